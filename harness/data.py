"""Corpora (evaluation and calibration parts), tokenization, windows and calibration samples."""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError

CORPORA = ("pydoc", "pycode", "wikitext2", "c4")  # or a path to a local text file


@dataclass(frozen=True)
class CorpusText:
    name: str
    eval_text: str
    calib_text: str


@dataclass(frozen=True)
class TokenizedText:
    """Token ids of one text, with what makes a number comparable: the text's hash and length."""

    corpus: str
    part: str  # eval | calib
    ids: Tensor  # 1-D int64
    sha256: str

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    def describe(self) -> dict:
        return {"part": self.part, "sha256": self.sha256, "tokens": self.n_tokens}


def _in_calibration_part(key: str) -> bool:
    # Stable across Python versions and runs, unlike hash(): about half of the documents.
    return hashlib.sha256(key.encode()).digest()[0] % 2 == 0


def split_documents(docs: dict[str, str]) -> tuple[str, str]:
    """Disjoint (eval, calib) texts: each document goes wholly to one part, by its key's hash."""
    names = sorted(docs)
    evaluation = [docs[n] for n in names if not _in_calibration_part(n)]
    calibration = [docs[n] for n in names if _in_calibration_part(n)]
    return "\n\n".join(evaluation), "\n\n".join(calibration)


def load_corpus(name: str) -> CorpusText:
    if name == "pydoc":
        # The text of CPython's help topics: ships with every Python, differs between versions.
        from pydoc_data.topics import topics

        return CorpusText(name, *split_documents(dict(topics)))
    if name == "pycode":
        # Another domain than pydoc's prose: the source of the standard library's top-level modules.
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        modules = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in stdlib.glob("*.py")}
        if not modules:
            raise UserError(f"no standard library sources under {stdlib}: this Python ships none; use another corpus")
        return CorpusText(name, *split_documents(modules))
    if name == "wikitext2":
        test = _hf_dataset("wikitext", "wikitext-2-raw-v1", "test")
        train = _hf_dataset("wikitext", "wikitext-2-raw-v1", "train")
        return CorpusText(name, "\n\n".join(test["text"]), "\n\n".join(train["text"]))
    if name == "c4":
        shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        docs = _hf_dataset("allenai/c4", None, "validation", data_files=shard)["text"]
        return CorpusText(name, *split_documents({f"{i:08d}": d for i, d in enumerate(docs)}))
    path = Path(name).expanduser()
    if path.is_file():
        paragraphs = [p for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
        return CorpusText(name, *split_documents({f"{i:08d}": p for i, p in enumerate(paragraphs)}))
    raise UserError(
        f"unknown corpus {name!r}: use one of {', '.join(CORPORA)} or the path of an existing text file"
    )


def _hf_dataset(path: str, config: str | None, split: str, **kwargs):
    try:
        import datasets

        return datasets.load_dataset(path, config, split=split, **kwargs)
    except Exception as e:  # datasets raises many types when offline or the id is wrong
        raise UserError(
            f"could not load {path} ({split}) through `datasets`: {type(e).__name__}: {str(e).splitlines()[0]}. "
            "It needs network; offline, use eval.corpora=[pydoc] or a local text file"
        ) from None


def tokenize(tokenizer, corpus: CorpusText, part: str) -> TokenizedText:
    text = corpus.eval_text if part == "eval" else corpus.calib_text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return TokenizedText(corpus.name, part, ids, hashlib.sha256(text.encode()).hexdigest())


def eval_windows(ids: Tensor, seqlen: int, max_windows: int | None) -> Tensor:
    """GPTQ protocol: non-overlapping windows of `seqlen`; at most `max_windows`, spread evenly over the text."""
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than eval.seqlen={seqlen}: lower it")
    windows = ids[: n * seqlen].reshape(n, seqlen)
    if max_windows is not None and max_windows < n:
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return windows


def calibration_samples(ids: Tensor, n_samples: int, seqlen: int, seed: int) -> Tensor:
    """(n_samples, seqlen) token windows starting at seeded random offsets of the calibration text."""
    if ids.numel() < seqlen + 1:
        raise UserError(
            f"the calibration text has {ids.numel()} tokens, fewer than one sample of calib.seqlen={seqlen}: "
            "lower calib.seqlen or use a larger calibration corpus"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
