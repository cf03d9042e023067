"""Adaptive evaluation: skip the tasks of a point whose verdict under the sweep's bar is already decided.

A point's perplexity windows come first (one forward each: cheap); its tasks, most of a point's time on
a CPU, come after. A point passes only if every check passes, so once a fully measured check fails, the
verdict is decided whatever its tasks say. The point stops there only if both hold:

- its perplexity increase or KL fails clearly: a Student-t lower bound over the windows at
  `eval.adaptive_confidence` (0.995) is beyond the threshold;
- so it fails the bar as `select` will judge it (whose upper bound of the same mean is above that lower
  bound): under the sweep's own bar stopping never changes a verdict.

Points near the bar are evaluated whole, so a later, looser bar (`harness select`) still has their
tasks; for a point truly at the bar, each such check stops it with probability at most
1 − adaptive_confidence (simulated in tests/test_adaptive.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import stats
from .policy import threshold_for


def decided_fail(base_nll: Mapping[str, list[float]], point_nll: Mapping[str, list[float]],
                 point_kl: Mapping[str, list[float]], policy: Mapping[str, Any], confidence: float) -> str | None:
    """Why the point already fails the bar, clearly (see above), or None. Per corpus, paired windows: the
    baseline's and the point's NLL, and the point's KL to the baseline."""
    for corpus in point_nll:
        judged = policy.get("corpora")
        if judged is not None and corpus not in judged:
            continue
        diffs = [p - b for p, b in zip(point_nll[corpus], base_nll[corpus], strict=True)]
        ppl_bar = threshold_for(policy, "max_ppl_increase_pct", corpus)
        if ppl_bar is not None:
            low = stats.increase_pct(stats.mean_lower(diffs, confidence))
            if low > ppl_bar:  # then select's own bound, the same mean's at a lower confidence, is beyond too
                return f"ppl/{corpus} increase ≥ {low:+.3g}% at {confidence:.1%} > {ppl_bar}%"
        kl_bar = threshold_for(policy, "max_kl", corpus)
        if kl_bar is not None and corpus in point_kl:
            low = stats.mean_lower(point_kl[corpus], confidence)
            if low > kl_bar:
                return f"kl/{corpus} ≥ {low:.4g} at {confidence:.1%} > {kl_bar}"
    return None
