"""Greedy batch-1 decoding that measures the model, not Python.

`model.generate` costs about 90 ms per token on an H100 whatever the model's size: per-step Python
and cache bookkeeping. This loop preallocates the KV cache, reuses the model's own modules (so its
QuantLinear kernels run), and on CUDA captures one decode step in a CUDA graph: a step is then one
graph replay. Llama-family decoders (model.model.layers with self_attn / mlp / two norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quantizers.arch import decoder_layers


class StaticDecoder:
    def __init__(self, model: nn.Module, max_len: int, cuda_graph: bool | None = None) -> None:
        self.model, self.layers, self.max_len = model, decoder_layers(model), max_len
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
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
        inner = self.model.model
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, pos[None])
        visible = self.positions[None, :] <= pos[:, None]  # (T, max_len): causal over the cache
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, pos, visible, keys, values)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h[:, -1:]))[:, -1]

    def _attention(self, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, visible: Tensor,
                   keys: Tensor, values: Tensor) -> Tensor:
        t = x.shape[1]
        q, k, v = (proj(x).view(1, t, -1, self.head_dim).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
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


def capture_cuda_graph(fn, warmup: int) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after `warmup` calls on a side stream (kernels compile, workspaces
    are allocated outside the graph, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
