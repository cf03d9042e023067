"""On a GPU: a real model quantized with RTN, decoded greedily through each kernel backend.

    python benchmarks/check_decode_backends.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/check_decode_backends.py --model <hub id> --bits 4 --backends torch,triton,cuda

Per format (group 128, one group per row, symmetric group 128): the static-cache decode loop (CUDA graphs)
produces `--tokens` greedy tokens through every backend; prints the share of tokens equal to the torch
reference's and decode tokens/sec. Greedy sequences part for good at the first near tie, so each backend
is also fed the reference's tokens (teacher forcing): per step, whether its next token is the reference's,
and the largest difference of its logits from the reference's, relative to the largest reference logit.
The batch-1 GEMVs are what this exercises; the prefill goes through the same dequantize path in every
backend.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import quantizers
from harness.metrics.speed import decode_tok_s
from harness.models import load_model
from quantizers import QuantSpec, use_backend
from quantizers.kernels.decode import StaticDecoder

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def greedy(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    """`tokens` greedy tokens after the prompt."""
    decoder = StaticDecoder(model, max_len=prompt.numel() + tokens + 4)
    decoder.prefill(prompt)
    return decoder.decode(tokens).cpu()


@torch.no_grad()
def forced_logits(model: torch.nn.Module, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(len(tokens), vocab): the logits after each of `tokens`, fed one at a time after the prompt."""
    decoder = StaticDecoder(model, max_len=prompt.numel() + tokens.numel() + 4)
    decoder.prefill(prompt)
    ids = tokens.to(decoder.device)
    positions = torch.arange(prompt.numel(), prompt.numel() + ids.numel(), device=decoder.device)
    return torch.cat([decoder.forward(ids[i].view(1, 1), positions[i:i + 1]).float().reshape(1, -1)
                      for i in range(ids.numel())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id, local folder or .gguf file")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--backends", default="torch,triton,cuda", help="the first is the reference")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    loaded = load_model({"name": args.model, "source": "auto"}, torch.bfloat16, "cuda")
    prompt = torch.tensor(loaded.tokenizer(PROMPT)["input_ids"])
    backends = args.backends.split(",")
    for group_size, sym in ((128, False), (-1, False), (128, True)):
        model = quantizers.quantize(copy.deepcopy(loaded.model), QuantSpec("rtn", args.bits, group_size, sym=sym))
        results, ref_tokens = {}, None
        for backend in backends:  # the reference first: its tokens are fed to the others
            counts = use_backend(model, backend)
            tokens = greedy(model, prompt, args.tokens)
            ref_tokens = tokens if ref_tokens is None else ref_tokens
            results[backend] = (tokens, forced_logits(model, prompt, ref_tokens), counts,
                                decode_tok_s(model, prompt, args.tokens))
        ref_forced = results[backends[0]][1]
        scale = ref_forced.abs().amax(-1)
        for backend, (tokens, forced, counts, tok_s) in results.items():
            print(json.dumps({
                "format": f"w{args.bits}g{group_size}{'-sym' if sym else ''}", "backend": backend, "layers": counts,
                "tokens_equal_to_reference": (tokens == ref_tokens).float().mean().item(),
                "forced_next_token_agrees": (forced.argmax(-1) == ref_forced.argmax(-1)).float().mean().item(),
                "forced_logits_rel_diff": ((forced - ref_forced).abs().amax(-1) / scale).max().item(),
                "decode_tok_s": round(tok_s, 1)}))


if __name__ == "__main__":
    main()
