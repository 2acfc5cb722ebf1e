"""ABQ on the GPU: per-block statistics, bitwidth choice and magnitude codes for selected entries.

Reference: `slicer_hf.codec.ops.choose_bits` and `ops.quantize` (as `ops._quantize_rows_reference` uses them).

The float32 arithmetic is the reference's, operation for operation: IEEE division (`div_rn`), no fused
multiply-add (see `launch_options`), float16 rounding of lo/hi, round-half-to-even, the same budget
`distortion^2 * sum((mag / peak)^2) / K` and test `err <= budget * block_size`, with errors in units of the row's
peak too (the squares of a row below 1e-19 would underflow). Codes therefore match exactly. The error
and budget sums are float32 reductions in the kernel's own order, as the reference's are in torch's: a block whose
error lies within float32 rounding of its budget may get a different bitwidth (then codes follow that bitwidth).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch_options, on_their_device, rows_per_program

FP16_MAX = tl.constexpr(65504.0)
FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny
FP32_MAX = tl.constexpr(3.4028234663852886e38)
ROUND_MAGIC = tl.constexpr(8388608.0)  # 2^23: (x + 2^23) - 2^23 rounds 0 <= x < 2^23 half-to-even, like torch.round


@triton.jit(do_not_specialize=["n_rows", "k", "m", "n_cands"])  # sizes of 1 must not become constants
def _quantize_kernel(
    val_ptr,
    label_ptr,
    cand_ptr,
    code_ptr,
    sign_ptr,
    lo_ptr,
    hi_ptr,
    bits_ptr,
    n_rows,
    k,
    m,
    n_cands,
    sq_distortion,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_K)  # [K]
    blocks = tl.arange(0, BLOCK_M)  # [M]
    valid = row_ok[:, None] & (cols < k)[None, :]  # [R, K]
    offs = rows.to(tl.int64)[:, None] * k + cols[None, :]
    vals = tl.load(val_ptr + offs, mask=valid, other=0.0)
    labels = tl.load(label_ptr + offs, mask=valid, other=-1).to(tl.int32)
    mag = tl.abs(vals)
    # div_rn takes operands of one shape: the scalars and row vectors below are broadcast by adding zeros
    k_f = tl.zeros([BLOCK_R], tl.float32) + k.to(tl.float32)
    unit = tl.maximum(tl.max(tl.where(valid, mag, 0.0), axis=1), FP32_TINY)[:, None]  # the row's peak, [R, 1]
    mag_u = tl.math.div_rn(mag, unit + tl.zeros([BLOCK_R, BLOCK_K], tl.float32))  # no underflow in the squares
    budget = tl.math.div_rn(sq_distortion * tl.sum(mag_u * mag_u, axis=1), k_f)  # per entry, [R]

    # block statistics, rounded to float16 as the wire holds them, spread back to the entries of each block
    lo = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    hi = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    for j in range(m):
        in_j = valid & (labels == j)
        lo_j = tl.min(tl.where(in_j, mag, FP32_MAX), axis=1)
        hi_j = tl.max(tl.where(in_j, mag, 0.0), axis=1)
        lo_j = tl.minimum(lo_j, FP16_MAX).to(tl.float16).to(tl.float32)
        hi_j = tl.minimum(hi_j, FP16_MAX).to(tl.float16).to(tl.float32)
        tl.store(lo_ptr + rows.to(tl.int64) * m + j, lo_j, mask=row_ok)
        tl.store(hi_ptr + rows.to(tl.int64) * m + j, hi_j, mask=row_ok)
        lo = tl.where(in_j, lo_j[:, None], lo)
        hi = tl.where(in_j, hi_j[:, None], hi)
    span = tl.maximum(hi - lo, FP32_TINY)
    mid = tl.math.div_rn(lo + hi, tl.full([BLOCK_R, BLOCK_K], 2.0, tl.float32))

    # candidates in ascending order: each block takes the first whose error fits its budget, else the last
    chosen = tl.full([BLOCK_R, BLOCK_M], -1, tl.int32)
    codes = tl.zeros([BLOCK_R, BLOCK_K], tl.int32)
    for c_i in range(n_cands):
        c = tl.load(cand_ptr + c_i)
        levels = ((1 << c) - 1).to(tl.float32)
        x = tl.math.div_rn(mag - lo, span) * levels
        q = tl.where(x < ROUND_MAGIC, (x + ROUND_MAGIC) - ROUND_MAGIC, x)  # x < 0 rounds to <= 0: clamped next
        q = tl.minimum(tl.maximum(q, 0.0), levels)
        step = tl.math.div_rn(hi - lo, tl.maximum(levels, 1.0) + tl.zeros([BLOCK_R, BLOCK_K], tl.float32))
        deq = tl.where(levels > 0, lo + q * step, mid)
        off = tl.math.div_rn(deq - mag, unit + tl.zeros([BLOCK_R, BLOCK_K], tl.float32))
        err = off * off
        q_int = tl.where(levels > 0, q, 0.0).to(tl.int32)
        for j in range(m):
            in_j = valid & (labels == j)
            err_j = tl.sum(tl.where(in_j, err, 0.0), axis=1)  # [R]
            size_j = (k // m + (j < k % m).to(tl.int32)).to(tl.float32)
            fits = (err_j <= budget * size_j) | (c_i == n_cands - 1)
            is_open = tl.max(tl.where(blocks[None, :] == j, chosen, -1), axis=1) < 0
            take = fits & is_open  # [R]
            chosen = tl.where((blocks[None, :] == j) & take[:, None], c, chosen)
            codes = tl.where(in_j & take[:, None], q_int, codes)

    tl.store(code_ptr + offs, codes.to(tl.int64), mask=valid)
    tl.store(sign_ptr + offs, (vals < 0).to(tl.int8), mask=valid)
    bits_offs = rows.to(tl.int64)[:, None] * m + blocks[None, :]
    tl.store(bits_ptr + bits_offs, chosen.to(tl.int64), mask=row_ok[:, None] & (blocks < m)[None, :])


@on_their_device
def quantize_selected(
    values: torch.Tensor, labels: torch.Tensor, m: int, candidates: tuple[int, ...], distortion: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes `[N, K]` (int64), signs `[N, K]` (bool), lo, hi `[N, M]` (float32) and bits `[N, M]` (int64).

    Args:
        values: kept values `[N, K]` (float32), any order within a row.
        labels: block of each kept value `[N, K]`, every block in [0, m) non-empty.
        m: blocks per row.
        candidates: allowed bitwidths, ascending, each in [0, 16].
        distortion: the ABQ budget.
    """
    values = values.float().contiguous()
    labels = labels.contiguous()
    n, k = values.shape
    device = values.device
    codes = torch.empty(n, k, dtype=torch.int64, device=device)
    signs = torch.empty(n, k, dtype=torch.int8, device=device)
    lo = torch.empty(n, m, dtype=torch.float32, device=device)
    hi = torch.empty(n, m, dtype=torch.float32, device=device)
    bits = torch.empty(n, m, dtype=torch.int64, device=device)
    cands = torch.tensor(candidates, dtype=torch.int32, device=device)
    block_k = triton.next_power_of_2(k)
    block_r = rows_per_program(values, block_k)
    _quantize_kernel[(triton.cdiv(n, block_r),)](
        values,
        labels,
        cands,
        codes,
        signs,
        lo,
        hi,
        bits,
        n,
        k,
        m,
        len(candidates),
        distortion**2,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        BLOCK_M=triton.next_power_of_2(m),
        **launch_options(block_r * block_k),
    )
    return codes, signs.bool(), lo, hi, bits
