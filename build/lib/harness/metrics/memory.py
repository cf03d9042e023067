"""Weight bytes from the real buffers, and peak memory (CUDA max allocated, or peak RSS on a CPU)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import nn

from quantizers import QuantLinear


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, and of the copies a kernel backend keeps beside them (its repacked
    layout), counting shared storage once."""
    seen: dict[int, int] = {}
    copies = [t for m in model.modules() if isinstance(m, QuantLinear) for t in m.backend_copies()]
    for t in list(model.parameters()) + list(model.buffers()) + copies:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def quantized_layer_stats(model: nn.Module) -> dict[str, float]:
    """Bytes and weight count of the quantized layers, real and as the format's formula says."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    real = sum(b.numel() * b.element_size() for m in layers for b in (m.qweight, m.scales, m.zeros) if b is not None)
    theory = sum(QuantLinear.theoretical_bytes(m.in_features, m.out_features, m.bits, m.group_size, m.sym)
                 for m in layers)
    return {"layers": len(layers), "bytes": real, "theoretical_bytes": theory,
            "weights": sum(m.in_features * m.out_features for m in layers)}


def linear_weight_stats(model: nn.Module, names: list[str]) -> dict[str, float]:
    """Bytes and weight count of unquantized linear layers (the baseline's side of bits per weight)."""
    linears = [model.get_submodule(n) for n in names]
    return {"bytes": sum(m.weight.numel() * m.weight.element_size() for m in linears),
            "weights": sum(m.weight.numel() for m in linears)}


class PeakMemory:
    """Peak memory inside the block: CUDA max allocated, or the process's peak RSS (reset where Linux allows)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = _peak_rss_bytes()


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass  # elsewhere the peak covers the whole process


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
