import copy
import json

import pytest
import torch

import quantizers
from quantizers import QuantSpec, grid
from quantizers.arch import decoder_layers, scale_groups
from quantizers.awq import fold_scale, search_scale


def inputs_with_large_channels(n=2048, columns=160, seed=0, dtype=torch.float32, size=30.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, columns, generator=gen)
    x[:, :6] *= size  # a few channels carry most of the activation
    return x.to(dtype)


def test_folding_scales_leaves_the_unquantized_block_unchanged(tiny):
    model, _ = tiny
    model = copy.deepcopy(model)
    block = decoder_layers(model)[0]
    hidden = torch.randn(2, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(24)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position_ids), "attention_mask": None}
    before = block(hidden, **kwargs)
    before = before[0] if isinstance(before, tuple) else before
    groups = scale_groups(block)
    assert [g.prev for g in groups] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]  # GQA: no v->o
    gen = torch.Generator().manual_seed(1)
    for group in groups:
        width = block.get_submodule(group.linears[0]).in_features
        fold_scale(block, group, torch.rand(width, generator=gen) * 4 + 0.25)
    after = block(hidden, **kwargs)
    after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_scale_search_lowers_output_error_against_rtn(bits):
    x = inputs_with_large_channels()
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec("awq", bits, 32)
    s = search_scale(x.abs().mean(0), w, spec, 20, lambda w_hat: x @ w_hat.T)
    awq = grid.fake_quantize(w * s, bits, 32, False) / s
    rtn = grid.fake_quantize(w, bits, 32, False)
    err = {name: (x @ (w - w_hat).T).norm() for name, w_hat in {"awq": awq, "rtn": rtn}.items()}
    assert err["awq"] < 0.9 * err["rtn"]


def _awq_with_large_channels(model, dtype):
    """AWQ 4-bit of the model in dtype, a few channels 1000x the rest: outputs near 1e3, whose squares
    and token sums overflow float16. Returns the model and its norm weights before quantization."""
    model = copy.deepcopy(model).to(dtype)
    norms = []
    for layer in decoder_layers(model):
        layer.post_attention_layernorm.weight.data[:3] *= 1000
        layer.input_layernorm.weight.data[:3] *= 1000
        norms.append(layer.post_attention_layernorm.weight.clone())
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits.float()).all()  # the unquantized model itself is finite
    return quantizers.quantize(model, QuantSpec("awq", 4, 32), calib), norms, calib


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_stays_finite_with_very_large_activations_in_half_precision(tiny, dtype):
    model, norms, calib = _awq_with_large_channels(tiny[0], dtype)
    for layer, before in zip(decoder_layers(model), norms, strict=True):
        assert torch.isfinite(layer.post_attention_layernorm.weight).all()
        assert not torch.equal(layer.post_attention_layernorm.weight, before)  # a scale was found and folded
        assert all(torch.isfinite(m.scales.float()).all() for m in layer.modules()
                   if isinstance(m, quantizers.QuantLinear))
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits.float()).all()


def test_awq_statistics_and_losses_in_float16_match_float32(tiny):
    from quantizers.awq import _capture, _Watched
    from quantizers.calibration import first_block_inputs

    found = {}
    for dtype in (torch.float16, torch.float32):
        model = copy.deepcopy(tiny[0]).to(dtype)
        block = decoder_layers(model)[0]
        block.input_layernorm.weight.data[:3] *= 1000  # the watched outputs' squares overflow float16
        block.post_attention_layernorm.weight.data[:3] *= 1000  # and so do the token sums of |x|
        calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
        inputs, kwargs = first_block_inputs(model, calib)
        groups = scale_groups(block)
        x_means, watched = _capture(block, groups, inputs, kwargs, 16384)
        losses = []
        for group in groups:
            output = _Watched(block, group, *watched[group.watch])
            weight = torch.cat([block.get_submodule(n).weight for n in group.linears]).float()
            w_q = grid.fake_quantize(weight, 4, 32, False)
            losses.append((output(w_q) - output(weight)).pow(2).mean())
        found[dtype] = torch.cat(list(x_means.values())), torch.stack(losses)
    for half, full in zip(found[torch.float16], found[torch.float32], strict=True):
        assert torch.isfinite(half).all()
        torch.testing.assert_close(half, full, rtol=0.1, atol=1e-3)  # the weights differ by their rounding


def test_output_aware_clip_lowers_output_error_against_weight_error_clip():
    x = inputs_with_large_channels(columns=96)
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))
    hessian = x.T @ x / len(x)
    errors = {}
    for name, params in {"weights": grid.search_params(w, 3, 32, False),
                         "outputs": grid.search_params(w, 3, 32, False, max_shrink=0.5, hessian=hessian)}.items():
        w_hat = grid.dequantize(grid.quantize(w, params, 3, 32), params, 32)
        errors[name] = (x @ (w - w_hat).T).pow(2).mean()
    assert errors["outputs"] < errors["weights"]


def test_diagonal_blocks_of_a_ragged_hessian():
    h = torch.randn(70, 70)
    blocks = grid.diagonal_blocks(h, 32)
    assert blocks.shape == (3, 32, 32)
    torch.testing.assert_close(blocks[1], h[32:64, 32:64])
    torch.testing.assert_close(blocks[2, :6, :6], h[64:, 64:])
    assert blocks[2, 6:].abs().sum() == 0 and blocks[2, :, 6:].abs().sum() == 0


def test_whole_model_awq_is_deterministic_and_beats_rtn(tiny):
    model, _ = tiny
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec("awq", 3, 32)
    a = quantizers.quantize(copy.deepcopy(model), spec, calib)
    b = quantizers.quantize(copy.deepcopy(model), spec, calib)
    qa = [m.qweight for m in a.modules() if isinstance(m, quantizers.QuantLinear)]
    qb = [m.qweight for m in b.modules() if isinstance(m, quantizers.QuantLinear)]
    assert len(qa) == 14 and all(torch.equal(x, y) for x, y in zip(qa, qb, strict=True))
    rtn = quantizers.quantize(copy.deepcopy(model), QuantSpec("rtn", 3, 32))
    with torch.no_grad():
        ref = model(calib).logits
        assert (a(calib).logits - ref).norm() < (rtn(calib).logits - ref).norm()


def test_unknown_folding_map_names_the_layers(tiny):
    model, _ = tiny
    block = copy.deepcopy(decoder_layers(model)[0])
    block.extra_proj = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="extra_proj"):
        scale_groups(block)


def test_tiny_sweep_with_awq_runs_end_to_end(tmp_path):
    from conftest import run_cli

    proc = run_cli("sweep", "model=tiny-llama", "eval=quick", "quant=fp16,awq,awq_gptq", "quant.bits=4",
                   "quant.group_size=32", "calib.n_samples=4", "calib.seqlen=128", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["quant"]["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json"))}
    assert records["awq"]["status"] == "ok" and records["awq"]["metrics"]["kl/pydoc"] > 0
    assert records["awq"]["quant"]["options"]["grid_points"] == 20
    assert records["awq_gptq"]["status"] == "ok" and records["awq_gptq"]["quant"]["options"]["act_order"] is True


def test_search_with_a_dead_input_channel_stays_finite():
    x = inputs_with_large_channels()
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(4))
    w[:, 7] = 0
    s = search_scale(x.abs().mean(0), w, QuantSpec("awq", 4, 32), 20, lambda w_hat: x @ w_hat.T)
    assert torch.isfinite(s).all() and not torch.equal(s, torch.ones_like(s))  # the search did not give up
