import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantizers
from harness.metrics.memory import quantized_layer_stats, weight_bytes
from quantizers import QuantLinear, QuantSpec, grid


@pytest.mark.parametrize(
    "bits,group_size,sym", [(8, -1, False), (4, 64, False), (4, 128, True), (3, 64, False), (2, 32, True)]
)
def test_forward_equals_dequantized_reference(bits, group_size, sym):
    torch.manual_seed(0)
    linear = nn.Linear(200, 72, bias=True)
    params = grid.compute_params(linear.weight, bits, group_size, sym)
    codes = grid.quantize(linear.weight, params, bits, group_size)
    layer = QuantLinear.from_codes(linear, codes, params, group_size, sym, bits)
    x = torch.randn(3, 5, 200)
    expected = F.linear(x, grid.dequantize(codes, params, group_size), linear.bias)
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(layer.codes(), codes)
    real = sum(b.numel() * b.element_size() for b in (layer.qweight, layer.scales, layer.zeros) if b is not None)
    assert real == QuantLinear.theoretical_bytes(200, 72, bits, group_size, sym)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 64), (8, -1)])
def test_packed_model_gives_the_fake_quantized_models_logits(tiny, bits, group_size):
    model, _ = tiny
    spec = QuantSpec("rtn", bits, group_size)
    fake = copy.deepcopy(model)
    for linear in quantizers.arch.target_linears(fake).values():
        linear.weight.data = grid.fake_quantize(linear.weight.data, bits, group_size, False)
    packed = quantizers.quantize(copy.deepcopy(model), spec)
    assert any(isinstance(m, QuantLinear) for m in packed.modules())
    ids = torch.randint(0, 250, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)


def test_embeddings_and_head_stay_unless_asked(tiny):
    model, _ = tiny
    packed = quantizers.quantize(copy.deepcopy(model), QuantSpec("rtn", 4, 64))
    assert isinstance(packed.lm_head, nn.Linear) and not isinstance(packed.lm_head, QuantLinear)
    with_head = quantizers.quantize(copy.deepcopy(model), QuantSpec("rtn", 4, 64, quantize_lm_head=True))
    assert isinstance(with_head.lm_head, QuantLinear)


def test_weight_bytes_shrink_as_the_format_says(tiny):
    model, _ = tiny
    full = weight_bytes(model)
    packed = quantizers.quantize(copy.deepcopy(model), QuantSpec("rtn", 4, 64))
    stats = quantized_layer_stats(packed)
    linear_fp32 = 4 * stats["weights"]
    assert stats["bytes"] == stats["theoretical_bytes"]
    assert weight_bytes(packed) == full - linear_fp32 + stats["bytes"]
    # 4 bits + per 64 weights a float16 scale and a uint8 zero; the 96-wide rows leave a ragged group
    assert 4.3 < 8 * stats["bytes"] / stats["weights"] < 5.0


def test_unknown_method_is_a_clear_error(tiny):
    with pytest.raises(quantizers.QuantSpecError, match="unknown quantization method 'nope'.*rtn"):
        quantizers.quantize(tiny[0], QuantSpec("nope", 4, 64))


def _quant(linear, bits, group_size, sym):
    params = grid.compute_params(linear.weight, bits, group_size, sym)
    return QuantLinear.from_codes(linear, grid.quantize(linear.weight, params, bits, group_size), params, group_size,
                                  sym, bits)


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_rows_compute_the_layers_side_by_side_without_a_second_copy(quantized):
    from quantizers.linear import fuse_rows

    torch.manual_seed(0)
    linears = [nn.Linear(96, n, bias=bias) for n, bias in ((64, False), (32, True), (32, False))]
    layers = [_quant(m, 4, 32, False) for m in linears] if quantized else linears
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        expected = torch.cat([m(x) for m in layers], dim=-1)
        fused = fuse_rows(layers)
        torch.testing.assert_close(fused(x), expected)
        torch.testing.assert_close(torch.cat([m(x) for m in layers], dim=-1), expected)  # members still work
    storage = fused.qweight if quantized else fused.weight
    member = layers[1].qweight if quantized else layers[1].weight
    assert member.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()  # a view, not a copy


def test_layers_of_different_formats_are_not_fused():
    from quantizers.linear import fuse_rows

    torch.manual_seed(0)
    a, b = nn.Linear(64, 32), nn.Linear(64, 32)
    assert fuse_rows([_quant(a, 4, 32, False), _quant(b, 8, 32, False)]) is None
    assert fuse_rows([_quant(a, 4, 32, False), b]) is None
    assert fuse_rows([a, nn.Linear(48, 32)]) is None
