"""Adaptive evaluation: stop a point whose verdict under the sweep's bar is already decided.

After a point's perplexity windows (cheap: one forward each) and before its tasks (most of a point's time
on a CPU), its per-window perplexity increase and KL are bounded from below at a high confidence
(`eval.adaptive_confidence`, 0.995 by default; Student-t over the windows, `stats.mean_lower`). If a lower
bound is already beyond its threshold, the point cannot pass, and its tasks are not run.

Only failing can be decided early: a pass is still decided on every window and item, at the bar's own
confidence, so the chance of a false pass is unchanged. What adaptivity can cost is a point truly within
the bar stopped as failing: at most 1 − adaptive_confidence (one look per point; simulated in
tests/test_adaptive.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import stats
from .select import threshold_for


def decided_fail(base_nll: Mapping[str, list[float]], point_nll: Mapping[str, list[float]],
                 point_kl: Mapping[str, list[float]], policy: Mapping[str, Any], confidence: float) -> str | None:
    """Why the point already fails the bar (a corpus's perplexity increase or KL beyond its threshold at
    `confidence`), or None. Per corpus, paired windows: NLL differences, and the point's KL per window."""
    for corpus in point_nll:
        judged = policy.get("corpora")
        if judged is not None and corpus not in judged:
            continue
        ppl_bar = threshold_for(policy, "max_ppl_increase_pct", corpus)
        diffs = [p - b for p, b in zip(point_nll[corpus], base_nll[corpus], strict=True)]
        if ppl_bar is not None:
            low = 100 * math.expm1(stats.mean_lower(diffs, confidence))
            if low > ppl_bar:
                return f"ppl/{corpus} increase ≥ {low:+.3g}% at {confidence:.1%} > {ppl_bar}%"
        kl_bar = threshold_for(policy, "max_kl", corpus)
        if kl_bar is not None and corpus in point_kl:
            low = stats.mean_lower(point_kl[corpus], confidence)
            if low > kl_bar:
                return f"kl/{corpus} ≥ {low:.4g} at {confidence:.1%} > {kl_bar}"
    return None
