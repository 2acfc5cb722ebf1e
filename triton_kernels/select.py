"""ATKF selection and MS block labels without a sort.

Reference: `slicer_hf.codec.ops.rank_order` followed by the sort to position order and the block of each rank in
`ops._quantize_rows_reference`; with one block and no asymmetry, `ops.top_positions`.

Every entry of a row gets a unique int64 key that orders entries exactly as the reference's stable sorts do::

    [group: 2 bits][|y| as float32 bits: 31 bits][BLOCK_D - 1 - index: IDX_BITS bits]

group 2 = chosen by sign (asymmetric filtering), 1 = the rest, 0 = excluded outliers; non-negative float32 bit
patterns order like the values; the inverted index makes the lowest index win a tie. The key of rank r is found by
a radix select (fix one bit at a time, counting keys >= the candidate), so no sort runs: an entry is kept when its
key is >= the key of rank K-1, and its block is the number of block starts s_j (j >= 1) whose key is >= its own.
Exact by construction: keys are unique and only compared.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch_options, on_their_device, rows_per_program

MAG_BITS = 31  # a finite non-negative float32 has its sign bit clear


@triton.jit(do_not_specialize=["n_rows", "d", "k", "m", "k_pos"])  # sizes of 1 must not become constants
def _select_kernel(
    y_ptr,
    excl_ptr,
    pos_ptr,
    label_ptr,
    val_ptr,
    n_rows,
    d,
    k,
    m,
    k_pos,
    ASYM: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    WITH_VALUES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IDX_BITS: tl.constexpr,
    LOW_BITS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    cols = tl.arange(0, BLOCK_D)  # [D]
    valid = (rows < n_rows)[:, None] & (cols < d)[None, :]  # [R, D]
    offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
    y = tl.load(y_ptr + offs, mask=valid, other=0.0)  # [R, D] float32
    inv_idx = (BLOCK_D - 1 - cols).to(tl.int64)[None, :]
    low = (tl.abs(y).to(tl.int32, bitcast=True).to(tl.int64) << IDX_BITS) | inv_idx  # magnitude, then index

    group = tl.full([BLOCK_R, BLOCK_D], 1, tl.int64)
    if ASYM:
        # K+ = min(k_pos, #positives) largest positives and K- = min(K - K+, #negatives) most negative entries
        is_pos = valid & (y > 0)
        is_neg = valid & (y < 0)
        n_pos = tl.minimum(tl.sum(is_pos.to(tl.int32), axis=1), k_pos)  # [R]
        n_neg = tl.minimum(tl.sum(is_neg.to(tl.int32), axis=1), k - n_pos)
        chosen = tl.zeros([BLOCK_R, BLOCK_D], tl.int1)
        for side in tl.static_range(2):
            if side == 0:
                side_key = tl.where(is_pos, low, -1)
                want = n_pos
            else:
                side_key = tl.where(is_neg, low, -1)
                want = n_neg
            # radix select: the want-th largest key of the row (want >= 1; want == 0 chooses nothing)
            t = tl.zeros([BLOCK_R], tl.int64)
            bit = tl.full([BLOCK_R], 1 << (LOW_BITS - 1), tl.int64)
            for _ in range(LOW_BITS):
                count = tl.sum((side_key >= (t | bit)[:, None]).to(tl.int32), axis=1)
                t = tl.where(count >= want, t | bit, t)
                bit = bit >> 1
            chosen = chosen | ((side_key >= t[:, None]) & (want > 0)[:, None])
        group = tl.where(chosen, 2, 1).to(tl.int64)
    if HAS_EXCL:
        excluded = tl.load(excl_ptr + offs, mask=valid, other=0)
        group = tl.where(excluded != 0, 0, group)
    key = tl.where(valid, (group << LOW_BITS) | low, -1)  # [R, D], unique per row

    labels = tl.zeros([BLOCK_R, BLOCK_D], tl.int32)
    kept = tl.zeros([BLOCK_R, BLOCK_D], tl.int1)
    for j in range(1, m + 1):
        # j < m: the start rank of block j; j == m: rank K-1, the last kept entry
        rank = tl.where(j < m, j * (k // m) + tl.minimum(j, k % m), k - 1)
        t = tl.zeros([BLOCK_R], tl.int64)
        bit = tl.full([BLOCK_R], 1 << (LOW_BITS + 1), tl.int64)
        for _ in range(LOW_BITS + 2):
            count = tl.sum((key >= (t | bit)[:, None]).to(tl.int32), axis=1)
            t = tl.where(count >= rank + 1, t | bit, t)
            bit = bit >> 1
        labels += ((key <= t[:, None]) & (j < m)).to(tl.int32)
        kept = tl.where(j == m, key >= t[:, None], kept)

    # compact the kept entries of each row, in position order
    slot = tl.cumsum(kept.to(tl.int32), axis=1) - 1
    out = rows.to(tl.int64)[:, None] * k + slot
    positions = cols.to(tl.int64)[None, :] + tl.zeros([BLOCK_R, BLOCK_D], tl.int64)
    tl.store(pos_ptr + out, positions, mask=kept)
    tl.store(label_ptr + out, labels.to(tl.int64), mask=kept)
    if WITH_VALUES:
        tl.store(val_ptr + out, y, mask=kept)


@on_their_device
def select_rows(
    y: torch.Tensor,
    k: int,
    m: int,
    k_pos: int | None = None,
    excluded: torch.Tensor | None = None,
    with_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kept positions `[N, K]` (ascending), their block labels `[N, K]` and, if asked, their values `[N, K]`.

    Args:
        y: rows `[N, d]`; selection runs on their float32 values.
        k: entries kept per row, 1 <= k <= d minus the excluded count.
        m: blocks, 1 <= m <= k.
        k_pos: positives kept per row (asymmetric filtering), or None.
        excluded: `[N, E]` positions that rank last, or None.
        with_values: also return the kept values (float32, position order).
    """
    y = y.float().contiguous()
    n, d = y.shape
    if not 1 <= m <= k <= d:
        raise ValueError(f"select_rows needs 1 <= m <= k <= d, got m={m}, k={k}, d={d}")
    block_d = triton.next_power_of_2(d)
    idx_bits = block_d.bit_length() - 1
    positions = torch.empty(n, k, dtype=torch.int64, device=y.device)
    labels = torch.empty(n, k, dtype=torch.int64, device=y.device)
    values = torch.empty(n, k, dtype=torch.float32, device=y.device) if with_values else None
    has_excl = excluded is not None and excluded.numel() > 0
    excl_mask = torch.zeros(n, d, dtype=torch.int8, device=y.device).scatter_(1, excluded, 1) if has_excl else y
    block_r = rows_per_program(y, block_d)
    _select_kernel[(triton.cdiv(n, block_r),)](
        y,
        excl_mask,
        positions,
        labels,
        values if with_values else y,
        n,
        d,
        k,
        m,
        0 if k_pos is None else k_pos,
        ASYM=k_pos is not None,
        HAS_EXCL=has_excl,
        WITH_VALUES=with_values,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        IDX_BITS=idx_bits,
        LOW_BITS=MAG_BITS + idx_bits,
        **launch_options(block_r * block_d),
    )
    return positions, labels, values
