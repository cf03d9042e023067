"""Offline evaluation tasks, generated (seeded) from text that ships with Python and written as an
ordinary lm-evaluation-harness task folder (YAML + JSONL), so they run through lm-eval's machinery.

- `qb_continuation` (HellaSwag-shaped): a passage's opening; its true continuation and three
  continuations of other passages. Metrics acc and acc_norm.
- `qb_lastword` (LAMBADA-shaped): a passage whose last word already occurs earlier in it; predict that
  word. Metrics acc (greedy) and perplexity.
- `qb_arithmetic`: sums, differences and products with near-miss distractors. Metric acc.

Passages come from the evaluation half of the `pydoc` corpus (not the calibration half).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from . import data, results

TASKS = ("qb_continuation", "qb_lastword", "qb_arithmetic")


def passages(min_words: int = 30, max_words: int = 90) -> list[str]:
    """Prose paragraphs of pydoc's evaluation half (no grammar, code or tables), whitespace normalised."""
    out = []
    for paragraph in data.load_corpus("pydoc").eval_text.split("\n\n"):
        if paragraph.startswith((" ", "\t")) or re.search(r"::=|>>>|\*\*\*|===|---|\|", paragraph):
            continue
        text = " ".join(paragraph.split())
        words = text.split(" ")
        letters = sum(c.isalpha() for c in text)
        if min_words <= len(words) <= max_words and letters > 0.7 * len(text):
            out.append(text)
    return out


def continuation_items(texts: list[str], n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    splits = []
    for text in texts:
        words = text.split(" ")
        cut = len(words) * 2 // 3
        splits.append((" ".join(words[:cut]), " ".join(words[cut:cut + 15])))
    chosen = rng.sample(range(len(splits)), min(n, len(splits)))
    items = []
    for i in chosen:
        endings: list[str] = []
        for j in rng.sample(range(len(splits)), len(splits)):  # three distinct endings of other passages
            if len(endings) < 3 and splits[j][1] not in (splits[i][1], *endings):
                endings.append(splits[j][1])
        label = rng.randrange(4)
        endings.insert(label, splits[i][1])
        items.append({"ctx": splits[i][0], "endings": endings, "label": label})
    return items


def lastword_items(texts: list[str], n: int, seed: int) -> list[dict[str, Any]]:
    """Passages cut after a word of at least 4 letters that occurs earlier in the passage."""
    rng = random.Random(seed)
    items = []
    for text in texts:
        words = text.split(" ")
        for end in range(len(words) - 1, 10, -1):
            word = words[end].strip(".,;:()'\"")
            if len(word) >= 4 and word.isalpha() and word in words[:end] and words[end] == word:
                items.append({"text": " ".join(words[:end]), "target": word})
                break
    rng.shuffle(items)
    return items[:n]


def arithmetic_items(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        op = rng.choice("+-*")
        a, b = (rng.randint(10, 99), rng.randint(10, 99)) if op != "*" else (rng.randint(3, 19), rng.randint(3, 19))
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        misses = [answer + d for d in (-1, 1, -10, 10, 2, -2)]
        if abs(answer) >= 10:  # a swapped last two digits is a classic near miss
            digits = str(abs(answer))
            misses.append(int(digits[:-2] + digits[-1] + digits[-2]) * (1 if answer >= 0 else -1))
        misses = [m for m in dict.fromkeys(misses) if m != answer]
        choices = rng.sample(misses, 3)
        label = rng.randrange(4)
        choices.insert(label, answer)
        items.append({"question": f"What is {a} {op} {b}?", "choices": [str(c) for c in choices], "label": label})
    return items


# Per task: how lm-eval turns an item into a prompt and a target, and what it measures.
_PROMPTS = {
    "qb_continuation": ("multiple_choice", {"doc_to_text": "{{ctx}}", "doc_to_choice": "{{endings}}",
                                            "doc_to_target": "label", "target_delimiter": " "}, ("acc", "acc_norm")),
    "qb_lastword": ("loglikelihood", {"doc_to_text": "{{text}}", "doc_to_target": "{{' ' + target}}",
                                      "target_delimiter": ""}, ("perplexity", "acc")),
    "qb_arithmetic": ("multiple_choice", {"doc_to_text": "Question: {{question}}\\nAnswer:",
                                          "doc_to_choice": "{{choices}}", "doc_to_target": "label"}, ("acc",)),
}
_AGGREGATION = {"acc": ("mean", "true"), "acc_norm": ("mean", "true"), "perplexity": ("perplexity", "false")}


def _task_yaml(name: str, data: Path, output_type: str, prompt: dict[str, str], metrics: tuple[str, ...],
               version: str) -> str:
    """An lm-eval task over a local JSONL file (its test split)."""
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
             f"output_type: {output_type}", "test_split: test"]
    lines += [f'{key}: "{value}"' for key, value in prompt.items()]
    lines += ["metric_list:"]
    for metric in metrics:
        aggregation, higher_is_better = _AGGREGATION[metric]
        lines += [f"  - metric: {metric}", f"    aggregation: {aggregation}",
                  f"    higher_is_better: {higher_is_better}"]
    return "\n".join([*lines, "metadata:", f"  version: {version}", ""])


def write_tasks(folder: Path, n_items: int = 200, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Generate the three tasks into `folder` (YAML + JSONL each); returns the items per task."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = passages()
    items = {
        "qb_continuation": continuation_items(texts, n_items, seed),
        "qb_lastword": lastword_items(texts, n_items, seed),
        "qb_arithmetic": arithmetic_items(n_items, seed),
    }
    for name, rows in items.items():
        path = folder / f"{name}.jsonl"
        results.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        output_type, prompt, metrics = _PROMPTS[name]
        yaml = _task_yaml(name, path.resolve(), output_type, prompt, metrics, f"{seed}.{n_items}")
        results.write_text_atomic(folder / f"{name}.yaml", yaml)
    return items


# Local files in the layout of a known task: the fields that identify the layout, and the task's prompt.
LAYOUTS = {
    "hellaswag": {"fields": ("ctx", "endings", "label"), "text": "{{ctx}}", "choice": "{{endings}}",
                  "target": "{{label | int}}", "delimiter": " "},
    "arc": {"fields": ("question", "choices", "answerKey"), "text": "Question: {{question}}\\nAnswer:",
            "choice": "{{choices.text}}", "target": "{{choices.label.index(answerKey)}}", "delimiter": " "},
    "piqa": {"fields": ("goal", "sol1", "sol2", "label"), "text": "Question: {{goal}}\\nAnswer:",
             "choice": "{{[sol1, sol2]}}", "target": "{{label | int}}", "delimiter": " "},
}

def detect_layout(path: Path) -> str:
    """The known layout a JSONL file's first record matches; raises naming the fields each expects."""
    from .errors import UserError

    try:
        first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    except (OSError, IndexError, json.JSONDecodeError) as e:
        raise UserError(f"eval.local_tasks: {path} is not a readable JSONL file ({type(e).__name__})") from None
    for layout, spec in LAYOUTS.items():
        if all(f in first for f in spec["fields"]):
            return layout
    expected = "; ".join(f"{name}: {', '.join(spec['fields'])}" for name, spec in LAYOUTS.items())
    raise UserError(f"eval.local_tasks: {path} has fields {', '.join(first)}, which match no known layout. "
                    f"Expected one of: {expected}")


def write_local_task(folder: Path, name: str, path: Path) -> str:
    """An lm-eval task `name` over a local JSONL file, with its layout's prompt format and metrics."""
    spec = LAYOUTS[detect_layout(path)]
    folder.mkdir(parents=True, exist_ok=True)
    prompt = {"doc_to_text": spec["text"], "doc_to_choice": spec["choice"], "doc_to_target": spec["target"],
              "target_delimiter": spec["delimiter"]}
    results.write_text_atomic(folder / f"{name}.yaml", _task_yaml(name, path.resolve(), "multiple_choice", prompt,
                                                    ("acc", "acc_norm"), "1.0"))
    return name
