"""Calibration sources: text corpora, the model's own samples, mixtures; cached; recorded; in-domain marked."""

import pytest
import torch

from harness import calibration, data
from harness.errors import UserError


def test_mixture_shares_follow_the_weights_and_sum_to_the_sample_count():
    assert calibration.shares({"self": 2.0, "pydoc": 1.0}, 64) == {"self": 43, "pydoc": 21}
    assert sum(calibration.shares({"a": 1.0, "b": 1.0, "c": 1.0}, 16).values()) == 16
    assert calibration.sources("pycode") == {"pycode": 1.0}
    with pytest.raises(UserError, match="must name a source"):
        calibration.sources({"pydoc": -1})


def test_self_samples_are_seeded_start_anywhere_and_follow_the_model_greedily_then_by_sampling(tiny):
    model, tokenizer = tiny
    a = calibration.generate(model, tokenizer, 5, 24, seed=0, greedy_tokens=3, batch_size=2)
    assert a.shape == (5, 24) and torch.equal(a, calibration.generate(model, tokenizer, 5, 24, seed=0, greedy_tokens=3,
                                                                       batch_size=2))
    assert not torch.equal(a, calibration.generate(model, tokenizer, 5, 24, seed=1, greedy_tokens=3, batch_size=2))
    assert len(set(a[:, 0].tolist())) > 1  # random first tokens
    with torch.no_grad():
        logits = model(a).logits
    greedy = logits[:, :3].argmax(-1)
    assert torch.equal(a[:, 1:4], greedy)  # the first tokens after the start are the model's most likely
    sampled_is_argmax = (a[:, 4:] == logits[:, 3:-1].argmax(-1)).float().mean()
    assert sampled_is_argmax < 0.9  # then it samples


def test_calibration_set_mixes_sources_caches_generation_and_records_provenance(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    calib = {"corpus": {"self": 1, "pydoc": 1}, "n_samples": 4, "seqlen": 32, "self": {"batch_size": 4}}
    load = lambda name: data.load_corpus(name, part="calib")  # noqa: E731
    samples, about = calibration.calibration_set(model, tokenizer, calib, 0, tmp_path, load, {"model": "tiny"})
    assert samples.shape == (4, 32) and set(about["sources"]) == {"self", "pydoc"}
    assert about["sources"]["self"]["generation"] == {"batch_size": 4} and about["sources"]["pydoc"]["tokens"] > 1000
    monkeypatch.setattr(calibration, "generate", lambda *a, **k: pytest.fail("generated again despite the cache"))
    again, _ = calibration.calibration_set(model, tokenizer, calib, 0, tmp_path, load, {"model": "tiny"})
    assert torch.equal(samples, again)


def test_a_damaged_calibration_cache_is_named_and_built_again(tiny, tmp_path, caplog):
    model, tokenizer = tiny
    calib = {"corpus": "self", "n_samples": 2, "seqlen": 16, "self": {"batch_size": 2}}
    load = lambda name: data.load_corpus(name, part="calib")  # noqa: E731
    samples, _ = calibration.calibration_set(model, tokenizer, calib, 0, tmp_path, load, {"model": "tiny"})
    [cached] = tmp_path.glob("*.pt")
    for damage in (b"\x80\x02garbage", cached.read_bytes()[:40]):  # unpickler garbage; a file cut short
        cached.write_bytes(damage)
        again, _ = calibration.calibration_set(model, tokenizer, calib, 0, tmp_path, load, {"model": "tiny"})
        assert torch.equal(samples, again) and f"calibration cache {cached} is unreadable" in caplog.text
        assert torch.equal(torch.load(cached), samples)  # rebuilt in place


@pytest.mark.parametrize("calib, message", [
    ({"corpus": "nope", "n_samples": 4, "seqlen": 8}, "unknown source 'nope'"),
    ({"corpus": "pydoc", "n_samples": 0, "seqlen": 8}, "calib.n_samples=0"),
    ({"corpus": "pydoc", "n_samples": 4, "seqlen": True}, "calib.seqlen=True"),
    ({"corpus": "self", "n_samples": 4, "seqlen": 8, "self": {"temp": 1}}, "unknown settings"),
])
def test_bad_calibration_settings_are_refused_before_work(calib, message):
    with pytest.raises(UserError, match=message):
        calibration.check(calib)


def test_evaluations_of_the_calibration_text_are_in_domain():
    assert calibration.in_domain("pydoc", ["pydoc", "pycode"], ["qb_arithmetic", "arc_easy"]) == ["pydoc",
                                                                                                  "qb_arithmetic"]
    assert calibration.in_domain("wikitext2", ["wikitext2:valid"], []) == ["wikitext2:valid"]
    assert calibration.in_domain("self", ["pydoc", "wikitext2"], ["qb_arithmetic"]) == []


def test_a_point_evaluated_on_its_calibration_text_is_marked_in_domain(tmp_path):
    import json

    from conftest import run_cli

    proc = run_cli("sweep", "model=tiny-llama", "eval=quick", "quant=fp16,gptq", "quant.bits=4", "quant.group_size=32",
                   "calib.corpus=pydoc", "calib.n_samples=4", "calib.seqlen=64", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    gptq = next(json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*gptq*.json"))
    assert gptq["in_domain"] == ["pydoc", "qb_arithmetic"] and gptq["data"]["calib"]["sources"]["pydoc"]["samples"] == 4
    report = (tmp_path / "report.md").read_text()
    assert "(in-domain)" in report and "In-domain: gptq 4-bit g32 were calibrated on the text" in report
    assert "Calibration: 4 samples of 64 tokens: `pydoc` 4 samples" in report
