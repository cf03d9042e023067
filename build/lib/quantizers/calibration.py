"""Block-by-block calibration: only one decoder block's activations are alive at a time.

The inputs of the first block are captured by running the model up to it; each block then
runs on them, the quantizer does its work on that block, and the block's *quantized*
outputs become the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import decoder_layers
from .spec import QuantSpecError


class _ReachedFirstBlock(Exception):
    pass


# Samples go through a block together up to this many tokens: fewer, larger launches.
TOKENS_PER_BATCH = 16384


def sample_batches(calib: Tensor, tokens_per_batch: int = TOKENS_PER_BATCH) -> list[Tensor]:
    """Equal batches of calibration samples (equal, so the captured keyword arguments fit every one)."""
    n, seqlen = calib.shape
    size = max(d for d in range(1, n + 1) if n % d == 0 and d * seqlen <= max(tokens_per_batch, seqlen))
    return list(calib.split(size))


@torch.no_grad()
def first_block_inputs(model: nn.Module, calib: Tensor) -> tuple[list[Tensor], dict[str, Any]]:
    """Hidden states entering block 0 for each batch of samples, and the keyword arguments blocks are
    called with."""
    block = decoder_layers(model)[0]
    hidden, kwargs = [], {}

    def capture(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _ReachedFirstBlock

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in sample_batches(calib):
            try:
                model(batch.to(device), use_cache=False)
            except _ReachedFirstBlock:
                pass
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return hidden, kwargs


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[Tensor], kwargs: dict[str, Any]) -> list[Tensor]:
    outputs = []
    for h in hidden:
        out = block(h, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def blocks_with_inputs(model: nn.Module, calib: Tensor, device: torch.device | None = None
                       ) -> Iterator[tuple[int, nn.Module, list[Tensor], dict]]:
    """Yield (index, block, inputs, kwargs); after the caller has quantized a block, its outputs feed the next.

    With `device`, each block moves there while it is worked on and back afterwards, and the
    activations live there: a model kept on the CPU is quantized one block at a time on a GPU."""
    hidden, kwargs = first_block_inputs(model, calib)
    if device is not None:
        hidden, kwargs = _to(hidden, device), _to(kwargs, device)
    for index, block in enumerate(decoder_layers(model)):
        home = next(block.parameters()).device
        block.to(device or home)
        yield index, block, hidden, kwargs
        hidden = run_block(block, hidden, kwargs)
        block.to(home)


def calibrated_blocks(model: nn.Module, calib: Tensor | None, device: torch.device | None, method: str,
                      progress: bool = False) -> Iterator[tuple[nn.Module, list[Tensor], dict]]:
    """blocks_with_inputs for a calibrated method: refuses a missing calibration set, shows progress."""
    if calib is None:
        raise QuantSpecError(f"{method} needs calibration samples")
    blocks = blocks_with_inputs(model, calib, device)
    for _, block, inputs, kwargs in tqdm(blocks, desc=method, disable=not progress, unit="block",
                                         total=len(decoder_layers(model))):
        yield block, inputs, kwargs


def _to(value: Any, device: torch.device) -> Any:
    return map_tensors(value, lambda t: t.to(device))


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """fn applied to every tensor in nested lists, tuples and dicts; other values as they are."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


@contextmanager
def capture_inputs(linears: dict[str, nn.Linear], on_input) -> Iterator[None]:
    """Call on_input(name, x) with every input of each linear; the hooks are removed on exit."""
    handles = [m.register_forward_hook(lambda _m, args, _out, name=name: on_input(name, args[0]))
               for name, m in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
