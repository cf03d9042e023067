"""Trade-off plots from the results table; each returns the PNG path it wrote."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _scatter_by_method(frame: pd.DataFrame, x: str, y: str, path: Path, title: str, xlabel: str, ylabel: str,
                       logy: bool = False, lines: bool = True, baseline_as_line: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if baseline_as_line:  # its x (e.g. 16 or 32 bits) would squash the quantized points into one corner
        for _, r in frame[frame["method"] == "fp16"].iterrows():
            ax.axhline(r[y], color="gray", linestyle="--", label=f"baseline ({r['dtype']})")
        frame = frame[frame["method"] != "fp16"]
    for method, rows in frame.groupby("method", sort=True):
        rows = rows.sort_values(x)
        ax.plot(rows[x], rows[y], marker="o", linestyle="-" if lines and len(rows) > 1 else "none", label=method)
        for _, r in rows.iterrows():
            if r["method"] != "fp16":
                ax.annotate(f"{r['bits']}b/{'pc' if r['group_size'] == -1 else r['group_size']}", (r[x], r[y]),
                            textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(frame: pd.DataFrame, plot_dir: Path, corpus: str) -> list[Path]:
    ok = frame[frame["status"] == "ok"].copy()
    ok["weight_mb"] = ok["weight_bytes"] / 1e6
    return [
        _scatter_by_method(ok, "bits_per_weight", f"ppl/{corpus}", plot_dir / "ppl_vs_bits.png",
                           f"Perplexity ({corpus}) vs bits per weight", "bits per weight (quantized layers)",
                           "perplexity", logy=True, baseline_as_line=True),
        _scatter_by_method(ok, "weight_mb", f"kl/{corpus}", plot_dir / "kl_vs_weight_bytes.png",
                           f"KL to the baseline ({corpus}) vs weight memory", "weight memory (MB)",
                           "mean KL (nats/token)"),
        _scatter_by_method(ok, f"ppl/{corpus}", "decode_tok_s", plot_dir / "decode_vs_ppl.png",
                           "Decode speed vs perplexity", f"perplexity ({corpus})", "decode tokens/s (batch 1)",
                           lines=False),
    ]
