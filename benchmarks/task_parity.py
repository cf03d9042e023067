"""The harness's task scores against `lm_eval.simple_evaluate` run directly, item by item.

    python -m harness sweep quant=fp16,rtn quant.bits=4 quant.group_size=64 eval.tasks=[] \
        'eval.task_data={arc_easy: ARC-Easy-Test.jsonl, piqa: piqa/valid.jsonl}' eval.task_limit=null \
        eval.adaptive=false out_dir=results/parity
    python benchmarks/task_parity.py results/parity

For every point of the sweep folder: the model is loaded and quantized as the sweep did (same config), and
lm-eval scores each benchmark task on its own, through a task YAML of this script's that includes lm-eval's
definition and reads the rows the sweep converted from the user's files. Prints acc and acc_norm both ways,
the items that differ, and the seconds each took; exits non-zero if any item differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import quantizers
from harness import results
from harness.metrics import tasks
from harness.models import load_model
from harness.sweep import make_point


def direct_scores(model, tokenizer, task_folder: Path, task: str, batch_size: int,
                  limit: int | None) -> dict[str, list[float]]:
    """lm-eval on its own over the rows the sweep wrote for `task` (every split it wrote)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = sorted(task_folder.glob(f"{task}.*.jsonl")) or sorted(task_folder.glob(f"{task}_*.*.jsonl"))
    subtasks = sorted({p.name.split(".")[0] for p in names})
    out_items: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for sub in subtasks:
            files = {p.name.split(".")[1]: str(p.resolve()) for p in task_folder.glob(f"{sub}.*.jsonl")}
            eval_split = "test" if "test" in files else next(iter(files))
            config = {"include": str(tasks.lm_eval_yaml(sub)), "task": sub, "dataset_path": "json",
                      "dataset_name": None, "dataset_kwargs": {"data_files": files}, "training_split": None,
                      "validation_split": None, "test_split": None,
                      "fewshot_split": "dev" if "dev" in files else None}
            config["test_split" if eval_split == "test" else "validation_split"] = eval_split
            Path(folder, f"{sub}.yaml").write_text(json.dumps(config))
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                              tasks=subtasks, task_manager=TaskManager(include_path=folder, include_defaults=False),
                              log_samples=True, bootstrap_iters=0, limit=limit)
    for sub in subtasks:
        samples = sorted(out["samples"][sub], key=lambda s: s["doc_id"])
        for metric in ("acc", "acc_norm"):
            if metric in samples[0]:
                out_items.setdefault(metric, []).extend(float(s[metric]) for s in samples)
    return out_items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    differing = 0
    for record in results.load_records(args.sweep_dir):
        cfg = record["config"]
        point = make_point(cfg)
        model, tokenizer = (lambda m: (m.model, m.tokenizer))(load_model(cfg["model"], point.dtype, point.device,
                                                                         cfg["seed"]))
        if not point.spec.is_baseline:  # calibrated methods would need the sweep's calibration: RTN only here
            assert not point.needs_calibration, "task_parity.py redoes RTN points only"
            quantizers.quantize(model, point.spec, None)
            quantizers.use_backend(model, point.backend)
        task_folder = Path(cfg["out_dir"]) / "tasks" / f"seed{cfg['seed']}"
        with quantizers.dequantized_once(model, point.dtype):  # as the sweep scores its tasks
            for task in cfg["eval"].get("task_data") or {}:
                start = time.perf_counter()
                direct = direct_scores(model, tokenizer, task_folder, task, cfg["eval"].get("task_batch_size", 16),
                                       cfg["eval"].get("task_limit"))
                seconds, point_s = time.perf_counter() - start, record.get("duration_s", float("nan"))
                for metric, values in direct.items():
                    ours = record["per_sample"][f"task/{task}/{metric}"]
                    diff = sum(a != b for a, b in zip(ours, values, strict=True))
                    differing += diff
                    print(f"{record['run_id']:32s} {task:10s} {metric:8s} harness {sum(ours) / len(ours):.4f} "
                          f"lm-eval {sum(values) / len(values):.4f} items {len(values)} differing {diff} "
                          f"(lm-eval direct {seconds:.1f} s, harness point {point_s:.1f} s)")
    print("parity: " + ("EQUAL item for item" if differing == 0 else f"{differing} items differ"))
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
