"""Batch-1 GEMV for 3-, 4- and 8-bit codes in CUDA C++, compiled at first use by NVRTC (through torch; no toolkit).

The arithmetic is `triton_pairs`' (two codes per bf16x2 instruction by the magic number 128.0), but the
data movement is explicit: a warp owns ROWS whole rows; each lane reads CHUNKS chunks of every row per
step (a chunk: 32 codes, 16 at 8 bits; 16 bytes at 4 and 8 bits, 12 at 3 bits, a word from each of three
planes), BATCH steps' words, scales and zero points loaded together before any arithmetic, and its share of
x once for all ROWS rows, as registers. In Triton the tiles of words, x pairs and group sums passed through
shared memory at every step. The zero point is taken in the centring step: (128 + c) − (128 + z) = c − z
exactly in bf16, so no Σx term; each lane's codes of a step lie in one group (groups are multiples of a
step's codes), whose scale is applied in float32. 8 bits: each byte is split in nibbles centred as 4-bit
codes are (z = 16 zh + zl) and recombined, 16 (h − zh) + (l − zl) = c − z, every step exact in bf16
(|c − z| <= 255 fits its 8-bit significand). 3 bits: a lane takes 2 chunks per step (8-byte loads from
each plane), and since its x is then 128 bytes, one cache line per lane for every load from L1, x goes
through shared memory, its 16-byte vectors swizzled so that a warp's loads hit every bank group.

Measured on an H100 (`python -m harness bench`: Llama-3-8B block in CUDA graphs, against the Triton GEMVs
in the same run, g128): 4 bits, 61.1 against 66.5 µs per block, 50.5 against 57.1 fused (q/k/v and gate/up
as one layer each); 8 bits, 95.7 against 104.1, 84.3 against 91.8 fused; 3 bits, 53.1 against 61.2,
44.9 against 52.2 fused. At 3 bits one chunk per lane
per step (three 4-byte loads, x from L1) ran no faster than Triton's (62.5 against 60.0 µs); 2 chunks with
x from L1, 83.4.

Storage as `packing` keeps it: at 4 bits word w of a row holds codes 8w + i and 8w + i + 4 at bits 4i and
16 + 4i; at 8 bits bytes are codes in order; at 3 bits a row is three planes of one word per 32-code chunk.
Needs rows and groups (or one per row) of whole chunks, bf16 activations, sm_80+.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layer_format import LayerFormat

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {  // a * b + c on bf16 pairs
    u32 d; asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 magic(u32 bits, u32 mask) {  // (bits & mask) | 0x43004300: 128 + c per half
    u32 d; asm("lop3.b32 %0, %1, %2, 0x43004300, 0xea;" : "=r"(d) : "r"(bits), "r"(mask)); return d;
}
__device__ __forceinline__ u32 centre_of(u32 z) { return (0xC300u | z) * 0x10001u; }  // −(128 + z), both halves
__device__ __forceinline__ float halves(u32 pair) {  // the sum of a bf16 pair, in float32
    return __uint_as_float(pair << 16) + __uint_as_float(pair & 0xffff0000u);
}
__device__ __forceinline__ float half_to_float(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 to_bf16(float f) {
    u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
// Weights are read once: kept out of L1, where x lives. N consecutive words, one vector load.
template <int N> __device__ __forceinline__ void load_words(const u32* p, u32* w) {
    if constexpr (N == 4) {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
    } else if constexpr (N == 2) {
        asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
    } else {
        asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
    }
}
__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// 4 bits: Σ (c − z)·x over a word of 8 codes; xp: the pairs (x_i, x_i+4); centre: −(128 + z).
__device__ __forceinline__ float dot_word4(u32 w, const u32 (&xp)[4], u32 centre) {
    const u32 one = 0x3f803f80u;
    u32 acc = fma2(fma2(magic(w, 0x000f000fu), one, centre), xp[0], 0u);
    #pragma unroll
    for (int i = 1; i < 4; i++) acc = fma2(fma2(magic(w >> (4 * i), 0x000f000fu), one, centre), xp[i], acc);
    return halves(acc);
}

// 8 bits: c − z for the bytes at bits `shift` and 16 + `shift` of w, from their nibbles centred as 4-bit
// codes are (z = 16 zh + zl): 16 (h − zh) + (l − zl), every step exact in bf16 (|c − z| <= 255).
__device__ __forceinline__ u32 byte_pair(u32 w, int shift, u32 centre_lo, u32 centre_hi) {
    const u32 one = 0x3f803f80u, sixteen = 0x41804180u;
    const u32 lo = fma2(magic(w >> shift, 0x000f000fu), one, centre_lo);
    return fma2(fma2(magic(w >> (shift + 4), 0x000f000fu), one, centre_hi), sixteen, lo);
}
// Σ (c − z)·x over two words of 4 byte codes; xp: the pairs (x0, x2), (x1, x3), (x4, x6), (x5, x7).
__device__ __forceinline__ float dot_words8(u32 w0, u32 w1, const u32 (&xp)[4], u32 lo, u32 hi) {
    u32 acc = fma2(byte_pair(w0, 0, lo, hi), xp[0], 0u);
    acc = fma2(byte_pair(w0, 8, lo, hi), xp[1], acc);
    acc = fma2(byte_pair(w1, 0, lo, hi), xp[2], acc);
    return halves(fma2(byte_pair(w1, 8, lo, hi), xp[3], acc));
}

// 3 bits: Σ (c − z)·x over a chunk of 32 codes, words w0, w1, w2 (`packing`): pair j < 15 at bits
// 3 (j % 5) and 16 + 3 (j % 5) of word j / 5, the last pair's bits at 15 and 31 of each word.
// xp: the pairs (x_2j, x_2j+1), x's own adjacent bf16.
__device__ __forceinline__ float dot_chunk3(u32 w0, u32 w1, u32 w2, const u32 (&xp)[16], u32 centre) {
    const u32 one = 0x3f803f80u, words[3] = {w0, w1, w2};
    float total = 0.f;
    #pragma unroll
    for (int i = 0; i < 3; i++) {
        u32 acc = 0u;
        #pragma unroll
        for (int j = 0; j < 5; j++)
            acc = fma2(fma2(magic(words[i] >> (3 * j), 0x00070007u), one, centre), xp[5 * i + j], acc);
        if (i == 2) {
            u32 last = magic(w0 >> 15, 0x00010001u);
            last |= (w1 >> 14) & 0x00020002u;
            last |= (w2 >> 13) & 0x00040004u;
            acc = fma2(fma2(last, one, centre), xp[15], acc);
        }
        total += halves(acc);
    }
    return total;
}

// Where x's 16-byte vector u is kept in shared memory: lanes whose runs of x lie 8 vectors apart (2 chunks)
// read from 8 different bank groups (u's bits 0-2 flipped by the lane's).
__device__ __forceinline__ int swizzle(int u) { return u ^ ((u >> 3) & 7); }

// Σ (c − z)·x over a lane's CHUNKS chunks of each of ROWS rows at step slice v. A chunk: 32 codes (16 at
// 8 bits), one 16-byte vector of words at 4 and 8 bits (words 4c..4c + 3), a word of each plane at 3 bits
// (words c, CHUNKS + c, 2 CHUNKS + c); its x: XVECS vectors of 16 bytes.
template <int BITS, int ROWS, int WORDS, int CHUNKS>
__device__ __forceinline__ void dot_step(const uint4* x, int v, const u32 (&w)[ROWS][WORDS], const u32 (&lo)[ROWS],
                                         const u32 (&hi)[ROWS], float (&out)[ROWS]) {
    constexpr int XVECS = BITS == 8 ? 2 : 4;
    static_assert(CHUNKS == 1 || (CHUNKS == 2 && BITS != 8), "the swizzle takes 2 chunks of 4 vectors of x");
    #pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        u32 xp3[16];  // 3 bits: the chunk's x pairs (x_2j, x_2j+1)
        #pragma unroll
        for (int j = 0; j < XVECS; j++) {
            const int u = XVECS * (CHUNKS * v + c) + j;
            const uint4 a = CHUNKS > 1 ? x[swizzle(u)] : __ldg(x + u);  // shared memory / global
            if constexpr (BITS == 3) {
                xp3[4 * j] = a.x; xp3[4 * j + 1] = a.y; xp3[4 * j + 2] = a.z; xp3[4 * j + 3] = a.w;
            } else if constexpr (BITS == 4) {  // word j of the chunk; x pairs (x_i, x_i+4)
                const u32 xp[4] = {__byte_perm(a.x, a.z, 0x5410), __byte_perm(a.x, a.z, 0x7632),
                                   __byte_perm(a.y, a.w, 0x5410), __byte_perm(a.y, a.w, 0x7632)};
                #pragma unroll
                for (int r = 0; r < ROWS; r++) out[r] += dot_word4(w[r][4 * c + j], xp, lo[r]);
            } else {  // words 2j and 2j + 1 of the chunk
                const u32 xp[4] = {__byte_perm(a.x, a.y, 0x5410), __byte_perm(a.x, a.y, 0x7632),
                                   __byte_perm(a.z, a.w, 0x5410), __byte_perm(a.z, a.w, 0x7632)};
                #pragma unroll
                for (int r = 0; r < ROWS; r++)
                    out[r] += dot_words8(w[r][4 * c + 2 * j], w[r][4 * c + 2 * j + 1], xp, lo[r], hi[r]);
            }
        }
        if constexpr (BITS == 3) {
            #pragma unroll
            for (int r = 0; r < ROWS; r++)
                out[r] += dot_chunk3(w[r][c], w[r][CHUNKS + c], w[r][2 * CHUNKS + c], xp3, lo[r]);
        }
    }
}
template <int BATCH, int ROWS, int WORDS> struct Batch {  // BATCH steps' words, centres and scales
    u32 w[BATCH][ROWS][WORDS], lo[BATCH][ROWS], hi[BATCH][ROWS];
    float scale[BATCH][ROWS];
};

// A warp owns ROWS whole rows. Step s: each lane's share of every row, v = 32 s + lane. Steps go in
// batches whose loads are all issued before any arithmetic (bytes in flight are what a GEMV needs); with
// PREFETCH, batch b + 1's before batch b's arithmetic.
template <int BITS, int K, int GROUP, int ROWS, int WARPS, int SYM, int BATCH, int PREFETCH, int CHUNKS>
__global__ void __launch_bounds__(WARPS * 32) gemv(const uint4* __restrict__ x, const u32* __restrict__ q,
        const u16* __restrict__ scales, const unsigned char* __restrict__ zeros, u16* __restrict__ out, int n) {
    // per lane per row per step: CHUNKS chunks (16 bytes each at 4 and 8 bits, a word of each plane at 3)
    constexpr int CODES = (BITS == 8 ? 16 : 32) * CHUNKS, WORDS = (BITS == 3 ? 3 : 4) * CHUNKS;
    constexpr int VECS = K / CODES, STEPS = (VECS + 31) / 32, BATCHES = (STEPS + BATCH - 1) / BATCH;
    constexpr int NG = (K + GROUP - 1) / GROUP;
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * WARPS + threadIdx.x / 32) * ROWS;
    int rows[ROWS];
    float acc[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; r++) { rows[r] = min(row0 + r, n - 1); acc[r] = 0.f; }
    Batch<BATCH, ROWS, WORDS> batch[PREFETCH ? 2 : 1];
    auto load = [&](int s0, Batch<BATCH, ROWS, WORDS>& into) {
        #pragma unroll
        for (int b = 0; b < BATCH; b++) {
            const int v = min((s0 + b) * 32 + lane, VECS - 1), g = (CODES * v) / GROUP;
            #pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (s0 + b < STEPS) {
                    const u32* row = q + (size_t)rows[r] * (K * BITS / 32);
                    if constexpr (BITS == 3) {
                        #pragma unroll
                        for (int p = 0; p < 3; p++)  // plane p: word p · K / 32 + chunk
                            load_words<CHUNKS>(row + p * (K / 32) + CHUNKS * v, into.w[b][r] + p * CHUNKS);
                    } else {
                        #pragma unroll
                        for (int c = 0; c < CHUNKS; c++)
                            load_words<4>(row + 4 * (CHUNKS * v + c), into.w[b][r] + 4 * c);
                    }
                    const u32 z = SYM ? (1u << (BITS - 1)) : __ldg(zeros + rows[r] * NG + g);
                    into.lo[b][r] = centre_of(z & 15u);
                    into.hi[b][r] = centre_of(z >> 4);  // 8 bits only
                    into.scale[b][r] = half_to_float(__ldg(scales + rows[r] * NG + g));
                }
            }
        }
    };
    if (PREFETCH) load(0, batch[0]);
    // CHUNKS > 1: a lane's x is 64·CHUNKS bytes, one cache line per lane for every load from L1; so x
    // goes through shared memory, copied while the first weights are on their way.
    constexpr bool XSMEM = CHUNKS > 1;
    __shared__ uint4 xs[XSMEM ? (K / 8 + 7) / 8 * 8 : 1];
    if constexpr (XSMEM) {
        for (int u = threadIdx.x; u < K / 8; u += WARPS * 32) xs[swizzle(u)] = __ldg(x + u);
        __syncthreads();
    }
    #pragma unroll
    for (int t = 0; t < BATCHES; t++) {
        if (!PREFETCH) load(t * BATCH, batch[0]);
        else if (t + 1 < BATCHES) load((t + 1) * BATCH, batch[(t + 1) & 1]);
        const Batch<BATCH, ROWS, WORDS>& cur = batch[PREFETCH ? t & 1 : 0];
        #pragma unroll
        for (int b = 0; b < BATCH; b++) {
            const int v = (t * BATCH + b) * 32 + lane;
            if (t * BATCH + b >= STEPS || (VECS % 32 != 0 && v >= VECS)) break;
            float dot[ROWS];
            #pragma unroll
            for (int r = 0; r < ROWS; r++) dot[r] = 0.f;
            dot_step<BITS, ROWS, WORDS, CHUNKS>(XSMEM ? xs : x, v, cur.w[b], cur.lo[b], cur.hi[b], dot);
            #pragma unroll
            for (int r = 0; r < ROWS; r++) acc[r] += cur.scale[b][r] * dot[r];
        }
    }
    #pragma unroll
    for (int r = 0; r < ROWS; r++) {
        const float total = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < n) out[row0 + r] = to_bf16(total);
    }
}
"""

SLICE = {3: 32, 4: 32, 8: 16}  # codes of a chunk: what rows and groups must be made of


@dataclass(frozen=True)
class LaunchConfig:
    rows: int  # per warp
    warps: int  # per block
    batch: int  # steps whose loads are issued together
    prefetch: bool  # the next batch's loads issued before this one's arithmetic
    chunks: int = 1  # per lane per row per step


def chunks_per_step_3bit(in_features: int, group: int) -> int:
    """2 where rows and groups are made of pairs of chunks and x fits in 48 KB of shared memory, else 1."""
    return 2 if in_features % 64 == 0 and group % 64 == 0 and in_features * 2 <= 48 * 1024 else 1


def launch_config(bits: int, out_features: int, in_features: int, group: int) -> LaunchConfig:
    """Measured on an H100 (Llama-3-8B block, whole blocks in CUDA graphs). 4 bits: 2 rows per warp, 2 to
    8 warps and 4 steps per batch were within 2% of the best everywhere but the fused gate/up (28672
    rows), where 4 rows were 4% faster; prefetching the next batch bought nothing (60.0 against 60.4 µs
    per block). 8 bits (8 steps per 4096 columns, not 4): batches of 2 steps, each prefetched while the
    one before is summed (97.0 against 98.6 µs without; 1 row per warp 98.5, 4 rows 126.2), but 1 row per
    warp and batches of 4 for the narrow k/v projections (1024 rows: more warps to keep bytes in flight;
    95.6 against 97.4 µs per block). 3 bits: 2 chunks per step, batches of 1 step prefetched (53.0 µs
    per block; 4 chunks 59.0, 4 rows 58.5, 8 warps 61.5, batches of 2 58.1); with 1 chunk (ragged
    widths, groups of 32, x too long for shared memory) batches of 2, prefetched (57.0; 4 rows 68.3).
    At 4 bits 2 chunks with x in shared memory bought nothing (61.1 against 60.9)."""
    if bits == 8:
        if out_features <= 2048:
            return LaunchConfig(rows=1, warps=4, batch=4, prefetch=True)
        return LaunchConfig(rows=2, warps=4, batch=2, prefetch=True)
    if bits == 3:
        chunks = chunks_per_step_3bit(in_features, group)
        return LaunchConfig(rows=2, warps=4, batch=1 if chunks == 2 else 2, prefetch=True, chunks=chunks)
    return LaunchConfig(rows=4 if out_features >= 16384 else 2, warps=4, batch=4, prefetch=False)


def _group(fmt: LayerFormat) -> int:
    return fmt.in_features if fmt.one_group else fmt.group_size


def why_not(layer: LayerFormat, device: torch.device) -> str | None:
    """Why this GEMV cannot serve such a layer on the device, or None (from its format alone)."""
    if layer.bits not in SLICE:
        return f"its GEMV serves {', '.join(map(str, sorted(SLICE)))}-bit weights, not {layer.bits}-bit"
    codes = SLICE[layer.bits]
    if layer.in_features % codes or _group(layer) % codes:
        return (f"at {layer.bits} bits it needs a width and groups in multiples of {codes} columns, not a width of "
                f"{layer.in_features} with groups of {_group(layer)}")
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "it needs bf16x2 arithmetic (sm_80 or newer)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this torch cannot compile CUDA at run time (torch.cuda._compile_kernel, torch 2.8 or newer)"
    return None


def serves(x: Tensor) -> bool:
    """Whether the GEMV takes these activations (bf16, 16-byte aligned); others go elsewhere."""
    return x.dtype == torch.bfloat16 and x.is_contiguous() and x.data_ptr() % 16 == 0


@functools.cache
def _kernel(bits: int, k: int, group: int, sym: bool, config: LaunchConfig):
    name = (f"gemv<{bits}, {k}, {group}, {config.rows}, {config.warps}, {int(sym)}, {config.batch}, "
            f"{int(config.prefetch)}, {config.chunks}>")
    return torch.cuda._compile_kernel(SOURCE, name, nvcc_options=["-std=c++17"])


def gemv(x: Tensor, layer: nn.Module) -> Tensor:
    """x (K,) bf16 -> (N,) bf16 through the packed weights."""
    n = layer.out_features
    group = _group(layer.format)
    config = launch_config(layer.bits, n, layer.in_features, group)
    kernel = _kernel(layer.bits, layer.in_features, group, layer.sym, config)
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    zeros = layer.scales if layer.sym else layer.zeros  # unused when symmetric
    blocks = -(-n // (config.rows * config.warps))
    kernel(grid=(blocks, 1, 1), block=(32 * config.warps, 1, 1), args=[x, layer.qweight, layer.scales, zeros, out, n])
    return out
