"""Prefill and batch-1 greedy decode throughput: warm-up, synchronisation, median of repeats."""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn

from quantizers.kernels.decode import StaticDecoder, capture_cuda_graph


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times_s(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _median_time_s(fn, device: torch.device, repeats: int, warmup: int) -> float:
    return statistics.median(_times_s(fn, device, repeats, warmup))


def rate_and_spread(units: float, times_s: list[float]) -> tuple[float, float]:
    """units per second at the median time, and the spread of the repeats: (slowest − fastest) / median, in %."""
    median = statistics.median(times_s)
    return units / median, 100 * (max(times_s) - min(times_s)) / median


@torch.no_grad()
def timed_us(fn, device: torch.device, repeats: int) -> float:
    """Microseconds per call of fn. On CUDA, fn is captured once in a CUDA graph and replayed, so the
    time is the kernels' and not Python's launch overhead; on the CPU, the median of `repeats` calls."""
    if device.type != "cuda":
        return _median_time_s(fn, device, repeats, warmup=2) * 1e6
    graph = capture_cuda_graph(fn, warmup=3)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


@torch.no_grad()
def prefill_times_s(model: nn.Module, prompt: Tensor, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of each timed forward over `prompt` (1-D ids). On CUDA, the decode loop's prefill captured
    in a CUDA graph, each replay timed by CUDA events: a small model's eager forward is mostly Python's
    kernel launches, whose jitter gave spreads up to 75% over 10 repeats on an H200 (docs/sweep-speed.md)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        ids = prompt[None].to(device)
        return _times_s(lambda: model(ids, use_cache=False), device, repeats, warmup)
    graph = capture_cuda_graph(prefill_step(model, prompt), warmup=max(warmup, 1))
    return _graph_times_s(graph, repeats)


def prefill_step(model: nn.Module, prompt: Tensor):
    """The function that GPU prefill timing captures: the decode loop's prefill of `prompt`, which leaves
    the greedy next token in `decoder.token`; the ids are on the device first, since a copy from the host
    cannot be captured."""
    decoder = StaticDecoder(model, max_len=prompt.numel() + 2)
    ids = prompt.to(decoder.device)

    def step() -> Tensor:
        decoder.prefill(ids)
        return decoder.token

    return step


def _graph_times_s(graph: torch.cuda.CUDAGraph, repeats: int) -> list[float]:
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def prefill_tok_s(model: nn.Module, prompt: Tensor, repeats: int = 3, warmup: int = 1) -> float:
    """Tokens per second of one forward over `prompt` (1-D ids)."""
    return rate_and_spread(prompt.numel(), prefill_times_s(model, prompt, repeats, warmup))[0]


def decode_tok_s(model: nn.Module, prompt: Tensor, new_tokens: int, repeats: int = 3, warmup: int = 1) -> float:
    """Greedy batch-1 decode after `prompt` with a static KV cache (and a CUDA graph per step on CUDA,
    see quantizers.kernels.decode); the prefill is not timed."""
    return rate_and_spread(new_tokens, decode_times_s(model, prompt, new_tokens, repeats, warmup))[0]


@torch.no_grad()
def decode_times_s(model: nn.Module, prompt: Tensor, new_tokens: int, repeats: int = 3,
                   warmup: int = 1) -> list[float]:
    """Seconds of each timed decode of `new_tokens` (see decode_tok_s)."""
    device = next(model.parameters()).device
    decoder = StaticDecoder(model, max_len=prompt.numel() + new_tokens + 2)

    def decode() -> None:
        decoder.prefill(prompt)
        _sync(device)
        start = time.perf_counter()
        decoder.decode(new_tokens)
        _sync(device)
        times.append(time.perf_counter() - start)

    times: list[float] = []
    for _ in range(warmup):
        decode()
    times.clear()
    for _ in range(repeats):
        decode()
    return times
