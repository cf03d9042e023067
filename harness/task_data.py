"""lm-eval's own tasks over benchmark files the user has on disk, in their authors' layouts.

A file is converted to the schema the lm-eval task reads from the Hugging Face hub (its rows), and a task
YAML is written that `include`s lm-eval's own definition and replaces only where the data comes from: its
`process_docs`, prompt, few-shot settings and metrics run unchanged. `lm_eval --include_path <folder>`
runs the same task on the same rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .results import write_text_atomic

log = logging.getLogger(__name__)
Record = dict[str, Any]


@dataclass(frozen=True)
class Layout:
    """One way a benchmark's items are published: the fields that identify it, and the conversion of one
    item to the rows lm-eval's task reads. `labels`: the field that may come from a separate labels file
    (one label per line, aligned with the items), as PIQA and WinoGrande publish theirs."""

    name: str
    fields: tuple[str, ...]
    convert: Callable[[Record, int], Record]
    labels: str | None = None

    def matches(self, record: Record, has_labels_file: bool) -> bool:
        needed = [f for f in self.fields if not (has_labels_file and f == self.labels)]
        return all(_get(record, f) is not None for f in needed)

    def describe(self) -> str:
        extra = f"; {self.labels} may come from a labels file" if self.labels else ""
        return f"{self.name} ({', '.join(self.fields)}{extra})"


def _get(record: Record, dotted: str) -> Any:
    value: Any = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _arc_ai2(r: Record, i: int) -> Record:
    choices = r["question"]["choices"]
    return {"id": r.get("id", str(i)), "question": r["question"]["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}


def _arc_hf(r: Record, i: int) -> Record:
    choices = r["choices"]
    return {"id": r.get("id", str(i)), "question": r["question"], "answerKey": r["answerKey"],
            "choices": {"text": list(choices["text"]), "label": list(choices["label"])}}


def _piqa(r: Record, i: int) -> Record:
    return {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])}


def _hellaswag(r: Record, i: int) -> Record:
    # the hub's rows carry the label as a string; the authors' as an int: lm-eval reads int(label)
    return {**r, "label": str(int(r["label"])), "endings": list(r["endings"])}


def _winogrande(r: Record, i: int) -> Record:
    return {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
            "answer": str(int(r["answer"]))}


def _lambada(r: Record, i: int) -> Record:
    return {"text": r["text"]}


def _boolq_authors(r: Record, i: int) -> Record:
    answer = r["answer"]
    if isinstance(answer, str):
        answer = answer.strip().lower() in ("true", "1", "yes")
    return {"question": r["question"], "passage": r["passage"], "idx": i, "label": int(bool(answer))}


def _boolq_superglue(r: Record, i: int) -> Record:
    return {"question": r["question"], "passage": r["passage"], "idx": r.get("idx", i), "label": int(r["label"])}


def _mmlu_csv(r: Record, i: int) -> Record:
    question, *choices, answer = r["columns"]
    return {"question": question, "subject": r["subject"], "choices": choices, "answer": "ABCD".index(answer.strip())}


def _mmlu_hf(r: Record, i: int) -> Record:
    answer = r["answer"]
    answer = "ABCD".index(answer.strip()) if isinstance(answer, str) and not answer.strip().isdigit() else int(answer)
    return {"question": r["question"], "subject": r["subject"], "choices": list(r["choices"]), "answer": answer}


# Per benchmark family: the layouts its files come in (its authors' first), and the lm-eval tasks it feeds.
FAMILIES: dict[str, tuple[Layout, ...]] = {
    "arc": (Layout("AI2 ARC jsonl", ("question.stem", "question.choices", "answerKey"), _arc_ai2),
            Layout("HF ai2_arc", ("question", "choices.text", "choices.label", "answerKey"), _arc_hf)),
    "piqa": (Layout("PIQA jsonl + labels file", ("goal", "sol1", "sol2", "label"), _piqa, labels="label"),),
    "hellaswag": (Layout("HellaSwag jsonl (authors' or HF)", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                         _hellaswag),),
    "winogrande": (Layout("WinoGrande jsonl (+ labels file) or HF", ("sentence", "option1", "option2", "answer"),
                          _winogrande, labels="answer"),),
    "lambada": (Layout("LAMBADA OpenAI jsonl or HF", ("text",), _lambada),),
    "boolq": (Layout("BoolQ jsonl (authors' or HF google/boolq)", ("question", "passage", "answer"), _boolq_authors),
              Layout("HF super_glue boolq", ("question", "passage", "label"), _boolq_superglue)),
    "mmlu": (Layout("MMLU csv (question, A, B, C, D, answer letter; <subject>_test.csv)", ("columns", "subject"),
                    _mmlu_csv),
             Layout("HF cais/mmlu", ("question", "subject", "choices", "answer"), _mmlu_hf)),
}


KNOWN_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada_openai", "lambada_standard",
               "boolq", "mmlu", "mmlu_<subject>")


def evaluated_split(lm_eval_yaml: Path) -> str:
    """The split lm-eval scores: the task's test split if it has one, else its validation split."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(lm_eval_yaml, resolve_func=False)
    return config.get("test_split") or config.get("validation_split") or "test"


def check_known(task: str, in_lm_eval: bool = True) -> None:
    """Refuse a task whose benchmark files this module cannot convert (or that lm-eval does not define)."""
    if not in_lm_eval or family_of(task) is None:
        raise UserError(f"eval.task_data: {task!r} is not a task with a known file layout; known: "
                        f"{', '.join(KNOWN_TASKS)} (any other lm-eval task reads its data from the Hugging Face "
                        "cache through eval.tasks)")


def family_of(task: str) -> str | None:
    if task in ("arc_easy", "arc_challenge"):
        return "arc"
    if task in ("lambada_openai", "lambada_standard"):
        return "lambada"
    if task == "mmlu" or task.startswith("mmlu_"):
        return "mmlu"
    return task if task in FAMILIES else None


# ---------------------------------------------------------------- reading files


def read_records(path: Path) -> list[Record]:
    """Items of one file: JSON lines, a JSON list, CSV (with a header, or MMLU's headerless rows) or parquet."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable benchmark file ({type(e).__name__}: {str(e)[:120]})") from None


def _read_csv(path: Path) -> list[Record]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and "question" in rows[0]:
        header = rows[0]
        return [dict(zip(header, row, strict=False)) for row in rows[1:]]
    subject = path.stem.rsplit("_", 1)[0] if path.stem.rsplit("_", 1)[-1] in ("test", "dev", "val") else path.stem
    return [{"columns": row, "subject": subject} for row in rows if row]


def labels_file(path: Path) -> Path | None:
    """PIQA and WinoGrande keep labels beside the items: `<stem>-labels.lst` (or `_labels`)."""
    for name in (f"{path.stem}-labels.lst", f"{path.stem}_labels.lst", f"{path.stem}-labels.txt"):
        if (path.parent / name).is_file():
            return path.parent / name
    return None


def _with_labels(records: list[Record], field: str, path: Path) -> list[Record]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != len(records):
        raise UserError(f"{path} has {len(lines)} labels for {len(records)} items: they must be aligned line by line")
    return [{**r, field: label} for r, label in zip(records, lines, strict=True)]


def convert(task: str, path: Path) -> tuple[list[Record], str]:
    """The file's items as lm-eval's `task` reads them, and the name of the layout they came in."""
    family = family_of(task)
    if family is None:
        raise UserError(f"eval.task_data: no known file layout for the task {task!r}; known: {', '.join(FAMILIES)} "
                        "(any other lm-eval task reads its data from the Hugging Face cache through eval.tasks)")
    records = read_records(path)
    if not records:
        raise UserError(f"eval.task_data.{task}: {path} holds no items")
    labels = labels_file(path)
    for layout in FAMILIES[family]:
        if layout.matches(records[0], labels is not None and layout.labels is not None):
            if layout.labels and _get(records[0], layout.labels) is None:
                records = _with_labels(records, layout.labels, labels)
            try:
                return [layout.convert(r, i) for i, r in enumerate(records)], layout.name
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise UserError(f"eval.task_data.{task}: an item of {path} does not fit {layout.name} "
                                f"({type(e).__name__}: {e})") from None
    found = ", ".join(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
    expected = " or ".join(lay.describe() for lay in FAMILIES[family])
    raise UserError(f"eval.task_data.{task}: {path} has fields {found}, which match no layout of {family}. "
                    f"Expected: {expected}")


# ---------------------------------------------------------------- finding files


_SPLIT_NAMES = {"test": ("test",), "validation": ("valid", "val", "dev"), "train": ("train",)}


def pick_file(task: str, where: Path, split: str) -> Path:
    """The file for `split` of a task: `where` itself, or the one file in that folder whose name says the split."""
    if where.is_file():
        return where
    if not where.is_dir():
        raise UserError(f"eval.task_data.{task}: {where} does not exist")
    files = sorted(p for p in where.iterdir() if p.is_file() and "label" not in p.stem.lower()
                   and p.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"))
    if len(files) == 1:
        return files[0]
    named = [p for p in files if any(s in p.stem.lower() for s in _SPLIT_NAMES.get(split, (split,)))]
    for candidates in (named, [p for p in named if p.suffix.lower() == ".jsonl"]):  # ARC ships jsonl and csv
        if len(candidates) == 1:
            return candidates[0]
    raise UserError(f"eval.task_data.{task}: cannot tell which file in {where} holds its {split} split "
                    f"({', '.join(p.name for p in files) or 'no data files'}); name the file instead")


def mmlu_files(where: Path) -> dict[str, dict[str, Path]]:
    """MMLU's authors' folder (data/{test,dev}/<subject>_<split>.csv), a test/ folder, or one csv: per subject, its
    test file and (for few-shot examples) its dev file."""
    files = [where] if where.is_file() else sorted(where.rglob("*.csv"))
    subjects: dict[str, dict[str, Path]] = {}
    for p in files:
        subject, _, split = p.stem.rpartition("_")
        in_split_folder = p.parent.name in ("test", "dev") or where.is_file() or p.parent == where
        if split in ("test", "dev") and in_split_folder:  # not auxiliary_train/'s other datasets
            subjects.setdefault(subject, {})[split] = p
    return {s: f for s, f in subjects.items() if "test" in f}


# ---------------------------------------------------------------- writing tasks


def write_task(folder: Path, task: str, where: Path, yaml_of: Callable[[str], Path | None],
               shots: int = 0) -> dict[str, Any]:
    """The converted rows and a task YAML in `folder` for one lm-eval task (MMLU: for each subject); returns
    what the record keeps of where the items came from. With `shots` > 0 the examples come from the task's
    training file, as lm-eval's own task draws them (MMLU: its dev files)."""
    if family_of(task) == "mmlu":
        return write_mmlu(folder, task, where, yaml_of)
    lm_eval_yaml = yaml_of(task)
    check_known(task, lm_eval_yaml is not None)
    eval_split = evaluated_split(lm_eval_yaml)
    path = pick_file(task, where, eval_split)
    rows, layout = convert(task, path)
    splits = {eval_split: rows}
    info = {"file": str(path.resolve()), "layout": layout, "file_sha256": _sha256(path)}
    if shots > 0 and eval_split != "train":
        train = _training_file(task, where, path)
        splits["train"] = convert(task, train)[0]
        info["shots_from"] = str(train.resolve())
    return _write(folder, task, lm_eval_yaml, splits, eval_split, info)


def _training_file(task: str, where: Path, evaluated: Path) -> Path:
    folder = where if where.is_dir() else where.parent
    try:
        train = pick_file(task, folder, "train")
    except UserError:
        train = None
    if train is None or train == evaluated:
        raise UserError(f"eval.num_fewshot > 0: {task}'s few-shot examples come from its training split, and "
                        f"{folder} has no single training file (train*.jsonl): add it, or use eval.num_fewshot=null")
    return train


def write_mmlu(folder: Path, task: str, where: Path, yaml_of: Callable[[str], Path | None]) -> dict[str, Any]:
    """MMLU as its subjects: a task per subject found (lm-eval's `mmlu_<subject>`), and for `mmlu` itself a group
    over them whose accuracy is the mean over every item (lm-eval's `mmlu` weights its subjects by size)."""
    rows, layout = _mmlu_rows(task, where)
    if task != "mmlu":
        rows = {s: splits for s, splits in rows.items() if f"mmlu_{s}" == task}
    if not rows:
        raise UserError(f"eval.task_data.{task}: no MMLU test items under {where} (the authors' <subject>_test.csv "
                        "files, or rows with a subject field)")
    info = {"file": str(where.resolve()), "layout": layout, "subjects": len(rows)}
    unknown = sorted(s for s in rows if yaml_of(f"mmlu_{s}") is None)
    if unknown and len(unknown) == len(rows):
        raise UserError(f"eval.task_data.{task}: {where} has items of subjects lm-eval's MMLU does not have "
                        f"({', '.join(unknown[:5])})")
    if unknown:
        log.warning("eval.task_data.%s: subjects lm-eval's MMLU does not have, left out: %s", task, ", ".join(unknown))
    rows = {s: splits for s, splits in rows.items() if s not in unknown}
    info["subjects"] = len(rows)
    for subject, splits in sorted(rows.items()):
        _write(folder, f"mmlu_{subject}", yaml_of(f"mmlu_{subject}"), splits, "test", {})
    if task == "mmlu":
        names = [f"mmlu_{s}" for s in sorted(rows)]
        group = {"group": "mmlu", "task": names, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                 "metadata": {"version": 2}}
        write_text_atomic(folder / "mmlu.yaml", json.dumps(group, indent=1))  # JSON is YAML
    return info


def _mmlu_rows(task: str, where: Path) -> tuple[dict[str, dict[str, list[Record]]], str]:
    """Per subject, per split (test, dev), MMLU's rows: from the authors' csv files, or from one file in the HF
    layout (its rows carry their subject; all of them test items)."""
    files = mmlu_files(where)
    if files:
        return {s: {split: convert(task, path)[0] for split, path in f.items()} for s, f in files.items()}, \
            FAMILIES["mmlu"][0].name
    converted, layout = convert(task, pick_file(task, where, "test"))
    by_subject: dict[str, dict[str, list[Record]]] = {}
    for row in converted:
        by_subject.setdefault(row["subject"], {"test": []})["test"].append(row)
    return by_subject, layout


def _write(folder: Path, task: str, lm_eval_yaml: Path, splits: dict[str, list[Record]], eval_split: str,
           info: dict[str, Any]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    data_files = {}
    for split, rows in splits.items():
        path = (folder / f"{task}.{split}.jsonl").resolve()
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        data_files[split] = str(path)
    config = {"include": str(lm_eval_yaml), "task": task, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": data_files},
              # only the splits that have data: few-shot examples come from the training split (or MMLU's dev),
              # as in lm-eval's own task; zero-shot needs neither
              "training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    config["test_split" if eval_split == "test" else "validation_split"] = eval_split
    if "train" in splits:
        config["training_split"] = "train"
    if "dev" in splits:
        config["fewshot_split"] = "dev"
    write_text_atomic(folder / f"{task}.yaml", json.dumps(config, indent=1))
    return {**info, "items": len(splits[eval_split]), "split": eval_split}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
