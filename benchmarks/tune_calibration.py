"""Calibration sources and method knobs measured out of domain, many settings in one process (issue 20's tuning).

One model load, one tokenization per text, then for each setting: quantize a fresh copy, measure perplexity on
the evaluation texts (WikiText-2 validation whole, pycode and pydoc windows). A line of JSON per setting goes to
OUT/results.jsonl as soon as it is measured, so a run cut short keeps what it measured.

    python benchmarks/tune_calibration.py --model smol.gguf --wikitext DIR --settings settings.json --out OUT \
        [--self NAME=samples.pt ...]

A setting: {"method": "gptq", "bits": 4, "group_size": 64, "calib": {"self": 1, "pydoc": 1}, "n_samples": 64,
"options": {"percdamp": 0.1}}. `calib` names sources as `calib.corpus` does; `self` sources come from the
sample files given with --self (e.g. `self@0.7=...`), or are generated here and saved to OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import quantizers
from harness import calibration, data, models
from harness.metrics.perplexity import perplexity

EVAL = {"wikitext2:valid": None, "pycode": 32, "pydoc": 16}


def eval_sets(tokenizer, wikitext: str, cap: int | None) -> dict[str, torch.Tensor]:
    sets = {}
    for name, windows in EVAL.items():
        windows = min(w for w in (windows, cap, 10**9) if w is not None)
        corpus = data.load_corpus(name, {"wikitext2": wikitext}, part="eval")
        ids = data.tokenize(tokenizer, corpus, "eval", bos="auto").ids
        sets[name] = data.eval_windows(ids, 2048, windows)
    return sets


def calib_set(source_weights: dict[str, float], n: int, tokenizer, self_samples: dict, seed: int = 0):
    parts = []
    for i, (source, count) in enumerate(calibration.shares(source_weights, n).items()):
        if count == 0:
            continue
        if source.startswith("self"):
            pool = self_samples[source]
            parts.append(pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + i))[:count]])
        else:
            text = data.tokenize(tokenizer, data.load_corpus(source, part="calib"), "calib")
            parts.append(data.calibration_samples(text.ids, count, 2048, seed + 1000 * i))
    return torch.cat(parts)


def skipping_first_positions(k: int):
    """An experimental knob, patched in: the Hessian leaves out each sample's first k positions (the attention
    sink, whose activations are orders of magnitude larger than the rest)."""
    from quantizers import gptq

    original = gptq.Hessian.add_batch

    def add_batch(self, x):
        return original(self, x[..., k:, :] if k and x.dim() == 3 else x)

    gptq.Hessian.add_batch = add_batch
    return lambda: setattr(gptq.Hessian, "add_batch", original)


def measure(model, sets) -> dict[str, float]:
    return {name: perplexity(model, windows).ppl for name, windows in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--wikitext", required=True)
    ap.add_argument("--settings", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-windows", type=int, default=None, help="at most this many windows per text (a smoke)")
    ap.add_argument("--self", nargs="*", default=[], help="NAME=path of (n, seqlen) sampled ids")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    loaded = models.load_model({"name": args.model, "source": "auto"}, dtype, "cpu")
    pristine, tokenizer = loaded.model, loaded.tokenizer
    sets = eval_sets(tokenizer, args.wikitext, args.max_windows)
    self_samples = {k: torch.load(v) for k, v in (s.split("=", 1) for s in args.self)}
    settings = json.loads(Path(args.settings).read_text())
    results = out / "results.jsonl"
    for setting in settings:
        start = time.time()
        model = copy.deepcopy(pristine).to(device)
        spec = setting.get("method", "fp16")
        if spec != "fp16":
            calib = None
            if quantizers.QUANTIZERS[spec].needs_calibration:
                sources = calibration.sources(setting.get("calib", "self"))
                for s in sources:
                    if s.startswith("self") and s not in self_samples:
                        temperature = float(s.partition("@")[2] or 1.0)
                        self_samples[s] = calibration.generate(model, tokenizer, 64, 2048, 0, temperature=temperature)
                        torch.save(self_samples[s], out / f"{s}.pt")
                calib = calib_set(sources, setting.get("n_samples", 64), tokenizer, self_samples)
            qspec = quantizers.QuantSpec(spec, setting["bits"], setting["group_size"],
                                         options=setting.get("options", {}))
            restore = skipping_first_positions(setting.get("hessian_skip", 0))
            try:
                quantizers.quantize(model, qspec, calib)
            finally:
                restore()
        quantized_s = time.time() - start
        with quantizers.dequantized_once(model, dtype):
            ppl = measure(model, sets)
        row = {**setting, "ppl": ppl, "quantize_s": round(quantized_s, 1), "total_s": round(time.time() - start, 1)}
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        del model
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
