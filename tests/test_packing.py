import pytest
import torch

from quantizers import packing


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 64, 77, 576])
def test_pack_unpack_round_trip(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    q = torch.randint(0, 2**bits, (5, n), generator=gen, dtype=torch.uint8)
    packed = packing.pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packing.packed_columns(n, bits))
    assert torch.equal(packing.unpack(packed, bits, n), q)


@pytest.mark.parametrize("bits,bytes_per_576", [(2, 144), (3, 216), (4, 288), (8, 576)])
def test_storage_is_dense(bits, bytes_per_576):
    q = torch.zeros(1, 576, dtype=torch.uint8)
    assert packing.pack(q, bits).numel() == bytes_per_576 == 576 * bits // 8


def test_int4_is_two_codes_per_byte_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert packing.pack(q, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]
