"""Perplexity over non-overlapping windows (GPTQ protocol), losses in float32."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class PerplexityResult:
    ppl: float
    nll_per_window: list[float]  # mean NLL of each window's predicted tokens
    tokens: int  # tokens predicted


def token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """NLL of each next token: logits (T, V) predict ids[1:] from positions [:-1]."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -logprobs.gather(-1, ids[1:, None]).squeeze(-1)


@torch.no_grad()
def window_logits(model: nn.Module, windows: Tensor) -> Iterator[Tensor]:
    """Logits (seqlen, vocab) of each window, one forward at a time (batch 1 bounds memory)."""
    device = next(model.parameters()).device
    for window in windows:
        yield model(window[None].to(device), use_cache=False).logits[0]


def perplexity(model: nn.Module, windows: Tensor) -> PerplexityResult:
    pairs = zip(windows, window_logits(model, windows), strict=True)
    nll = [token_nll(logits, w.to(logits.device)).mean().item() for w, logits in pairs]
    return PerplexityResult(ppl_from_nll(nll), nll, windows.shape[0] * (windows.shape[1] - 1))


def ppl_from_nll(nll_per_window: list[float]) -> float:
    """exp of the mean NLL; inf where a finite but catastrophic loss (over ~709 nats a token) overflows it."""
    mean = sum(nll_per_window) / len(nll_per_window)
    return math.exp(mean) if mean < 709 else math.inf
