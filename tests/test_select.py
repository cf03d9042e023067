"""The verdict on synthetic records with known answers, and the bootstrap's coverage on simulated data."""

import re

import numpy as np
import pytest

from harness.errors import UserError
from harness.select import select

POLICY = {"baseline": "fp16", "max_ppl_increase_pct": 5.0, "max_kl": 0.1, "max_task_drop": 0.05,
          "max_mean_task_drop": 0.03, "task_metric": "acc_norm", "corpora": None, "tasks": None,
          "confidence": 0.95, "bootstrap_samples": 1000, "seed": 0, "objective": "weight_bytes"}
WINDOWS, ITEMS = 32, 400
rng = np.random.default_rng(1)
BASE_NLL = rng.normal(2.3, 0.2, WINDOWS)
BASE_ITEMS = (rng.random(ITEMS) < 0.7).astype(float)


def record(run_id, method="rtn", bits=4, nbytes=100, nll_shift=0.0, nll_noise=0.002, kl=0.01, flip=0.0, seed=0,
           speed=100.0):
    """A point whose windows' NLL is the baseline's + shift (+ noise), and which gets `flip` of the baseline's
    correct items wrong."""
    r = np.random.default_rng(seed)
    noise = r.normal(0, nll_noise, WINDOWS)
    nll = BASE_NLL + nll_shift + noise - noise.mean()  # the estimate is exactly the shift
    items = BASE_ITEMS.copy()
    items[np.flatnonzero(items)[: int(flip * ITEMS)]] = 0.0
    bits_per_weight = 16.0 if bits is None else bits + 0.2
    return {"run_id": run_id, "status": "ok",
            "quant": {"method": method, "bits": bits, "group_size": 128, "sym": False},
            "metrics": {"weight_bytes": nbytes, "bits_per_weight": bits_per_weight, "decode_tok_s": speed},
            "per_sample": {"nll/pydoc": nll.tolist(), "kl/pydoc": [kl] * WINDOWS,
                           "task/qa/acc": items.tolist(), "task/qa/acc_norm": items.tolist()}}


def baseline():
    base = record("base", method="fp16", bits=None, nbytes=1000, nll_noise=0.0, kl=0.0)
    del base["per_sample"]["kl/pydoc"]
    return base


def point(selection, run_id):
    return next(p for p in selection["points"] if p["run_id"] == run_id)


def test_clear_winner_is_the_smallest_passing_point():
    records = [baseline(), record("w8", bits=8, nbytes=500, nll_shift=0.001),
               record("w4", bits=4, nbytes=250, nll_shift=0.02, flip=0.01),
               record("w3", bits=3, nbytes=190, nll_shift=0.3, kl=0.5, flip=0.2)]
    s = select(records, POLICY)
    assert s["chosen"] == "w4" and "rtn 4-bit g128" in s["verdict"]
    assert point(s, "w8")["passed"] and not point(s, "w3")["passed"]
    reasons = " ".join(point(s, "w3")["reasons"])
    assert "ppl/pydoc" in reasons and "kl/pydoc" in reasons and "task/qa" in reasons and "task/mean" in reasons


def test_a_point_within_the_bar_on_the_mean_but_not_on_the_bound_fails():
    # +4% perplexity on average (bar 5%), but windows so noisy that the 95% bound is well above 5%
    noisy = record("noisy", nll_shift=np.log(1.04), nll_noise=0.1, nbytes=250)
    steady = record("steady", bits=8, nll_shift=np.log(1.04), nll_noise=0.002, nbytes=500)
    s = select([baseline(), noisy, steady], POLICY)
    check = next(c for c in point(s, "noisy")["checks"] if c["name"] == "ppl/pydoc")
    assert check["estimate"] < 5.0 < check["upper"] and not check["passed"]
    assert s["chosen"] == "steady"


def test_ties_on_bytes_go_to_the_better_point_beyond_noise_else_to_speed():
    better = record("gptq", method="gptq", nll_shift=0.01, seed=1, speed=90.0)
    worse = record("rtn", method="rtn", nll_shift=0.04, seed=2, speed=120.0)
    s = select([baseline(), better, worse], POLICY)
    assert s["chosen"] == "gptq" and "worse beyond noise: rtn" in s["tie_break"]
    # indistinguishable in quality (same shift, noise larger than any difference): the faster one
    a = record("a", method="gptq", nll_shift=0.02, nll_noise=0.05, seed=3, speed=90.0)
    b = record("b", method="awq", nll_shift=0.02, nll_noise=0.05, seed=4, speed=120.0)
    s = select([baseline(), a, b], POLICY)
    assert s["chosen"] == "b" and "chosen on decode speed" in s["tie_break"]


def test_nothing_passes_names_the_closest_point():
    records = [baseline(), record("w4", nll_shift=0.07, kl=0.15), record("w3", bits=3, nbytes=190, nll_shift=0.5,
                                                                           kl=0.9)]
    s = select(records, POLICY)
    assert s["chosen"] is None and s["closest"] == "w4"
    assert s["verdict"].startswith("No quantized point passes") and "Closest: rtn 4-bit g128" in s["verdict"]


def test_a_sweep_with_only_its_baseline_says_to_add_points():
    s = select([baseline()], POLICY)
    assert s["chosen"] is None and "only its baseline" in s["verdict"]


def test_better_than_baseline_only_beyond_noise():
    lucky = record("lucky", nll_shift=-0.003, nll_noise=0.05, seed=5)  # lower estimate, within noise
    real = record("real", bits=8, nbytes=500, nll_shift=-0.02, nll_noise=0.002)
    s = select([baseline(), lucky, real], POLICY)
    ppl = {p["run_id"]: next(c for c in p["checks"] if c["name"] == "ppl/pydoc") for p in s["points"]}
    assert ppl["lucky"]["estimate"] < 0 and not ppl["lucky"]["better"]
    assert ppl["real"]["better"]


def test_points_of_another_model_or_text_are_not_paired_with_the_baseline():
    other_model, other_text = record("m", nbytes=250), record("t", nbytes=250)
    other_model["model"] = {"name": "another-model"}
    other_text["data"] = {"eval": {"pydoc": {"sha256": "different", "seqlen": 2048, "windows": WINDOWS}}}
    s = select([baseline(), other_model, other_text, record("w8", bits=8, nbytes=500)], POLICY)
    assert s["chosen"] == "w8"
    assert "not the baseline's" in point(s, "m")["reasons"][0]
    assert "ppl/pydoc: not paired: other text than the baseline's" in point(s, "t")["reasons"][0]


def test_another_config_of_a_model_another_kl_topk_or_a_missing_task_sample_is_not_paired():
    def configured(r, model_config=None, kl_topk=64):
        r["config"] = {"model": {"name": "tiny-llama", "source": "tiny", "config": model_config or {}},
                       "eval": {"kl_topk": kl_topk}}
        return r

    no_task = configured(record("no_task", nbytes=240))
    del no_task["per_sample"]["task/qa/acc"], no_task["per_sample"]["task/qa/acc_norm"]
    records = [configured(baseline()), configured(record("wider", nbytes=200), {"hidden_size": 128}),
               configured(record("topk", nbytes=220), kl_topk=16), no_task,
               configured(record("w8", bits=8, nbytes=500))]
    s = select(records, POLICY)
    assert s["chosen"] == "w8"
    assert "its settings" in point(s, "wider")["reasons"][0] and "hidden_size" in point(s, "wider")["reasons"][0]
    assert "kl/pydoc: not paired: kl_topk 16 ≠ baseline's 64" in point(s, "topk")["reasons"]
    assert any(r.startswith("task/qa") for r in point(s, "no_task")["reasons"]) and not point(s, "no_task")["passed"]


def test_task_items_of_another_file_version_or_shots_are_not_paired_with_the_baseline():
    def with_items(r, sha, version=1.0, shots=0):
        r["data"] = {"tasks": {"qa": {"items_sha256": sha, "version": version, "n_shot": shots}}}
        return r

    records = [with_items(baseline(), "aaa"), with_items(record("other", nbytes=250), "bbb"),
               with_items(record("shots", nbytes=260), "aaa", shots=5),
               with_items(record("w8", bits=8, nbytes=500), "aaa")]
    s = select(records, POLICY)
    assert s["chosen"] == "w8"
    assert "task/qa: not paired: other items than the baseline's" in point(s, "other")["reasons"]
    assert "task/qa: not paired: n_shot 5 ≠ baseline's 0" in point(s, "shots")["reasons"]


def test_policy_thresholds_per_name_and_objectives():
    records = [baseline(), record("w8", bits=8, nbytes=500, speed=150.0),
               record("w4", nbytes=250, flip=0.01, speed=120.0)]
    assert select(records, POLICY)["chosen"] == "w4"
    assert select(records, {**POLICY, "max_task_drop": {"qa": 0.01}})["chosen"] == "w8"
    assert select(records, {**POLICY, "objective": "decode_tok_s"})["chosen"] == "w8"


@pytest.mark.parametrize("override, message", [
    ({"max_task_drop": {"hellaswag": 0.01}}, "it measured: qa"),
    ({"corpora": ["wikitext2"]}, "it measured: pydoc"),
    ({"task_metric": "f1"}, "acc, acc_norm"),
    ({"objective": "latency"}, "weight_bytes"),
    ({"baseline": "bf16"}, "quant=fp16"),
])
def test_a_policy_naming_what_the_sweep_did_not_measure_says_what_it_did(override, message):
    with pytest.raises(UserError, match=message):
        select([baseline(), record("w4")], {**POLICY, **override})


def test_points_without_a_measured_speed_cannot_win_on_speed_and_are_named():
    timed = record("w4", bits=4, nbytes=250, nll_shift=0.001, speed=150.0)
    untimed = record("w3", bits=3, nbytes=190, nll_shift=0.001, speed=None)
    s = select([baseline(), timed, untimed], {**POLICY, "objective": "decode_tok_s"})
    assert s["chosen"] == "w4" and "rtn 3-bit g128 also passed, but decode_tok_s was not measured" in s["verdict"]
    s = select([baseline(), untimed], {**POLICY, "objective": "decode_tok_s"})
    assert s["chosen"] is None and s["verdict"].startswith("No point can be chosen on decode_tok_s: rtn 3-bit g128")


def stopped(run_id, nll_shift):
    """A point whose tasks the sweep skipped (adaptive evaluation) under its own bar."""
    r = record(run_id, nll_shift=nll_shift, nll_noise=0.01, kl=0.01)
    r["per_sample"] = {k: v for k, v in r["per_sample"].items() if not k.startswith("task/")}
    r["stopped_early"] = "ppl/pydoc increase ≥ +20% at 99.5% > 5.0%"
    r["config"] = {"eval": {"adaptive_confidence": 0.995}}
    return r


def test_a_point_stopped_early_is_judged_again_under_the_policy_in_force():
    s = select([baseline(), stopped("far", np.log(1.3))], POLICY)
    assert any(r.startswith("tasks not run: beyond the bar after its windows (ppl/pydoc")
               for r in point(s, "far")["reasons"])
    loose = select([baseline(), stopped("far", np.log(1.3))], {**POLICY, "max_ppl_increase_pct": 50.0})
    [reason] = point(loose, "far")["reasons"]  # ppl and KL now pass: only the missing tasks fail it
    assert reason.startswith("tasks not measured: the sweep stopped this point") and "eval.adaptive=false" in reason
    assert not point(loose, "far")["passed"]


@pytest.mark.parametrize("override, message", [
    ({"max_kl": "abc"}, "select.max_kl='abc' must be nats per token"),
    ({"max_task_drop": float("nan")}, "select.max_task_drop=nan must be"),
    ({"max_kl": -0.1}, "select.max_kl=-0.1 must be nats per token, at least 0"),
    ({"max_ppl_increase_pct": {"pydoc": True}}, "select.max_ppl_increase_pct={'pydoc': True}"),
    ({"bootstrap_samples": 0}, "select.bootstrap_samples=0 must be a positive integer"),
    ({"confidence": 1.5}, "select.confidence=1.5 must be a number in [0.5, 1)"),
])
def test_a_bad_policy_is_refused_in_one_line(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        select([baseline(), record("w4", nbytes=250)], {**POLICY, **override})
