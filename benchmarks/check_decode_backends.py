"""On a GPU: a real model quantized with RTN, decoded greedily through each kernel backend.

    python benchmarks/check_decode_backends.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/check_decode_backends.py --model <hub id> --bits 4 --backends torch,triton,cuda

Per format (group 128, one group per row, symmetric group 128): the static-cache decode loop (CUDA graphs)
produces `--tokens` greedy tokens through every backend; prints the share of tokens equal to the torch
reference's, the largest relative difference of one more step's logits, and decode tokens/sec. The batch-1
GEMVs are what this exercises; the prefill goes through the same dequantize path in every backend.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import quantizers
from harness.decoder import StaticDecoder
from harness.metrics.speed import decode_tok_s
from harness.models import load_model
from quantizers import QuantSpec
from quantizers.kernels import use_backend

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def greedy(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens` greedy tokens after the prompt, and the logits of the step after them."""
    decoder = StaticDecoder(model, max_len=prompt.numel() + tokens + 4)
    decoder.prefill(prompt)
    out = decoder.decode(tokens)
    pos = torch.tensor([prompt.numel() + tokens], device=out.device)
    return out.cpu(), decoder.forward(out[-1:].view(1, 1), pos).float()


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
        results = {}
        for backend in backends:
            counts = use_backend(model, backend)
            tokens, logits = greedy(model, prompt, args.tokens)
            results[backend] = (tokens, logits, counts, decode_tok_s(model, prompt, args.tokens))
        ref_tokens, ref_logits = results[backends[0]][:2]
        for backend, (tokens, logits, counts, tok_s) in results.items():
            print(json.dumps({
                "format": f"w{args.bits}g{group_size}{'-sym' if sym else ''}", "backend": backend, "layers": counts,
                "tokens_equal_to_reference": (tokens == ref_tokens).float().mean().item(),
                "next_logits_rel_diff": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
                "decode_tok_s": round(tok_s, 1)}))


if __name__ == "__main__":
    main()
