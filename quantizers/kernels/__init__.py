"""Kernel backends for QuantLinear's forward, chosen per device, shape and format.

Each backend says why it cannot serve a layer (or None when it can) and computes y = x Wᵀ + b.
`torch` (dequantize, then one matmul) is the reference every other backend is tested against.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import int4pack
from .layer_format import LayerFormat

__all__ = ["BACKENDS", "Backend", "BackendError", "LayerFormat", "check_backend", "choose", "serving", "use_backend"]
from .torch_ref import dequantize_matmul

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str
    why_not: Callable[[LayerFormat, torch.device], str | None]  # None when it can serve such a layer there
    forward: Callable[[Tensor, nn.Module], Tensor]
    prepare: Callable[[nn.Module], None] = lambda layer: None  # convert the storage once, at load time
    summary: str = ""
    reference_dequantize: bool = False  # many-row inputs go through the reference's dequantize_weight


def _always(layer: LayerFormat, device: torch.device) -> str | None:
    return None


def _triton_why_not(layer: LayerFormat, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "it runs on CUDA only"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _cuda_why_not(layer: LayerFormat, device: torch.device) -> str | None:
    from . import cuda_gemv

    if device.type != "cuda":
        return "it runs on CUDA only"
    return cuda_gemv.why_not(layer, device) or _triton_why_not(layer, device)  # Triton dequantizes for prefill


def _triton_gemv(x: Tensor, layer: nn.Module) -> Tensor:
    from . import triton_lowbit  # imported on first use: triton is optional

    return triton_lowbit.gemv(x, layer)


def _cuda_gemv(x: Tensor, layer: nn.Module) -> Tensor:
    from . import cuda_gemv

    if not cuda_gemv.serves(x):
        _warn_once(f"the cuda backend's GEMV takes bf16 activations, contiguous and 16-byte aligned; these "
                   f"({x.dtype}) go through Triton's GEMV (run in bfloat16 to use it)")
        return _triton_gemv(x, layer)
    return cuda_gemv.gemv(x, layer)


def _gemv_or_gemm(gemv: Callable[[Tensor, nn.Module], Tensor]) -> Callable[[Tensor, nn.Module], Tensor]:
    """A forward: batch 1 through `gemv` (the packed weights read once), more rows through Triton's
    dequantize and cuBLAS (compute-bound: the one extra pass over the weights costs little)."""
    def forward(x: Tensor, layer: nn.Module) -> Tensor:
        from . import triton_lowbit

        flat = x.reshape(-1, layer.in_features)
        if flat.shape[0] == 1:
            y = gemv(flat[0], layer)[None]
        else:
            y = torch.nn.functional.linear(flat, triton_lowbit.dequantize(layer, x.dtype))
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], layer.out_features)

    return forward


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", _always, dequantize_matmul, summary="dequantize + matmul (the reference), any device",
                reference_dequantize=True),
        Backend("cuda", _cuda_why_not, _gemv_or_gemm(_cuda_gemv),
                summary="CUDA: a CUDA C++ GEMV at batch 1 (compiled at first use), Triton's dequantize + cuBLAS "
                        "GEMM otherwise; 3- and 4-bit (widths and groups in multiples of 32) and 8-bit (of 16), bf16"),
        Backend("triton", _triton_why_not, _gemv_or_gemm(_triton_gemv),
                summary="CUDA: fused dequantize-GEMV at batch 1, dequantize + cuBLAS GEMM otherwise; any format"),
        Backend("tinygemm", int4pack.tinygemm_why_not, int4pack.tinygemm_forward, int4pack.prepare_tinygemm,
                summary="CUDA: aten._weight_int4pack_mm, 4-bit, groups 32-256, bf16"),
        Backend("cpu_int4", int4pack.cpu_why_not, int4pack.cpu_forward, int4pack.prepare_cpu,
                summary="CPU: aten._weight_int4pack_mm_for_cpu, 4-bit, groups 32-256", reference_dequantize=True),
    )
}

# What `auto` picks, best first, per device type: the fastest measured on a GPU (docs/kernels.md), then
# what serves every format; tinygemm stays available by name.
PREFERENCE = {"cuda": ("cuda", "triton", "tinygemm", "torch"), "cpu": ("cpu_int4", "torch")}


class BackendError(ValueError):
    """A backend was named that cannot serve a layer; the message says which backends can."""


def serving(layer: LayerFormat, device: torch.device) -> list[str]:
    return [name for name, b in BACKENDS.items() if b.why_not(layer, device) is None]


def choose(layer: LayerFormat, device: torch.device) -> str:
    preference = PREFERENCE.get(device.type, ("torch",))
    return next(name for name in preference if BACKENDS[name].why_not(layer, device) is None)


def check_backend(name: str, layers: dict[str, tuple[LayerFormat, torch.device]]) -> dict[str, str]:
    """The backend each layer would get; `layers` maps a name to (its format, its device). The same
    answer before quantization as after it. Raises BackendError for a named backend that cannot serve one."""
    if name != "auto" and name not in BACKENDS:
        raise BackendError(f"quant.backend={name!r} is not known: use auto or one of {', '.join(BACKENDS)}")
    chosen = {}
    for layer_name, (layer, device) in layers.items():
        chosen[layer_name] = choose(layer, device) if name == "auto" else name
        reason = BACKENDS[chosen[layer_name]].why_not(layer, device)
        if reason is not None:
            raise BackendError(
                f"quant.backend={name} cannot serve {layer_name} ({layer.bits}-bit, group {layer.group_size}, "
                f"{layer.in_features} wide, on {device.type}): {reason}; backends that can: "
                f"{', '.join(serving(layer, device))} (or quant.backend=auto)"
            )
    return chosen
