import copy

import pytest
import torch

import quantizers
from quantizers import QuantSpec, grid
from quantizers.gptq import GPTQOptions, Hessian, solve


def correlated_inputs(n=2048, columns=160, seed=0, outliers=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(16, columns, generator=gen)  # 16 latent factors: strongly correlated columns
    x = torch.randn(n, 16, generator=gen) @ mixing + 0.1 * torch.randn(n, columns, generator=gen)
    x[:, :outliers] *= 20
    return x


def hessian_of(x):
    h = Hessian(x.shape[1], x.device)
    for chunk in x.split(256):
        h.add_batch(chunk)
    return h.H


def output_error(w, w_hat, x):
    return (x @ w.T - x @ w_hat.T).norm().item()


@pytest.fixture
def weight():
    return torch.randn(64, 160, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 32, 48])  # 48: ragged, and groups that cross the 128-column blocks
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(weight, bits, group_size, act_order):
    x = correlated_inputs()
    spec = QuantSpec("gptq", bits, group_size, options={"act_order": act_order})
    codes, params = solve(weight, hessian_of(x), spec, GPTQOptions(act_order=act_order))
    gptq_err = output_error(weight, grid.dequantize(codes, params, group_size), x)
    rtn_err = output_error(weight, grid.fake_quantize(weight, bits, group_size, False), x)
    assert gptq_err < 0.7 * rtn_err


@pytest.mark.parametrize("act_order", [False, True])
def test_mse_clip_with_identity_hessian_gives_clip_searched_rtn(weight, act_order):
    w = weight.clone()
    w[:, 5] *= 8
    codes, params = solve(w, torch.eye(160), QuantSpec("gptq", 3, 32), GPTQOptions(act_order=act_order, mse_clip=True))
    searched = grid.search_params(w, 3, 32, False)
    assert torch.equal(params.scale, searched.scale)
    assert torch.equal(codes, grid.quantize(w, searched, 3, 32))
    assert not torch.equal(params.scale, grid.compute_params(w, 3, 32, False).scale)


def test_hessian_is_the_running_mean_of_2xxT():
    x = correlated_inputs(n=300)
    torch.testing.assert_close(hessian_of(x), 2 * x.T @ x / 300, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_rtn(weight, act_order):
    spec = QuantSpec("gptq", 4, 32)
    codes, params = solve(weight, torch.eye(160), spec, GPTQOptions(act_order=act_order, mse_clip=False))
    rtn = grid.compute_params(weight, 4, 32, False)
    assert torch.equal(codes, grid.quantize(weight, rtn, 4, 32))
    assert torch.equal(params.scale, rtn.scale)


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_does_not_hurt_with_large_channels(weight, bits):
    x = correlated_inputs(outliers=4, seed=2)
    H = hessian_of(x)
    errs = {}
    for act_order in (False, True):
        spec = QuantSpec("gptq", bits, 32)
        codes, params = solve(weight, H, spec, GPTQOptions(act_order=act_order))
        errs[act_order] = output_error(weight, grid.dequantize(codes, params, 32), x)
    assert errs[True] <= 1.05 * errs[False]


@pytest.mark.parametrize("act_order", [False, True])
def test_rows_are_solved_independently(weight, act_order):
    # What lets q, k and v (gate and up) be solved as one matrix over their shared Hessian.
    H, spec, opts = hessian_of(correlated_inputs()), QuantSpec("gptq", 4, 48), GPTQOptions(act_order=act_order)
    together, params = solve(weight, H, spec, opts)
    top, top_params = solve(weight[:40], H, spec, opts)
    bottom, _ = solve(weight[40:], H, spec, opts)
    assert torch.equal(together, torch.cat([top, bottom]))
    assert torch.equal(params.scale[:40], top_params.scale)


def test_linears_reading_one_input_share_one_hessian(tiny):
    from quantizers.arch import decoder_layers, target_linears
    from quantizers.calibration import capture_inputs, first_block_inputs, run_block
    from quantizers.gptq import block_hessians

    model, _ = tiny
    calib = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = first_block_inputs(model, calib)
    block = decoder_layers(model)[0]
    linears = target_linears(block)
    shared = block_hessians(block, linears, inputs, kwargs)
    assert shared["self_attn.q_proj"] is shared["self_attn.v_proj"] is shared["self_attn.k_proj"]
    assert shared["mlp.gate_proj"] is shared["mlp.up_proj"] and shared["mlp.up_proj"] is not shared["mlp.down_proj"]
    separate = {n: Hessian(m.in_features, m.weight.device) for n, m in linears.items()}
    with capture_inputs(linears, lambda n, x: separate[n].add_batch(x)):
        run_block(block, inputs, kwargs)
    for name in linears:
        torch.testing.assert_close(shared[name].H, separate[name].H)


def test_true_sequential_stages_follow_the_block_and_see_quantized_inputs(tiny):
    from quantizers.arch import decoder_layers, set_module, target_linears
    from quantizers.calibration import first_block_inputs
    from quantizers.gptq import _sequential_stages, block_hessians

    model, _ = tiny
    model = copy.deepcopy(model)
    calib = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = first_block_inputs(model, calib)
    block = decoder_layers(model)[0]
    linears = target_linears(block)
    unquantized = block_hessians(block, linears, inputs, kwargs)
    order = []
    for names, hessian in _sequential_stages(block, linears, inputs, kwargs):
        order.append(names)
        if names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]:
            torch.testing.assert_close(hessian.H, unquantized[names[0]].H)  # nothing quantized before them
        else:  # its input passed through the quantized linears before it
            assert not torch.allclose(hessian.H, unquantized[names[0]].H, rtol=1e-3, atol=1e-5)
        for n in names:  # a crude stand-in for quantization: the inputs downstream must change
            linear = linears[n]
            set_module(block, n, torch.nn.Linear(linear.in_features, linear.out_features, bias=False))
    assert order == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                     ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_calibration_batches_are_equal_and_cover_every_sample():
    from quantizers.calibration import sample_batches

    calib = torch.arange(12 * 5).reshape(12, 5)
    batches = sample_batches(calib, tokens_per_batch=20)
    assert [len(b) for b in batches] == [4, 4, 4] and torch.equal(torch.cat(batches), calib)
    assert [len(b) for b in sample_batches(calib[:7], tokens_per_batch=20)] == [1] * 7  # 7 is prime
    assert len(sample_batches(calib, tokens_per_batch=1)) == 12


@pytest.mark.parametrize(("bits", "group_size", "block_size"), [(4, 48, 128), (3, 32, 64), (8, -1, 100)])
def test_triton_block_kernel_gives_the_torch_loops_codes(weight, bits, group_size, block_size):
    pytest.importorskip("triton")  # run by its CPU interpreter (conftest)
    H, spec = hessian_of(correlated_inputs(outliers=2)), QuantSpec("gptq", bits, group_size)
    opts = GPTQOptions(block_size=block_size)
    by_torch, params = solve(weight, H, spec, opts, kernel="torch")
    by_triton, triton_params = solve(weight, H, spec, opts, kernel="triton")
    assert torch.equal(params.scale, triton_params.scale)
    assert (by_torch != by_triton).float().mean() < 1e-3  # float rounding may flip a rare tie


def test_nan_hessian_is_refused(weight):
    H = torch.eye(160)
    H[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solve(weight, H, QuantSpec("gptq", 4, 32), GPTQOptions())


def test_whole_model_gptq_is_deterministic_and_beats_rtn(tiny):
    model, _ = tiny
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec("gptq", 3, 32, options={})
    a = quantizers.quantize(copy.deepcopy(model), spec, calib)
    b = quantizers.quantize(copy.deepcopy(model), spec, calib)
    qa, qb = [m for m in a.modules() if isinstance(m, quantizers.QuantLinear)], [
        m for m in b.modules() if isinstance(m, quantizers.QuantLinear)]
    assert len(qa) == 14 and all(torch.equal(x.qweight, y.qweight) for x, y in zip(qa, qb, strict=True))
    rtn = quantizers.quantize(copy.deepcopy(model), QuantSpec("rtn", 3, 32))
    with torch.no_grad():
        ref = model(calib).logits
        assert (a(calib).logits - ref).norm() < (rtn(calib).logits - ref).norm()


def test_tiny_sweep_with_gptq_runs_end_to_end(tmp_path):
    import json

    from conftest import run_cli

    proc = run_cli("sweep", "model=tiny-llama", "eval=quick", "quant=fp16,gptq", "quant.bits=4", "quant.group_size=32",
                   "calib.n_samples=4", "calib.seqlen=128", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["quant"]["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json"))}
    gptq = records["gptq"]
    assert gptq["status"] == "ok" and gptq["data"]["calib"]["n_samples"] == 4
    assert gptq["quant"]["options"] == {"percdamp": 0.5, "block_size": 128, "act_order": True, "mse_clip": True,
                                       "true_sequential": True}
    assert gptq["metrics"]["kl/pydoc"] > 0
