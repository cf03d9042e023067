"""QuantSpec: what to quantize to, validated where it is made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

BASELINE_METHODS = ("fp16",)


class QuantSpecError(ValueError):
    """A spec that cannot be quantized to; the message says what to change."""


@dataclass(frozen=True)
class QuantSpec:
    method: str
    bits: int | None = None  # None for the baseline
    group_size: int | None = 128  # -1: one group per output channel
    sym: bool = False
    quantize_lm_head: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)  # method knobs

    def __post_init__(self) -> None:
        if self.method in BASELINE_METHODS:
            # The baseline ignores the grid knobs, so sweeps that vary them collapse to one point.
            object.__setattr__(self, "bits", None)
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "sym", False)
            return
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QuantSpecError(f"quant.bits={self.bits} is not supported: use an integer from 2 to 8")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size == 0
                or self.group_size < -1):
            raise QuantSpecError(
                f"quant.group_size={self.group_size} is not valid: use a positive group size, "
                "or -1 for one group per output channel"
            )
        for name in ("sym", "quantize_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise QuantSpecError(f"quant.{name}={getattr(self, name)!r} must be true or false")

    @property
    def is_baseline(self) -> bool:
        return self.bits is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        return cls(**{**d, "options": dict(d.get("options") or {})})

    @property
    def label(self) -> str:
        """A short readable name: rtn-w4g128, rtn-w8pc, fp16."""
        if self.is_baseline:
            return self.method
        group = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.method}-w{self.bits}{group}{'-sym' if self.sym else ''}"
