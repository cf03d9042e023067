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


def test_int3_chunks_hold_code_pairs_in_the_halves_of_plane_words():
    """The layout the pair GEMV reads: per 32-code chunk three int32 planes; code 2j and 2j+1 at bits
    3(j % 5) and 16 + 3(j % 5) of plane j // 5, the last pair one bit per plane at bits 15 and 31."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 8, (2, 64), generator=gen, dtype=torch.uint8)
    words = packing.pack(q, 3).view(torch.int32).reshape(2, 3, 2).to(torch.int64) & 0xFFFFFFFF  # row, plane, chunk
    for row in range(2):
        for chunk in range(2):
            codes = q[row, 32 * chunk:32 * chunk + 32].tolist()
            w = words[row, :, chunk].tolist()
            for j in range(15):
                word, shift = w[j // 5], 3 * (j % 5)
                assert (word >> shift) & 7 == codes[2 * j] and (word >> (16 + shift)) & 7 == codes[2 * j + 1]
            for half in range(2):
                assert sum(((w[b] >> (15 + 16 * half)) & 1) << b for b in range(3)) == codes[30 + half]
