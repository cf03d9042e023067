"""QuantLinear: a linear layer stored as packed integer codes + per-group scales/zeros."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import grid, packing
from .kernels import BACKENDS, check_backend
from .kernels.layer_format import LayerFormat


class QuantLinear(nn.Module):
    """Packed `bits`-bit weights; forward through a kernel backend: the reference (dequantize + matmul)
    until `quantizers.use_backend(model, name)` picks one for the device the model is on."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: Tensor | None = None,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.backend = backend
        ng = grid.n_groups(in_features, group_size)
        cols = packing.packed_columns(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, ng, dtype=torch.float16))
        # A symmetric grid's zero point is the constant 2^(bits-1): nothing to store.
        self.register_buffer("zeros", None if sym else torch.zeros(out_features, ng, dtype=torch.uint8))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_codes(
        cls, linear: nn.Linear, codes: Tensor, params: grid.GridParams, group_size: int, sym: bool, bits: int
    ) -> QuantLinear:
        layer = cls(linear.in_features, linear.out_features, bits, group_size, sym, linear.bias)
        layer.to(linear.weight.device)
        layer.qweight.copy_(packing.pack(codes, bits))
        layer.scales.copy_(params.scale)
        if not sym:
            layer.zeros.copy_(params.zero)
        return layer

    @property
    def format(self) -> LayerFormat:
        return LayerFormat(self.in_features, self.out_features, self.bits, self.group_size, self.sym)

    def grid_params(self) -> grid.GridParams:
        zero = self.zeros
        if zero is None:
            zero = torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.uint8)
        return grid.GridParams(scale=self.scales, zero=zero)

    def codes(self) -> Tensor:
        return packing.unpack(self.qweight, self.bits, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        kept = getattr(self, "_dequantized", None)
        if kept is not None and kept.dtype == dtype:
            return kept
        return grid.dequantize(self.codes(), self.grid_params(), self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return BACKENDS[self.backend].forward(x, self)

    def backend_copies(self) -> list[Tensor]:
        """Tensors a backend keeps beside the packed storage (its own repacked layout), resident while it serves."""
        out = []
        for attr in ("_tinygemm", "_cpu_int4"):
            out += [t for t in getattr(self, attr, None) or () if isinstance(t, Tensor)]
        return out

    @staticmethod
    def theoretical_bytes(in_features: int, out_features: int, bits: int, group_size: int, sym: bool) -> int:
        """Bytes that the format needs: packed codes, float16 scales, uint8 zeros (asymmetric)."""
        ng = grid.n_groups(in_features, group_size)
        per_row = packing.packed_columns(in_features, bits) + ng * 2 + (0 if sym else ng)
        return out_features * per_row

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, backend={self.backend}"
        )


@contextmanager
def dequantized_once(model: nn.Module, dtype: torch.dtype) -> Iterator[int]:
    """Inside the block, each QuantLinear whose backend dequantizes through the reference at every call
    (`torch`; `cpu_int4` above a few rows) keeps its dequantized weight instead: the same values, computed
    once, for many-token passes (perplexity, task scoring) on devices without a faster kernel. Costs one
    dense copy of those layers until the block ends. Yields the bytes kept."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and BACKENDS[m.backend].reference_dequantize]
    for layer in layers:
        layer._dequantized = layer.dequantize_weight(dtype)
    try:
        yield sum(m._dequantized.numel() * m._dequantized.element_size() for m in layers)
    finally:
        for layer in layers:
            layer._dequantized = None


def fuse_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing `layers`' outputs side by side (their rows stacked), for linears that read the
    same input (q/k/v; gate/up): one launch instead of several at batch-1 decode, where the small ones are
    bound by launch latency, not bytes. The layers' weights become views of the fused storage, so nothing
    is stored twice. None when they cannot be fused: not all plain nn.Linear or all QuantLinear of one
    format and backend, or of different widths."""
    first = layers[0]
    if isinstance(first, QuantLinear):
        key = lambda m: (m.in_features, m.bits, m.group_size, m.sym, m.backend, m.qweight.device)  # noqa: E731
    elif type(first) is nn.Linear:
        key = lambda m: (m.in_features, m.weight.dtype, m.weight.device)  # noqa: E731
    else:
        return None
    if any(type(m) is not type(first) or key(m) != key(first) for m in layers):
        return None
    with torch.no_grad():
        bias = next((m.bias for m in layers if m.bias is not None), None)
        if bias is not None:  # a layer without one adds zeros
            bias = torch.cat([m.bias if m.bias is not None else bias.new_zeros(m.out_features) for m in layers])
        out_features = sum(m.out_features for m in layers)
        if isinstance(first, QuantLinear):
            fused = QuantLinear(first.in_features, out_features, first.bits, first.group_size, first.sym, bias,
                                first.backend).to(first.qweight.device)
            names = ["qweight", "scales"] + ([] if first.sym else ["zeros"])
        else:
            fused = nn.Linear(first.in_features, out_features, bias=bias is not None, device=first.weight.device,
                              dtype=first.weight.dtype).requires_grad_(False)
            names = ["weight"]
            if bias is not None:
                fused.bias.copy_(bias)
        for name in names:
            getattr(fused, name).copy_(torch.cat([getattr(m, name) for m in layers]))
        start = 0
        for m in layers:  # each layer's storage becomes its rows of the fused one
            rows = slice(start, start + m.out_features)
            for name in names:
                view = getattr(fused, name)[rows]
                setattr(m, name, nn.Parameter(view, requires_grad=False) if name == "weight" else view)
            start += m.out_features
    if isinstance(fused, QuantLinear):
        BACKENDS[fused.backend].prepare(fused)
    return fused


def use_backend(model: nn.Module, name: str = "auto") -> dict[str, int]:
    """Set (and prepare) the kernel backend of every QuantLinear of the model, on the device it is on.
    `auto` picks per layer; a named backend that cannot serve a layer raises BackendError naming the
    layer, why, and the backends that can. Returns how many layers each backend got."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    chosen = check_backend(name, {n: (m.format, m.qweight.device) for n, m in layers.items()})
    for layer_name, layer in layers.items():
        BACKENDS[chosen[layer_name]].prepare(layer)
        layer.backend = chosen[layer_name]
    return dict(Counter(chosen.values()))
