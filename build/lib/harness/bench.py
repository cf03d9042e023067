"""`python -m harness bench`: what each kernel backend delivers, per precision, against bf16 in the same run.

Per shape (one decoder block's seven linears, random weights) and format: µs per block at batch 1
(decode) and at a prefill, the bytes of weights read per second against the device's peak, the ratio
against bf16 F.linear, and each backend's largest output error against the torch reference. Then,
optionally, end-to-end greedy decode tokens/sec of a whole model of a known shape.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from quantizers import QuantLinear, use_backend
from quantizers.arch import set_module, target_linears
from quantizers.kernels import BACKENDS
from quantizers.linear import fuse_rows

from . import shapes
from .errors import UserError
from .metrics import speed

log = logging.getLogger(__name__)

# Memory bandwidth of known GPUs, GB/s (vendor figures), matched on the device name.
PEAK_GB_S = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "A100-SXM4-80GB": 2039, "A100": 1555,
             "L40S": 864, "RTX 4090": 1008}


def parse_format(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"w(\d)g(-?\d+)", str(text))
    if not m:
        raise UserError(f"format {text!r} is not of the form w<bits>g<group size>, e.g. w4g128 or w8g-1")
    return int(m[1]), int(m[2])


def random_quant_linear(out_features: int, in_features: int, bits: int, group_size: int, device: torch.device,
                        gen: torch.Generator) -> QuantLinear:
    """A QuantLinear with random codes and plausible scales: its speed is that of any weights."""
    layer = QuantLinear(in_features, out_features, bits, group_size, sym=False).to(device)
    layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=gen, dtype=torch.uint8))
    layer.scales.copy_((torch.rand(layer.scales.shape, generator=gen) * 0.01 + 0.001).half())
    layer.zeros.copy_(torch.randint(0, 2**bits, layer.zeros.shape, generator=gen, dtype=torch.uint8))
    return layer


def _stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _peak_gb_s(device: torch.device, configured: float | None) -> tuple[float, str]:
    if configured:
        return float(configured), "configured"
    if device.type != "cuda":
        return float("nan"), "unknown on the CPU"
    name = torch.cuda.get_device_name(device)
    for key, gb_s in PEAK_GB_S.items():
        if key in name:
            return float(gb_s), f"{name} (vendor figure)"
    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = speed.timed_us(lambda: dst.copy_(src), device, 20) / 1e6
    return 2 * src.numel() / seconds / 1e9, f"{name} (measured copy)"


def _block_forward(layers: dict[str, nn.Module], inputs: dict[str, Tensor]):
    def run() -> list[Tensor]:
        return [layers[name](inputs[name]) for name in layers]
    return run


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # linears that read one input


def _fused_block(layers: dict[str, nn.Module], inputs: dict[str, Tensor]):
    """The block as the decoder runs it: q/k/v and gate/up as one layer each (`fuse_rows`)."""
    fused = dict(layers)
    for names in FUSED:
        if all(name in fused for name in names) and (one := fuse_rows([fused.pop(name) for name in names])):
            fused["+".join(names)] = one
        else:
            fused.update({name: layers[name] for name in names})
    fused_inputs = {name: inputs[name.split("+")[0]] for name in fused}
    return _block_forward(fused, fused_inputs)


def _block_us(layers: dict[str, nn.Module], inputs: dict[str, dict[str, Tensor]], device: torch.device,
              repeats: int) -> dict[str, float]:
    """µs per block: decode, decode fused, then prefill (the batch-1 timings before the GEMMs, whose heat
    could slow what follows them)."""
    us = {"decode": speed.timed_us(_block_forward(layers, inputs["decode"]), device, repeats),
          "decode_fused": speed.timed_us(_fused_block(layers, inputs["decode"]), device, repeats)}
    us["prefill"] = speed.timed_us(_block_forward(layers, inputs["prefill"]), device, repeats)
    return us


def _relative_error(got: list[Tensor], expected: list[Tensor]) -> float:
    return max(((g.float() - e.float()).norm() / e.float().norm()).item() for g, e in zip(got, expected, strict=True))


def bench_layers(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(cfg["seed"])
    rows = []
    for shape in cfg["shapes"]:
        linear_shapes = shapes.linear_shapes(_config(shape))
        tokens = {"decode": 1, "prefill": cfg["prefill_tokens"]}
        inputs = {phase: {name: torch.randn(m, k, generator=gen).to(device, dtype) for name, (_, k) in
                          linear_shapes.items()} for phase, m in tokens.items()}
        dense = {name: nn.Linear(k, n, bias=False).to(device, dtype) for name, (n, k) in linear_shapes.items()}
        baseline_us = _block_us(dense, inputs, device, cfg["repeats"])
        dense_bytes = sum(_stored_bytes(m) for m in dense.values())
        rows.append(_row(shape, "bf16", "F.linear", dense_bytes, dense_bytes, baseline_us, baseline_us, 0.0, cfg,
                         device))
        del dense
        for fmt in cfg["formats"]:
            bits, group_size = parse_format(fmt)
            layers = {name: random_quant_linear(n, k, bits, group_size, device, gen)
                      for name, (n, k) in linear_shapes.items()}
            stored = sum(_stored_bytes(m) for m in layers.values())
            theoretical = sum(QuantLinear.theoretical_bytes(k, n, bits, group_size, False)
                              for n, k in linear_shapes.values())
            with torch.no_grad():
                reference = {p: _block_forward(layers, inputs[p])() for p in tokens}
            for backend in cfg["backends"]:
                reason = next((r for m in layers.values() if (r := BACKENDS[backend].why_not(m.format, device))), None)
                if reason:
                    rows.append({"shape": shape, "format": fmt, "backend": backend, "status": f"n/a: {reason}"})
                    continue
                use_backend(nn.ModuleDict(layers), backend)
                with torch.no_grad():
                    error = max(_relative_error(_block_forward(layers, inputs[p])(), reference[p]) for p in tokens)
                us = _block_us(layers, inputs, device, cfg["repeats"])
                rows.append(_row(shape, fmt, backend, stored, theoretical, us, baseline_us, error, cfg, device))
                log.info("%s %s %s: decode %.1f µs (%.2fx bf16), prefill %.1f µs (%.2fx), error %.2g", shape, fmt,
                         backend, us["decode"], baseline_us["decode"] / us["decode"], us["prefill"],
                         baseline_us["prefill"] / us["prefill"], error)
    return rows


def _config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**shapes.SHAPES[shape])


def _row(shape: str, fmt: str, backend: str, stored: int, theoretical: int, us: dict[str, float],
         baseline_us: dict[str, float], error: float, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    peak, _ = cfg["_peak"]
    decode_gb_s = stored / (us["decode"] / 1e6) / 1e9
    return {
        "shape": shape, "format": fmt, "backend": backend,
        "status": "ok" if error <= cfg["tolerance"] else f"wrong: error {error:.3g} > {cfg['tolerance']}",
        "decode_us_per_block": us["decode"], "prefill_us_per_block": us["prefill"],
        "decode_speedup_vs_bf16": baseline_us["decode"] / us["decode"],
        # the block as the decoder runs it (q/k/v and gate/up fused), against bf16 fused the same way
        "decode_fused_us_per_block": us["decode_fused"],
        "decode_fused_speedup_vs_bf16": baseline_us["decode_fused"] / us["decode_fused"],
        "prefill_speedup_vs_bf16": baseline_us["prefill"] / us["prefill"],
        "decode_weight_gb_s": decode_gb_s, "decode_fraction_of_peak": decode_gb_s / peak,
        "weight_bytes": stored, "theoretical_bytes": theoretical,
        "bytes_over_theoretical": stored / theoretical - 1, "max_rel_error": error,
    }


def bench_decode(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """End-to-end greedy decode tok/s of a random model of `decode_model`'s shape: bf16, then each format
    (its linears replaced by random packed ones, served by the backend `auto` picks); with
    `decode_quantize_head`, each format once more with the output head packed in it too."""
    model = shapes.build(cfg["decode_model"], device, cfg["seed"], dtype)
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(cfg["seed"]))
    bf16_tok_s = speed.decode_tok_s(model, prompt, cfg["decode_tokens"], repeats=3, warmup=1)
    rows = [{"model": cfg["decode_model"], "format": "bf16", "lm_head": "bf16", "backends": "F.linear",
             "decode_tok_s": bf16_tok_s, "speedup_vs_bf16": 1.0, "weight_bytes": _stored_bytes(model)}]
    gen = torch.Generator().manual_seed(cfg["seed"])
    linear_shapes = {name: (m.out_features, m.in_features) for name, m in target_linears(model).items()}
    head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    head = model.get_output_embeddings()
    for fmt in cfg["decode_formats"]:
        bits, group_size = parse_format(fmt)
        for name, (n, k) in linear_shapes.items():  # the previous format's layers are freed as they are replaced
            set_module(model, name, random_quant_linear(n, k, bits, group_size, device, gen))
        rows.append(_decode_row(cfg, model, prompt, fmt, "bf16", bf16_tok_s, device))
        if cfg["decode_quantize_head"]:
            set_module(model, head_name, random_quant_linear(head.out_features, head.in_features, bits, group_size,
                                                             device, gen))
            rows.append(_decode_row(cfg, model, prompt, fmt, fmt, bf16_tok_s, device))
            set_module(model, head_name, head)
    return rows


def _decode_row(cfg: dict[str, Any], model: nn.Module, prompt: Tensor, fmt: str, head: str, bf16_tok_s: float,
                device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    chosen = use_backend(model, "auto")
    tok_s = speed.decode_tok_s(model, prompt, cfg["decode_tokens"], repeats=3, warmup=1)
    log.info("decode %s %s (head %s): %.1f tok/s (%.2fx bf16)", cfg["decode_model"], fmt, head, tok_s,
             tok_s / bf16_tok_s)
    return {"model": cfg["decode_model"], "format": fmt, "lm_head": head, "backends": str(chosen),
            "decode_tok_s": tok_s, "speedup_vs_bf16": tok_s / bf16_tok_s, "weight_bytes": _stored_bytes(model)}


def run(cfg: dict[str, Any]) -> dict[str, pd.DataFrame]:
    device = torch.device("cuda" if cfg["device"] == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg["device"] == "auto" else cfg["device"]))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible: use device=cpu")
    for fmt in [*cfg["formats"], *(cfg["decode_formats"] if cfg["decode_model"] else [])]:
        parse_format(fmt)  # a bad one fails before any work
    for shape in [*cfg["shapes"], *([cfg["decode_model"]] if cfg["decode_model"] else [])]:
        if shape not in shapes.SHAPES:
            raise UserError(f"shape {shape!r} is not known: use one of {', '.join(shapes.SHAPES)}")
    for backend in cfg["backends"]:
        if backend not in BACKENDS:
            raise UserError(f"backend {backend!r} is not known: use some of {', '.join(BACKENDS)}")
    dtype = getattr(torch, cfg["dtype"])
    cfg = {**cfg, "_peak": _peak_gb_s(device, cfg["peak_gb_s"])}
    out = {"layers": pd.DataFrame(bench_layers(cfg, device, dtype), columns=["shape", "format", "backend", "status"]
                                  if not cfg["shapes"] else None)}
    if cfg["decode_model"]:
        out["decode"] = pd.DataFrame(bench_decode(cfg, device, dtype))
    _write(out, Path(cfg["out_dir"]), cfg, device)
    return out


def _write(out: dict[str, pd.DataFrame], out_dir: Path, cfg: dict[str, Any], device: torch.device) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in out.items():
        frame.to_csv(out_dir / f"{name}.csv", index=False)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Kernel benchmark on {device_name} (torch {torch.__version__})", "",
             f"Peak memory bandwidth: {cfg['_peak'][0]:.0f} GB/s ({cfg['_peak'][1]}). Times per decoder block "
             f"(seven linears), batch 1 (decode) and {cfg['prefill_tokens']} tokens (prefill); speed-ups against "
             "bf16 F.linear measured in this run; `decode_fused`: the block as the decoder runs it, q/k/v and "
             "gate/up each one fused layer, against bf16 fused the same way.", "",
             out["layers"].to_markdown(index=False, floatfmt=".4g")]
    if "decode" in out:
        lines += ["", f"## End-to-end greedy decode, {cfg['decode_model']}-shaped model (random weights)", "",
                  out["decode"].to_markdown(index=False, floatfmt=".4g")]
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    if (out["layers"]["status"] == "ok").any():
        _plot(out["layers"], out_dir / "bench.png")


def _plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[frame["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, phase in zip(axes, ("decode", "prefill"), strict=True):
        table = ok.pivot_table(index=["shape", "format"], columns="backend", values=f"{phase}_speedup_vs_bf16")
        table.plot.bar(ax=ax, rot=45)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{phase}: speed-up against bf16 (higher is better)")
        ax.set_ylabel("× bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from . import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / "bench.yaml")
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except Exception as e:  # omegaconf raises several types for unknown keys and bad values
        raise UserError(f"bad bench override ({e}); keys are: {', '.join(cfg)}") from None
    out = run(OmegaConf.to_container(cfg, resolve=True))
    print((Path(cfg.out_dir) / "bench.md").read_text())
    wrong = out["layers"]["status"].str.startswith("wrong")
    if wrong.any():
        raise UserError(f"{int(wrong.sum())} backend(s) disagree with the reference: see the status column")

