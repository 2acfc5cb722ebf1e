"""Trellis-coded quantization (TCQ) of calibrated-basis coordinates, for SLICER ECSQ with `trellis=True`.

Rounding each coordinate to the nearest multiple of the step leaves the uniform quantizer's space-filling loss
(about 1.5 dB at high rate). TCQ wins part of it back: the reconstruction grid is twice as fine (points at multiples
of step / 2, cut into four subsets D0..D3 by the point's index mod 4), and an 8-state trellis lets each coordinate
use only one of two unions, A0 = D0 u D2 (multiples of the step) or A1 = D1 u D3 (odd multiples of half a step),
chosen by the state its predecessors left. The encoder picks the whole path with the Viterbi algorithm, minimizing
squared error plus `LAMBDA` x the bits each code costs under its coordinate's Laplace model.

What is sent is, per coordinate, the index k of its point in its union (point k x step in A0, (k + 1/2) x step in
A1), entropy-coded under the coordinate's quantized Laplace, shifted by half a step in A1. The branch taken is the
parity of k, and the state is the last three parities, so the union of a coordinate is a function of codes already
decoded: union(t) = parity(t - 2) xor parity(t - 3) along its trellis.

The d coordinates run as `TRELLISES` interleaved trellises (coordinate c is step c // G of trellis c % G): the union of
coordinate c depends on the codes of c - 2G and c - 3G only, so a decoder takes each run of 2G coordinates (all rows
of a packet) in one call of the entropy decoder, and the encoder runs its Viterbi over all trellises and rows at once.
Codes go on the wire in that order: runs of 2G coordinates, each row-major.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

TRELLISES = 16  # G: interleaved trellises; 16 costs about 0.4% of the gain of one trellis over all d coordinates
RUN = 2 * TRELLISES  # coordinates the decoder takes per call: each depends only on earlier runs
STATES = 8
CHUNK_VALUES = 1 << 16  # of the rows `quantize` searches at once
LAMBDA = 0.11  # squared error (in steps^2) one bit is worth to the encoder's path search
# state s holds the last three branch bits (bit 0 the newest); its union is bit 1 xor bit 2
_UNION = np.array([((s >> 1) ^ (s >> 2)) & 1 for s in range(STATES)])
_PRED = np.array([[nx >> 1, (nx >> 1) | 4] for nx in range(STATES)])  # [8, 2]: the two states leading to nx
UNION_MEAN = -0.5  # a code's mean in its union's model, per unit of union: A0's is 0, A1's points lie half a step lower
_SUBSET = _UNION[_PRED] + 2 * (np.arange(STATES) & 1)[:, None]  # [8, 2]: the subset of that branch


def unions(codes: np.ndarray) -> np.ndarray:
    """`[N, d]` 0/1: the union each coordinate was coded in, from the codes `[N, d]` (what the decoder computes)."""
    parity = (codes & 1).astype(np.int8)
    g = TRELLISES
    out = np.zeros_like(parity)
    for lag in (2 * g, 3 * g):
        if parity.shape[1] > lag:
            out[:, lag:] ^= parity[:, :-lag]
    return out


def wire_order(d: int) -> list[slice]:
    """The runs of coordinates, in the order their codes are sent."""
    return [slice(c, min(c + RUN, d)) for c in range(0, d, RUN)]


def to_wire(a: np.ndarray) -> np.ndarray:
    """`[N, d]` per-coordinate values (codes, their means or scales), flat in the order the codes are sent."""
    return np.concatenate([a[:, run].ravel() for run in wire_order(a.shape[1])])


def _laplace_bits(v: np.ndarray, b: np.ndarray) -> np.ndarray:
    """-log2 of the Laplace(0, b) mass of [v - 1/2, v + 1/2], for v a multiple of 1/2 (v and b in steps)."""
    a = np.abs(v)
    inner = -np.log2(-np.expm1(-0.5 / b))  # v = 0
    outer = 1.0 + (a - 0.5) / (b * np.log(2.0)) - np.log2(-np.expm1(-1.0 / b))  # |v| >= 1/2
    return np.where(a < 0.25, inner, outer)


def quantize(w: np.ndarray, scale: np.ndarray, bound: int) -> np.ndarray:
    """TCQ codes `[N, d]` int32 of coordinates `w` `[N, d]` in steps, with Laplace scales `scale` `[d]` in steps.

    Codes stay in [-bound, bound]; the point of code k is k + union / 2 (see `unions`). Rows are independent: many
    go `CHUNK_VALUES` values at a time, so the search's memory (about 300 bytes a value) stays bounded.
    """
    n, d = w.shape
    rows = max(1, CHUNK_VALUES // max(d, 1))
    if n > rows:
        return np.concatenate([quantize(w[i : i + rows], scale, bound) for i in range(0, n, rows)])
    g = TRELLISES
    steps = -(-d // g)
    pad = steps * g - d
    m = n * g

    def by_step(a: np.ndarray) -> np.ndarray:  # [N, steps * g] -> [steps, N * g]: trellis (row, c % g), step c // g
        return a.reshape(n, steps, g).transpose(1, 0, 2).reshape(steps, m)

    # padded coordinates come last: no coded coordinate depends on them, and they cost nothing
    x = by_step(2.0 * np.pad(w, ((0, 0), (0, pad))))[..., None]  # [steps, m, 1], in half steps
    b = by_step(np.broadcast_to(np.pad(scale, (0, pad), constant_values=1.0), (n, steps * g)))[..., None]
    live = by_step(np.broadcast_to(np.pad(np.ones(d), (0, pad)), (n, steps * g)))[..., None]
    j = np.arange(4)  # subset D_j: the points (in half steps) = j mod 4; D0, D2 make union 0, D1, D3 union 1
    lo, hi = np.where(j % 2, 1 - 2 * bound, -2 * bound), np.where(j % 2, 2 * bound + 1, 2 * bound)
    q = np.clip(np.round((x - j) / 4), np.ceil((lo - j) / 4), np.floor((hi - j) / 4))
    point = (4 * q + j).astype(np.int64)  # [steps, m, 4]: each subset's nearest point
    cost = live * ((point - x) ** 2 / 4 + LAMBDA * _laplace_bits(point / 2, b))  # in steps^2

    metric = np.full((m, STATES), np.inf)
    metric[:, 0] = 0.0
    came_from = np.empty((steps, m, STATES), bool)  # whether the branch into a state left the second predecessor
    for t in range(steps):  # add, compare, select
        branch = cost[t][:, _SUBSET]  # [m, 8, 2]
        first, second = metric[:, _PRED[:, 0]] + branch[..., 0], metric[:, _PRED[:, 1]] + branch[..., 1]
        came_from[t] = second < first
        metric = np.minimum(first, second)
    state = metric.argmin(1)
    rows = np.arange(m)
    chosen = np.empty((steps, m), np.int64)
    for t in range(steps - 1, -1, -1):
        which = came_from[t, rows, state].astype(np.int64)
        chosen[t] = point[t, rows, _SUBSET[state, which]]
        state = _PRED[state, which]
    p = chosen.reshape(steps, n, g).transpose(1, 0, 2).reshape(n, steps * g)[:, :d]
    return ((p - (p & 1)) // 2).astype(np.int32)  # the index in its union: p = 2k + union


def decode(decode_run: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, scale: np.ndarray) -> np.ndarray:
    """The codes `[n, d]` from an entropy decoder, one run of coordinates at a time.

    Args:
        decode_run: takes the means and scales (in steps) of the run's codes, row-major, and returns the codes.
        n: rows.
        scale: each coordinate's Laplace scale `[d]`, in steps.
    """
    g, d = TRELLISES, len(scale)
    held = np.zeros((n, 3 * g + d), np.int32)  # 3G zero codes in front: the parities before a trellis starts
    scales = scale if n == 1 else to_wire(np.broadcast_to(scale, (n, d)))  # every run's scales, in wire order
    for lo, hi, wired in _runs(d, n):  # a run's union: the parity of codes 2G and 3G back, one decoder call a run
        union = (held[:, lo - 2 * g : hi - 2 * g] ^ held[:, lo - 3 * g : hi - 3 * g]) & 1
        held[:, lo:hi] = decode_run(UNION_MEAN * union.ravel(), scales[wired]).reshape(n, -1)
    return held[:, 3 * g :]


@functools.lru_cache(maxsize=64)
def _runs(d: int, n: int) -> tuple[tuple[int, int, slice], ...]:
    """Per run of `n` rows of `d` coordinates: its columns in `decode`'s held codes, and its codes' place on the wire
    (worked out once per shape, not at every packet)."""
    out, done = [], 0
    for run in wire_order(d):
        size = n * (run.stop - run.start)
        out.append((run.start + 3 * TRELLISES, run.stop + 3 * TRELLISES, slice(done, done + size)))
        done += size
    return tuple(out)
