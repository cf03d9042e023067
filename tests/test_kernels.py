"""Every backend against the reference (dequantize + matmul), and the choice between them."""

import struct

import pytest
import torch

import quantizers
from quantizers import LayerFormat, QuantLinear, QuantSpec, grid, use_backend
from quantizers.kernels import BACKENDS, BackendError, choose, cuda_gemv, triton_lowbit, triton_pairs
from quantizers.kernels.torch_ref import dequantize_matmul


def quant_linear(out_features, in_features, bits, group_size, sym, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    linear.weight.data = torch.randn(out_features, in_features, generator=gen) * torch.linspace(0.2, 2, in_features)
    params = grid.compute_params(linear.weight, bits, group_size, sym)
    codes = grid.quantize(linear.weight, params, bits, group_size)
    return QuantLinear.from_codes(linear, codes, params, group_size, sym, bits)


FORMATS = [  # bits, group size, sym, width: ragged groups and widths that are no multiple of 8 included
    (8, 128, False, 256), (8, -1, True, 200), (4, 64, False, 576), (4, 128, False, 576), (4, 32, True, 96),
    (3, 64, False, 576), (3, 128, True, 300), (3, 32, False, 100), (2, 64, False, 130), (5, 16, False, 70),
    (4, 48, False, 200), (8, 64, False, 100), (3, 48, False, 200),  # groups of 48; 8-bit part words
    (2, 32, False, 160), (3, 32, True, 96),  # whole int32 words at 2 bits; 3-bit chunks of 32 codes
]


@pytest.mark.parametrize("bits,group_size,sym,width", FORMATS)
def test_triton_kernels_match_the_reference(bits, group_size, sym, width):
    # Run on the CPU through Triton's interpreter (tests/conftest.py); the same code compiles on CUDA.
    layer = quant_linear(48, width, bits, group_size, sym)
    reference = layer.dequantize_weight(torch.float32)
    torch.testing.assert_close(triton_lowbit.dequantize(layer, torch.float32), reference, rtol=0, atol=0)
    # in bf16 (what a prefill uses) each weight is the reference rounded (the interpreter truncates): one ulp
    torch.testing.assert_close(triton_lowbit.dequantize(layer, torch.bfloat16).float(), reference, rtol=2**-7, atol=0)
    x = torch.randn(width, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(triton_lowbit.gemv(x, layer), reference @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,group_size,sym,width", [
    (4, 64, False, 576), (4, 128, False, 576), (4, 32, True, 96), (4, -1, False, 1000), (4, 256, True, 1024),
    (3, 64, False, 576), (3, 128, True, 1024), (3, 32, False, 96), (3, -1, False, 320),
])
def test_pair_gemv_matches_the_reference(bits, group_size, sym, width):
    # bf16 activations take the two-weights-per-instruction kernel (triton_pairs); in the interpreter its
    # PTX is replaced by the same pairs in float32, so this checks which code meets which x (halves, pairs,
    # groups, ragged tiles); the PTX itself is checked on the GPU by `python -m harness bench`.
    layer = quant_linear(48, width, bits, group_size, sym)
    x = torch.randn(width, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert triton_pairs.serves(x, layer, triton_lowbit._kernel_group(layer))
    exact = layer.dequantize_weight(torch.float32) @ x.float()
    got = triton_lowbit.gemv(x, layer)
    assert got.dtype == torch.bfloat16
    # only the bf16 rounding of the output (the interpreter truncates): within one bf16 ulp of the exact value
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()


@pytest.mark.parametrize("group_size,sym", [(32, False), (64, True), (128, False), (256, False)])
def test_cpu_int4_matches_the_reference(group_size, sym):
    layer = quant_linear(64, 512, 4, group_size, sym, bias=True)
    x = torch.randn(1, 3, 512, generator=torch.Generator().manual_seed(2))  # decode-sized: the int4 kernel
    expected = dequantize_matmul(x, layer)
    got = BACKENDS["cpu_int4"].forward(x, layer)
    assert got.shape == expected.shape
    # the CPU kernel rounds the dequantized weights to bf16 internally: a bf16-sized tolerance
    assert (got - expected).norm() / expected.norm() < 5e-3
    many_rows = torch.randn(2, 40, 512, generator=torch.Generator().manual_seed(3))  # handed to the reference
    torch.testing.assert_close(BACKENDS["cpu_int4"].forward(many_rows, layer), dequantize_matmul(many_rows, layer))


def test_auto_picks_a_backend_per_format_and_falls_back():
    cpu = torch.device("cpu")
    assert choose(LayerFormat(256, 16, 4, 64, False), cpu) == "cpu_int4"
    assert choose(LayerFormat(576, 16, 4, 128, False), cpu) == "torch"  # ragged group: int4 kernel cannot
    assert choose(LayerFormat(256, 16, 3, 64, False), cpu) == "torch"
    model = torch.nn.Sequential(quant_linear(16, 256, 4, 64, False), quant_linear(16, 256, 3, 64, False))
    assert use_backend(model, "auto") == {"cpu_int4": 1, "torch": 1}
    assert [m.backend for m in model] == ["cpu_int4", "torch"]


def test_a_named_backend_that_cannot_serve_says_which_can():
    model = torch.nn.Sequential(quant_linear(16, 256, 3, 64, False))
    with pytest.raises(BackendError, match=r"4-bit weights only.*backends that can: torch"):
        use_backend(model, "cpu_int4")
    with pytest.raises(BackendError, match="CUDA only.*backends that can: torch"):
        use_backend(model, "tinygemm")
    with pytest.raises(BackendError, match="not known"):
        use_backend(model, "marlin")


def test_cuda_gemv_says_which_formats_it_cannot_serve_before_asking_the_device():
    cuda = torch.device("cuda")  # never touched: the format is refused first
    assert "serves 3, 4, 8-bit weights, not 2-bit" in cuda_gemv.why_not(LayerFormat(256, 8, 2, 64, False), cuda)
    assert "at 3 bits it needs a width and groups in multiples of 32 columns, not a width of 200" in cuda_gemv.why_not(
        LayerFormat(200, 8, 3, 64, False), cuda)
    assert "multiples of 32 columns, not a width of 200 with groups of 128" in cuda_gemv.why_not(
        LayerFormat(200, 8, 4, 128, False), cuda)
    assert "not a width of 192 with groups of 48" in cuda_gemv.why_not(LayerFormat(192, 8, 4, 48, False), cuda)
    assert "multiples of 16 columns, not a width of 200" in cuda_gemv.why_not(LayerFormat(200, 8, 8, -1, True), cuda)
    assert "CUDA only" in BACKENDS["cuda"].why_not(LayerFormat(256, 8, 4, 64, False), torch.device("cpu"))
    with pytest.raises(BackendError, match="CUDA only.*backends that can: torch"):
        use_backend(torch.nn.Sequential(quant_linear(8, 256, 4, 64, False)), "cuda")


def test_auto_on_cuda_picks_the_cuda_gemv_where_it_serves_and_triton_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # as an H100 says
    cuda = torch.device("cuda")
    assert choose(LayerFormat(576, 8, 4, 128, False), cuda) == "cuda"  # ragged last group: fine
    assert choose(LayerFormat(256, 8, 4, -1, True), cuda) == "cuda"
    assert choose(LayerFormat(208, 8, 8, 16, False), cuda) == "cuda"
    assert choose(LayerFormat(200, 8, 4, 64, False), cuda) == "triton"
    assert choose(LayerFormat(200, 8, 8, -1, True), cuda) == "triton"
    assert choose(LayerFormat(576, 8, 3, 128, False), cuda) == "cuda"
    assert choose(LayerFormat(300, 8, 3, 128, False), cuda) == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "sm_80" in cuda_gemv.why_not(LayerFormat(256, 8, 4, 64, False), cuda)


def test_cuda_backend_sends_activations_its_gemv_does_not_take_to_triton_and_says_so(caplog):
    layer = quant_linear(24, 256, 4, 64, False, bias=True)
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(4))  # float32: not the CUDA GEMV's
    with caplog.at_level("WARNING"):
        got = BACKENDS["cuda"].forward(x, layer)  # Triton's GEMV, here in its CPU interpreter
    torch.testing.assert_close(got, dequantize_matmul(x, layer), rtol=1e-5, atol=1e-4)
    assert "bf16 activations" in caplog.text and "torch.float32" in caplog.text


def _bf16_exact(value: float) -> bool:
    return torch.tensor(value, dtype=torch.bfloat16).item() == value


def _bf16(bits: int) -> float:  # a bf16 is the top half of a float32
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def test_cuda_gemv_constants_dequantize_exactly_in_bf16():
    """The kernel's bit tricks: a code c OR-ed into bf16 128.0 (0x4300) is 128 + c, and 0xC300 | z is
    −(128 + z), so their sum is c − z exactly, for every 4-bit code and zero point."""
    for c in range(16):
        for z in range(16):
            assert _bf16(0x4300 | c) == 128 + c and _bf16(0xC300 | z) == -(128 + z)
            assert _bf16(0x4300 | c) + _bf16(0xC300 | z) == c - z


def test_cuda_gemv_recombines_8_bit_codes_from_nibbles_exactly_in_bf16():
    """At 8 bits each byte is split in nibbles, each centred as a 4-bit code is (z = 16 zh + zl, exact as
    above), then one bf16 FMA by the constant 16 (0x4180) gives 16 (h − zh) + (l − zl): c − z for every
    code and zero point, and an FMA rounds once, so it is exact where the result fits bf16."""
    assert _bf16(0x4180) == 16.0 and _bf16(0x3F80) == 1.0
    codes = torch.arange(256)
    c, z = codes[:, None], codes[None, :]
    recombined = 16 * ((c >> 4) - (z >> 4)) + ((c & 15) - (z & 15))
    assert torch.equal(recombined, c - z)
    assert all(_bf16_exact(float(value)) for value in recombined.unique().tolist())


def _kernel_reads_3bit_chunk(w0: int, w1: int, w2: int) -> list[int]:
    """The 32 codes of a chunk as `dot_chunk3` takes them from its three words: pair j < 15 by the mask
    0x00070007 after a shift of 3 (j % 5) of word j / 5, the last pair's bits gathered from bits 15 and 31."""
    words, codes = (w0, w1, w2), []
    for j in range(15):
        pair = (words[j // 5] >> (3 * (j % 5))) & 0x00070007
        codes += [pair & 0xFFFF, pair >> 16]
    last = ((w0 >> 15) & 0x00010001) | ((w1 >> 14) & 0x00020002) | ((w2 >> 13) & 0x00040004)
    return codes + [last & 0xFFFF, last >> 16]


def test_cuda_gemv_reads_3_bit_chunks_where_packing_puts_them():
    """Plane p of a row starts at word p · K / 32; chunk c's word in it is word c (the kernel's loads)."""
    k = 128
    codes = torch.randint(0, 8, (3, k), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    words = quantizers.packing.pack(codes, 3).view(torch.int32).long() & 0xFFFFFFFF
    for row in range(3):
        read = [code for chunk in range(k // 32)
                for code in _kernel_reads_3bit_chunk(*(words[row, p * (k // 32) + chunk].item() for p in range(3)))]
        assert read == codes[row].tolist()


def test_cuda_gemv_shared_memory_swizzle_is_a_permutation_without_bank_conflicts():
    """`swizzle<2>` (u ^ ((u >> 3) & 7)): x's 16-byte vector u in shared memory. A lane of a 3-bit step of 2
    chunks reads vectors 8 v + i; each 8 lanes (one shared-memory phase of 16-byte loads) must hit 8
    different bank groups, and the copy in (vector u by thread u) too."""
    def swizzle(u):
        return u ^ ((u >> 3) & 7)

    for k in (576, 4096, 14336):
        vectors, padded = k // 8, -(-k // 64) * 8
        assert sorted({swizzle(u) for u in range(vectors)}) == sorted(swizzle(u) for u in range(vectors))
        assert max(swizzle(u) for u in range(vectors)) < padded
        for i in range(8):
            for first_lane in range(0, 32, 8):
                assert len({swizzle(8 * v + i) % 8 for v in range(first_lane, first_lane + 8)}) == 8
        assert all(len({swizzle(u) % 8 for u in range(t, t + 8)}) == 8 for t in range(0, vectors - 7, 8))


def test_quantized_model_logits_agree_across_cpu_backends(tiny):
    import copy

    model, _ = tiny
    quantized = quantizers.quantize(copy.deepcopy(model), QuantSpec("rtn", 4, 32))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = quantized(ids).logits
        assert use_backend(quantized, "auto") == {"cpu_int4": 14}
        fast = quantized(ids).logits
    assert (fast - reference).norm() / reference.norm() < 1e-2
    assert (fast.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95


def test_dequantized_once_gives_the_reference_values_and_lets_go_after(monkeypatch):
    model = torch.nn.Sequential(quant_linear(16, 256, 3, 64, False, bias=True), quant_linear(16, 256, 4, 64, False))
    use_backend(model, "auto")  # torch (3-bit) and cpu_int4 (4-bit): both dequantize through the reference
    x = torch.randn(2, 40, 256, generator=torch.Generator().manual_seed(5))  # many rows: the reference path
    expected = [layer(x) for layer in model]
    calls, original = [], grid.dequantize
    monkeypatch.setattr(grid, "dequantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    with quantizers.dequantized_once(model, torch.float32) as kept_bytes:
        assert kept_bytes == 2 * 16 * 256 * 4 and len(calls) == 2  # one dense float32 copy per layer
        got = [layer(x) for layer in model]
        assert len(calls) == 2  # the forwards used the copies: no dequantization per call
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)  # the same values, not merely close
    assert all(layer._dequantized is None for layer in model)


def test_every_backend_dequantizes_to_the_same_weights_and_the_same_perplexity(tiny):
    """One numerical truth per format: scale × (q − zero) in float32, one rounding to the compute dtype."""
    import copy

    import quantizers
    from quantizers import QuantSpec
    from quantizers.kernels import triton_lowbit

    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    quantizers.quantize(model, QuantSpec("rtn", 4, 32))
    layer = next(m for m in model.modules() if isinstance(m, quantizers.QuantLinear))
    exact = triton_lowbit.dequantize(layer, torch.float32)  # Triton's interpreter casts to bf16 by truncation
    assert torch.equal(layer.dequantize_weight(torch.float32), exact)
    assert torch.equal(layer.dequantize_weight(torch.bfloat16), exact.to(torch.bfloat16))  # one rounding
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    nll = {}
    for backend in ("torch", "cpu_int4"):
        quantizers.use_backend(model, backend)
        with torch.no_grad():
            logits = model(ids).logits.float()
        nll[backend] = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(nll["torch"] - nll["cpu_int4"]) < 2e-3 * nll["torch"], nll


def test_weight_bytes_count_the_copies_a_backend_keeps(tiny):
    import copy

    from harness.metrics.memory import weight_bytes

    model = copy.deepcopy(tiny[0])
    quantizers.quantize(model, QuantSpec("rtn", 4, 32))
    before = weight_bytes(model)
    use_backend(model, "cpu_int4")
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 4)))  # the kernel repacks on first use
    kept = sum(t.untyped_storage().nbytes() for m in model.modules() if isinstance(m, QuantLinear)
               for t in m.backend_copies())
    assert kept > 0 and weight_bytes(model) == before + kept
