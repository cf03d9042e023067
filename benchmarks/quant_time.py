"""Wall time and peak GPU memory of quantizing a model of a known shape with random weights.

    python benchmarks/quant_time.py --shape llama3-8b --method gptq --bits 4 --group-size 128
    python benchmarks/quant_time.py --shape smollm2-135m --method gptq --on-device

The model is built from its config (no download) in bf16. By default it is kept on the CPU and
quantized on the GPU one block at a time (what a user with a GPU smaller than the model does);
`--on-device` puts the whole model on the GPU first. Calibration samples are random token ids:
the work done is the same as with text, the resulting quality means nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import quantizers
from harness.shapes import SHAPES, build
from quantizers import QuantSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. act_order=false (JSON values)")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--on-device", action="store_true", help="the whole model on the device, not block by block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the record to this JSON file")
    args = parser.parse_args()

    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    spec = QuantSpec(args.method, args.bits, args.group_size, options=options)
    device = torch.device(args.device)
    model = build(args.shape, device, args.seed)
    if not args.on_device:
        model.to("cpu")
    parameters = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (args.n_samples, args.seqlen), generator=torch.Generator().manual_seed(args.seed))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    quantizers.quantize(model, spec, calib, progress=True, device=device)
    if cuda:
        torch.cuda.synchronize(device)
    record = {
        "shape": args.shape, "method": args.method, "bits": args.bits, "group_size": args.group_size,
        "options": options, "n_samples": args.n_samples, "seqlen": args.seqlen, "on_device": args.on_device,
        "parameters": parameters,
        "quant_time_s": round(time.perf_counter() - start, 2),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    print(json.dumps(record))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
