"""Tables, plots, the verdict, report.md and a self-contained report.html, rebuilt from DIR/runs/*.json."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from . import capacity, plots, results
from .errors import UserError
from .select import OBJECTIVES, select

Block = tuple  # ("h1" | "h2" | "p" | "ul", text or items) | ("table", header, rows) | ("img", path, alt)


def build(out_dir: Path, policy: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the records of `out_dir`; write results.parquet/csv, selection.json, plots/, report.md/.html."""
    records = results.load_records(out_dir)
    if not records:
        raise UserError(f"{out_dir} holds no run records (runs/*.json): run a sweep with out_dir={out_dir} first")
    frame = results.records_to_frame(records)
    results.write_tables(out_dir, frame)
    baseline = policy.get("baseline", "fp16")
    has_baseline = any(r["status"] == "ok" and baseline in (r["run_id"], r.get("quant", {}).get("method"))
                       for r in records)
    selection = select(records, policy) if has_baseline else None
    if selection is not None:
        results.write_json_atomic(out_dir / "selection.json", selection)
    else:  # no verdict now: an earlier one left in the folder would be read as this sweep's
        (out_dir / "selection.json").unlink(missing_ok=True)
        for png in (out_dir / "plots").glob("*.png"):
            png.unlink(missing_ok=True)
    pngs = plots.draw_all(selection, out_dir / "plots") if selection else []
    blocks = report_blocks(records, selection, pngs, out_dir) + warning_blocks(records, out_dir)
    results.write_text_atomic(out_dir / "report.md", to_markdown(blocks, out_dir))
    results.write_text_atomic(out_dir / "report.html", to_html(blocks))
    return {"frame": frame, "selection": selection, "plots": pngs}


def report_blocks(records: list[dict], selection: dict | None, pngs: list[Path], out_dir: Path) -> list[Block]:
    blocks: list[Block] = [("h1", "Quantization sweep report")]
    if selection is None:
        blocks.append(("p", "**Verdict:** none: the sweep has no baseline point. Add one to the same folder with "
                            f"`python -m harness run quant=fp16 out_dir={out_dir}`."))
    else:
        blocks += [("p", f"**Verdict:** {selection['verdict']}"), ("p", f"Quality bar: {policy_text(selection)}.")]
        blocks += [("h2", "What it means"), ("p", _capacity_intro()), capacity_table(selection, records)]
        blocks += [("h2", "Results"), results_table(selection)]
        in_domain = [p for p in selection["points"] if p.get("in_domain")]
        if in_domain:
            blocks.append(("p", _in_domain_text(in_domain)))
        unserved = [p["label"] for p in selection["points"] if p.get("speed_note")]
        if unserved:
            device = next(p["device"] for p in selection["points"] if p.get("speed_note"))
            blocks.append(("p", _no_kernel_text(device, unserved)))
        failing = [p for p in selection["points"] if not p["passed"] and not p["is_baseline"]]
        if failing:
            blocks += [("h2", "Why points fail"), ("ul", [f"{p['label']}: {'; '.join(p['reasons'])}" for p in failing])]
    if pngs:
        blocks += [("h2", "Plots")] + [("img", p, p.stem) for p in pngs]
    first = next((r for r in records if r["status"] == "ok"), None)
    if first is not None:
        blocks += [("h2", "Setup"), ("ul", setup_lines(first, records))]
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        blocks += [("h2", "Failed runs"),
                   ("ul", [f"`{r['run_id']}`: {r['error']['type']}: {r['error']['message']}" for r in failed])]
    return blocks


def warning_blocks(records: list[dict], out_dir: Path) -> list[Block]:
    """Records that could not be used, and a sweep made by several versions of the code."""
    blocks: list[Block] = []
    damaged = results.damaged_records(out_dir)
    if damaged:
        blocks += [("h2", "Unusable records"),
                   ("p", "These files in runs/ could not be read as records, so their points are missing above: "
                         "delete them and run the sweep again to measure those points."), ("ul", damaged)]
    versions = mixed_code_versions(records)
    if versions:
        blocks += [("h2", "Mixed code versions"),
                   ("p", "The points were measured by different versions of the harness; numbers may not compare. "
                         "Per version: " + "; ".join(f"`{v}`: {n} points" for v, n in versions.items()) + ".")]
    return blocks


def mixed_code_versions(records: list[dict]) -> dict[str, int]:
    """Points per code version, if more than one version made them (else empty)."""
    counts: dict[str, int] = {}
    for r in records:
        v = r.get("env", {}).get("code_version") or "unrecorded"
        counts[v] = counts.get(v, 0) + 1
    return counts if len(counts) > 1 else {}


def policy_text(selection: dict[str, Any]) -> str:
    p = selection["policy"]
    parts = []
    if p.get("max_ppl_increase_pct") is not None:
        parts.append(f"perplexity at most +{p['max_ppl_increase_pct']}% per corpus")
    if p.get("max_kl") is not None:
        parts.append(f"mean KL at most {p['max_kl']} per corpus")
    if selection["tasks"] and p.get("max_task_drop") is not None:
        parts.append(f"{p['task_metric']} drop at most {p['max_task_drop']} per task")
    if selection["tasks"] and p.get("max_mean_task_drop") is not None:
        parts.append(f"at most {p['max_mean_task_drop']} on the mean over tasks")
    judged = ", ".join(selection["corpora"] + selection["tasks"])
    return (f"{'; '.join(parts) or 'no thresholds'} (on {judged}), each as the {p['confidence']:.0%} one-sided "
            f"Student-t bound of the mean paired difference over the baseline's windows and items; "
            f"{OBJECTIVES[p['objective']]} {p['objective']} wins")


def _capacity_intro() -> str:
    return (f"Weight memory of this architecture family (Llama) at three sizes, with the decoder linears at the "
            f"precision's measured bits per weight (scales included) and embeddings and output head in 16 bits; "
            f"a GPU holds a model if the weights take at most {capacity.HEADROOM:.0%} of its memory (the rest for "
            "activations and a short KV cache; long contexts need more).")


def capacity_table(selection: dict[str, Any], records: list[dict]) -> Block:
    by_id = {r["run_id"]: r for r in records}
    points = [{"label": "baseline (16-bit)", "bits_per_weight": None}]
    if selection["chosen"]:
        chosen = by_id[selection["chosen"]]
        points.append({"label": selection["chosen_label"], "bits_per_weight": chosen["metrics"]["bits_per_weight"],
                       "quantize_head": bool(chosen["quant"].get("quantize_lm_head"))})
    rows = [[r["point"], r["size"], f"{r['weight_gb']:.1f}", r["fits"]] for r in capacity.table(points)]
    return ("table", ["precision", "model size", "weights GB", "smallest GPU that holds it"], rows)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def results_table(selection: dict[str, Any]) -> Block:
    """Every point: size, each check as estimate [bound], speed against the baseline, pass or fail."""
    base = next(p for p in selection["points"] if p["is_baseline"])
    checks = [c["name"] for c in base["checks"]]
    header = (["point", "bits/weight", "weight MB"] + [_check_header(c) for c in checks]
              + ["decode tok/s", "windows · items", "bar"])
    rows = []
    order = sorted(selection["points"], key=lambda p: (not p["is_baseline"], -(p["bits_per_weight"] or 0), p["label"]))
    for p in order:
        mark = " ✅" if p["run_id"] == selection["chosen"] else (" (baseline)" if p["is_baseline"] else "")
        mark += " (in-domain)" if p.get("in_domain") else ""
        row = [p["label"] + mark, _fmt(p["bits_per_weight"], ".2f"), _fmt((p["weight_bytes"] or math.nan) / 1e6, ".1f")]
        found = {c["name"]: c for c in p["checks"]}
        row += [_check_cell(found.get(name)) for name in checks]
        row.append(_speed_cell(p, base))
        stopped = " (stopped early)" if p.get("stopped_early") else ""
        row.append(f"{p.get('windows', 0)} · {p.get('items', 0)}{stopped}")
        row.append("pass" if p["passed"] else "fail")
        rows.append(row)
    return ("table", header, rows)


def _in_domain_text(points: list[dict]) -> str:
    evaluated = sorted({e for p in points for e in p["in_domain"]})
    return (f"In-domain: {', '.join(p['label'] for p in points)} were calibrated on the text that "
            f"{', '.join(f'`{e}`' for e in evaluated)} evaluate (another part of it, or text it generated). A "
            "calibrated method fits its calibration domain, so these numbers are optimistic: on other text such "
            "points can fall behind plain rounding. Judge them on corpora and tasks they were not calibrated on "
            "(`calib.corpus` other than `eval.corpora`).")


def _no_kernel_text(device: str, labels: list[str]) -> str:
    return (f"Speed (\"no kernel here\"): no {device} kernel serves {', '.join(labels)} (all their layers, or those "
            "of a width the kernel cannot take). Run there, those layers would dequantize every weight at every "
            "step, which is not the cost of the format, so their speed is not measured. Their quality is measured "
            "on the same values, dequantized once. A ratio below 1× is a kernel slower than the dense baseline.")


def _speed_cell(point: dict, base: dict) -> str:
    """Decode tok/s and its ratio to the baseline's; a point without a kernel for its format on this device
    says so, and a kernel slower than the dense baseline is named as such, not shown as the format's cost."""
    speed, base_speed = point["decode_tok_s"], base["decode_tok_s"]
    if speed is None:
        return "no kernel here" if point.get("speed_note") else ""
    if not base_speed or point["is_baseline"]:
        return _fmt(speed, ".1f")
    ratio = speed / base_speed
    return f"{speed:.1f} ({ratio:.2f}×{'; kernel slower than dense' if ratio < 1 else ''})"


def _check_header(name: str) -> str:
    if name.startswith("ppl/"):
        return f"Δppl {name[4:]} % [bound]"
    if name.startswith("kl/"):
        return f"KL {name[3:]} [bound]"
    return f"drop {name[5:]} pts [bound]"


def _check_cell(check: dict | None) -> str:
    if check is None or check["units"] == 0:
        return "n/a"
    if check["name"].startswith("kl/"):
        return f"{check['estimate']:.4f} [{check['upper']:.4f}]"
    scale = 100 if check["name"].startswith("task/") else 1  # task drops in accuracy points
    better = " (better)" if check["better"] else ""
    return f"{scale * check['estimate']:+.2f} [{scale * check['upper']:+.2f}]{better}"


def setup_lines(record: dict, records: list[dict]) -> list[str]:
    model, env, data = record["model"], record["env"], record.get("data", {})
    lines = [f"Model: `{model['name']}` ({model['architecture']}, {model['params'] / 1e6:.1f}M parameters), "
             f"source format: {model['source_format']}; evaluated in {model['dtype']}.",
             f"Machine: {env['device_name']}; python {env['python']}, torch {env['torch']}, "
             f"transformers {env['transformers']}."]
    if model["source_format"].startswith("random init"):
        lines.append("The weights are random: quality numbers mean nothing here; time and memory are real.")
    if "Q4" in model["source_format"] or "Q8" in model["source_format"]:
        lines.append("The source weights are themselves a low-bit GGUF, dequantized on load: the baseline is that "
                     "dequantized model, not the original bf16 release.")
    for corpus, d in data.get("eval", {}).items():
        lines.append(f"Corpus `{corpus}` (evaluation part): {d['tokens']} tokens, sha256 {d['sha256'][:12]}, "
                     f"{d['windows']} windows of {d['seqlen']} tokens. Compare numbers only on the same hash.")
    calibrated = next((r["data"]["calib"] for r in records if (r.get("data") or {}).get("calib")), None)
    if calibrated:
        lines.append(_calib_line(calibrated))
    lines.append("Speed ratios (×) are against the baseline measured in the same sweep, on the same machine.")
    return lines


def _calib_line(calib: dict[str, Any]) -> str:
    parts = []
    for source, d in (calib.get("sources") or {}).items():
        how = f", generated with {d['generation']}" if "generation" in d else f", text sha256 {d['sha256'][:12]}"
        parts.append(f"`{source}` {d['samples']} samples{how}, seed {d['seed']}")
    return (f"Calibration: {calib.get('n_samples')} samples of {calib.get('seqlen')} tokens: " + "; ".join(parts)
            + ".")


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out += [f"{'#' if kind == 'h1' else '##'} {block[1]}", ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            header, rows = block[1], block[2]
            out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
        elif kind == "img":
            out += [f"![{block[2]}]({block[1].relative_to(out_dir).as_posix()})", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(blocks: list[Block]) -> str:
    """One file, the plots embedded as data URIs: it can be mailed or attached as it is."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(block[1].read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></figure>')
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Quantization sweep report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")

