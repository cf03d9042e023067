"""Trade-off plots from a selection (points with their checks' bounds); each returns the PNG path it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import results  # noqa: E402


def _check(point: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in point["checks"] if c["name"] == name), None)


def _quality_points(selection: dict[str, Any], quality: str, x: str) -> list[dict[str, Any]]:
    """Quantized points that finished, with the quality check's estimate and bounds and a finite x."""
    out = []
    for p in selection["points"]:
        c = _check(p, quality)
        if p["is_baseline"] or c is None or p.get(x) is None or c["units"] == 0:
            continue
        out.append({**p, "y": c["estimate"], "lo": c["lower"], "hi": c["upper"]})
    return out


def pareto_frontier(points: list[dict[str, Any]], x: str, larger_x_better: bool = False) -> list[dict[str, Any]]:
    """Points no other point beats on both x and quality (lower y), sorted by x."""
    sign = -1 if larger_x_better else 1
    ordered = sorted(points, key=lambda p: (sign * p[x], p["y"]))
    frontier, best = [], float("inf")
    for p in ordered:
        if p["y"] < best:
            frontier.append(p)
            best = p["y"]
    return frontier


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    results.write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    plt.close(fig)
    return path


def _tradeoff(selection: dict[str, Any], quality: str, x: str, path: Path, title: str, xlabel: str,
              larger_x_better: bool) -> Path | None:
    points = _quality_points(selection, quality, x)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ax.axhline(0, color="gray", linestyle="--", label="baseline")
    for method in sorted({p["method"] for p in points}):
        mine = [p for p in points if p["method"] == method]
        ax.errorbar([p[x] for p in mine], [p["y"] for p in mine], fmt="o", capsize=3, label=method,
                    yerr=[[p["y"] - p["lo"] for p in mine], [p["hi"] - p["y"] for p in mine]])
    frontier = pareto_frontier(points, x, larger_x_better)
    ax.plot([p[x] for p in frontier], [p["y"] for p in frontier], color="black", linewidth=1, label="Pareto frontier")
    for p in points:
        ax.annotate(p["label"].split(" ", 1)[-1].replace("-bit ", "b/"), (p[x], p["y"]), textcoords="offset points",
                    xytext=(4, 3), fontsize=6)
        if p["run_id"] == selection["chosen"]:
            ax.plot(p[x], p["y"], marker="*", markersize=18, color="gold", markeredgecolor="black", linestyle="none",
                    label=f"chosen: {p['label']}")
    ax.set_yscale("symlog", linthresh=1.0)
    unit = "%" if quality.startswith("ppl/") else ""
    return _finish(fig, ax, path, title, xlabel, f"{quality} change vs baseline{' (%)' if unit else ''}, "
                   f"{selection['policy']['confidence']:.0%} bounds")


def task_deltas(selection: dict[str, Any], path: Path) -> Path | None:
    """Per task: each quantized point's accuracy change against the baseline, with its bootstrap interval."""
    tasks = [f"task/{t}" for t in selection["tasks"]] + (["task/mean"] if selection["tasks"] else [])
    points = [p for p in selection["points"] if not p["is_baseline"] and p["status"] == "ok"]
    if not tasks or not points:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 0.35 * len(points) + 1.6), sharey=True,
                             squeeze=False)
    labels = [p["label"] for p in points]
    for ax, task in zip(axes[0], tasks, strict=True):
        checks = [_check(p, task) for p in points]
        # The check is the drop (baseline − point); the plot shows the change (point − baseline).
        change = [-c["estimate"] if c else float("nan") for c in checks]
        err = [[c["upper"] - c["estimate"] if c else 0 for c in checks],
               [c["estimate"] - c["lower"] if c else 0 for c in checks]]
        colors = ["tab:green" if c and c["passed"] else "tab:red" for c in checks]
        ax.barh(range(len(points)), change, xerr=err, color=colors, alpha=0.7, capsize=2)
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.set_title(task.removeprefix("task/"), fontsize=9)
        ax.set_xlabel("accuracy change")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(points)), labels, fontsize=7)
    fig.suptitle(f"Task accuracy change vs baseline ({selection['policy']['task_metric']}; green passes, "
                 f"bars {selection['policy']['confidence']:.0%} bounds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    results.write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    plt.close(fig)
    return path


def primary_quality(selection: dict[str, Any]) -> str | None:
    """The quality axis of the trade-off plots: the first corpus's perplexity, else the mean task drop."""
    if selection["corpora"]:
        return f"ppl/{selection['corpora'][0]}"
    return "task/mean" if selection["tasks"] else None


def draw_all(selection: dict[str, Any], plot_dir: Path) -> list[Path]:
    quality = primary_quality(selection)
    if quality is None:
        return []
    paths = [
        _tradeoff(selection, quality, "bits_per_weight", plot_dir / "pareto_quality_vs_bits.png",
                  "Quality vs bits per weight", "bits per weight (quantized layers, scales included)", False),
        _tradeoff(selection, quality, "decode_tok_s", plot_dir / "quality_vs_decode.png",
                  "Quality vs decode speed", "decode tokens/s (batch 1)", True),
        task_deltas(selection, plot_dir / "task_deltas.png"),
    ]
    return [p for p in paths if p is not None]
