"""Tables, plots, the verdict and report.md, rebuilt from DIR/runs/*.json at any time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from . import plots, results
from .errors import UserError
from .select import baseline_row, point_label, quality_corpora, select


def build(out_dir: Path, policy: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the records of `out_dir`; write results.parquet/csv, plots/, selection.json, report.md."""
    records = results.load_records(out_dir)
    if not records:
        raise UserError(f"{out_dir} holds no run records (runs/*.json): run a sweep with out_dir={out_dir} first")
    frame = results.records_to_frame(records)
    results.write_tables(out_dir, frame)
    ok = frame[frame["status"] == "ok"]
    corpora = quality_corpora(ok)
    has_baseline = (ok["method"] == "fp16").any()
    selection = select(frame, policy) if has_baseline else None
    if selection is not None:
        results.write_json_atomic(out_dir / "selection.json", selection)
    pngs = plots.draw_all(frame, out_dir / "plots", corpora[0]) if corpora and not ok.empty else []
    (out_dir / "report.md").write_text(_markdown(frame, records, selection, pngs, out_dir))
    return {"frame": frame, "selection": selection, "plots": pngs}


def _markdown(frame: pd.DataFrame, records: list[dict], selection: dict | None, pngs: list[Path],
              out_dir: Path) -> str:
    first = next(r for r in records if r["status"] == "ok") if any(r["status"] == "ok" for r in records) else None
    lines = ["# Quantization sweep report", ""]
    if selection is not None:
        lines += [f"**Verdict:** {selection['verdict']}", "",
                  f"Quality bar: {_policy_text(selection['policy'])}.", ""]
    else:
        lines += ["**Verdict:** none: the sweep has no baseline point (add `quant=fp16`).", ""]
    if first is not None:
        lines += _setup_lines(first)
    lines += ["## Results", "", _table(frame, selection), ""]
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["## Failed points", ""] + [f"- `{r['run_id']}`: {r['error']['type']}: {r['error']['message']}"
                                              for r in failed] + [""]
    if pngs:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in pngs] + [""]
    lines += ["Speed ratios (×) are against the baseline measured in the same sweep, on the same machine.", ""]
    return "\n".join(lines)


def _policy_text(policy: dict[str, Any]) -> str:
    return (f"perplexity at most +{policy['max_ppl_increase_pct']}% and mean KL at most {policy['max_kl']} "
            f"on every corpus; smallest {policy['objective']} wins")


def _setup_lines(record: dict) -> list[str]:
    model, env, data = record["model"], record["env"], record.get("data", {})
    lines = ["## Setup", "",
             f"- Model: `{model['name']}` ({model['architecture']}, {model['params'] / 1e6:.1f}M parameters), "
             f"source format: {model['source_format']}; evaluated in {model['dtype']}.",
             f"- Machine: {env['device_name']}; python {env['python']}, torch {env['torch']}, "
             f"transformers {env['transformers']}."]
    if model["source_format"].startswith("gguf Q") or "Q4" in model["source_format"]:
        lines.append("- The source weights are themselves a low-bit GGUF, dequantized on load: the baseline is "
                     "that dequantized model, not the original bf16 release.")
    for corpus, d in data.get("eval", {}).items():
        lines.append(f"- Corpus `{corpus}` (evaluation part): {d['tokens']} tokens, sha256 {d['sha256'][:12]}, "
                     f"{d['windows']} windows of {d['seqlen']} tokens. Compare numbers only on the same hash.")
    return lines + [""]


def _table(frame: pd.DataFrame, selection: dict | None) -> str:
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return "(no point finished: see the failed points below)"
    corpora = quality_corpora(ok)
    try:
        base = baseline_row(frame)
    except UserError:
        base = None
    header = ["point", "bits/weight", "weight MB"]
    for c in corpora:
        header += [f"ppl {c}", f"Δppl {c}", f"KL {c}", f"top-1 {c}"]
    header += ["prefill tok/s", "decode tok/s", "quant s", "bar"]
    passed = {p["run_id"]: p["passed"] for p in (selection or {}).get("points", [])}
    rows = []
    for _, r in ok.sort_values(["bits_per_weight", "method"], ascending=[False, True]).iterrows():
        row = [point_label(r) + (" ✅" if selection and r["run_id"] == selection["chosen"] else ""),
               f"{r['bits_per_weight']:.2f}", f"{r['weight_bytes'] / 1e6:.1f}"]
        for c in corpora:
            delta = "" if base is None else f"{100 * (r[f'ppl/{c}'] / base[f'ppl/{c}'] - 1):+.2f}%"
            row += [f"{r[f'ppl/{c}']:.3f}", delta, f"{r[f'kl/{c}']:.4f}", f"{r[f'top1/{c}']:.3f}"]
        for key in ("prefill_tok_s", "decode_tok_s"):
            ratio = "" if base is None else f" ({r[key] / base[key]:.2f}×)"
            row.append(f"{r[key]:.1f}{ratio}")
        row += [f"{r['quant_time_s']:.1f}", {True: "pass", False: "fail"}.get(passed.get(r["run_id"]), "")]
        rows.append(row)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(row) + " |" for row in rows])
