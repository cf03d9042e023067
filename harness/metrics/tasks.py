"""Task accuracy through lm-evaluation-harness itself, on the (quantized) model object in memory."""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import math
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError

# What the record keeps of a task's metrics, and the per-item fields for paired comparisons.
METRICS = ("acc", "acc_norm", "perplexity")


def task_manager(include_path: Path | None, only: list[str] | None = None):
    """lm-eval's TaskManager over the YAMLs in `include_path` and the tasks lm-eval ships. Indexing those
    takes seconds, so it is skipped when every task in `only` is one of the folder's, and one manager is
    kept per folder, content of its YAMLs and that choice for the process."""
    yamls = sorted(Path(include_path).glob("*.yaml")) if include_path is not None else []
    fingerprint = "".join(p.name + hashlib.sha256(p.read_bytes()).hexdigest() for p in yamls)
    own = only is not None and set(only) <= {p.stem for p in yamls}
    return _task_manager(str(include_path) if include_path else None, fingerprint, not own)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, fingerprint: str, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def lm_eval_yaml(name: str) -> Path | None:
    """The YAML that defines lm-eval's own task `name` (None if lm-eval has no such task, or it has no YAML)."""
    entry = _task_manager(None, "", True).task_index.get(name)
    return None if entry is None or entry.yaml_path is None else Path(entry.yaml_path)


def check_task_names(names: list[str], manager, also_known: set[str] | frozenset = frozenset()) -> None:
    """An unknown task name lists the closest known names (lm-eval's, and `also_known`)."""
    known = set(manager.all_tasks) | set(also_known)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UserError(f"eval.tasks: {name!r} is not a task lm-eval knows{hint}")


def evaluate_tasks(model: nn.Module, tokenizer: Any, tasks: list[str], include_path: Path | None = None,
                   limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   seed: int = 0, manager=None) -> dict[str, dict[str, Any]]:
    """Per task: its metrics (and their stderr) and each item's correctness, in lm-eval's item order.
    `manager`: a TaskManager already built for `include_path` (building one indexes every lm-eval task: seconds)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(include_path)
    check_task_names(tasks, manager)
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # bootstrap_iters=0: lm-eval's bootstrap of perplexity's stderr took seconds per point in a process
    # pool; each accuracy's stderr is computed below from the items, as lm-eval's mean_stderr does.
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, bootstrap_iters=0)
    results = {}
    for task in tasks:
        raw = out["results"][task]
        metrics = {}
        for key, value in raw.items():
            metric, _, _filter = key.partition(",")
            if metric in METRICS and isinstance(value, (int, float)):
                metrics[metric] = float(value)
        samples = _samples(out, task)
        items = {m: [float(s[m]) for s in samples] for m in ("acc", "acc_norm") if samples and m in samples[0]}
        metrics.update({f"{m}_stderr": _mean_stderr(v) for m, v in items.items()})
        about = {"n": len(samples), "version": out["versions"].get(task), "n_shot": out["n-shot"].get(task),
                 "items_sha256": hashlib.sha256("".join(s["doc_hash"] for s in samples).encode()).hexdigest()}
        results[task] = {"metrics": metrics, "items": items, **about}
    return results


def _samples(out: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """A task's scored items in lm-eval's order; a group's are its subtasks' in turn, by name."""
    if task in out["samples"]:
        return sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s for sub in sorted(out.get("group_subtasks", {}).get(task, [])) for s in _samples(out, sub)]


def _mean_stderr(values: list[float]) -> float:
    """The standard error of a mean: sample standard deviation / √n."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
