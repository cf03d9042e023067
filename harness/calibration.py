"""Calibration samples for the methods that calibrate: from a text corpus, from the model itself, or a mixture.

`calib.corpus` names one source or weights several: `pydoc`, `pycode`, `wikitext2` (its train split), `c4`,
a local text file, `self` (text sampled from the unquantized model), or `{self: 1, pydoc: 1}`. Samples are
kept under `<out_dir>/calib/`, keyed by the model, the source and every setting that shapes them, so a sweep
builds them once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import data
from .errors import UserError
from .results import code_version

log = logging.getLogger(__name__)

SELF = "self"


def sources(corpus: Any) -> dict[str, float]:
    """`calib.corpus` as {source: weight}: one name, or a mapping of names to positive weights."""
    if isinstance(corpus, str):
        return {corpus: 1.0}
    if isinstance(corpus, dict) and corpus and all(isinstance(w, (int, float)) and w > 0 for w in corpus.values()):
        return {str(k): float(w) for k, w in corpus.items()}
    raise UserError(f"calib.corpus={corpus!r} must name a source (pydoc, pycode, wikitext2, c4, self or a text file) "
                    "or weight several, e.g. calib.corpus={self: 1, pydoc: 1}")


def check(calib: dict[str, Any]) -> None:
    """Every calibration setting the user can get wrong, before any work."""
    for source in sources(calib.get("corpus")):
        named = source in (SELF, *data.CORPORA) or source.startswith("wikitext2:")
        if not (named or Path(source).expanduser().is_file()):
            raise UserError(f"calib.corpus: unknown source {source!r}: use {', '.join((*data.CORPORA, SELF))}, a text "
                            "file, or a mapping of them to weights")
    for key, low in (("n_samples", 1), ("seqlen", 2)):
        value = calib.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"calib.{key}={value!r} must be an integer of at least {low}")
    settings = calib.get("self") or {}
    unknown = set(settings) - {"temperature", "greedy_tokens", "batch_size"}
    if unknown:
        raise UserError(f"calib.self: unknown settings {sorted(unknown)}: temperature, greedy_tokens, batch_size")


def in_domain(calib_corpus: Any, eval_corpora: list[str], tasks: list[str]) -> list[str]:
    """The evaluations a calibration source also feeds: the same corpus (another half of it, or the same file),
    and the offline qb_* tasks, which are generated from pydoc's text."""
    calibrated = set(sources(calib_corpus))
    same = [c for c in eval_corpora if c in calibrated or c.partition(":")[0] in calibrated]
    if "pydoc" in calibrated:
        same += [t for t in tasks if t.startswith("qb_")]
    return same


def shares(weights: dict[str, float], n_samples: int) -> dict[str, int]:
    """Samples per source, proportional to the weights (largest remainders), summing to n_samples."""
    total = sum(weights.values())
    exact = {s: n_samples * w / total for s, w in weights.items()}
    counts = {s: math.floor(x) for s, x in exact.items()}
    for s in sorted(exact, key=lambda s: counts[s] - exact[s])[: n_samples - sum(counts.values())]:
        counts[s] += 1
    return counts


def calibration_set(model: nn.Module, tokenizer, calib: dict[str, Any], seed: int, cache: Path,
                    load_text, model_key: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """(n_samples, seqlen) token ids and what the record says about them. `load_text(name)` gives a text
    source's calibration text; `model_key` identifies the model that generates `self` samples."""
    n, seqlen = int(calib["n_samples"]), int(calib["seqlen"])
    parts, about = [], {}
    for i, (source, count) in enumerate(shares(sources(calib["corpus"]), n).items()):
        if count == 0:
            continue
        source_seed = seed + 1000 * i  # each source its own draws, stable when another source is added
        if source == SELF:
            settings = dict(calib.get("self") or {})
            key = {"model": model_key, "source": SELF, "n": count, "seqlen": seqlen, "seed": source_seed,
                   "code": code_version(), **settings}
            samples = _cached(cache, key, lambda c=count, s=source_seed, g=settings: generate(model, tokenizer, c,
                                                                                               seqlen, s, **g))
            about[source] = {"samples": count, "tokens": samples.numel(), "seed": source_seed, "generation": settings,
                             "sha256": _tensor_sha256(samples)}
        else:
            text = data.tokenize(tokenizer, load_text(source), "calib")
            samples = data.calibration_samples(text.ids, count, seqlen, source_seed)
            about[source] = {"samples": count, "tokens": text.n_tokens, "seed": source_seed, "sha256": text.sha256}
        parts.append(samples)
    return torch.cat(parts), {"corpus": calib["corpus"], "n_samples": n, "seqlen": seqlen, "sources": about}


def _cached(cache: Path, key: dict[str, Any], build) -> Tensor:
    path = cache / f"{hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # a damaged file raises whatever its bytes lead the unpickler to
            log.warning("calibration cache %s is unreadable (%s: %s): building it again", path, type(e).__name__, e)
    samples = build()
    from .results import write_atomic

    write_atomic(path, lambda f: torch.save(samples, f), binary=True)
    return samples


def _tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


@torch.no_grad()
def generate(model: nn.Module, tokenizer, n: int, seqlen: int, seed: int, temperature: float = 1.0,
             greedy_tokens: int = 3, batch_size: int = 64) -> Tensor:
    """(n, seqlen) token ids sampled from the model itself, as data-free calibration (LLM-QAT's recipe): each
    sequence starts from a token drawn uniformly from the vocabulary, continues with `greedy_tokens` most-likely
    tokens (a random first token alone leads nowhere), then samples from the model's distribution at
    `temperature`. Seeded: the same seed gives the same samples on the same device and dtype."""
    device = next(model.parameters()).device
    vocab = _ordinary_tokens(tokenizer, model.config.vocab_size)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sampler = torch.Generator(device=device).manual_seed(seed)
    out = []
    steps = tqdm(total=-(-n // batch_size) * (seqlen - 1), desc="calibration: sampling from the model", unit="tok",
                 unit_scale=min(batch_size, n), leave=False)
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        ids = vocab[torch.randint(len(vocab), (rows, 1), generator=gen)].to(device)
        past, step_input = None, ids
        for t in range(1, seqlen):
            result = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past, logits = result.past_key_values, result.logits[:, -1].float()
            if t <= greedy_tokens:
                token = logits.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=sampler)
            ids = torch.cat([ids, token], dim=1)
            step_input = token
            steps.update()
        out.append(ids.cpu())
    steps.close()
    return torch.cat(out)


def _ordinary_tokens(tokenizer, vocab_size: int) -> Tensor:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return torch.tensor([i for i in range(vocab_size) if i not in special])
