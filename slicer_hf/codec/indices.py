"""Kept-position coding: per row, the cheaper of a d-bit bitmap and Rice-coded gaps."""

from __future__ import annotations

import numpy as np

from ..errors import CodecError
from .bits import BitReader, BitWriter

MAX_RICE = 15
MODES = ("auto", "bitmap", "rice")


def write_positions(w: BitWriter, positions: np.ndarray, d: int, mode: str = "auto") -> None:
    """Write sorted positions `[N, K]` (each row strictly increasing, < d)."""
    n, k = positions.shape
    if k in (0, d) or n == 0:
        return  # nothing or everything kept: the count alone says which
    gaps = np.diff(positions, axis=1, prepend=-1) - 1  # [N, K], >= 0
    rs = np.arange(MAX_RICE + 1)
    rice_bits = k * (rs[None, :] + 1) + (gaps[:, :, None] >> rs[None, None, :]).sum(axis=1)  # [N, R]
    best_r = rice_bits.argmin(axis=1)
    use_rice = rice_bits.min(axis=1) + 4 < d if mode == "auto" else np.full(n, mode == "rice")
    w.write(use_rice.astype(np.uint64), 1)
    w.write(best_r[use_rice], 4)
    for row in range(n):
        if use_rice[row]:
            r = int(best_r[row])
            w.write_unary(gaps[row] >> r)
            w.write(gaps[row] & ((1 << r) - 1), r)
        else:
            bitmap = np.zeros(d, dtype=np.uint64)
            bitmap[positions[row]] = 1
            w.write(bitmap, 1)


def read_positions(r: BitReader, n: int, k: int, d: int) -> np.ndarray:
    """Read what `write_positions` wrote: `[n, k]` sorted positions."""
    if k == d:
        return np.broadcast_to(np.arange(d), (n, d)).copy()
    if k == 0 or n == 0:
        return np.zeros((n, k), dtype=np.int64)
    use_rice = r.read(n, 1).astype(bool)
    rice_r = r.read(int(use_rice.sum()), 4).astype(np.int64)
    out = np.empty((n, k), dtype=np.int64)
    next_r = iter(rice_r)
    for row in range(n):
        if use_rice[row]:
            rr = int(next(next_r))
            gaps = (r.read_unary(k, (d >> rr) + k) << rr) | r.read(k, rr).astype(np.int64)  # the gaps sum to < d
            pos = np.cumsum(gaps + 1) - 1
        else:
            pos = np.flatnonzero(r.read(d, 1))
        if pos.size != k or (k and pos[-1] >= d):
            raise CodecError(f"row {row}: position section holds {pos.size} positions < {d}, expected {k}")
        out[row] = pos
    return out
