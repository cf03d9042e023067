"""On a GPU: GPTQ's Triton block kernel against the torch column loop, on one layer.

    python benchmarks/check_gptq_kernel.py [--rows 4096 --columns 4096 --bits 4 --group-size 128]

Prints the fraction of codes that differ, the output error ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖ of each path on
correlated inputs, and the solve time of each.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantizers import QuantSpec, grid
from quantizers.gptq import GPTQOptions, Hessian, solve


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 64, device="cuda", generator=gen) @ torch.randn(64, args.columns, device="cuda",
                                                                       generator=gen)
    x += 0.1 * torch.randn(x.shape, device="cuda", generator=gen)
    w = torch.randn(args.rows, args.columns, device="cuda", generator=gen)
    hessian = Hessian(args.columns, x.device)
    hessian.add_batch(x)
    spec, opts = QuantSpec("gptq", args.bits, args.group_size), GPTQOptions()
    record = {"rows": args.rows, "columns": args.columns, "bits": args.bits, "group_size": args.group_size,
              "device": torch.cuda.get_device_name()}
    codes = {}
    for kernel in ("torch", "triton", "triton"):  # the first triton call compiles
        (codes[kernel], params), seconds = timed(lambda kernel=kernel: solve(w, hessian.H, spec, opts, kernel=kernel))
        w_hat = grid.dequantize(codes[kernel], params, args.group_size)
        record[f"{kernel}_solve_s"] = round(seconds, 4)
        record[f"{kernel}_rel_output_error"] = ((x @ (w - w_hat).T).norm() / (x @ w.T).norm()).item()
    record["codes_differ_fraction"] = (codes["torch"] != codes["triton"]).float().mean().item()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
