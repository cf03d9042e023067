"""Batch-1 GEMV for 4-bit codes in CUDA C++, compiled at first use by NVRTC (through torch; no toolkit).

The arithmetic is `triton_pairs`' (two codes per bf16x2 instruction by the magic number 128.0), but the
data movement is explicit: a warp owns ROWS whole rows; each lane reads 16 bytes of every row per step
(4 words, 32 codes), BATCH steps' words, scales and zero points loaded together before any arithmetic,
and its 64 bytes of x once for all ROWS rows, as registers. In Triton the tiles of words, x pairs and
group sums passed through shared memory at every step. The zero point is taken in the centring step:
(128 + c) − (128 + z) = c − z exactly in bf16, so no Σx term; each lane's 32 codes lie in one group
(groups are multiples of 32), whose scale is applied in float32.

Measured on an H100 (Llama-3-8B block in one CUDA graph, three blocks in turn so that L2 holds none,
`scratch` lab, against the Triton pair GEMV in the same run): 59.6 against 65.7 µs per block at g128,
49.3 against 55.9 fused (q/k/v and gate/up as one layer each). At 3 bits the same structure was slower
than Triton's (63.3 against 58.4 µs), so 3 bits stay there.

Storage as `packing` keeps it: word w of a row holds codes 8w + i and 8w + i + 4 at bits 4i and 16 + 4i.
Needs rows of whole 32-code slices, groups of whole slices (or one per row), bf16 activations, sm_80+.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {  // a * b + c on bf16 pairs
    u32 d; asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 magic(u32 bits, u32 mask) {  // (bits & mask) | 0x43004300: 128 + c per half
    u32 d; asm("lop3.b32 %0, %1, %2, 0x43004300, 0xea;" : "=r"(d) : "r"(bits), "r"(mask)); return d;
}
__device__ __forceinline__ float halves(u32 pair) {  // the sum of a bf16 pair, in float32
    return __uint_as_float(pair << 16) + __uint_as_float(pair & 0xffff0000u);
}
__device__ __forceinline__ float half_to_float(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 to_bf16(float f) {
    u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ void load_words(const u32* p, u32 (&w)[4]) {
    // read once: kept out of L1, where x lives
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}
__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Σ (c − z)·x over a word of 8 codes; xp: the pairs (x_i, x_i+4); centre: −(128 + z) in both halves.
__device__ __forceinline__ float dot_word(u32 w, const u32 (&xp)[4], u32 centre) {
    const u32 one = 0x3f803f80u;
    u32 acc = fma2(fma2(magic(w, 0x000f000fu), one, centre), xp[0], 0u);
    #pragma unroll
    for (int i = 1; i < 4; i++) acc = fma2(fma2(magic(w >> (4 * i), 0x000f000fu), one, centre), xp[i], acc);
    return halves(acc);
}

template <int K, int GROUP, int ROWS, int WARPS, int SYM, int BATCH>
__global__ void __launch_bounds__(WARPS * 32) gemv4(const uint4* __restrict__ x, const u32* __restrict__ q,
        const u16* __restrict__ scales, const unsigned char* __restrict__ zeros, u16* __restrict__ out, int n) {
    constexpr int VECS = K / 32, STEPS = (VECS + 31) / 32, NG = (K + GROUP - 1) / GROUP;
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * WARPS + threadIdx.x / 32) * ROWS;
    int rows[ROWS];
    float acc[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; r++) { rows[r] = min(row0 + r, n - 1); acc[r] = 0.f; }
    // Step s: this lane's 16 bytes of each row, columns 32v .. 32v + 31 with v = 32s + lane.
    #pragma unroll
    for (int s0 = 0; s0 < STEPS; s0 += BATCH) {
        u32 w[BATCH][ROWS][4], centre[BATCH][ROWS];
        float scale[BATCH][ROWS];
        #pragma unroll
        for (int b = 0; b < BATCH; b++) {  // all loads first: bytes in flight are what a GEMV needs
            const int v = min((s0 + b) * 32 + lane, VECS - 1), g = (32 * v) / GROUP;
            #pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (s0 + b < STEPS) {
                    load_words(q + (size_t)rows[r] * (K / 8) + 4 * v, w[b][r]);
                    const u32 z = SYM ? 8u : __ldg(zeros + rows[r] * NG + g);
                    centre[b][r] = (0xC300u | z) * 0x10001u;
                    scale[b][r] = half_to_float(__ldg(scales + rows[r] * NG + g));
                }
            }
        }
        #pragma unroll
        for (int b = 0; b < BATCH; b++) {
            const int v = (s0 + b) * 32 + lane;
            if (s0 + b >= STEPS || (VECS % 32 != 0 && v >= VECS)) break;
            float dot[ROWS];
            #pragma unroll
            for (int r = 0; r < ROWS; r++) dot[r] = 0.f;
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint4 a = __ldg(x + 4 * v + j);  // (x0, x1), (x2, x3), (x4, x5), (x6, x7) of word j
                const u32 xp[4] = {__byte_perm(a.x, a.z, 0x5410), __byte_perm(a.x, a.z, 0x7632),
                                   __byte_perm(a.y, a.w, 0x5410), __byte_perm(a.y, a.w, 0x7632)};
                #pragma unroll
                for (int r = 0; r < ROWS; r++) dot[r] += dot_word(w[b][r][j], xp, centre[b][r]);
            }
            #pragma unroll
            for (int r = 0; r < ROWS; r++) acc[r] += scale[b][r] * dot[r];
        }
    }
    #pragma unroll
    for (int r = 0; r < ROWS; r++) {
        const float total = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < n) out[row0 + r] = to_bf16(total);
    }
}
"""

SLICE = 32  # codes a lane reads per row per step: 16 bytes


@dataclass(frozen=True)
class LaunchConfig:
    rows: int  # per warp
    warps: int  # per block
    batch: int  # steps whose loads are issued together


def launch_config(out_features: int) -> LaunchConfig:
    """Measured on an H100 (Llama-3-8B shapes, 13 configs each): 2 rows per warp, 2 to 8 warps and 4 steps
    per batch were within 2% of the best everywhere but the fused gate/up (28672 rows), where 4 rows were
    4% faster."""
    return LaunchConfig(rows=4 if out_features >= 16384 else 2, warps=4, batch=4)


def _group(layer: nn.Module) -> int:
    return layer.in_features if layer.scales.shape[1] == 1 else layer.group_size


def why_not(layer: nn.Module, device: torch.device) -> str | None:
    """Why this GEMV cannot serve the layer on the device, or None."""
    if layer.bits != 4:
        return f"its GEMV serves 4-bit weights only, not {layer.bits}-bit"
    if layer.in_features % SLICE or _group(layer) % SLICE:
        return (f"it needs a width and groups in multiples of {SLICE} columns, not a width of {layer.in_features} "
                f"with groups of {_group(layer)}")
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "it needs bf16x2 arithmetic (sm_80 or newer)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this torch cannot compile CUDA at run time (torch.cuda._compile_kernel, torch 2.8 or newer)"
    return None


def serves(x: Tensor) -> bool:
    """Whether the GEMV takes these activations (bf16, 16-byte aligned); others go elsewhere."""
    return x.dtype == torch.bfloat16 and x.is_contiguous() and x.data_ptr() % 16 == 0


@functools.cache
def _kernel(k: int, group: int, sym: bool, config: LaunchConfig):
    name = f"gemv4<{k}, {group}, {config.rows}, {config.warps}, {int(sym)}, {config.batch}>"
    return torch.cuda._compile_kernel(SOURCE, name, nvcc_options=["-std=c++17"])


def gemv(x: Tensor, layer: nn.Module) -> Tensor:
    """x (K,) bf16 -> (N,) bf16 through the packed 4-bit weights."""
    n = layer.out_features
    config = launch_config(n)
    kernel = _kernel(layer.in_features, _group(layer), layer.sym, config)
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    zeros = layer.scales if layer.sym else layer.zeros  # unused when symmetric
    blocks = -(-n // (config.rows * config.warps))
    kernel(grid=(blocks, 1, 1), block=(32 * config.warps, 1, 1), args=[x, layer.qweight, layer.scales, zeros, out, n])
    return out
