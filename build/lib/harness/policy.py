"""The quality bar's thresholds, as `select` and adaptive evaluation read them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def threshold_for(policy: Mapping[str, Any], key: str, name: str) -> float | None:
    """A check's threshold: one number for all, or a {name: number} mapping (unnamed: unchecked)."""
    value = policy.get(key)
    return value.get(name) if isinstance(value, Mapping) else value
