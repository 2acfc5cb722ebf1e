"""Protocol fuzzing against a live server: hypothesis draws OPEN, STEP and CLOSE messages over the whole schema
(every field, lengths, versions, session ids, interleavings on one stream) and sends them over gRPC.

The verdict of one case: every reply is a well-formed message, no refusal is an internal error, and the server
answers the next case. `run_fuzz` runs as many cases as asked (hypothesis shrinks a failure to a small example).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .. import protocol
from ..codec import build_codec
from ..codec.bits import write_varint
from ..errors import CodecError, ProtocolError, TransportError
from ..transport.grpc import GrpcTransport

CLEAN_CODES = {
    "malformed",
    "version",
    "too_large",
    "unknown_session",
    "model_mismatch",
    "bad_split",
    "bad_request",
    "codec",
    "state_lost",
    "bad_seq",
    "busy",
    "kv_budget",
    "kv_session_cap",
    "draining",
    "too_many_sessions",
    "timeout",
}
CODECS = ("identity", "fp16", "int8", "topk", "slicer")


@dataclass
class FuzzReport:
    cases: int = 0
    messages: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "failures": self.failures[:20]}


def _int() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 8), st.integers(0, 1 << 40), st.sampled_from([1 << 24, (1 << 31) - 1, 4096]))


def _json_value() -> st.SearchStrategy[Any]:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 40), st.floats(), st.text(max_size=8))
    return st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=6,
    )


@st.composite
def open_messages(draw: Any, fingerprint: str, splits: tuple[int, int]) -> bytes:
    codec = build_codec(draw(st.sampled_from(CODECS))).spec()
    if draw(st.integers(0, 4)) == 0:
        codec[draw(st.sampled_from(["max_elements", "sparsity", "version", "name", "junk"]))] = draw(_json_value())
    valid = draw(st.integers(0, 9)) < 7  # most opens are well formed, so that steps reach real sessions
    body: dict[str, Any] = {
        "fingerprint": fingerprint if valid else draw(st.sampled_from([fingerprint, "0" * 16])),
        "split_layer": draw(st.integers(*splits) if valid else st.one_of(st.integers(-2, 99), _json_value())),
        "codec": codec if valid else draw(st.one_of(st.just(codec), _json_value())),
    }
    lossy_downlinks = [build_codec(name).spec() for name in ("fp16", "int8", "slicer")]
    for key, values in (
        ("downlink", st.sampled_from(["hidden", "logits", "topk_logits", "bogus"])),
        ("downlink_codec", st.one_of(st.sampled_from(lossy_downlinks), _json_value())),
        ("bare_replies", st.one_of(st.booleans(), _json_value())),
        ("downlink_topk", st.one_of(st.integers(-1, 1 << 20), _json_value())),
        ("downlink_dtype", st.sampled_from(["auto", "float16", "float64", "x"])),
        ("dtype", st.sampled_from(["float32", "bfloat16", "float64", "int8"])),
    ):
        if draw(st.booleans()):
            body[key] = draw(values)
    version = protocol.PROTOCOL_VERSION if valid else draw(st.sampled_from([protocol.PROTOCOL_VERSION, 0, 2, 255]))
    return bytes([version, protocol.OPEN]) + json.dumps(body).encode()


@st.composite
def step_messages(draw: Any, hidden_size: int) -> tuple[int, bytes]:
    """(the session index to use: -1 a random id, else the nth opened on this stream; the message without its
    header and session; its type: STEP, or NEXT with start, batch, tokens and need_from left out)."""
    batch, tokens = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 5]))
    codec = build_codec(draw(st.sampled_from(CODECS)))
    width = draw(st.sampled_from([hidden_size] * 4 + [1, hidden_size + 1]))
    shape = draw(st.sampled_from([(batch, tokens, width)] * 4 + [(tokens, width), (batch, tokens + 1, width)]))
    dtype = draw(st.sampled_from([torch.float32] * 3 + [torch.float16, torch.float64]))
    payload = codec.encode(
        torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).to(dtype)
    )
    mutation = draw(st.sampled_from(["none"] * 4 + ["truncate", "flip", "garbage", "empty"]))
    if mutation == "truncate":
        payload = payload[: draw(st.integers(0, max(len(payload) - 1, 0)))]
    elif mutation == "flip" and payload:
        i = draw(st.integers(0, len(payload) - 1))
        payload = payload[:i] + bytes([payload[i] ^ (1 << draw(st.integers(0, 7)))]) + payload[i + 1 :]
    elif mutation == "garbage":
        payload = draw(st.binary(max_size=64))
    elif mutation == "empty":
        payload = b""
    seq, start = draw(_int()), draw(st.sampled_from([0, 0, 0, tokens, 7, 1 << 20]))
    claimed_batch = draw(st.sampled_from([batch] * 4 + [0, 4096, 65]))
    claimed_tokens = draw(st.sampled_from([tokens] * 4 + [0, 1 << 24, 4097]))
    flags, extra, grid = draw(_flags(batch, tokens, start))
    if flags & protocol.BARE and draw(st.booleans()):  # a packet without its envelope, as a bare step sends it
        with contextlib.suppress(CodecError):  # a mutated packet may not be the codec's
            payload = codec.bare(payload, shape, dtype) or payload
    index = draw(st.sampled_from([0, 0, 0, 1, -1]))
    if draw(st.booleans()):
        return index, write_varint(seq) + bytes([flags]) + extra + payload, protocol.NEXT
    fields = (seq, start, claimed_batch, claimed_tokens)
    body = b"".join(map(write_varint, fields)) + bytes([flags]) + write_varint(draw(st.integers(0, tokens)))
    return index, body + grid + extra + payload, protocol.STEP


@st.composite
def _flags(draw: Any, batch: int, tokens: int, start: int) -> tuple[int, bytes, bytes]:
    """A step's flags byte and the sections they announce (mask bits, history bits, positions; the grid apart, as it
    precedes them), each well formed or not: every flag of the protocol, alone or together, or all of them."""
    if draw(st.integers(0, 9)) == 0:
        return 255, draw(st.binary(max_size=8)), b""

    def bits(rows: int, columns: int) -> bytes:
        size = (rows * columns + 7) // 8 if draw(st.integers(0, 3)) else draw(st.integers(0, 4))  # or the wrong size
        return draw(st.binary(min_size=size, max_size=size))

    flags = draw(st.sampled_from([protocol.MASK_NONE, protocol.MASK_NONE, protocol.MASK_ONES, protocol.MASK_BITS, 3]))
    extra, grid = bits(batch, tokens) if flags == protocol.MASK_BITS else b"", b""
    if draw(st.integers(0, 3)) == 0:
        flags |= protocol.HISTORY
        extra += bits(batch, min(start, 64))
    if draw(st.integers(0, 3)) == 0:
        flags |= protocol.POSITIONS
        extra += draw(st.binary(min_size=0, max_size=4 * batch * tokens + 4))
    if draw(st.integers(0, 4)) == 0:
        flags |= protocol.GRID
        h = draw(st.sampled_from([1, tokens, 3, 1 << 20]))
        grid = write_varint(h) + write_varint(draw(st.sampled_from([max(tokens // h, 1), 2, 0])))
    for flag in (protocol.BARE, protocol.CHAINED):
        if draw(st.integers(0, 3)) == 0:
            flags |= flag
    return flags, extra, grid


@st.composite
def conversations(draw: Any, fingerprint: str, splits: tuple[int, int], hidden_size: int) -> list[tuple[str, Any]]:
    """One stream's messages: opens, steps, closes, stats and raw junk, in any order."""
    kinds = st.sampled_from(["open", "open", "step", "step", "step", "close", "stats", "junk"])
    out = []
    for kind in draw(st.lists(kinds, min_size=1, max_size=6)):
        if kind == "open":
            out.append(("raw", draw(open_messages(fingerprint, splits))))
        elif kind == "step":
            out.append(("step", draw(step_messages(hidden_size))))
        elif kind == "close":
            target = draw(st.one_of(st.integers(-1, 3), _json_value()))
            out.append(("close", target))
        elif kind == "stats":
            out.append(("raw", protocol.header(protocol.STATS)))
        else:
            out.append(("raw", draw(st.binary(max_size=48))))
    return out


def _send(transport: GrpcTransport, message: bytes, report: FuzzReport) -> bytes:
    reply = transport.request(message)
    report.messages += 1
    kind = protocol.message_type(reply)  # a reply that does not parse is a failure (raises)
    if kind == protocol.ERROR:
        code = str(protocol.decode_json(reply).get("code"))
        report.refusals[code] = report.refusals.get(code, 0) + 1
        if code not in CLEAN_CODES:
            raise AssertionError(f"unclean refusal {code}: {protocol.decode_json(reply).get('message')}")
    else:
        report.accepted += 1
    return reply


def run_case(url: str, conversation: list[tuple[str, Any]], report: FuzzReport, token: str | None = None) -> None:
    transport = GrpcTransport([url], token=token, timeout_s=60)
    opened: list[int] = []
    try:
        for kind, item in conversation:
            if kind == "raw":
                reply = _send(transport, item, report)
                if protocol.message_type(reply) == protocol.OPENED:
                    opened.append(int(protocol.decode_json(reply)["session"]))
            elif kind == "close":
                target = opened[item] if isinstance(item, int) and 0 <= item < len(opened) else item
                _send(transport, protocol.encode_json(protocol.CLOSE, {"session": target}), report)
            else:
                index, body, message = item
                session = opened[index] if 0 <= index < len(opened) else 1 << 30
                _send(transport, protocol.header(message) + write_varint(session) + body, report)
    except TransportError as exc:  # the server may end a stream it refuses to trust; it must still be up
        if "UNAVAILABLE" in str(exc):
            raise AssertionError(f"server unreachable: {exc}") from exc
    finally:
        transport.close()
    report.cases += 1


def run_fuzz(url: str, model_config: Any, cases: int, min_split_layer: int = 1, token: str | None = None) -> FuzzReport:
    """Run `cases` hypothesis cases against the server at `url` (which serves splits from `min_split_layer` on);
    failures are collected, not raised."""
    report = FuzzReport()
    fingerprint = protocol.model_fingerprint(model_config)
    splits = (min_split_layer, int(model_config.num_hidden_layers) - 1)
    strategy = conversations(fingerprint, splits, int(model_config.hidden_size))

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    )
    @given(strategy)
    def case(conversation: list[tuple[str, Any]]) -> None:
        run_case(url, conversation, report, token)

    try:
        case()
    except (AssertionError, ProtocolError, TransportError) as exc:
        report.failures.append(f"{type(exc).__name__}: {exc}")
    return report
