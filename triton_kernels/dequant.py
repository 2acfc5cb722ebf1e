"""Decode's hot path: dequantize, apply the sign and scatter the kept entries into zero rows.

Reference: `slicer_hf.codec.ops.dequantize_rows` (with `ops.dequantize`). Same float32 operations in the same
order (IEEE division, no fused multiply-add), so the decoded values are bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import flat_block, launch_options, on_their_device


@triton.jit(do_not_specialize=["n_entries", "k", "m", "d"])
def _dequantize_kernel(
    pos_ptr,
    label_ptr,
    sign_ptr,
    code_ptr,
    lo_ptr,
    hi_ptr,
    bits_ptr,
    out_ptr,
    n_entries,
    k,
    m,
    d,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat entry index over [N, K]
    ok = i < n_entries
    row = i // k
    label = tl.load(label_ptr + i, mask=ok, other=0)
    block = row * m + label
    lo = tl.load(lo_ptr + block, mask=ok, other=0.0)
    hi = tl.load(hi_ptr + block, mask=ok, other=0.0)
    bits = tl.load(bits_ptr + block, mask=ok, other=0).to(tl.int32)
    code = tl.load(code_ptr + i, mask=ok, other=0).to(tl.float32)
    negative = tl.load(sign_ptr + i, mask=ok, other=0) != 0
    pos = tl.load(pos_ptr + i, mask=ok, other=0)

    levels = ((1 << bits) - 1).to(tl.float32)
    step = tl.where(levels > 0, tl.math.div_rn(hi - lo, tl.maximum(levels, 1.0)), 0.0)
    mid = tl.math.div_rn(lo + hi, tl.full([BLOCK], 2.0, tl.float32))
    value = tl.where(levels > 0, lo + code * step, mid)
    value = tl.where(negative, -value, value)
    tl.store(out_ptr + row * d + pos, value, mask=ok)


@on_their_device
def dequantize_rows(
    positions: torch.Tensor,
    labels: torch.Tensor,
    signs: torch.Tensor,
    codes: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: torch.Tensor,
    d: int,
) -> torch.Tensor:
    """Float32 rows `[N, d]`: zeros, with each kept entry's dequantized, signed value at its position."""
    n, k = codes.shape
    m = bits.shape[1]
    out = torch.zeros(n, d, dtype=torch.float32, device=codes.device)
    block = flat_block(codes)
    _dequantize_kernel[(triton.cdiv(n * k, block),)](
        positions.contiguous(),
        labels.contiguous(),
        signs.to(torch.int8).contiguous(),
        codes.contiguous(),
        lo.float().contiguous(),
        hi.float().contiguous(),
        bits.contiguous(),
        out,
        n * k,
        k,
        m,
        d,
        BLOCK=block,
        **launch_options(block),
    )
    return out
