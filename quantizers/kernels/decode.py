"""Greedy batch-1 decoding that measures the model, not Python.

`model.generate` costs about 90 ms per token on an H100 whatever the model's size: per-step Python
and cache bookkeeping. This loop preallocates the KV cache, reuses the model's own modules (so its
QuantLinear kernels run), and on CUDA captures one decode step in a CUDA graph: a step is then one
graph replay. Linears that read one input (q/k/v; gate/up) run as one fused layer each, bf16 or
quantized alike (`quantizers.linear.fuse_rows`: their weights become views of the fused storage), and
on CUDA the small operations between the linears are compiled (`Glue`). Llama-family decoders
(model.model.layers with self_attn / mlp / two norms).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..arch import decoder_layers
from ..linear import fuse_rows

log = logging.getLogger(__name__)


class StaticDecoder:
    def __init__(self, model: nn.Module, max_len: int, cuda_graph: bool | None = None, fuse: bool = True,
                 compile: bool | None = None) -> None:
        self.model, self.layers, self.max_len = model, decoder_layers(model), max_len
        param = next(model.parameters())
        self.glue = Glue(param.device.type == "cuda" if compile is None else compile)
        self.qkv = [_fused(fuse, layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in self.layers]
        self.gate_up = [_fused(fuse, layer.mlp, ("gate_proj", "up_proj")) for layer in self.layers]
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device, dtype = param.device, model.model.embed_tokens.weight.dtype
        shape = (1, cfg.num_key_value_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in self.layers]
        self.positions = torch.arange(max_len, device=self.device)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # the next input, then output
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def forward(self, ids: Tensor, pos: Tensor) -> Tensor:
        """Logits of the last of `ids` (1, T) at positions `pos` (T,), writing their keys and values."""
        inner, glue = self.model.model, self.glue
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, pos[None])
        # (T, max_len) additive mask, causal over the cache: made once per step, not once per layer
        visible = torch.zeros(1, device=self.device, dtype=h.dtype).masked_fill(
            self.positions[None, :] > pos[:, None], float("-inf"))
        x = glue.norm(self.layers[0].input_layernorm, h)
        norms_after = [layer.input_layernorm for layer in self.layers[1:]] + [inner.norm]
        for layer, qkv, gate_up, keys, values, norm_after in zip(self.layers, self.qkv, self.gate_up, self.keys,
                                                                 self.values, norms_after, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = (qkv(x).split(_widths(attn, "q_proj", "k_proj", "v_proj"), dim=-1) if qkv else
                       (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)))
            h, x = glue.add_norm(h, self._attention(attn, q, k, v, cos, sin, pos, visible, keys, values),
                                 layer.post_attention_layernorm)
            if gate_up is None:
                y = mlp(x)
            else:
                gate, up = gate_up(x).split(_widths(mlp, "gate_proj", "up_proj"), dim=-1)
                y = mlp.down_proj(glue.act_mul(mlp, gate, up))
            h, x = glue.add_norm(h, y, norm_after)  # the next layer's input norm, or the final one
        return self.model.lm_head(x[:, -1:])[:, -1]

    def _attention(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor,
                   visible: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        t = q.shape[1]
        q, k, v = (y.view(1, t, -1, self.head_dim).transpose(1, 2) for y in (q, k, v))
        if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = self.glue.rope_and_cache(q, k, v, cos, sin, pos, keys, values)
        scale = getattr(attn, "scaling", self.head_dim**-0.5)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True)
        return attn.o_proj(o.transpose(1, 2).reshape(1, t, -1))

    def _step(self) -> None:
        logits = self.forward(self.token, self.pos)
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> None:
        """Fill the cache with `prompt` (1-D ids); the next token is the prompt's greedy continuation."""
        n = prompt.numel()
        if n + 1 > self.max_len:
            raise ValueError(f"a prompt of {n} tokens leaves no room in a cache of {self.max_len}")
        logits = self.forward(prompt[None].to(self.device), self.positions[:n])
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(n)

    @torch.no_grad()
    def decode(self, new_tokens: int) -> Tensor:
        """The next `new_tokens` greedy tokens (1-D), continuing from the prefill or the last decode."""
        if int(self.pos) + max(new_tokens, 2) > self.max_len:  # the graph's warm-up writes two steps
            raise ValueError(f"{new_tokens} more tokens do not fit a cache of {self.max_len}")
        if self.use_graph and self.graph is None:
            self._capture()
        step = self.graph.replay if self.graph is not None else self._step
        out = []
        for _ in range(new_tokens):
            out.append(self.token.clone())
            step()
        return torch.cat(out).reshape(-1)

    def _capture(self) -> None:
        token, pos = self.token.clone(), self.pos.clone()
        self.graph = capture_cuda_graph(self._step, warmup=2)
        self.token.copy_(token)  # the warm-up moved on; its cache writes are rewritten by the next steps
        self.pos.copy_(pos)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm's arithmetic as a function (float32 statistics, the weight applied in x's dtype)."""
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def _add_rms_norm(h: Tensor, y: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    h = h + y
    return h, _rms_norm(h, weight, eps)


def _rope_and_cache(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, keys: Tensor,
                    values: Tensor) -> Tensor:
    """Rotary embedding of q and k, k and v written into the cache at `pos`; the rotated q."""
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys.index_copy_(2, pos, k)
    values.index_copy_(2, pos, v)
    return q


def _silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # _rms_norm's arithmetic
SILU = ("SiLU", "SiLUActivation")


class Glue:
    """The decode step's small operations between the linears (norms, residual adds, rotary embedding,
    the MLP's activation). Eager, each is 3-8 kernel launches: measured on an H100, an 8B-shaped model's
    step ran about 800 such kernels, 2.2 ms of GPU time against 5.9 ms for its linears. Compiled
    (`torch.compile`, on CUDA by default), each becomes one fused kernel: the same arithmetic as the
    modules (`RMS_NORMS`, `SILU`); other norms and activations stay eager."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self.fell_back: list[str] = []  # the functions that failed to compile and run eagerly
        wrap = (lambda fn: _compiled(fn, self.fell_back)) if compiled else (lambda fn: fn)
        self._norm, self._add_norm = wrap(_rms_norm), wrap(_add_rms_norm)
        self._rope_and_cache, self._silu_mul = wrap(_rope_and_cache), wrap(_silu_mul)

    def norm(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.compiled and type(module).__name__ in RMS_NORMS:
            return self._norm(x, module.weight, module.variance_epsilon)
        return module(x)

    def add_norm(self, h: Tensor, y: Tensor, module: nn.Module) -> tuple[Tensor, Tensor]:
        if self.compiled and type(module).__name__ in RMS_NORMS:
            return self._add_norm(h, y, module.weight, module.variance_epsilon)
        h = h + y
        return h, module(h)

    def rope_and_cache(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, keys: Tensor,
                       values: Tensor) -> Tensor:
        return self._rope_and_cache(q, k, v, cos, sin, pos, keys, values)

    def act_mul(self, mlp: nn.Module, gate: Tensor, up: Tensor) -> Tensor:
        if self.compiled and type(mlp.act_fn).__name__ in SILU:
            return self._silu_mul(gate, up)
        return mlp.act_fn(gate) * up


_COMPILED: dict[str, object] = {}  # one torch.compile per function for the process: every decoder reuses it


def _compiled(fn, fell_back: list[str]):
    """fn through torch.compile (static shapes; our own CUDA graph replays the step), or fn itself, with a
    warning, where compiling fails (no compiler for the device, an unsupported op)."""
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False, fullgraph=True)
    compiled = _COMPILED[fn.__name__]

    def call(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except Exception as e:  # inductor raises many types; the eager function computes the same
            log.warning("torch.compile failed for %s (%s): running it eagerly", fn.__name__, str(e)[:200])
            compiled = fn
            fell_back.append(fn.__name__)
            return fn(*args)
    return call


def _fused(fuse: bool, module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    if not fuse or not all(hasattr(module, name) for name in names):
        return None
    if names == ("gate_proj", "up_proj") and not (hasattr(module, "down_proj") and hasattr(module, "act_fn")):
        return None  # not the gated MLP this loop computes
    return fuse_rows([getattr(module, name) for name in names])


def _widths(module: nn.Module, *names: str) -> list[int]:
    return [getattr(module, name).out_features for name in names]


@functools.cache
def _capture_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for every capture: torch keeps a cuBLAS workspace per stream for the
    process's life, so a new stream per capture leaked 32 MiB each into later points' memory figures."""
    return torch.cuda.Stream(device)


def capture_cuda_graph(fn, warmup: int) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after `warmup` calls on a side stream (kernels compile, workspaces
    are allocated outside the graph, as capture requires)."""
    stream = _capture_stream(torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
