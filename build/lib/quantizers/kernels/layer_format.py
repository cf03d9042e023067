"""What a backend may know of a layer before it is quantized: its shape and format, never its storage.

Backend selection runs twice: before any work (from the grid point's spec and the model's linear
shapes) and when the packed model is put on its kernels. Both ask the same questions of a
`LayerFormat`, so a check that passes before quantization cannot fail after it for want of a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..grid import n_groups


@dataclass(frozen=True)
class LayerFormat:
    in_features: int
    out_features: int
    bits: int
    group_size: int  # -1: one group per output channel
    sym: bool = False

    @property
    def n_groups(self) -> int:
        return n_groups(self.in_features, self.group_size)

    @property
    def one_group(self) -> bool:
        """One group spans the whole row (per channel, or a group size at least the width)."""
        return self.n_groups == 1
