"""The edge's handle on the server part of the model: one session, its uplink/downlink accounting, and the
log of what was sent, replayed to another server when the current one dies."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from . import protocol
from .bitrate import BitrateController
from .codec import Codec, build_codec, codec_from_spec
from .config import SlicerConfig
from .errors import CodecError, NowhereElse, ProtocolError, TransportError
from .transport import Transport

logger = logging.getLogger(__name__)
_LINKS = itertools.count(1)
_T = TypeVar("_T")
NO_ROOM = ("too_many_sessions", "kv_budget", "step_limits")  # refusals another server may not give


def _positions(reply: torch.Tensor) -> int:
    """The positions a reply holds: its rows `[..., d]` (a feature map comes back as rows of channels)."""
    return reply.numel() // max(reply.shape[-1], 1)


REPLY_KINDS = {  # what each downlink answers with
    "hidden": (protocol.REPLY_HIDDEN, protocol.REPLY_HIDDEN_BARE),
    "logits": (protocol.REPLY_LOGITS,),
    "topk_logits": (protocol.REPLY_TOPK,),
}


def wire_dtype(dtype: torch.dtype | None) -> str | None:
    """The name OPEN gives the dtype a client's hidden states travel in (None: one the wire does not name)."""
    return str(dtype).removeprefix("torch.") if dtype in (torch.float16, torch.bfloat16, torch.float32) else None


def open_request(
    config: SlicerConfig,
    model_config: Any,
    model_name: str,
    split_layer: int,
    codec: Codec,
    dtype: torch.dtype | None = None,
) -> dict:
    """The OPEN message body: the client's model fingerprint, split layer, codec spec, the dtype its hidden states
    travel in, and the downlink."""
    request = {
        "model": model_name,
        "fingerprint": protocol.model_fingerprint(model_config),
        "split_layer": split_layer,
        "codec": codec.spec(),
        "downlink": config.downlink,
        "downlink_topk": config.downlink_topk,
        "downlink_dtype": config.downlink_dtype,
    }
    if (name := wire_dtype(dtype)) is not None:
        request["dtype"] = name
    downlink_codec = config.downlink_codec()
    if downlink_codec is not None:
        request["downlink_codec"] = downlink_codec.spec()
        request["bare_replies"] = True  # this edge rebuilds its replies' envelopes (`Codec.unbare`)
    return request


@dataclass
class WireStats:
    """Bytes and messages that crossed the link since the last reset."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    uplink_messages: int = 0
    downlink_messages: int = 0
    tokens: int = 0  # positions whose hidden states went up (batch rows included)
    replied: int = 0  # positions whose rows came back (a prompt's last only, for a causal LM's next token)
    uplink_payload_bytes: int = 0  # the codec packets alone
    failovers: int = 0  # times a lost session was rebuilt (on the same server or another) and carried on
    retries: int = 0  # failed attempts on the way, each one counted
    bitrate_changes: list[dict[str, float]] = field(default_factory=list)  # adaptive bitrate: {token, step, ...}

    @property
    def uplink_bits_per_token(self) -> float:
        return 8.0 * self.uplink_bytes / max(self.tokens, 1)

    @property
    def downlink_bits_per_token(self) -> float:
        """Downlink bits per position that came back (not per position sent: a prompt's reply is one row)."""
        return 8.0 * self.downlink_bytes / max(self.replied, 1)

    def __add__(self, other: WireStats) -> WireStats:
        """Both counts together (two sessions', say)."""
        return WireStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "uplink_bits_per_token": self.uplink_bits_per_token,
            "downlink_bits_per_token": self.downlink_bits_per_token,
        }


@dataclass(frozen=True)
class StepLimits:
    """What one step may carry on a server, as its OPENED names it (None: not named, as by an older server)."""

    tokens: int | None = None  # positions of each sequence
    elements: int | None = None  # values: batch x positions x width
    message_bytes: int | None = None  # of one message, the step's reply included
    batch: int | None = None  # sequences of one session (an encoder's large batch goes up in parts of this many)
    whole: bool = False  # a forward's positions go up in one step: the server's cache cannot carry one on exactly

    HEADROOM = 64 << 10  # of a reply's bytes, for its headers and the codec's envelope (an eighth of a small limit)

    @classmethod
    def from_opened(cls, opened: dict[str, Any]) -> StepLimits:
        def count(name: str) -> int | None:
            value = opened.get(name)
            return value if type(value) is int and value >= 1 else None

        return cls(
            count("max_step_tokens"),
            count("max_step_elements"),
            count("max_message_bytes"),
            count("max_session_batch"),
            opened.get("whole_steps") is True,
        )

    def _room(self) -> int:
        """Bytes of a message past its headers and envelope."""
        assert self.message_bytes is not None
        return self.message_bytes - min(self.HEADROOM, self.message_bytes // 8)

    def _fitting(self, size: int, width: int, extra_bits: int, fixed_bytes: int) -> int | None:
        """How many of a step's units of `size` positions of `width` values (a position or a row) the server's
        values and bytes allow: a position's bytes counted at 4 a value (a float32 packet's, about the most a codec
        sends) and its `extra_bits` (position id, mask bit), besides the step's `fixed_bytes` (an earlier mask)."""
        bounds = [self.elements // (size * width) if self.elements else None]
        if self.message_bytes:
            bounds.append(8 * (self._room() - fixed_bytes) // (size * (32 * width + extra_bits)))
        return min((b for b in bounds if b is not None), default=None)

    def positions(self, batch: int, width: int, wanted: int, extra_bits: int = 0, fixed_bytes: int = 0) -> int:
        """The positions (at most `wanted`, at least 1) a step of `batch` rows of `width` values may carry, each
        with `extra_bits` besides its values (32 for an int32 position id, 1 for a mask bit), and `fixed_bytes` of the
        step's own (the mask of earlier positions it sends)."""
        fitting = self._fitting(batch, width, extra_bits, fixed_bytes)
        return max(1, min(wanted, self.tokens or wanted, wanted if fitting is None else fitting))

    def fits(self, step: protocol.Step, width: int) -> bool:
        """Whether the server takes `step` (of rows `width` wide) as it was cut: its positions, values and bytes."""
        tokens_fit = self.tokens is None or step.tokens <= self.tokens
        values_fit = self.elements is None or step.batch * step.tokens * width <= self.elements
        bytes_fit = self.message_bytes is None or len(protocol.encode_step(step)) <= self.message_bytes
        return tokens_fit and values_fit and bytes_fit

    def rows(self, tokens: int, width: int, wanted: int, extra_bits: int = 0) -> int:
        """The rows (at most `wanted` and the server's batch, at least 1) a step of `tokens` positions of `width` values
        (and `extra_bits` each, see `positions`) may carry."""
        fitting = self._fitting(tokens, width, extra_bits, 0)
        return max(1, min(wanted, self.batch or wanted, wanted if fitting is None else fitting))

    def replies(self, each_bytes: int, wanted: int) -> int:
        """How many outputs of at most `each_bytes` (at most `wanted`) one reply may hold; a `ProtocolError` where not
        even one fits (the server would compute the step, then refuse its reply)."""
        if self.message_bytes is None:
            return wanted
        room = self._room()
        if each_bytes > room:
            raise ProtocolError(
                f"one output of this step takes up to {each_bytes:,} bytes, and the server's replies hold at most "
                f"{self.message_bytes:,} (max_message_bytes): send fewer rows at once or ask for a narrower downlink",
                code="too_large",
            )
        return min(wanted, room // each_bytes)


@dataclass
class SuffixLink:
    """A session with a server running layers `split_layer..L-1`.

    Args:
        transport: how messages travel.
        open_request: the OPEN body (model fingerprint, split layer, codec spec, downlink).
        codec: the uplink codec (must match `open_request["codec"]`).
        vocab_size: the model's vocabulary (the size of a logits reply).
        max_attempts: tries of one step through failures that a new connection may fix.
        backoff_s, max_backoff_s: the first and the largest pause between tries (exponential, full jitter).
    """

    transport: Transport
    open_request: dict[str, Any]
    codec: Codec
    vocab_size: int = 0
    max_attempts: int = 10
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    stats: WireStats = field(default_factory=WireStats)
    session: int | None = None
    _seq: int = 0
    _sent: list[protocol.Step] = field(default_factory=list)  # steps of the current sequence, for replay
    bitrate: BitrateController | None = None  # moves the uplink ECSQ step between decode steps
    _last_reply: float | None = None  # when the latest step's reply came (adaptive bitrate's token clock)
    _bare: bool = False  # the server rebuilds packet envelopes: steps may leave them out
    _width: int = 0  # of the hidden states this session sends
    _next: bool = False  # the server takes steady-state decode steps as NEXT messages
    _acked: tuple[int, int, int] | None = None  # (seq, end, batch) of the last step this session's server answered
    _chain: tuple[int, torch.Tensor] | None = None  # a chained codec's (end, decoded rows at end - 1) of the last step
    downlink_codec: Codec = field(init=False)  # of hidden-state replies: the one `open_request` announced
    uid: int = field(default_factory=lambda: next(_LINKS))  # this link, in the marks it hands out
    _end: int = 0  # positions the server holds (0..end-1)
    _mask: torch.Tensor | None = None  # the attention mask the server holds for them (None: it hides none)
    _epoch: int = 0  # seq of the last step from position 0: an earlier mark belongs to another sequence
    _rewinds: list[tuple[int, int]] = field(default_factory=list)  # (seq, start) of later steps that went back
    _limits: StepLimits = field(default_factory=StepLimits)  # what one step may carry, from the latest OPENED
    _ever_answered: bool = False  # whether any server ever answered anything (a refusal included)

    def __post_init__(self) -> None:
        spec = self.open_request.get("downlink_codec")
        self.downlink_codec = codec_from_spec(spec) if spec else build_codec("identity")

    def _request(self, data: bytes) -> bytes:
        return self._counted(data, self.transport.request(data))

    def _counted(self, data: bytes, reply: bytes) -> bytes:
        """`reply`, once `data` has been answered with it: counted then (a request no server took never crossed)."""
        self._ever_answered = True
        self.stats.uplink_bytes += len(data)
        self.stats.uplink_messages += 1
        self.stats.downlink_bytes += len(reply)
        self.stats.downlink_messages += 1
        return reply

    def open(self) -> None:
        reply = self._request(protocol.encode_json(protocol.OPEN, self.open_request))
        protocol.raise_if_error(reply)
        opened = protocol.decode_json(reply) if protocol.message_type(reply) == protocol.OPENED else {}
        session = opened.get("session")
        if type(session) is not int or not 0 <= session < 1 << 63:
            raise ProtocolError(f"malformed answer to OPEN: {reply[:80]!r}", code="malformed")
        self.session = session
        self._bare = bool(opened.get("bare_steps")) and self.open_request.get("dtype") is not None
        self._next, self._acked = bool(opened.get("next_steps")), None
        limits = StepLimits.from_opened(opened)
        if (ours := self.transport.max_message_bytes) is not None:  # replies this side's channel takes
            limits = dataclasses.replace(limits, message_bytes=min(limits.message_bytes or ours, ours))
        self._limits = limits

    def step_limits(self) -> StepLimits:
        """What one step may carry on this session's server (the session opens now where it is not open), so that
        a caller cuts a long prompt or a large batch into steps the server takes."""
        if self.session is None:
            self._with_failover(lambda: None, replay=[])  # a lost session's steps are stale: its marks are void
        return self._limits

    def reply_bytes(self, width: int) -> int:
        """The most bytes the outputs of a reply take for one position of one row, whose final hidden state is `width`
        wide: its float32 values, or the vocabulary's for logits (top-k replies are made from whole logits, and a
        compressed downlink sends fewer): what the server sizes a step's reply by."""
        return 4 * (self.vocab_size if self.open_request["downlink"] in ("logits", "topk_logits") else width)

    def close(self) -> None:
        """Give the session up and end the stream. Where the server frees a stream's sessions when it ends, that is
        all (a CLOSE would wait out a stalled server, or open a stream again at exit just to send it); else CLOSE."""
        try:
            if self.session is not None and not self.transport.frees_sessions_on_close:
                self._request(protocol.encode_json(protocol.CLOSE, {"session": self.session}))
        except (TransportError, ProtocolError) as exc:
            logger.debug("close of session %s failed: %s", self.session, exc)
        finally:
            self._drop()

    def _drop(self) -> None:
        """Forget the session and its sequence and end the stream: no mark from before continues on what follows."""
        self.session = None
        self._sent.clear()
        self._chain, self._mask = None, None
        self._epoch = self._seq + 1
        self.transport.close()

    def mark(self) -> tuple[int, int]:
        """What the server holds now, for `continues` (the edge tags its KV cache with it after each forward)."""
        return self.uid, self._seq

    def continues(self, mark: tuple[int, int] | None, start: int) -> bool:
        """Whether the server still holds positions 0..start-1 as they were at `mark`: no step since went back
        below `start` (another generate() from a fresh prompt, or another branch of the same prefix)."""
        if mark is None or mark[0] != self.uid or mark[1] < self._epoch:
            return False
        return all(at >= start for seq, at in self._rewinds if seq > mark[1])

    def step(
        self,
        hidden: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        need_from: int,
        grid: tuple[int, int] | None = None,
        reply_shape: tuple[int | None, ...] | None = None,
        decoding: bool | None = None,
        history: torch.Tensor | None = None,
    ) -> tuple[int, torch.Tensor]:
        """Send `hidden` `[B, T, d]` for positions `start..start+T-1`; returns (reply kind, tensor).

        Args:
            mask: `[B, T]` the attention mask's columns of these positions (None: no mask, every position visible).
            history: `[B, start]` the attention mask of the earlier positions as the caller has it now; sent along
                where it is not the one the server holds (a later turn that hides a finished row's padding).
            grid: (H, W) when the T rows are a feature map.
            reply_shape: the hidden-state reply's shape (None for a dimension not known in advance), where it is
                not `[B, T - need_from, d]`.
            decoding: whether this step is a decode step, the tokens adaptive bitrate paces (default: one position
                after the first); a prompt cut into one-position steps is not.
        """
        decoding = hidden.shape[1] == 1 and start > 0 if decoding is None else decoding
        self._width = hidden.shape[-1]
        if self.bitrate is not None:
            self.codec.step = self.bitrate.step  # ECSQ packets carry their step: the server needs no notice
        chain = self._chain  # a chained codec continues the sequences from the last step when this one follows it
        chained = chain is not None and chain[0] == start and len(chain[1]) == hidden.shape[0]
        given = chain[1] if chained else None
        payload = self.codec.encode(hidden, given=given)
        decoded = None  # the rows as the server decodes them, where this side needs them too
        if self.codec.chains or (self.downlink_codec.given_width is not None and reply_shape is None):
            decoded = self.codec.decode(payload, given=given)
        if self.codec.chains:
            self._chain = (start + hidden.shape[1], decoded[:, -1])
        self._seq += 1
        rewound = 0 < start < self._end
        if start == 0:
            self._epoch, self._rewinds = self._seq, []
        elif rewound:
            self._rewinds.append((self._seq, start))
        self._end = start + hidden.shape[1]
        mask = None if mask is None else mask.bool().cpu()
        # a step dropped from the replay that carried the earlier positions' mask: a replay would not rebuild it (only
        # a step that goes back drops any: a decode step does not walk the whole replay)
        lost = rewound and any(s.history is not None for s in self._sent if s.start >= start)
        history = self._changed_history(history, hidden.shape[0], start, lost)
        self._mask = protocol.extend_mask(self._mask, mask, start, history)
        step = protocol.Step(
            0,
            self._seq,
            start,
            hidden.shape[0],
            hidden.shape[1],
            need_from,
            payload,
            mask,
            None if positions is None else positions.cpu(),
            grid,
            chained=chained,
            history=history,
        )
        self._sent = [s for s in self._sent if s.start < start] + [step]  # what the server should hold now
        self.stats.tokens += hidden.shape[0] * hidden.shape[1]
        self.stats.uplink_payload_bytes += len(payload)
        failovers = self.stats.failovers
        try:
            kind, body = self._with_failover(lambda: self._checked(self._exchange(step), step.seq), self._sent)
        except BaseException as exc:  # whatever the server holds now, no earlier mark may continue it
            self._epoch = self._seq + 1
            if not isinstance(exc, (TransportError, ProtocolError)):  # interrupted: the reply may still come
                self._abandon(ask_server=False)
            raise
        if kind not in REPLY_KINDS[self.open_request["downlink"]]:
            raise ProtocolError(
                f"a {self.open_request['downlink']!r} session got a reply of kind {kind}", code="malformed"
            )
        if self.bitrate is not None:  # a token that moved to another server is no measure of the link
            self._pace(decoding and self.stats.failovers == failovers, 8 * len(payload) / hidden.shape[0])
        kind, out = self._reply_tensor(kind, body, step, hidden.shape[-1], reply_shape, decoded)
        self.stats.replied += _positions(out)
        # a NaN or +inf would pass silently into the next tokens (logits may hold -inf: a top-k reply's rest)
        if out.isnan().any() or out.isposinf().any() or (kind == protocol.REPLY_HIDDEN and out.isneginf().any()):
            raise ProtocolError(f"the reply to step {step.seq} holds NaN or infinite values", code="bad_values")
        return kind, out

    def _reply_tensor(
        self,
        kind: int,
        body: bytes,
        step: protocol.Step,
        width: int,
        reply_shape: tuple[int | None, ...] | None,
        decoded: torch.Tensor | None,
    ) -> tuple[int, torch.Tensor]:
        """(kind, tensor) of a reply body, checked against the shape the step asked for."""
        b, keep = step.batch, step.tokens - step.need_from
        if kind == protocol.REPLY_TOPK:
            return kind, protocol.decode_topk_logits(
                body, (b, keep, self.vocab_size), self.open_request["downlink_topk"]
            )
        if kind == protocol.REPLY_HIDDEN_BARE and reply_shape is None:  # [B, T - need_from, width], float32
            body = self.downlink_codec.unbare(body, (b, keep, width), torch.float32)
            kind = protocol.REPLY_HIDDEN
        if kind not in (protocol.REPLY_HIDDEN, protocol.REPLY_LOGITS):
            raise ProtocolError(f"unknown reply kind {kind}", code="malformed")
        width = width if kind == protocol.REPLY_HIDDEN else self.vocab_size
        expect = reply_shape if reply_shape is not None and kind == protocol.REPLY_HIDDEN else (b, keep, width)
        try:
            if kind != protocol.REPLY_HIDDEN:
                return kind, build_codec("identity").decode(body, expect_shape=expect)
            predicted = self.downlink_codec.given_width is not None and reply_shape is None
            sent = decoded[:, step.need_from :] if predicted else None
            return kind, self.downlink_codec.decode(body, expect_shape=expect, given=sent)
        except CodecError as exc:
            raise ProtocolError(f"bad reply to step {step.seq}: {exc}", code="bad_shape") from exc

    def new_generation(self) -> None:
        """A new `generate()` call: its first decode step (a continued sequence's first step is one position) starts
        the token clock again rather than timing the pause since the last reply."""
        self._last_reply = None

    def _pace(self, decoding: bool, bits: float) -> None:
        """Feed the bitrate controller a decode token's latency (reply to reply: the edge's compute, the link and
        the server) and record its moves; any other step starts a new generation's clock."""
        now = time.perf_counter()
        if decoding and self._last_reply is not None:
            moves = len(self.bitrate.changes)
            self.bitrate.observe(1e3 * (now - self._last_reply), bits)
            self.stats.bitrate_changes += self.bitrate.changes[moves:]
        else:
            self.bitrate.restart()
        self._last_reply = now

    def _with_failover(self, send: Callable[[], _T], replay: list[protocol.Step]) -> _T:
        """`send()` on this session; where the session is lost, on a fresh one onto which the steps `replay` (the
        sequence so far, ending with the one `send` sends, if any) are replayed first."""
        last: Exception | None = None
        refusal: ProtocolError | None = None  # the latest refusal for want of room, for when nowhere else is left
        timeouts = 0  # replies that timed out: the session moves on each, until it has on every server
        for attempt in range(self.max_attempts):
            if attempt > 1:  # the first retry goes at once (to the next server); then back off, with jitter
                time.sleep(random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 2))))
            try:
                if self.session is None:
                    self.open()
                    if cut := next((s for s in replay if not self._limits.fits(s, self._width)), None):
                        raise ProtocolError(
                            f"this server takes steps of at most {self._limits.tokens} positions, "
                            f"{self._limits.elements} values and messages of {self._limits.message_bytes} bytes, and "
                            f"this sequence went up in steps cut for other limits ({cut.batch} x {cut.tokens} "
                            f"positions of {self._width}): start it again",
                            code="step_limits",
                        )
                    if replay[:-1]:
                        self._replay([dataclasses.replace(step, need_from=step.tokens) for step in replay[:-1]])
                result = send()
                if last is not None:
                    self.stats.failovers += 1
                return result
            except (TransportError, ProtocolError) as exc:
                if isinstance(exc, NowhereElse) and refusal is not None:  # the refusal is the answer
                    self._abandon(ask_server=False)
                    raise refusal from exc
                elsewhere = self.transport.has_alternatives()  # another server may have room
                if isinstance(exc, TransportError):
                    timeouts += exc.timed_out
                    # slow on every server: the timeout is the answer (a move each retry had cost 10 x timeout_s)
                    recoverable = exc.retryable and not (exc.timed_out and timeouts >= self.transport.servers())
                else:
                    recoverable = exc.code in ("unknown_session", "state_lost", "draining", "shutdown") or (
                        elsewhere and exc.code in NO_ROOM
                    )
                if not recoverable:  # the server closes a session whose request it refused; end the stream too
                    self._abandon(ask_server=not isinstance(exc, TransportError))
                    raise
                self.session = None
                last = exc
                moves = isinstance(exc, TransportError) or exc.code not in ("unknown_session", "state_lost")
                if isinstance(exc, ProtocolError) and exc.code in NO_ROOM:
                    refusal = exc
                    self.transport.refused()
                if moves and not self.transport.reset():
                    raise
                self.stats.retries += 1
                if attempt + 1 < self.max_attempts:  # the first failure says what happened; later ones: debug log
                    # a rewind past a window, or a session that idled out: nothing failed
                    routine = isinstance(exc, ProtocolError) and exc.code in ("state_lost", "unknown_session")
                    (logger.debug if attempt else logger.info if routine else logger.warning)(
                        "attempt %d of %d failed (%s); trying again on %s%s",
                        attempt + 1,
                        self.max_attempts,
                        exc,
                        self.transport.name,
                        f", replaying {len(replay) - 1} steps" if len(replay) > 1 else "",  # the last is sent
                    )
        self._abandon(ask_server=False)  # end the stream the last attempt left open (its session is gone)
        unreached = isinstance(last, TransportError) and last.unreachable and not self._ever_answered
        hint = f" (is a slicer-hf server running at {self.transport.name}?)" if unreached else ""
        raise TransportError(
            f"gave up after {self.max_attempts} attempts{hint}; the last failure: {last}", retryable=False
        )

    def _abandon(self, ask_server: bool = True) -> None:
        """Drop the session after an error no retry fixes: ask the server to close it (if it still can) and end the
        stream, so nothing is held until the idle timeout. After a failed link, ending the stream is enough (the
        server frees what a stream held when it ends; a CLOSE would open a new stream and wait again)."""
        try:
            if self.session is not None and (ask_server or not self.transport.frees_sessions_on_close):
                self.transport.request(protocol.encode_json(protocol.CLOSE, {"session": self.session}))
        except (TransportError, ProtocolError):
            pass
        finally:
            self._drop()

    def _exchange(self, step: protocol.Step) -> bytes:
        """Send `step` on this session; its reply, once the server has taken it."""
        step.session = self.session or 0
        reply = self._request(protocol.encode_step(self._leaner(step)))
        protocol.raise_if_error(reply)
        self._acked = (step.seq, step.start + step.tokens, step.batch)
        return reply

    def _replay(self, steps: list[protocol.Step]) -> None:
        """Rebuild a lost session's suffix cache on this one from `steps` (asking no outputs), all sent before their
        replies are read: after a long generation, one round trip rather than one a step. Each reply is checked in
        order; the first refusal ends the replay."""
        messages = []
        for step in steps:
            step.session = self.session or 0
            messages.append(protocol.encode_step(self._leaner(step)))
            self._acked = (step.seq, step.start + step.tokens, step.batch)  # as the server will hold it by the next
        with contextlib.closing(self.transport.pipeline(messages)) as replies:
            for data, reply in zip(messages, replies):
                protocol.raise_if_error(self._counted(data, reply))

    def _leaner(self, step: protocol.Step) -> protocol.Step:
        """`step` as this server takes it with the fewest bytes: its packet without what the session already says
        (`Codec.bare`: the envelope, the agreed ECSQ step), and a decode step that follows the last answered one as
        NEXT (start and batch implied); anything else goes whole."""
        leaner = step
        if self._bare and not step.bare:
            shape = (step.batch, step.tokens, self._width)
            body = self.codec.bare(step.payload, shape, getattr(torch, self.open_request["dtype"]))
            if body is not None:
                leaner = dataclasses.replace(step, payload=body, bare=True)
        follows = self._acked == (step.seq - 1, step.start, step.batch)
        steady = step.tokens == 1 and step.need_from == 0 and step.grid is None and step.history is None
        if self._next and follows and steady:
            leaner = dataclasses.replace(leaner, next=True)
        return leaner

    def _changed_history(
        self, history: torch.Tensor | None, batch: int, start: int, always: bool = False
    ) -> torch.Tensor | None:
        """`history` (`[B, start]`), where it differs from the mask the server holds for those positions, or
        `always` (the steps a replay would send no longer rebuild it)."""
        if history is None or start == 0 or tuple(history.shape) != (batch, start):
            return None
        history = history.bool().cpu()
        if always:
            return history
        held = None if self._mask is None else self._mask[:, :start]
        same = bool(history.all()) if held is None else held.shape == history.shape and torch.equal(held, history)
        return None if same else history

    @staticmethod
    def _checked(reply: bytes, seq: int) -> tuple[int, bytes]:
        """(kind, body) of the reply to step `seq`, or a clear error: a reply to any other step means the two sides
        disagree on what was sent, and going on would mix up sequences silently."""
        got, kind, body = protocol.decode_reply(reply)
        if got != seq:
            raise ProtocolError(f"reply for step {got} arrived while waiting for step {seq}", code="bad_seq")
        return kind, body
