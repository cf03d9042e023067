"""What a precision means for bigger models of the same family: weight memory at 7B, 13B and 70B
parameters, and which common GPUs hold it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from .shapes import FAMILY_SIZES, linear_shapes

GPUS_GIB = {"24 GB (RTX 4090, L4)": 24, "48 GB (L40S, RTX 6000 Ada)": 48, "80 GB (A100, H100)": 80,
            "141 GB (H200)": 141}
HEADROOM = 0.9  # weights may take 90% of the memory: the rest for the CUDA context, activations, a short KV cache


def family_params(size: str) -> dict[str, int]:
    """Parameters in the decoder blocks' linears and in the embeddings and output head."""
    config = SimpleNamespace(**FAMILY_SIZES[size])
    per_block = sum(o * i for o, i in linear_shapes(config).values())
    embeddings = config.vocab_size * config.hidden_size
    return {"linear": per_block * config.num_hidden_layers, "embedding": embeddings,
            "head": 0 if config.tie_word_embeddings else embeddings}


def weight_bytes(size: str, bits_per_weight: float | None, quantize_head: bool = False) -> float:
    """Weight bytes with the linears at `bits_per_weight` (scales included; None: 16-bit), embeddings 16-bit."""
    p = family_params(size)
    linear_bits = 16.0 if bits_per_weight is None else bits_per_weight
    head_bits = linear_bits if quantize_head else 16.0
    return (p["linear"] * linear_bits + p["head"] * head_bits + p["embedding"] * 16.0) / 8


def table(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (point, family size): GB of weights and the GPUs that hold them. Each point is
    {"label", "bits_per_weight" (None for 16-bit), "quantize_head"}."""
    rows = []
    for point in points:
        for size in FAMILY_SIZES:
            nbytes = weight_bytes(size, point["bits_per_weight"], point.get("quantize_head", False))
            fits = [name for name, gib in GPUS_GIB.items() if nbytes <= HEADROOM * gib * 2**30]
            rows.append({"point": point["label"], "size": size, "weight_gb": nbytes / 1e9,
                         "fits": fits[0] if fits else "none of these (needs several GPUs)"})
    return rows
