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
WIKITEXT2_SPLITS = {"test": "wiki.test.raw", "valid": "wiki.valid.raw", "train": "wiki.train.raw"}


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
    bos: bool = False  # one BOS token before the text

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    def describe(self) -> dict:
        return {"part": self.part, "sha256": self.sha256, "tokens": self.n_tokens, "bos": self.bos}


def _in_calibration_part(key: str) -> bool:
    # Stable across Python versions and runs, unlike hash(): about half of the documents.
    return hashlib.sha256(key.encode()).digest()[0] % 2 == 0


def split_documents(docs: dict[str, str]) -> tuple[str, str]:
    """Disjoint (eval, calib) texts: each document goes wholly to one part, by its key's hash."""
    names = sorted(docs)
    evaluation = [docs[n] for n in names if not _in_calibration_part(n)]
    calibration = [docs[n] for n in names if _in_calibration_part(n)]
    return "\n\n".join(evaluation), "\n\n".join(calibration)


def load_corpus(name: str, data_dirs: dict[str, str | None] | None = None, shared: bool = False,
                part: str | None = None) -> CorpusText:
    """A corpus's evaluation and calibration texts. Built-in corpora that serve both are split into disjoint
    halves; WikiText-2 is its released splits (`wikitext2` evaluates test, `wikitext2:valid` validation, and
    calibrates on train); a local file is evaluated whole, in order, as it is on disk, unless it is `shared`
    with calibration: then its paragraphs are split into disjoint halves like a built-in corpus's. `part`
    (eval | calib): only that part is needed, so a corpus of separate files reads only that one."""
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
    if name == "wikitext2" or name.startswith("wikitext2:"):
        split = name.partition(":")[2] or "test"
        if split not in WIKITEXT2_SPLITS:
            raise UserError(f"unknown WikiText-2 split in {name!r}: use wikitext2 (test), wikitext2:valid or "
                            "wikitext2:train")
        folder = (data_dirs or {}).get("wikitext2")
        return CorpusText(name, wikitext2_text(split, folder) if part != "calib" else "",
                          wikitext2_text("train", folder) if part != "eval" else "")
    if name == "c4":
        shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        docs = _hf_dataset("allenai/c4", None, "validation", data_files=shard)["text"]
        return CorpusText(name, *split_documents({f"{i:08d}": d for i, d in enumerate(docs)}))
    path = Path(name).expanduser()
    if path.is_file():
        text = read_text_file(path)
        if shared:
            paragraphs = [p for p in text.split("\n\n") if p.strip()]
            return CorpusText(name, *split_documents({f"{i:08d}": p for i, p in enumerate(paragraphs)}))
        return CorpusText(name, text, text)
    raise UserError(
        f"unknown corpus {name!r}: use one of {', '.join(CORPORA)} or the path of an existing text file"
    )


def check_corpus_name(name: str, key: str) -> None:
    """A corpus name this module can load (without loading it): a known corpus, a WikiText-2 split, or a file."""
    if name in CORPORA or Path(name).expanduser().is_file():
        return
    if name.startswith("wikitext2:"):
        if name.partition(":")[2] in WIKITEXT2_SPLITS:
            return
        raise UserError(f"{key}: unknown WikiText-2 split in {name!r}: use wikitext2 (test), wikitext2:valid or "
                        "wikitext2:train")
    raise UserError(f"{key}: unknown corpus {name!r}: use one of {', '.join(CORPORA)}, wikitext2:valid, or the path "
                    "of an existing text file")


def read_text_file(path: Path) -> str:
    """A local text file exactly as it is; a binary file is refused rather than read as text."""
    raw = path.read_bytes()
    if b"\0" in raw[:65536]:
        raise UserError(f"{path} looks like a binary file, not text: name a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): convert it, e.g. with iconv") from None


def wikitext2_text(split: str, folder: str | None) -> str:
    """WikiText-2 (raw) as the GPTQ protocol reads it: `wiki.<split>.raw` as released from a local folder, else
    the Hugging Face rows joined with blank lines, as the GPTQ reference code joins them (another text: the
    record's hash tells them apart)."""
    if folder:
        path = Path(folder).expanduser() / WIKITEXT2_SPLITS[split]
        if not path.is_file():
            raise UserError(f"data_dirs.wikitext2={folder}: no {WIKITEXT2_SPLITS[split]} there (the folder of "
                            "wikitext-2-raw-v1.zip holds wiki.test.raw, wiki.valid.raw and wiki.train.raw)")
        return read_text_file(path)
    hf_split = {"valid": "validation"}.get(split, split)
    return "\n\n".join(_hf_dataset("wikitext", "wikitext-2-raw-v1", hf_split)["text"])


def _hf_dataset(path: str, config: str | None, split: str, **kwargs):
    try:
        import datasets

        return datasets.load_dataset(path, config, split=split, **kwargs)
    except Exception as e:  # datasets raises many types when offline or the id is wrong
        raise UserError(
            f"could not load {path} ({split}) through `datasets`: {type(e).__name__}: {str(e).splitlines()[0]}. "
            "It needs network or the Hugging Face cache (HF_DATASETS_OFFLINE=1 reads the cache only); offline, "
            "use eval.corpora=[pydoc], a local text file, or data_dirs.wikitext2=<folder of wiki.*.raw>"
        ) from None


def tokenize(tokenizer, corpus: CorpusText, part: str, bos: str = "none") -> TokenizedText:
    """The text's ids, tokenized once as a whole. `bos`: `none`; `text`: one BOS token before the text;
    `auto`: one where the tokenizer adds one by default (the GPTQ reference tokenizes the whole text so)."""
    text = corpus.eval_text if part == "eval" else corpus.calib_text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    add_bos = bos == "text" or (bos == "auto" and adds_bos(tokenizer))
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise UserError("eval.bos=text, but the tokenizer has no BOS token: use eval.bos=none")
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    return TokenizedText(corpus.name, part, ids, hashlib.sha256(text.encode()).hexdigest(), add_bos)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token first when asked for its special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


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
