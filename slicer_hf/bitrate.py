"""Adaptive bitrate within a session: move the uplink codec's ECSQ step between decode steps to hold a per-token
latency target, along a profiled ladder of (step, bits/token) whose coarsest rung is the quality floor.

The edge alone decides; every ECSQ packet carries its step, so the server decodes each one as it comes and nothing
is renegotiated. The controller models a decode token's latency as `base + bits / goodput`: `base` (compute, round
trip, downlink) is the lowest recent latency with the uplink's share taken out, and the goodput follows from how
far the latest tokens sit above it. A rung is taken coarser as soon as one token misses the target or the recent
median crosses `high` x target, straight to the finest rung predicted under 90% of it, or where none is, under
`high` x target (one rung only while the model can put none of the latency down to the uplink, as at the first
token; the floor only where no rung is predicted under `high`); finer only after `patience` tokens in a row predict
that the finer rung's uplink time fits within `low` of the room `base` leaves under the target and its latency
under `high` x target (where a coarser move may land: with compute near the target the first rule alone let the step
cycle), and a finer rung given up within `calm` tokens doubles that patience (hysteresis, so the knob does not
flap on a link at the edge of two rungs). The room is measured above `base`, not from zero: where compute alone
takes most of the target, a fast link still brings the finer rungs back. A finer rung that misses at once is
measured beside the rung it left: their latencies' difference over their bits' difference is the slope, which one
rung's latency cannot tell from the base; and a model that puts all of a latency well under the target down to the
uplink (a base of zero, where one slow token's slope can leave it) moves finer after `patience` tokens to find out,
unless two rungs have measured a base near zero. What the model cannot tell is compute jitter that crosses the target by
itself: it reads as a slow link, and the controller steps coarser though no rung would help. Nor, on one rung
alone, can it always tell the base from the slope: with compute at 87% of the target and 2 ms of jitter, a link back
from a drop leaves the step coarse in some runs (3 of 8 seeds in simulation, where the controller before this one
stayed coarse in all 8); a slope measured across rungs over a longer history would mend it.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class BitrateController:
    """Chooses the ECSQ step of each decode step.

    Args:
        ladder: (step, bits per token) rungs, finest (most bits) first; the last rung is the quality floor.
        target_ms: per-token latency to hold.
        start: the rung to begin with (index into `ladder`).
        window: latest tokens whose median drives a move.
        high: move coarser when the median exceeds `high` x target.
        low: move finer only when the finer rung's uplink time is predicted within `low` x (target - base).
        patience: tokens of predicted room before a finer move (doubles after one that did not hold, up to 64 or
            the patience given, if larger).
        calm: tokens a finer rung must hold before `patience` is back to its start.
        history: tokens over whose latencies (the uplink's share taken out) `base` is a low quantile.
    """

    ladder: Sequence[tuple[float, float]]
    target_ms: float
    start: int = 0
    window: int = 3
    high: float = 0.95
    low: float = 0.7
    patience: int = 4
    calm: int = 32
    history: int = 256
    level: int = field(init=False)
    changes: list[dict[str, float]] = field(init=False, default_factory=list)
    _recent: deque[tuple[float, float]] = field(init=False)  # (latency ms, bits) of the latest tokens
    _floor: deque[float] = field(init=False)  # latencies with the uplink share taken out, for `base`
    _room: int = field(init=False, default=0)
    _wait: int = field(init=False)
    _since_finer: int | None = field(init=False, default=None)  # tokens since a finer move, while on trial
    _tokens: int = field(init=False, default=0)
    _slope: float | None = field(init=False, default=None)  # ms per uplink bit, as last seen (smoothed)
    _left: tuple[float, float] | None = field(init=False, default=None)  # (median ms, bits) on the rung just left
    _anchored_base: float | None = field(init=False, default=None)  # the base two rungs' latencies last measured

    def __post_init__(self) -> None:
        self.ladder = [(float(s), float(b)) for s, b in self.ladder]
        if not self.ladder:
            raise ValueError("the bitrate ladder needs at least one (step, bits) rung")
        steps, bits = [s for s, _ in self.ladder], [b for _, b in self.ladder]
        if any(a >= b for a, b in zip(steps, steps[1:])) or any(a <= b for a, b in zip(bits, bits[1:])):
            raise ValueError(f"ladder rungs must go from fine to coarse: steps rising, bits falling; got {self.ladder}")
        if not self.target_ms > 0:
            raise ValueError(f"target_ms must be > 0, got {self.target_ms}")
        if not 0 <= self.start < len(self.ladder):
            raise ValueError(f"start must index the ladder (0..{len(self.ladder) - 1}), got {self.start}")
        self.level = self.start
        self._recent = deque(maxlen=self.window)
        self._floor = deque(maxlen=self.history)
        self._wait = self.patience

    @property
    def step(self) -> float:
        """The ECSQ step to encode the next decode step with."""
        return self.ladder[self.level][0]

    def restart(self) -> None:
        """A new generation begins: the gap since the last token is not a token's latency, and the room counted
        toward a finer move starts again."""
        self._recent.clear()
        self._room = 0

    def observe(self, latency_ms: float, bits: float) -> None:
        """One decode token took `latency_ms` (edge compute to reply) and sent `bits` up; maybe move a rung."""
        self._tokens += 1
        self._recent.append((latency_ms, bits))
        median = statistics.median(lat for lat, _ in self._recent)
        over = latency_ms > self.target_ms or median > self.high * self.target_ms  # one miss is enough to act
        base, per_bit = self._model(max(median, latency_ms) if over else median)
        self._floor.append(max(latency_ms - bits * per_bit, 0.0))  # below zero, it would hold a wrong slope up
        if self._since_finer is not None:
            self._since_finer += 1
            if self._since_finer > self.calm:  # the finer rung held: the next try need not wait so long
                self._since_finer, self._wait = None, self.patience
        if over and self._left is not None and self._since_finer is not None and self._since_finer <= self.window:
            self._anchor(latency_ms, bits)  # the finer rung just tried misses: it and the rung left give the slope
            base, per_bit = self._model(max(median, latency_ms))
        if over and self.level < len(self.ladder) - 1:
            if per_bit == 0.0:  # nothing to put the miss down to the uplink by (no history yet): one rung at a time
                self._move(self.level + 1, median)
                return
            coarser = {i: self._predict(i, base, per_bit) for i in range(self.level + 1, len(self.ladder))}
            fits = [i for i, latency in coarser.items() if latency <= 0.9]
            near = [i for i, latency in coarser.items() if latency <= self.high]  # where none has margin
            self._move((fits or near or [len(self.ladder) - 1])[0], median)
            return
        finer = self.level - 1
        # a model that puts all of a latency well under the target down to the uplink (no compute at all) is one rung
        # cannot tell from a slope too steep (one slow token's, say): only trying the finer rung tells them apart
        unsure = base <= 0.0 and median <= self.low * self.target_ms
        unsure &= self._anchored_base is None or self._anchored_base > 0.05 * self.target_ms  # (not measured so)
        if self.level > 0 and (
            unsure
            or self.ladder[finer][1] * per_bit <= self.low * (self.target_ms - base)
            and self._predict(finer, base, per_bit) <= self.high  # where a coarser move may land: no flapping
        ):
            self._room += 1
            if self._room >= self._wait:
                self._move(self.level - 1, median)
        else:
            self._room = 0

    def _model(self, latency: float) -> tuple[float, float]:
        """(base ms, ms per uplink bit): base is a low quantile of past latencies with the uplink's share taken
        out; what `latency` (the recent median, or the latest token when it missed) sits above it is put down to
        the uplink's bits. Where it sits at the base (a steady link: the base has caught up with it), the slope
        seen last stands, and the base is what is left of `latency` without it; a rung it could not hold is not
        tried again until the latency itself comes down."""
        bits = max(statistics.median(b for _, b in self._recent), 1.0)
        floor = sorted(self._floor)
        base = min(floor[len(floor) // 10], latency) if floor else latency  # a low quantile: robust to one fast token
        if latency > base:
            per_bit = (latency - base) / bits
            self._slope = per_bit if self._slope is None else 0.5 * (self._slope + per_bit)
            return base, per_bit
        if self._slope is None:
            return base, 0.0
        return max(latency - bits * self._slope, 0.0), self._slope

    def _anchor(self, latency: float, bits: float) -> None:
        """A finer rung tried and missed the target: its latency beside the one of the rung it left puts the latency
        they differ by down to the bits they differ by. That is the slope, and the base under both, which one rung's
        latency cannot tell apart (a base seen too high, a slope too low, would try the rung again and again)."""
        left_ms, left_bits = self._left  # type: ignore[misc]
        self._left = None
        if bits <= left_bits or (slope := (latency - left_ms) / (bits - left_bits)) <= 0:
            return
        self._slope = slope
        self._floor.clear()
        self._floor.append(max(latency - bits * slope, 0.0))
        self._anchored_base = self._floor[0]

    def _predict(self, level: int, base: float, per_bit: float) -> float:
        """Predicted latency at `level` as a share of the target."""
        return (base + self.ladder[level][1] * per_bit) / self.target_ms

    def _move(self, level: int, median: float) -> None:
        self._room = 0
        self._left = (median, self.ladder[self.level][1]) if level < self.level else None
        self._recent.clear()
        if level > self.level and self._since_finer is not None:  # the last finer move did not hold
            self._since_finer, self._wait = None, min(2 * self._wait, max(64, self.patience))
        elif level < self.level:
            self._since_finer = 0
        if level != self.level:
            self.level = level
            self.changes.append({"token": self._tokens, "step": self.step, "median_ms": round(median, 3)})


__all__ = ["BitrateController"]
