"""Kept-position coding: per row, the cheaper of a d-bit bitmap and Rice-coded gaps."""

from __future__ import annotations

import numpy as np

from ..errors import CodecError
from .bits import BitReader, BitWriter

MAX_RICE = 15
CHUNK_BITS = 1 << 20  # section bits `read_positions` gathers at a time (8 bytes of index each)


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
    """Read what `write_positions` wrote: `[n, k]` sorted positions.

    Only the rows' starts are found one row after another (a bitmap takes d bits; a Rice row ends k remainders
    after its k-th unary one, which a search in the ones of the stream finds); their fields are then read all at once.
    """
    if k == d:
        return np.broadcast_to(np.arange(d), (n, d)).copy()
    if k == 0 or n == 0:
        return np.zeros((n, k), dtype=np.int64)
    use_rice = r.read(n, 1).astype(bool)
    rice_r = np.zeros(n, dtype=np.int64)
    rice_r[use_rice] = r.read(int(use_rice.sum()), 4)
    most = int(np.where(use_rice, (d >> rice_r) + k + k * rice_r, d).sum())  # the bits valid rows can take at most
    bits = r.peek(most)
    ones = np.flatnonzero(bits) if use_rice.any() else np.zeros(0, dtype=np.int64)
    starts, first_one, end = _row_starts(ones, use_rice, rice_r, n, k, d, len(bits))
    out = np.empty((n, k), dtype=np.int64)
    rows_at_once = max(1, CHUNK_BITS // d)  # a row takes at most about d bits (a Rice row fewer, else a bitmap)
    for part in range(0, n, rows_at_once):
        chunk = slice(part, part + rows_at_once)
        _read_rows(bits, ones, starts[chunk], first_one[chunk], use_rice[chunk], rice_r[chunk], out[chunk], part, d)
    r.pos += end
    return out


def _read_rows(
    bits: np.ndarray,
    ones: np.ndarray,
    starts: np.ndarray,
    first_one: np.ndarray,
    use_rice: np.ndarray,
    rice_r: np.ndarray,
    out: np.ndarray,
    first_row: int,
    d: int,
) -> None:
    """Fill `out` `[rows, k]` with the positions of rows whose sections start at `starts` in `bits`."""
    k = out.shape[1]
    if (~use_rice).any():
        at = np.flatnonzero(~use_rice)
        bitmaps = bits[starts[at, None] + np.arange(d)]
        held = bitmaps.sum(1)
        if (bad := np.flatnonzero(held != k)).size:
            row = first_row + int(at[bad[0]])
            raise CodecError(f"row {row}: position section holds {int(held[bad[0]])} positions < {d}, expected {k}")
        out[at] = np.nonzero(bitmaps)[1].reshape(-1, k)
    if use_rice.any():
        at = np.flatnonzero(use_rice)
        closing = ones[first_one[at, None] + np.arange(k)]  # [R, k]: the one that ends each unary value
        quotients = np.diff(closing, axis=1, prepend=starts[at, None] - 1) - 1
        gaps = quotients << rice_r[at, None]
        for rr in np.unique(rice_r[at]):  # the remainders: k fields of rr bits after the unary section
            rows = np.flatnonzero(rice_r[at] == rr)
            after = closing[rows, -1, None, None] + 1  # [rows, 1, 1]: where the unary section ends
            fields = after + (np.arange(k) * rr)[:, None] + np.arange(rr)  # [rows, k, rr]: each remainder's bits
            gaps[rows] |= (bits[fields].astype(np.int64) << np.arange(rr)).sum(-1)
        pos = np.cumsum(gaps + 1, axis=1) - 1
        if (bad := np.flatnonzero(pos[:, -1] >= d)).size:
            raise CodecError(f"row {first_row + int(at[bad[0]])}: position section holds positions past {d - 1}")
        out[at] = pos


def _row_starts(
    ones: np.ndarray, use_rice: np.ndarray, rice_r: np.ndarray, n: int, k: int, d: int, size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Each row's first bit (from the reader's position), for a Rice row the index in `ones` of its unary
    section's first one, and the bits all rows take. A section that runs past the stream, or a unary section longer
    than a valid row's, is a `CodecError`."""
    starts, first_one = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if not use_rice.any():  # bitmaps only: every row takes d bits
        starts[:] = np.arange(n) * d
        end = n * d
    else:
        end, rice, rrs = 0, use_rice.tolist(), rice_r.tolist()
        for row in range(n):
            starts[row] = end
            if not rice[row]:
                end += d
                continue
            j = int(np.searchsorted(ones, end))
            span = (d >> rrs[row]) + k  # the most bits a valid row's unary section takes
            if j + k > len(ones) or ones[j + k - 1] - end >= span:
                message = f"row {row} holds fewer than {k} values in {span} bits"
                raise CodecError(f"unary section truncated or too long: {message}")
            first_one[row] = j
            end = int(ones[j + k - 1]) + 1 + k * rrs[row]
    if end > size:
        raise CodecError(f"bitstream truncated: the position sections need {end} bits, have {size}")
    return starts, first_one, end
