import pytest
import torch

from quantizers import QuantSpec, QuantSpecError, grid


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [-1, 32, 64, 96])  # 200 columns: 64 and 96 leave ragged last groups
@pytest.mark.parametrize("sym", [False, True])
def test_round_trip_within_half_a_step(correlated_weights, bits, group_size, sym):
    w = correlated_weights
    params = grid.compute_params(w, bits, group_size, sym)
    q = grid.quantize(w, params, bits, group_size)
    assert q.max() <= 2**bits - 1
    err = (grid.dequantize(q, params, group_size) - w).abs()
    size = grid.effective_group_size(200, group_size)
    step = grid.from_groups(params.scale.float().unsqueeze(-1).expand(-1, -1, size), 200)
    assert (err <= step / 2 + 1e-5).all()


def test_ragged_last_group_uses_only_its_own_columns(correlated_weights):
    w = correlated_weights  # 200 = 3 × 64 + 8
    params = grid.compute_params(w, 4, 64, sym=False)
    alone = grid.compute_params(w[:, 192:], 4, 64, sym=False)
    assert params.scale.shape == (48, 4)
    assert torch.equal(params.scale[:, 3], alone.scale[:, 0])
    assert torch.equal(params.zero[:, 3], alone.zero[:, 0])


def test_per_channel_is_one_group(correlated_weights):
    params = grid.compute_params(correlated_weights, 8, -1, sym=False)
    assert params.scale.shape == (48, 1)


def test_symmetric_grid_is_centred():
    w = torch.tensor([[-1.0, 0.5, 0.25, 1.0]])
    params = grid.compute_params(w, 4, -1, sym=True)
    assert params.zero.item() == 8
    deq = grid.dequantize(grid.quantize(w, params, 4, -1), params, -1)
    assert (deq - w).abs().max() <= params.scale.float().item() / 2 + 1e-6


def test_more_bits_less_error(correlated_weights):
    w = correlated_weights
    errors = [(grid.fake_quantize(w, b, 64, False) - w).pow(2).mean() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))


def test_all_zero_group_stays_zero():
    w = torch.zeros(3, 16)
    assert torch.equal(grid.fake_quantize(w, 4, 8, False), w)


@pytest.mark.parametrize("bits", [1, 9, 0, None])
def test_spec_rejects_bits_outside_2_to_8(bits):
    with pytest.raises(QuantSpecError, match="from 2 to 8"):
        QuantSpec("rtn", bits, 128)


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_spec_rejects_bad_group_size(group_size):
    with pytest.raises(QuantSpecError, match="-1 for one group per output channel"):
        QuantSpec("rtn", 4, group_size)


def test_baseline_spec_ignores_grid_knobs_and_round_trips():
    assert QuantSpec("fp16", 4, 64) == QuantSpec("fp16", 8, -1)
    spec = QuantSpec("rtn", 3, 64, sym=True, options={"k": 1})
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.label == "rtn-w3g64-sym"


@pytest.mark.parametrize("bits", [3, 4])
def test_clip_search_never_loses_to_min_max(correlated_weights, bits):
    w = correlated_weights.clone()
    w[:, 7] *= 8  # an outlier column: shrinking its groups' range pays
    plain = grid.compute_params(w, bits, 64, False)
    searched = grid.search_params(w, bits, 64, False)

    def group_err(p):
        deq = grid.dequantize(grid.quantize(w, p, bits, 64), p, 64)
        return (grid.to_groups(deq - w, 64).abs() ** 2.4).sum(-1)

    assert (group_err(searched) <= group_err(plain) + 1e-4).all()
    assert group_err(searched).sum() < 0.97 * group_err(plain).sum()
