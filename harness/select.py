"""The quality bar and the verdict: the most aggressive point whose quality stays within the bar."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .errors import UserError

OBJECTIVES = ("weight_bytes", "bits_per_weight")


def quality_corpora(frame: pd.DataFrame) -> list[str]:
    return sorted(c.removeprefix("ppl/") for c in frame.columns if c.startswith("ppl/"))


def baseline_row(frame: pd.DataFrame) -> pd.Series:
    base = frame[(frame["method"] == "fp16") & (frame["status"] == "ok")]
    if base.empty:
        raise UserError("the sweep has no baseline point: add one with quant=fp16 (same model and eval settings)")
    return base.iloc[0]


def select(frame: pd.DataFrame, policy: dict[str, Any]) -> dict[str, Any]:
    """Judge every point against the baseline; choose the passing point with the smallest objective."""
    objective = policy.get("objective", "weight_bytes")
    if objective not in OBJECTIVES:
        raise UserError(f"select.objective={objective!r} is not known: use one of {', '.join(OBJECTIVES)}")
    base = baseline_row(frame)
    corpora = quality_corpora(frame)
    points = []
    for _, row in frame[frame["status"] == "ok"].iterrows():
        reasons = []
        for c in corpora:
            increase = 100 * (row[f"ppl/{c}"] / base[f"ppl/{c}"] - 1)
            if increase > policy["max_ppl_increase_pct"]:
                reasons.append(f"ppl/{c} +{increase:.2f}% > {policy['max_ppl_increase_pct']}%")
            if row[f"kl/{c}"] > policy["max_kl"]:
                reasons.append(f"kl/{c} {row[f'kl/{c}']:.4f} > {policy['max_kl']}")
        points.append({"run_id": row["run_id"], "label": point_label(row), "passed": not reasons,
                       "reasons": reasons, objective: float(row[objective]),
                       "mean_kl": float(sum(row[f"kl/{c}"] for c in corpora) / len(corpora))})
    passing = sorted((p for p in points if p["passed"]), key=lambda p: (p[objective], p["mean_kl"]))
    chosen = passing[0] if passing else None
    return {"policy": dict(policy), "baseline": base["run_id"], "chosen": chosen and chosen["run_id"],
            "chosen_label": chosen and chosen["label"], "verdict": _verdict(chosen, points, objective),
            "points": points}


def point_label(row: pd.Series) -> str:
    if row["method"] == "fp16" or pd.isna(row["bits"]):
        return str(row["method"])
    group = "per-channel" if row["group_size"] == -1 else f"g{row['group_size']}"
    return f"{row['method']} {row['bits']}-bit {group}{' sym' if row.get('sym') else ''}"


def _verdict(chosen: dict | None, points: list[dict], objective: str) -> str:
    if chosen is None:
        return "No quantized point passes the bar: keep the baseline, or relax the policy."
    if chosen["label"] == "fp16":
        return "Only the baseline passes the bar: no quantized point stays within it."
    return f"{chosen['label']} is the most aggressive point that passes the bar (smallest {objective})."
