"""The wire protocol between edge and server: versioned, compact, the same bytes in-process and on a network.

Every message starts with ``[PROTOCOL_VERSION u8][type u8]``. Control messages (open, opened, close, error,
stats) carry a JSON body; the hot path (step, reply) is binary::

    STEP   [session varint][seq varint][start varint][B varint][T varint][flags u8][need_from varint]
           [grid H varint, W varint, if flags & GRID]
           [mask bits B*T, if flags & MASK_BITS][history bits B*start, if flags & HISTORY]
           [positions int32 B*T, if flags & POSITIONS]
           [uplink codec packet: without its envelope if BARE, continuing the last step's rows if CHAINED]
    NEXT   [session varint][seq varint][flags u8][mask bits B][positions int32 B][packet]: a decode step in steady
           state (T = 1 new position for each of the session's B sequences, right after the last step, every output
           wanted); the server takes start and B from the session and accepts it only as the step after the last one
    REPLY  [seq varint][kind u8][downlink payload]  (kind REPLY_HIDDEN_BARE: a compressed downlink's bare packet)

An encoder request is one step at `start` 0. A feature map (a CNN's, or a Swin stage's tokens) travels as
T = H*W rows of its channels, row-major over the grid `(H, W)` that the GRID flag carries.

`start` is how many positions the edge had cached before this step: the server crops its cache back to it
(a new `generate()` call starts again at 0), and refuses a step that would leave a gap. `seq` counts the steps of
a session; the reply echoes it and the edge refuses a reply for any other step. A replayed or reordered step is
refused; so is a NEXT step that does not follow the server's last one (a step was lost), since its start is implied.

Nothing sized by a message is allocated before the receiver has checked the claimed sizes: `decode_step` hands
the header to a `check` callback first, and the top-k reply is checked against the shape the edge expects.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .codec.bits import Reader, write_varint
from .errors import CodecError, ProtocolError

PROTOCOL_VERSION = 1
OPEN, OPENED, STEP, REPLY, CLOSE, CLOSED, ERROR, STATS, STATS_REPLY, NEXT = range(1, 11)
MESSAGE_NAMES = {
    OPEN: "open",
    OPENED: "opened",
    STEP: "step",
    REPLY: "reply",
    CLOSE: "close",
    CLOSED: "closed",
    ERROR: "error",
    STATS: "stats",
    STATS_REPLY: "stats_reply",
    NEXT: "next",
}
MASK_NONE, MASK_ONES, MASK_BITS = 0, 1, 2  # flags bits 0-1
POSITIONS = 4  # flags bit 2: explicit position ids follow
GRID = 8  # flags bit 3: the rows are a feature map of H x W positions
BARE = 16  # flags bit 4: the codec packet leaves out its envelope; the session's codec and dtype and the step's
# [B, T, width] rebuild it (sent only to a server whose OPENED says "bare_steps")
CHAINED = 32  # flags bit 5: a chained codec's packet (`Codec.chains`) continues the sequences from the decoded rows at
# start - 1 that the server holds from the last step; without it each sequence starts afresh in this step
HISTORY = 64  # flags bit 6: the mask of positions 0..start-1 follows, replacing the one the server holds (an edge
# whose attention mask now hides positions it had shown: a conversation that masks the padding a finished row got)
REPLY_HIDDEN, REPLY_TOPK, REPLY_LOGITS = 1, 2, 3
REPLY_HIDDEN_BARE = 4  # hidden states through the session's downlink codec, the packet bare (`Codec.bare`): float32
# rows of the step's [B, T - need_from, width] (sent only to an edge whose OPEN asked for "bare_replies")
MAX_BATCH = 4096
MAX_JSON_BYTES = 64 << 10  # a control message (an OPEN is under 1 KB)
MAX_ERROR_CHARS = 4096  # of an ERROR's message: JSON escaping may grow it up to six times

# gRPC names and settings both sides share (the transport and the server import them from here)
SERVICE = "slicer_hf.v1.Split"
SESSION_METHOD = f"/{SERVICE}/Session"
STATS_METHOD = f"/{SERVICE}/Stats"
METRICS_METHOD = f"/{SERVICE}/Metrics"
DRAIN_METHOD = f"/{SERVICE}/Drain"
KEEPALIVE_TIME_MS = 20_000  # clients and servers ping an idle connection this often
KEEPALIVE_TIMEOUT_MS = 10_000  # and drop it when the ping is not answered in this time


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 in brackets or not) stays on this machine."""
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


TOKEN_RULE = (
    "an auth token must be printable ASCII without surrounding spaces (a token read from a file keeps its newline: "
    "strip it)"
)


def usable_token(token: str) -> bool:
    """Whether `token` can go in gRPC metadata as every client sends it (gRPC refuses anything else on every call)."""
    return token.isascii() and token.isprintable() and token == token.strip()


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 literal in brackets (`[::1]:50051`), as gRPC addresses and URLs take it."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def fleet_router_url(url: str) -> str:
    """The HTTP(S) address of a fleet's router from its client URL: `slicer+http://h:p/prefix` -> `http://h:p/prefix`
    (the client asks it for sessions, operators and tests list its replicas)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.removeprefix('slicer+')}://{rest.rstrip('/')}"


def channel_options(max_message_bytes: int, server: bool = False) -> list[tuple[str, Any]]:
    """gRPC options of both ends. The server accepts pings down to half the clients' interval, so idle streams
    and long prefills never draw a too_many_pings GOAWAY."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a compressed message is taken as the bytes that came (a codec's packet is compressed already): inflated, a
        # 60 KiB gzip message had made 60 MiB on the server, its size limit applied after inflating
        ("grpc.per_message_decompression", 0),
    ]
    if server:
        options.append(("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2))
    return options


FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


STAGE_KEYS = ("hidden_sizes", "depths", "embed_dim", "embedding_size")  # vision models sized per stage


def model_fingerprint(config: Any) -> str:
    """Identity of an architecture and its sizes: edge and server must agree on it. An encoder configured as a decoder
    (`is_decoder=True`: its blocks attend causally) is another model than the same weights run bidirectionally."""
    ident = {key: getattr(config, key, None) for key in FINGERPRINT_KEYS}
    ident |= {key: value for key in STAGE_KEYS if (value := getattr(config, key, None)) is not None}
    if getattr(config, "is_decoder", False) is True:  # only then: every other model's fingerprint stays as it was
        ident["is_decoder"] = True
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Step:
    """One uplink message: hidden states of T new positions for B sequences."""

    session: int
    seq: int
    start: int
    batch: int
    tokens: int
    need_from: int  # final outputs are wanted for positions need_from..T-1 of this step
    payload: bytes
    mask: torch.Tensor | None = None  # [B, T] bool: the new columns of the 2D attention mask; None: no mask
    positions: torch.Tensor | None = None  # [B, T] int64, when they are not start + arange(T)
    grid: tuple[int, int] | None = None  # (H, W) with H * W = T: the rows are a feature map
    bare: bool = False  # the payload is a codec packet without its envelope
    next: bool = False  # sent as NEXT: start and batch come from the session (`decode_step`'s check fills them)
    chained: bool = False  # the packet continues from the last step's decoded rows (flag CHAINED)
    history: torch.Tensor | None = None  # [B, start] bool: the mask of the earlier positions, now (flag HISTORY)


def header(kind: int) -> bytes:
    return bytes([PROTOCOL_VERSION, kind])


def message_type(data: bytes) -> int:
    if len(data) < 2:
        raise ProtocolError(f"message of {len(data)} bytes is too short", code="malformed")
    if data[0] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {data[0]} is not supported (this side speaks {PROTOCOL_VERSION})", code="version"
        )
    if data[1] not in MESSAGE_NAMES:
        raise ProtocolError(f"unknown message type {data[1]}", code="malformed")
    return data[1]


def encode_json(kind: int, body: dict[str, Any]) -> bytes:
    return header(kind) + json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def decode_json(data: bytes) -> dict[str, Any]:
    """The body of a control message (OPEN, OPENED, CLOSE, STATS, ERROR...), at most `MAX_JSON_BYTES`: it is parsed
    whole before any field is checked."""
    if len(data) > MAX_JSON_BYTES:
        raise ProtocolError(
            f"{MESSAGE_NAMES.get(data[1], '?')} message of {len(data):,} bytes (control messages take at most "
            f"{MAX_JSON_BYTES:,})",
            code="too_large",
        )
    try:
        body = json.loads(data[2:].decode())
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer past Python's digit limit; too deep
        raise ProtocolError(f"malformed {MESSAGE_NAMES.get(data[1], '?')} message: {exc}", code="malformed") from exc
    if not isinstance(body, dict):
        raise ProtocolError("control message body must be a JSON object", code="malformed")
    return body


def encode_error(code: str, message: str) -> bytes:
    """An ERROR message; a long message (one that quotes a client's value) is cut, so the reply stays a control
    message the client reads (`MAX_JSON_BYTES`)."""
    return encode_json(ERROR, {"code": code, "message": clipped(message, MAX_ERROR_CHARS)})


def clipped(message: str, limit: int) -> str:
    """`message`, cut to `limit` characters where it is longer (one that quotes a client's value may be long)."""
    return message if len(message) <= limit else message[:limit] + f"... ({len(message):,} characters in all)"


def raise_if_error(data: bytes) -> None:
    if message_type(data) == ERROR:
        body = decode_json(data)
        raise ProtocolError(f"server refused: {body.get('message')}", code=str(body.get("code", "error")))


def encode_step(step: Step) -> bytes:
    flags = MASK_NONE
    extra = b""
    if step.mask is not None:
        if bool(step.mask.all()):
            flags = MASK_ONES
        else:
            flags = MASK_BITS
            extra += _bits(step.mask)
    if step.history is not None:
        if step.mask is None:  # a step without a mask sends no mask at all: every position visible
            raise ValueError("a step's history mask goes with its own mask columns")
        if tuple(step.history.shape) != (step.batch, step.start):
            raise ValueError(f"a step's history mask is [B, start], got {tuple(step.history.shape)}")
        flags |= HISTORY
        extra += _bits(step.history)
    if step.positions is not None:
        flags |= POSITIONS
        extra += step.positions.cpu().to(torch.int32).numpy().tobytes()
    grid = b""
    if step.grid is not None:
        flags |= GRID
        grid = write_varint(step.grid[0]) + write_varint(step.grid[1])
    if step.bare:
        flags |= BARE
    if step.chained:
        flags |= CHAINED
    if step.next:
        if step.tokens != 1 or step.need_from != 0 or step.grid is not None or step.history is not None:
            raise ValueError("a NEXT step carries one position per sequence, every output wanted, no grid or history")
        ids = write_varint(step.session) + write_varint(step.seq)
        return header(NEXT) + ids + bytes([flags]) + extra + step.payload
    fields = (step.session, step.seq, step.start, step.batch, step.tokens)
    return (
        header(STEP)
        + b"".join(write_varint(v) for v in fields)
        + bytes([flags])
        + write_varint(step.need_from)
        + grid
        + extra
        + step.payload
    )


def extend_mask(
    held: torch.Tensor | None, new: torch.Tensor | None, start: int, history: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The `[B, start + T]` mask after a step that sends columns `new` `[B, T]` from `start`, over the mask `held`
    (None: every position visible), or `history` `[B, start]` in its place; None where the step sends none (every
    position visible, as transformers takes a missing mask) or the result hides nothing. Both sides keep this account:
    the server of its session's mask, the edge of what its server holds."""
    if new is None:
        return None
    before = history if history is not None else None if held is None or start == 0 else held[:, :start]
    if (before is None or bool(before.all())) and bool(new.all()):
        return None
    if before is None:
        before = torch.ones(new.shape[0], start, dtype=torch.bool)
    return torch.cat([before, new.bool()], dim=1)


def _bits(mask: torch.Tensor) -> bytes:
    return np.packbits(mask.cpu().numpy().astype(np.uint8).ravel(), bitorder="little").tobytes()


def _read_bits(r: Reader, rows: int, columns: int) -> torch.Tensor:
    """A `[rows, columns]` bool mask of `_bits` (taken from the message before anything is allocated for it)."""
    bits = np.unpackbits(np.frombuffer(r.take((rows * columns + 7) // 8), np.uint8), bitorder="little")
    return torch.from_numpy(bits[: rows * columns].astype(bool)).reshape(rows, columns)


def decode_step(data: bytes, check: Callable[[Step], None], max_tokens: int = 1 << 24) -> Step:
    """Parse a STEP or NEXT message.

    Args:
        data: the message.
        check: called with the header (session, seq, start, batch, tokens, need_from, grid; no mask, positions
            or payload yet) before anything sized by the claimed batch and tokens is allocated; it raises to refuse.
            For a NEXT step (`step.next`) it must set `start` and `batch` from the session.
        max_tokens: an absolute bound on the claimed tokens.
    """
    try:
        r = Reader(data)
        r.take(2)
        session, seq = r.varint(), r.varint()
        if data[1] == NEXT:
            return _decode_next(r, session, seq, check)
        start, batch, tokens = r.varint(limit=1 << 31), r.varint(limit=MAX_BATCH), r.varint(limit=max_tokens)
        flags = r.u8()
        need_from = r.varint(limit=tokens)
        if flags & ~(3 | POSITIONS | GRID | BARE | CHAINED | HISTORY) or flags & 3 == 3:
            raise ProtocolError(f"unknown step flags {flags:#x}", code="malformed")
        if batch == 0 or tokens == 0:
            raise ProtocolError(f"step with batch={batch}, tokens={tokens}", code="malformed")
        grid = (r.varint(limit=tokens), r.varint(limit=tokens)) if flags & GRID else None
        if grid is not None and grid[0] * grid[1] != tokens:
            raise ProtocolError(f"grid {grid[0]}x{grid[1]} does not hold the step's {tokens} rows", code="malformed")
        step = Step(session, seq, start, batch, tokens, need_from, b"", grid=grid, bare=bool(flags & BARE))
        step.chained = bool(flags & CHAINED)
        check(step)
        _read_columns(r, step, flags)
        return step
    except CodecError as exc:
        raise ProtocolError(f"malformed step message: {exc}", code="malformed") from exc


def _decode_next(r: Reader, session: int, seq: int, check: Callable[[Step], None]) -> Step:
    flags = r.u8()
    if flags & ~(3 | POSITIONS | BARE | CHAINED) or flags & 3 == 3:
        raise ProtocolError(f"unknown next-step flags {flags:#x}", code="malformed")
    step = Step(session, seq, -1, 0, 1, 0, b"", bare=bool(flags & BARE), next=True, chained=bool(flags & CHAINED))
    check(step)
    if step.start < 0 or not 1 <= step.batch <= MAX_BATCH:
        raise RuntimeError(f"the check left a NEXT step at start={step.start}, batch={step.batch}")
    _read_columns(r, step, flags)
    return step


def _read_columns(r: Reader, step: Step, flags: int) -> None:
    """The step's mask, positions and payload, after its header."""
    batch, tokens = step.batch, step.tokens
    if flags & 3 == MASK_ONES:
        step.mask = torch.ones(batch, tokens, dtype=torch.bool)
    elif flags & 3 == MASK_BITS:
        step.mask = _read_bits(r, batch, tokens)
    if flags & HISTORY:
        if flags & 3 == MASK_NONE:  # it would be dropped with the mask the step leaves off
            raise ProtocolError("a step's history mask came without its mask columns", code="malformed")
        step.history = _read_bits(r, batch, step.start)
    if flags & POSITIONS:
        positions = r.array(np.int32, batch * tokens).astype(np.int64)
        step.positions = torch.from_numpy(positions).reshape(batch, tokens)
    step.payload = r.take(r.remaining())


def encode_reply(seq: int, kind: int, payload: bytes) -> bytes:
    return header(REPLY) + write_varint(seq) + bytes([kind]) + payload


def decode_reply(data: bytes) -> tuple[int, int, bytes]:
    raise_if_error(data)
    try:
        r = Reader(data)
        r.take(2)
        seq, kind = r.varint(), r.u8()
        return seq, kind, r.take(r.remaining())
    except CodecError as exc:
        raise ProtocolError(f"malformed reply: {exc}", code="malformed") from exc


def encode_topk_logits(values: torch.Tensor, indices: torch.Tensor, vocab: int) -> bytes:
    """Top-k logits `[B, n, k]`: float32 values and uint16/uint32 token ids."""
    b, n, k = values.shape
    index_dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    head = b"".join(write_varint(v) for v in (b, n, k, vocab))
    return head + values.float().cpu().numpy().tobytes() + indices.cpu().numpy().astype(index_dtype).tobytes()


def decode_topk_logits(
    data: bytes, expect: tuple[int, int, int], max_k: int, fill: float = float("-inf")
) -> torch.Tensor:
    """Full `[B, n, vocab]` logits with everything outside the top-k at `fill`.

    Args:
        data: the reply body.
        expect: the `(B, n, vocab)` this edge asked for; any other shape is refused before allocating.
        max_k: the `downlink_topk` this edge asked for.
    """
    try:
        r = Reader(data)
        b, n, k, vocab = r.varint(MAX_BATCH), r.varint(1 << 20), r.varint(1 << 20), r.varint(1 << 24)
        if (b, n, vocab) != tuple(expect) or not 1 <= k <= min(max_k, vocab):  # k=0: every logit -inf, NaN odds
            raise ProtocolError(
                f"top-k reply of B={b} n={n} k={k} vocab={vocab}, expected {tuple(expect)} with 1 <= k <= {max_k}",
                code="bad_shape",
            )
        values = torch.from_numpy(r.array(np.float32, b * n * k)).reshape(b, n, k)
        idx_dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        indices = torch.from_numpy(r.array(idx_dtype, b * n * k).astype(np.int64)).reshape(b, n, k)
        r.finish()
    except CodecError as exc:
        raise ProtocolError(f"malformed top-k reply: {exc}", code="malformed") from exc
    if (indices >= vocab).any():
        raise ProtocolError("top-k token id out of range", code="malformed")
    return torch.full((b, n, vocab), fill).scatter(2, indices, values)
