"""SLICER-Search: from an edge profile, a server profile, the link and the client's budgets, predict every
(split layer, uplink codec setting, downlink) and choose one.

Per decode token, with k the split layer, `up` the uplink point and `down` the downlink (exact, or ECSQ):

    edge    = embed + sum(edge layers < k) + head + step overhead + up.encode [+ down.decode]
    server  = sum(server layers >= k) + up.decode [+ down.encode]
    bytes   = the STEP (or REPLY) message + TCP/IP/HTTP2 framing, each way
    latency = max(edge + server + RTT + overhead + sum((bytes - burst)+ / rate),  up bytes / up rate,
                  down bytes / down rate)
    KL      = up.kl + down.kl (the two errors are small and independent: their KLs add to first order)

The memory of the edge is its weights (embedding, head, layers < k) and the KV cache of layers < k for the context.
The link is a token bucket of `burst` bytes filling at the rate, each way. With no burst (a physical line) every
byte pays its serialization time, and the latency is compute + RTT + overhead + bytes / rate each way. With a
burst (a shaper: `tc tbf`, a carrier's policer), a message waits only for what the bucket lacks when it is sent;
between tokens the bucket refills, so the link costs nothing until a token's bytes outgrow what one token period
refills, where the link sets the pace (bytes / rate).

A candidate is feasible when it meets every given constraint; the Pareto set is over (latency, server compute,
uplink bits, KL), ranked by the objective.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import protocol
from ..codec import build_codec
from ..config import SlicerConfig, at_least
from ..errors import ConfigError
from .profile import Profile, RatePoint

OBJECTIVES = ("latency", "server-compute", "uplink")
SEARCH_NAME = "search.json"
# gRPC over HTTP/2 over TCP/IPv4 per decode step, beyond the protocol message, measured over the veth link of
# `slicer_hf.bench.link` (Linux byte counters): the DATA frame and gRPC prefix, TCP/IP headers, and the ACKs of the
# other direction; each further MSS-sized segment of a long message adds its own headers and ACK. Up: 194-196 bytes
# a decode step with fp16 and SLICER packets (2026-12-07); the 210 first measured had counted the benchmark's own
# STATS calls (about 35 bytes a step).
FRAMING_BYTES_UP = 195
FRAMING_BYTES_DOWN = 116
SEGMENT_BYTES, MSS = 100, 1448


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """The client's network path to the server.

    Args:
        uplink_mbps, downlink_mbps: rates each way, Mbit/s.
        rtt_ms: round-trip propagation time.
        overhead_ms: per-step time neither side's model spends (gRPC, the protocol, the server's scheduling).
        framing_bytes_up, framing_bytes_down: bytes per step each way beyond the protocol message.
        burst_bytes: the token bucket each way (0: a physical line, every byte pays its serialization time).
    """

    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float = 0.0
    overhead_ms: float = 2.0
    framing_bytes_up: int = FRAMING_BYTES_UP
    framing_bytes_down: int = FRAMING_BYTES_DOWN
    burst_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("uplink_mbps", "downlink_mbps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of Mbit/s, got {value!r}")
        for name in ("rtt_ms", "overhead_ms", "framing_bytes_up", "framing_bytes_down", "burst_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Constraints:
    """The client's budgets; None leaves one open.

    Args:
        max_kl: mean KL to the unsplit model, nats per token.
        max_ppl_increase_pct: perplexity increase, percent.
        edge_memory_gb: the edge's weights and KV cache, GB (1e9 bytes).
        max_token_latency_ms: per decode token.
        context_tokens: positions the edge's KV cache must hold (for the memory figure).
        prompt_tokens: prompt length for the time-to-first-token figure.
    """

    max_kl: float | None = None
    max_ppl_increase_pct: float | None = None
    edge_memory_gb: float | None = None
    max_token_latency_ms: float | None = None
    context_tokens: int = 2048
    prompt_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("max_kl", "max_ppl_increase_pct", "edge_memory_gb", "max_token_latency_ms"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number or None, got {value!r}")
        for name in ("context_tokens", "prompt_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")

    def limits(self) -> dict[str, float]:
        """The constraints that are set, as {prediction field: limit}."""
        limits = {
            "kl": self.max_kl,
            "ppl_change_pct": self.max_ppl_increase_pct,
            "edge_memory_gb": self.edge_memory_gb,
            "token_latency_ms": self.max_token_latency_ms,
        }
        return {k: float(v) for k, v in limits.items() if v is not None}


CONSTRAINT_NAMES = {
    "kl": "max_kl",
    "ppl_change_pct": "max_ppl_increase_pct",
    "edge_memory_gb": "edge_memory_gb",
    "token_latency_ms": "max_token_latency_ms",
}


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What a candidate is predicted to cost, per decode token unless named otherwise."""

    token_latency_ms: float
    edge_ms: float
    server_ms: float
    link_ms: float
    ttft_ms: float
    uplink_bits: float  # the STEP message of one decode token
    downlink_bits: float  # its REPLY message
    edge_memory_gb: float
    kl: float
    ppl_change_pct: float


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One (split layer, uplink setting, downlink) with its prediction."""

    split_layer: int
    codec: str
    step: float | None
    downlink_step: float | None
    prediction: Prediction

    def label(self) -> str:
        up = f"ecsq {self.step:g}" if self.codec == "slicer" else self.codec
        down = "exact" if self.downlink_step is None else f"ecsq {self.downlink_step:g}"
        return f"split {self.split_layer}, up {up}, down {down}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "label": self.label()}


class InfeasibleError(ConfigError):
    """No candidate meets every constraint. `binding` names the constraint that needs the least relaxing, `nearest`
    is the candidate that meets the others and comes closest to it."""

    def __init__(self, message: str, binding: str, nearest: Candidate) -> None:
        super().__init__(message)
        self.binding, self.nearest = binding, nearest


@dataclasses.dataclass
class SearchResult:
    """Feasible candidates ranked by the objective (the first is the choice), and the Pareto set among them."""

    objective: str
    constraints: Constraints
    link: LinkSpec
    ranked: list[Candidate]
    pareto: list[Candidate]
    config: SlicerConfig  # the chosen candidate as a config
    profiles: dict[str, Any]

    @property
    def chosen(self) -> Candidate:
        return self.ranked[0]

    @property
    def adaptive(self) -> dict[str, Any] | None:
        """With adaptive bitrate: the step the config starts at (the finest predicted to meet the target, which may
        not be the objective's choice), its ladder of steps and the target; else None."""
        if not self.config.bitrate_ladder:
            return None
        ladder = [step for step, _ in self.config.bitrate_ladder]
        return {"start_step": self.config.step, "ladder": ladder, "target_ms": self.config.target_token_latency_ms}

    def summary(self) -> str:
        """The choice in one line, and with adaptive bitrate where the written config starts."""
        line = f"{self.chosen.label()} (objective: {self.objective}; {len(self.ranked)} feasible candidates)"
        if (adaptive := self.adaptive) is not None:
            steps = ", ".join(f"{s:g}" for s in adaptive["ladder"])
            line += (
                f"\nadaptive bitrate: the config starts at ecsq {adaptive['start_step']:g}, the finest step predicted "
                f"to meet {adaptive['target_ms']:g} ms/token, and moves over ecsq {steps}"
            )
            if len(adaptive["ladder"]) == 1:
                line += " (one rung: nothing to move to; a looser quality budget admits coarser steps)"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "constraints": dataclasses.asdict(self.constraints),
            "link": dataclasses.asdict(self.link),
            "chosen": self.chosen.to_dict(),
            "adaptive": self.adaptive,
            "pareto": [c.to_dict() for c in self.pareto],
            "feasible": len(self.ranked),
            "profiles": self.profiles,
            "config": self.config.to_dict(),
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the chosen `slicer_config.json` and `search.json` (the predictions) into `folder`."""
        path = Path(folder)
        self.config.save_pretrained(path)
        (path / SEARCH_NAME).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
        """Upload the chosen config and `search.json` (with a model card where the repo has no README) to a Hub repo
        in one commit; returns its URL."""
        from ..config import upload_with_card

        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            card = self.config.model_card(repo_id)
            return upload_with_card(Path(tmp), repo_id, card, token, private, "SLICER-Search choice")

    def table(self, limit: int = 12) -> str:
        """The Pareto candidates (best first by the objective) as a markdown table; the choice is marked."""
        rows = [
            "| | candidate | ms/token | edge ms | server ms | link ms | TTFT ms | up bits | down bits | edge GB | KL "
            "| ppl % |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in self.pareto[:limit]:
            p = c.prediction
            rows.append(
                f"| {'*' if c == self.chosen else ''} | {c.label()} | {p.token_latency_ms:.1f} | {p.edge_ms:.1f} "
                f"| {p.server_ms:.1f} | {p.link_ms:.1f} | {p.ttft_ms:.0f} | {p.uplink_bits:,.0f} "
                f"| {p.downlink_bits:,.0f} | {p.edge_memory_gb:.3f} | {p.kl:.4f} | {p.ppl_change_pct:+.2f} |"
            )
        if len(self.pareto) > limit:
            more = len(self.pareto) - limit
            rows.append(f"\n... and {more} more Pareto candidates ({SEARCH_NAME} holds them all: --out)")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------- predicting
def _step_overhead_bits(profile: Profile, codec: str) -> int:
    """What a decode step's message adds to its codec packet (of the profiled `codec`: "slicer" or "fp16"), in bits:
    the NEXT header (large ids: a long-running session), less what a bare step leaves out of the packet."""
    ones = torch.ones(1, 1, dtype=torch.bool)
    step = protocol.Step(1 << 20, 1 << 20, 1 << 14, 1, 1, 0, b"", ones, bare=True, next=True)
    return 8 * len(protocol.encode_step(step)) - _bare_savings_bits(profile, codec)


def _reply_bits(profile: Profile, down: RatePoint | None) -> float:
    """A decode step's reply: its header and the exact packet, or the compressed one sent bare."""
    header = 8 * len(protocol.encode_reply(1 << 20, protocol.REPLY_HIDDEN, b""))
    if down is None:
        return header + _exact_downlink_bits(profile)
    return header + down.bits_per_token - _bare_savings_bits(profile, down.codec)


def _bare_savings_bits(profile: Profile, codec: str) -> int:
    """The bits of a one-row packet of the profiled `codec` that a bare message leaves out: its envelope, and what
    the session has agreed on (an ECSQ packet's flags, outlier count and step)."""
    return _bare_savings(profile.model["hidden_size"], profile.model.get("dtype", "float32"), codec)


@functools.lru_cache(maxsize=16)
def _bare_savings(width: int, dtype_name: str, codec: str) -> int:
    from .profile import ECSQ_BASE

    dtype = getattr(torch, dtype_name)
    spec = {**ECSQ_BASE, "step": 0.3} if codec == "slicer" else {"codec": codec}
    built = build_codec(spec.pop("codec"), **spec)
    row = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    packet = built.encode(row)
    bare = built.bare(packet, (1, 1, width), dtype)
    return 0 if bare is None else 8 * (len(packet) - len(bare))


def _on(profile: Profile, point: RatePoint) -> RatePoint:
    """`point` as `profile`'s machine measured it, where it profiled the same setting; else `point` itself."""
    return next((p for p in profile.rate_distortion if p.setting == point.setting), point)


def _exact_downlink_bits(profile: Profile) -> float:
    """An exact hidden-state reply's codec packet, in the model's dtype."""
    dtype = getattr(torch, profile.model.get("dtype", "float32"))
    return 8 * len(build_codec("identity").encode(torch.zeros(1, 1, profile.model["hidden_size"], dtype=dtype)))


def _on_wire(message_bytes: float, framing: float) -> float:
    """A message's bytes on the link: itself, its framing, and the headers of each further TCP segment."""
    return message_bytes + framing + SEGMENT_BYTES * max(math.ceil(message_bytes / MSS) - 1, 0)


def predict(
    edge: Profile,
    server: Profile,
    k: int,
    up: RatePoint,
    down: RatePoint | None,
    link: LinkSpec,
    constraints: Constraints,
) -> Prediction:
    """The figures of split `k` with uplink point `up` and downlink `down` (None: exact)."""
    overhead = _step_overhead_bits(edge, up.codec)
    up_bits = up.bits_per_token + overhead
    down_bits = _reply_bits(server, down)  # the server sends it, in its own dtype
    e = edge.edge
    edge_layers = edge.layers[:k]
    edge_ms = e["embed_decode_ms"] + sum(layer.decode_ms for layer in edge_layers) + e["head_decode_ms"]
    # each machine's codec time from its own profile, where it measured the setting (else the other's, borrowed)
    edge_ms += e["step_overhead_ms"] + _on(edge, up).encode_ms + (_on(edge, down).decode_ms if down else 0.0)
    server_ms = sum(layer.decode_ms for layer in server.layers[k:]) + _on(server, up).decode_ms
    server_ms += _on(server, down).encode_ms if down else 0.0
    up_rate, down_rate = link.uplink_mbps * 125.0, link.downlink_mbps * 125.0  # bytes per ms
    up_bytes, down_bytes = (
        _on_wire(up_bits / 8, link.framing_bytes_up),
        _on_wire(down_bits / 8, link.framing_bytes_down),
    )
    fixed_ms = edge_ms + server_ms + link.rtt_ms + link.overhead_ms
    burst = link.burst_bytes
    short = max(up_bytes - burst, 0) / up_rate + max(down_bytes - burst, 0) / down_rate  # what the buckets lack
    latency_ms = max(fixed_ms + short, up_bytes / up_rate, down_bytes / down_rate)
    p = constraints.prompt_tokens
    prefill_ms = p * (
        sum(layer.prefill_ms_per_token for layer in edge_layers)
        + sum(layer.prefill_ms_per_token for layer in server.layers[k:])
        + _on(edge, up).encode_ms
        + _on(server, up).decode_ms
    )
    prompt_bytes = _on_wire((p * up.bits_per_token + overhead) / 8, link.framing_bytes_up)
    prefill_link_ms = (
        max(prompt_bytes - link.burst_bytes, 0) / up_rate + max(down_bytes - link.burst_bytes, 0) / down_rate
    )
    ttft_ms = (
        prefill_ms + prefill_link_ms + link.rtt_ms + link.overhead_ms + e["head_decode_ms"] + e["step_overhead_ms"]
    )
    weights = e["embed_bytes"] + e["head_bytes"] + e.get("other_bytes", 0.0)
    weights += sum(layer.weight_bytes for layer in edge_layers)
    kv = constraints.context_tokens * sum(layer.kv_bytes_per_token for layer in edge_layers)
    if not (math.isfinite(latency_ms) and math.isfinite(ttft_ms)):
        raise ConfigError(f"the link's figures make a token's predicted time overflow: {link}")
    return Prediction(
        token_latency_ms=latency_ms,
        edge_ms=edge_ms,
        server_ms=server_ms,
        link_ms=latency_ms - edge_ms - server_ms,
        ttft_ms=ttft_ms,
        uplink_bits=up_bits,
        downlink_bits=down_bits,
        edge_memory_gb=(weights + kv) / 1e9,
        kl=up.kl + (down.kl if down else 0.0),
        ppl_change_pct=up.ppl_change_pct + (down.ppl_change_pct if down else 0.0),
    )


def candidates(
    edge: Profile,
    server: Profile,
    link: LinkSpec,
    constraints: Constraints,
    splits: Sequence[int] | None = None,
    compress_downlink: bool = True,
) -> list[Candidate]:
    """Every (split, uplink point, downlink) the profiles measured, predicted: the edge's points, and the server's
    where the edge did not measure that setting."""
    own = {p.setting for p in edge.rate_distortion}
    borrowed = [p for p in server.rate_distortion if p.setting not in own]
    rd = dataclasses.replace(edge, rate_distortion=[*edge.rate_distortion, *borrowed])
    if not rd.rate_distortion:
        raise ConfigError("neither profile holds rate-distortion points: profile one with calibration text")
    n = edge.num_layers
    downs: list[RatePoint | None] = [None]
    if compress_downlink:
        downs += [p for p in rd.points(n) if p.codec == "slicer"]
    profiled = rd.split_layers()
    if splits is None and not profiled:
        raise ConfigError("the profiles hold no uplink rate-distortion point at any split layer in [1, L-1]")
    if splits is not None and not splits:
        raise ConfigError(f"no split layers to consider (splits is empty); the profiles hold splits {profiled}")
    if splits is not None and (missing := sorted(set(splits) - set(profiled))):
        raise ConfigError(
            f"no rate-distortion points at the split layers asked for ({missing}); the profiles hold splits {profiled}"
        )
    chosen_splits = profiled if splits is None else [k for k in profiled if k in set(splits)]
    out = []
    for k in chosen_splits:
        for up in rd.points(k):
            for down in downs:
                out.append(
                    Candidate(
                        k,
                        up.codec,
                        up.step,
                        None if down is None else down.step,
                        predict(edge, server, k, up, down, link, constraints),
                    )
                )
    return out


# ------------------------------------------------------------------------------------------- choosing
OBJECTIVE_FIELDS = {  # the objective, then what breaks near-ties
    "latency": ("token_latency_ms", "server_ms"),
    "server-compute": ("server_ms", "token_latency_ms"),
    "uplink": ("uplink_bits", "token_latency_ms"),
}
TIE = 0.01  # candidates within 1% of each other on the objective are a tie: predictions are not finer than that


def _rank(cands: Sequence[Candidate], objective: str) -> list[Candidate]:
    """Best first: by the objective, where values within `TIE` of the best count as equal and the second field
    (then KL) decides among them."""
    first, second = OBJECTIVE_FIELDS[objective]
    ranked = sorted(cands, key=lambda c: (getattr(c.prediction, first), getattr(c.prediction, second), c.prediction.kl))
    best = getattr(ranked[0].prediction, first)
    ties = [c for c in ranked if getattr(c.prediction, first) <= best * (1 + TIE)]
    ties.sort(key=lambda c: (getattr(c.prediction, second), c.prediction.kl))
    return ties + [c for c in ranked if c not in ties]


def _pareto(cands: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other one beats on every one of (latency, server compute, uplink bits, KL)."""

    def point(c: Candidate) -> tuple[float, ...]:
        p = c.prediction
        return (p.token_latency_ms, p.server_ms, p.uplink_bits, p.kl)

    pts = [point(c) for c in cands]
    return [
        c
        for c, a in zip(cands, pts)
        if not any(all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a)) for b in pts)
    ]


def _violations(c: Candidate, limits: dict[str, float]) -> dict[str, float]:
    """value / limit for each set constraint (above 1: violated)."""
    return {name: getattr(c.prediction, name) / limit for name, limit in limits.items()}


def _infeasible(cands: Sequence[Candidate], limits: dict[str, float], adaptive: bool = False) -> InfeasibleError:
    """The error for constraints no candidate meets together. The binding constraint is the one that needs the
    least relaxing: among the candidates that meet every other constraint, the nearest is the one closest to it. When
    no single relaxation is enough, the nearest is the candidate whose worst violation is smallest. `adaptive`: the
    candidates are the ECSQ uplinks alone, and the message says so."""
    best: list[tuple[float, str, Candidate]] = []
    for name in limits:
        others = {n: v for n, v in limits.items() if n != name}
        meet = [c for c in cands if all(r <= 1.0 for r in _violations(c, others).values())]
        if meet:
            c = min(meet, key=lambda c: _violations(c, {name: limits[name]})[name])
            best.append((_violations(c, {name: limits[name]})[name], name, c))
    if best:
        _, binding, nearest = min(best, key=lambda t: t[0])
    else:
        nearest = min(cands, key=lambda c: (max(_violations(c, limits).values()), c.prediction.token_latency_ms))
        ratios = _violations(nearest, limits)
        binding = max(ratios, key=ratios.get)
    ratios = _violations(nearest, limits)
    unit = {"kl": " nats", "ppl_change_pct": "%", "edge_memory_gb": " GB", "token_latency_ms": " ms"}
    missed = [
        f"{CONSTRAINT_NAMES[n]}={limits[n]:g}{unit[n]} (it predicts {getattr(nearest.prediction, n):.6g}{unit[n]})"
        for n, r in sorted(ratios.items(), key=lambda kv: -kv[1])
        if r > 1
    ]
    alone = [n for n in limits if not any(_violations(c, {n: limits[n]})[n] <= 1 for c in cands)]
    relax = [f"{CONSTRAINT_NAMES[n]} to {at_least(getattr(nearest.prediction, n))}" for n in ratios if ratios[n] > 1]
    what = "codec setting"
    if adaptive:
        what = "ECSQ setting (adaptive bitrate moves the ECSQ step; fp16 and exact uplinks are left out)"
    message = (
        f"no split and {what} meets every constraint; the binding one is {CONSTRAINT_NAMES[binding]}="
        f"{limits[binding]:g}{unit[binding]}. The nearest point: {nearest.label()} misses "
        + ", ".join(missed)
        + "; relax "
        + " and ".join(relax)
        + " to take it."
    )
    if alone:
        message += " Even alone, no candidate meets " + ", ".join(CONSTRAINT_NAMES[n] for n in alone) + "."
    return InfeasibleError(message, CONSTRAINT_NAMES[binding], nearest)


def search(
    edge: Profile | str | os.PathLike[str],
    server: Profile | str | os.PathLike[str],
    link: LinkSpec,
    constraints: Constraints | None = None,
    objective: str = "latency",
    base: SlicerConfig | None = None,
    splits: Sequence[int] | None = None,
    compress_downlink: bool = True,
    adaptive: bool = False,
) -> SearchResult:
    """Choose the split layer and codec knobs for one client.

    Args:
        edge, server: profiles (or their paths) of the client's device and of the server machine.
        link: the client's network path.
        constraints: its budgets.
        objective: "latency" (per decode token), "server-compute" (server ms per token) or "uplink" (bits per token).
        base: the config whose other fields the choice keeps (default: SlicerConfig()).
        splits: consider only these split layers (default: every one profiled).
        compress_downlink: also consider ECSQ on the downlink (the profiled downlink steps).
        adaptive: write an adaptive-bitrate ladder (the ECSQ steps at the chosen split within the quality budget)
            and `max_token_latency_ms` as its target into the config; it starts at the finest step predicted to
            meet the target.

    Raises:
        InfeasibleError: no candidate meets every constraint (it names the binding one and the nearest point).
        ConfigError: bad arguments, profiles of different models, no rate-distortion points.
    """
    edge = edge if isinstance(edge, Profile) else Profile.load(edge)
    server = server if isinstance(server, Profile) else Profile.load(server)
    constraints = constraints or Constraints()
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    shape = ("fingerprint", "num_hidden_layers", "hidden_size")  # a profile without a fingerprint still has its sizes
    if any(edge.model.get(key) != server.model.get(key) for key in shape):
        raise ConfigError(
            f"the profiles are of different models: edge {edge.model.get('id')!r}, server {server.model.get('id')!r}"
        )
    if adaptive and constraints.max_token_latency_ms is None:
        raise ConfigError(
            "adaptive bitrate needs a per-token latency target (max_token_latency_ms, --max-token-latency-ms): it is "
            "the latency the edge holds"
        )
    every = candidates(edge, server, link, constraints, splits, compress_downlink)
    if adaptive:  # the ladder moves the ECSQ step: only ECSQ uplinks qualify
        every = [c for c in every if c.codec == "slicer"]
        if not every:
            raise ConfigError("adaptive bitrate moves the ECSQ step, and the profiles hold no ECSQ points")
    limits = constraints.limits()
    feasible = [c for c in every if all(v <= 1.0 for v in _violations(c, limits).values())]
    if not feasible:
        raise _infeasible(every, limits, adaptive)
    ranked = _rank(feasible, objective)
    pareto = _rank(_pareto(feasible), objective)
    config = _config_of(ranked[0], edge, base or SlicerConfig())
    if adaptive:  # every ECSQ step at the chosen split and downlink within the quality budget
        first = ranked[0]
        quality = {n: v for n, v in limits.items() if n in ("kl", "ppl_change_pct")}
        rungs = sorted(
            (
                c
                for c in every
                if (c.split_layer, c.codec, c.downlink_step) == (first.split_layer, "slicer", first.downlink_step)
                and all(v <= 1.0 for v in _violations(c, quality).values())
            ),
            key=lambda c: c.step,
        )
        rungs = list({c.step: c for c in rungs}.values())  # one rung a step (a profile may list a step twice)
        # a coarser step that measured no fewer bits than a finer one is no rung: it costs quality for nothing
        bits = [c.prediction.uplink_bits for c in rungs]
        rungs = [c for i, c in enumerate(rungs) if all(bits[i] < finer for finer in bits[:i])]
        target = constraints.max_token_latency_ms
        start = next((c for c in rungs if c.prediction.token_latency_ms <= target), rungs[-1])  # finest that fits
        ladder = tuple((c.step, c.prediction.uplink_bits - _step_overhead_bits(edge, "slicer")) for c in rungs)
        config = config.replace(step=start.step, bitrate_ladder=ladder, target_token_latency_ms=target)
    profiles = {
        role: {"machine": p.machine, "versions": p.versions, "model": p.model, "calibration": p.calibration}
        for role, p in (("edge", edge), ("server", server))
    }
    return SearchResult(objective, constraints, link, ranked, pareto, config, profiles)


def _config_of(c: Candidate, profile: Profile, base: SlicerConfig) -> SlicerConfig:
    """`base` set to the candidate: split, codec (SLICER ECSQ with the profiled knobs, or fp16), downlink."""
    from .profile import ECSQ_BASE

    model = profile.model
    changes: dict[str, Any] = {
        "split_layer": c.split_layer,
        "codec": c.codec,
        "downlink": "hidden",
        "downlink_step": c.downlink_step,
        "model_id": base.model_id_for(model.get("id"), model["hidden_size"], model["num_hidden_layers"]),
        "num_hidden_layers": model["num_hidden_layers"],
        "hidden_size": model["hidden_size"],
        "bitrate_ladder": (),
        "target_token_latency_ms": None,
        # the codec as profiled: a base's calibrated bases, trellis and chaining were not what was measured
        "basis": None,
        "downlink_basis": None,
        "trellis": False,
        "predict_previous": False,
        "downlink_dtype": "auto",  # the downlink bits predicted are those of the model's dtype
    }
    if c.codec == "slicer" or c.downlink_step is not None or base.rotation == "calibrated":
        changes.update({k: v for k, v in ECSQ_BASE.items() if k != "codec"})
    if c.codec == "slicer":
        changes["step"] = c.step
    return base.replace(**changes)


__all__ = [
    "OBJECTIVES",
    "Candidate",
    "Constraints",
    "InfeasibleError",
    "LinkSpec",
    "Prediction",
    "SearchResult",
    "candidates",
    "predict",
    "search",
]
