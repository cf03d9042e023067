"""Adaptive evaluation: its false-stop rate by simulation, its power, and a sweep that stops a point."""

import json
import math

import numpy as np
import pytest
from conftest import run_cli

from harness.adaptive import decided_fail

POLICY = {"max_ppl_increase_pct": 5.0, "max_kl": 0.1, "corpora": None}
CONFIDENCE = 0.995
SPREAD = 0.03  # per-window NLL difference spread of a 4-bit point of the default model, about


def at_the_bar(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-window NLL differences whose true mean is exactly the perplexity bar."""
    noise = {
        "normal": lambda: rng.normal(0, SPREAD, n),
        "heavy tails": lambda: rng.standard_t(3, n) * SPREAD,
        "right-skewed": lambda: (rng.gamma(0.5, 1, n) - 0.5) * 2 * SPREAD,  # a few windows much worse
    }[kind]()
    return math.log1p(POLICY["max_ppl_increase_pct"] / 100) + noise


def stop_rate(make_point, sims: int, n: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    base = rng.normal(2.5, 0.3, n)
    stops = 0
    for _ in range(sims):
        nll, kl = make_point(rng, n)
        stops += decided_fail({"c": base.tolist()}, {"c": (base + nll).tolist()}, {"c": kl.tolist()}, POLICY,
                              CONFIDENCE) is not None
    return stops / sims


@pytest.mark.parametrize("n", [4, 8, 16])
@pytest.mark.parametrize("kind", ["normal", "heavy tails", "right-skewed"])
def test_a_point_at_the_perplexity_bar_is_stopped_at_most_as_often_as_the_confidence_allows(kind, n):
    sims = 20000
    rate = stop_rate(lambda rng, n: (at_the_bar(kind, rng, n), np.zeros(n)), sims, n)
    allowed = 1 - CONFIDENCE
    assert rate <= allowed + 3 * math.sqrt(allowed * (1 - allowed) / sims), rate


@pytest.mark.parametrize("n", [4, 8])
def test_a_point_at_the_kl_bar_is_stopped_at_most_as_often_as_the_confidence_allows(n):
    sims = 20000
    # per-window KL: positive, right-skewed (lognormal), mean exactly the bar
    rate = stop_rate(lambda rng, n: (np.zeros(n), POLICY["max_kl"] * rng.lognormal(0, 1, n) / math.exp(0.5)),
                     sims, n)
    allowed = 1 - CONFIDENCE
    assert rate <= allowed + 3 * math.sqrt(allowed * (1 - allowed) / sims), rate


def test_a_point_well_beyond_the_bar_is_stopped_and_one_within_it_is_not():
    beyond = stop_rate(lambda rng, n: (math.log(1.15) + rng.normal(0, SPREAD, n), np.zeros(n)), 2000, 8)
    within = stop_rate(lambda rng, n: (math.log(1.01) + rng.normal(0, SPREAD, n), np.zeros(n)), 2000, 8)
    assert beyond > 0.95 and within == 0


def test_policy_maps_and_nulls_are_honoured():
    base, worse = {"c": [2.0] * 4}, {"c": [2.5, 2.6, 2.5, 2.55]}
    assert "ppl/c" in decided_fail(base, worse, {}, POLICY, CONFIDENCE)
    assert decided_fail(base, worse, {}, {**POLICY, "max_ppl_increase_pct": None}, CONFIDENCE) is None
    assert decided_fail(base, worse, {}, {**POLICY, "max_ppl_increase_pct": {"other": 1.0}}, CONFIDENCE) is None
    assert decided_fail(base, worse, {}, {**POLICY, "corpora": ["other"]}, CONFIDENCE) is None


def test_a_sweep_skips_the_tasks_of_a_point_already_beyond_its_bar_and_says_so(tmp_path):
    proc = run_cli("sweep", "model=tiny-llama", "eval=quick", "quant=fp16,rtn", "quant.bits=3", "eval.max_windows=8",
                   "select.max_ppl_increase_pct=null", "select.max_kl=0.00001", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {(r["quant"]["method"], r["quant"]["group_size"]): r
               for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json"))}
    stopped = records["rtn", 64]
    assert stopped["stopped_early"].startswith("kl/pydoc ≥")
    assert not any(k.startswith("task/") for k in stopped["per_sample"]) and "tasks" not in stopped["phases_s"]
    base = records["fp16", None]
    assert base["stopped_early"] is None and "task/qb_arithmetic/acc" in base["per_sample"]
    report = (tmp_path / "report.md").read_text()
    assert "8 · 0 (stopped early)" in report and "tasks not run: beyond the bar after its windows (kl/pydoc" in report
    # asked for whole, the same point is completed in place: one record per point, tasks measured
    again = run_cli("sweep", "model=tiny-llama", "eval=quick", "quant=fp16,rtn", "quant.bits=3", "eval.max_windows=8",
                    "eval.adaptive=false", "select.max_ppl_increase_pct=null", "select.max_kl=0.00001",
                    f"out_dir={tmp_path}")
    assert again.returncode == 0, again.stderr[-3000:]
    completed = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(completed) == 4  # the baseline and the grid's three 3-bit group sizes, each once
    assert all(r["stopped_early"] is None and "task/qb_arithmetic/acc" in r["per_sample"] for r in completed)
