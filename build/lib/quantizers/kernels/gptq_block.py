"""GPTQ's inner loop over one block of columns as a single Triton kernel.

Rows of W are independent in GPTQ: each program takes a tile of rows, keeps the block's columns
in registers and walks them in order (quantize column i, then push its error onto columns > i).
One launch per block replaces the ~8 small launches per column of the torch loop, which
dominate on a GPU. Inputs are transposed (columns as rows) like the torch loop's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS_PER_PROGRAM = 32


# Adding 1.5·2^23 leaves no fraction bits in float32, so the addition rounds as torch.round does
# (ties to even); exact for |x| < 2^22, and larger values keep their sign and are clamped anyway.
# (libdevice.rint would do, but Triton's CPU interpreter, which the tests use, lacks it.)
ROUNDING_SHIFT = tl.constexpr(12582912.0)


@triton.jit
def _block_kernel(w_ptr, s_ptr, z_ptr, hinv_ptr, q_ptr, err_ptr, rows, maxq,
                  WIDTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_W)
    in_rows, in_cols = r < rows, c < WIDTH
    tile = tl.load(w_ptr + c[None, :] * rows + r[:, None], mask=in_rows[:, None] & in_cols[None, :], other=0.0)
    for i in range(WIDTH):
        w = tl.sum(tl.where(c[None, :] == i, tile, 0.0), axis=1)  # column i, as updated so far
        s = tl.load(s_ptr + i * rows + r, mask=in_rows, other=1.0)
        z = tl.load(z_ptr + i * rows + r, mask=in_rows, other=0.0)
        rounded = (tl.math.div_rn(w, s) + ROUNDING_SHIFT) - ROUNDING_SHIFT
        q = tl.minimum(tl.maximum(rounded + z, 0.0), maxq)
        err = tl.math.div_rn(w - (q - z) * s, tl.load(hinv_ptr + i * WIDTH + i))
        h = tl.load(hinv_ptr + i * WIDTH + c, mask=in_cols & (c >= i), other=0.0)
        tile -= err[:, None] * h[None, :]
        tl.store(q_ptr + i * rows + r, q, mask=in_rows)
        tl.store(err_ptr + i * rows + r, err, mask=in_rows)


def quantize_block(W1: Tensor, S: Tensor, Z: Tensor, Hinv1: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Codes (as float) and scaled errors of a (width, rows) block of transposed columns, given each
    column's per-row scale S and zero Z (width, rows) and the block's upper Cholesky factor Hinv1."""
    width, rows = W1.shape
    W1, S, Z, Hinv1 = (t.contiguous().float() for t in (W1, S, Z, Hinv1))
    codes, err = torch.empty_like(W1), torch.empty_like(W1)
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _block_kernel[grid](W1, S, Z, Hinv1, codes, err, rows, float(maxq),
                        WIDTH=width, BLOCK_R=ROWS_PER_PROGRAM, BLOCK_W=triton.next_power_of_2(width))
    return codes, err
