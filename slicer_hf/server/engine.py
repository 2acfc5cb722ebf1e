"""`SplitServer`: turns protocol messages into suffix forward passes, one KV cache per session.

It serves a causal LM's decoder layers (sessions of many steps, K/V in the store) or an encoder's blocks (text
encoders, ViT, Swin, CNNs: each step a one-shot request at position 0, batched across clients, no cache).

Transport-agnostic: `handle(bytes) -> bytes` (or `submit`, its reply to await) is all a transport calls, in-process or
behind gRPC. A request thread only admits a step; the compute thread decodes its packet, runs it with the other
sessions' steps and answers. Every failure becomes an ERROR reply for that request only; a failing session is closed
and its memory freed, the others go on.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from transformers import PreTrainedModel

from .. import compat, protocol
from ..codec import build_codec, codec_from_spec
from ..codec.base import MACHINE_ERRORS
from ..config import DOWNLINK_DTYPES, DOWNLINKS
from ..errors import CodecError, ConfigError, ProtocolError
from ..hooks import attach_hooks
from .layers import ServedLayers
from .prepack import prepack_linears
from .scheduler import Chunk, Scheduler, Work
from .state import (
    WIRE_DTYPES,
    Reply,
    ServerLimits,
    ServerStats,
    Session,
    client_host,
    default_kv_budget_bytes,
    log_internal,
)

logger = logging.getLogger(__name__)
MAX_DOWNLINK_TOPK = 1 << 16
REPLY_ENVELOPE_BYTES = 64  # of a reply, around its outputs: its header, seq and kind, and the codec's header


def _reap_idle(server_ref: weakref.ref[SplitServer], stopped: threading.Event, period_s: float) -> None:
    """The reaper thread holds its server weakly, so a server nobody uses any more is collected."""
    while not stopped.wait(period_s):
        server = server_ref()
        if server is None:
            return
        server.expire_idle()
        del server


class SplitServer:
    """Runs the suffix of a split model for many sessions.

    Args:
        model: the causal LM, or an encoder of `compat.ENCODER_SPLIT_FAMILIES` (all blocks from `min_split_layer`
            on must hold real weights).
        model_name: a name reported to clients.
        limits: session and request limits.
        min_split_layer: the shallowest split this server accepts (layers below it may be absent).
        batching: run the decode steps of concurrent sessions together.
        kv_store: keep K/V in the server's block store (`kvstore.py`), where the architecture allows; off, or
            where it does not, each session keeps a transformers cache and steps run one at a time.
        prepack: for a causal LM on the CPU, replace the `Linear` layers of the served blocks by ones on weights
            packed for oneDNN (`prepack.py`), in place: for a model the server owns. Its decode forwards of few rows
            run faster; outputs round differently (greedy tokens stay those of `generate()`). An encoder's blocks
            are left as loaded: its outputs stay those of the unsplit model bit for bit.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        model_name: str = "",
        limits: ServerLimits | None = None,
        min_split_layer: int = 1,
        batching: bool = True,
        kv_store: bool = True,
        prepack: bool = False,
    ) -> None:
        self.model = model.eval()
        self.model_name = model_name or model.config.name_or_path
        self.limits = limits or ServerLimits()
        self.min_split_layer = min_split_layer
        self.num_layers = compat.num_layers(model.config)
        if not 1 <= min_split_layer < self.num_layers:
            raise ConfigError(
                f"min_split_layer must be in [1, {self.num_layers - 1}] for this {self.num_layers}-layer model "
                f"(the edge runs at least one layer, the server at least one), got {min_split_layer}"
            )
        self.encoder_kind = compat.encoder_kind(model.config)  # None for a causal LM
        # a family that splits may still have a variant that does not
        (compat.check_encoder_supported if self.encoder_kind else compat.check_supported)(model.config)
        self.hidden_size = (  # the widest row a packet may carry
            max(compat.split_width(model.config, k) for k in range(min_split_layer, self.num_layers))
            if self.encoder_kind
            else int(model.config.hidden_size)
        )
        self.fingerprint = protocol.model_fingerprint(model.config)
        # positions past a learned position table fail inside the forward (on CUDA, a device assert that ends every
        # session): they are refused first
        self.max_positions = min(
            self.limits.max_context_tokens, compat.position_table(model) or self.limits.max_context_tokens
        )
        self.dtype = next(model.parameters()).dtype
        self.device = next(p.device for p in model.parameters() if p.device.type != "meta")
        self.kv_budget_bytes = self.limits.kv_budget_bytes or default_kv_budget_bytes(self.device)
        self.kv_bytes_used = 0
        self.draining = False  # takes no new sessions
        self.sessions: dict[int, Session] = {}
        self.stats = ServerStats()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # the session table and the KV reservations
        self._downlink_codec = build_codec("identity")
        self.prepacked = 0
        if prepack and not self.encoder_kind:
            self.prepacked = prepack_linears(compat.decoder_layers(model)[min_split_layer:])
        if self.prepacked:
            logger.info("%d Linear layers run on weights packed for oneDNN", self.prepacked)
        attach_hooks(model)
        self.layers = ServedLayers(model, min_split_layer, kv_store and not self.encoder_kind, self.kv_budget_bytes)
        self.store = self.layers.store
        splits = range(min_split_layer, self.num_layers)  # an encoder keeps nothing between requests
        self._kv_costs = {k: (0, 0) if self.encoder_kind else self.layers.kv_costs(k) for k in splits}
        # a step of several positions runs in chunks, unless this cache cannot carry one on exactly (`chunks_match`)
        self.whole_steps = not self.encoder_kind and self.store is None and not self.layers.chunks_match()
        self.scheduler = Scheduler(self, batching)
        self._stopped = threading.Event()
        weakref.finalize(self, self._stopped.set)
        weakref.finalize(self, self.scheduler.stop)  # joined: a thread still running at exit can abort the process
        if self.limits.idle_timeout_s < float("inf"):
            period = min(max(self.limits.idle_timeout_s / 4, 0.05), 5.0)
            reaper = threading.Thread(
                target=_reap_idle, args=(weakref.ref(self), self._stopped, period), name="slicer-reaper", daemon=True
            )
            reaper.start()

    # ---------------------------------------------------------------- entry point
    def handle(self, data: bytes, client: str = "", owned: set[int] | None = None) -> bytes:
        """Answer one request, waiting for it; never raises for bad input (see `submit`). A step the compute thread
        has not started within `step_timeout_s` is withdrawn and refused."""
        reply = self.submit(data, client, owned)
        wait_s = self.limits.step_timeout_s
        try:
            return reply.result(timeout=wait_s if wait_s < threading.TIMEOUT_MAX else None)  # (inf: no timeout)
        except FutureTimeout:
            reply.withdraw()
            return reply.result()

    def submit(self, data: bytes, client: str = "", owned: set[int] | None = None) -> Reply:
        """Take one request and return its reply-to-be: a step is admitted here and answered by the compute
        thread (which decodes its packet, runs it with the other sessions' steps, and encodes the reply); any
        other message is answered at once. The reply never fails: a refusal is an ERROR reply.

        Args:
            data: one protocol message.
            client: the peer, for logs.
            owned: when given, the sessions this caller opened: steps for any other session are refused, and
                sessions it opens are added.
        """
        self.stats.add(bytes_in=len(data))
        found: list[Session] = []  # the session, once admitted: its `busy` lock is then held until the reply
        try:
            if self._stopped.is_set():
                raise ProtocolError("server shutting down", code="shutdown")
            if len(data) > self.limits.max_message_bytes:
                raise ProtocolError(
                    f"message of {len(data)} bytes exceeds {self.limits.max_message_bytes}", code="too_large"
                )
            kind = protocol.message_type(data)
            if kind in (protocol.STEP, protocol.NEXT):
                step = protocol.decode_step(data, check=lambda header: self._admit(header, owned, found))
                work = self._work(found[0], step)
                reply = Reply(work.future)
                work.future.add_done_callback(lambda done: reply.set_result(self._answer(work)))
                self.scheduler.submit(work)
                return reply
            answer = self._answer_control(kind, data, client, owned)
        except Exception as exc:  # a bug or an unforeseen input must not take the server down either
            if not isinstance(exc, (ProtocolError, CodecError)):
                log_internal(logger, "internal error while handling a request", exc)
            answer = self._refuse(exc, found[0] if found else None)
            if found:
                found[0].busy.release()
        reply = Reply()
        reply.set_result(answer)
        return reply

    def _answer_control(self, kind: int, data: bytes, client: str, owned: set[int] | None) -> bytes:
        """The answer to OPEN, CLOSE or STATS."""
        if kind == protocol.OPEN:
            session = self._open(protocol.decode_json(data), client)
            if owned is not None:
                owned.add(session.id)
            opened = {"session": session.id, "server": self.model_name, "num_layers": self.num_layers}
            opened["bare_steps"] = len(session.wire_dtypes) == 1  # it can rebuild a packet's envelope
            opened["next_steps"] = not self.encoder_kind  # it takes steady-state decode steps as NEXT
            opened["max_step_tokens"] = self.limits.max_step_tokens  # the edge cuts its steps to fit
            opened["max_step_elements"] = self.limits.max_step_elements
            opened["max_message_bytes"] = self.limits.max_message_bytes  # replies too: outputs are cut to fit
            opened["max_session_batch"] = self.limits.max_session_batch  # an encoder's batch goes up in parts
            opened["whole_steps"] = self.whole_steps  # the edge sends a forward's positions in one step
            answer = protocol.encode_json(protocol.OPENED, opened)
        elif kind == protocol.CLOSE:
            target = protocol.decode_json(data).get("session", -1)
            if isinstance(target, int) and (owned is None or target in owned):
                self.close_session(target)
            answer = protocol.encode_json(protocol.CLOSED, {})
        elif kind == protocol.STATS:
            answer = protocol.encode_json(protocol.STATS_REPLY, self.stats_dict())
        else:
            raise ProtocolError(f"a client may not send {protocol.MESSAGE_NAMES[kind]!r}", code="malformed")
        self.stats.add(bytes_out=len(answer))
        return answer

    def _answer(self, work: Work) -> bytes:
        """The reply to a step the compute thread has finished, failed or withdrawn; frees its session for the
        next step (before the reply goes out, so the client's next step finds it free)."""
        session, step = work.session, work.step
        try:
            if work.future.cancelled():
                timeout_s = self.limits.step_timeout_s
                raise ProtocolError(f"no compute slot within {timeout_s} s", code="timeout")
            payload, kind = work.future.result()
            answer = protocol.encode_reply(step.seq, kind, payload)
            if len(answer) > self.limits.max_message_bytes:
                raise ProtocolError(
                    f"the reply of {len(answer):,} bytes would exceed max_message_bytes="
                    f"{self.limits.max_message_bytes:,}: send fewer positions per step (prefill_chunk_tokens) or a "
                    "smaller downlink",
                    code="too_large",
                )
            self.stats.add(tokens=step.batch * step.tokens, steps=1, bytes_out=len(answer))
            session.tokens += step.batch * step.tokens
            session.last_used = time.monotonic()
        except Exception as exc:
            if session.closed:  # its client left (the stream ended or was cancelled): nobody reads this, no error
                logger.debug("step %d of session %d ended with its session: %s", step.seq, session.id, exc)
                answer = protocol.encode_error("unknown_session", f"session {session.id} was closed")
            else:
                if not isinstance(exc, (ProtocolError, CodecError)):
                    log_internal(logger, "internal error in a step", exc)
                answer = self._refuse(exc, session)
        finally:
            session.busy.release()
        return answer

    def _refuse(self, exc: Exception, session: Session | None) -> bytes:
        """The ERROR reply for `exc`; the session it broke, if any, is closed (a broken stream cannot be trusted to
        continue)."""
        if isinstance(exc, ProtocolError):
            code, message = exc.code, str(exc)
        elif isinstance(exc, CodecError):
            code, message = "codec", str(exc)
        else:
            code, message = "internal", f"{type(exc).__name__}: {exc}"
        self.stats.error(code)
        if session is not None:
            self.close_session(session.id)
        # a rewind past what a sliding window kept is routine (prompt reuse): the client replays, nothing failed; so
        # is a queued step refused as the server stops
        log = logger.info if code in ("state_lost", "shutdown") else logger.warning
        # cut shorter than the reply's: a client's values quoted in full would let it fill the log (a reviewer's 50
        # OPENs of 64 KB wrote 8 MB)
        log("refused request (session %s): %s: %s", session and session.id, code, protocol.clipped(message, 300))
        answer = protocol.encode_error(code, message)
        self.stats.add(bytes_out=len(answer))
        return answer

    # ---------------------------------------------------------------- sessions
    def _open(self, req: dict[str, Any], client: str) -> Session:
        if req.get("fingerprint") != self.fingerprint:
            raise ProtocolError(
                f"model mismatch: client runs {req.get('model')!r} ({req.get('fingerprint')}), "
                f"server serves {self.model_name!r} ({self.fingerprint})",
                code="model_mismatch",
            )
        k = req.get("split_layer")
        if type(k) is not int or not self.min_split_layer <= k < self.num_layers:
            raise ProtocolError(
                f"split_layer must be in [{self.min_split_layer}, {self.num_layers - 1}] on this server, got {k!r}",
                code="bad_split",
            )
        downlink = req.get("downlink", "hidden")
        if downlink not in DOWNLINKS:
            raise ProtocolError(f"downlink must be one of {DOWNLINKS}, got {downlink!r}", code="bad_request")
        if self.encoder_kind and downlink != "hidden":
            raise ProtocolError(
                f"an encoder answers with hidden states only, got downlink {downlink!r}", code="bad_request"
            )
        topk = req.get("downlink_topk", 64)
        if type(topk) is not int or not 1 <= topk <= MAX_DOWNLINK_TOPK:
            raise ProtocolError(
                f"downlink_topk must be an integer in [1, {MAX_DOWNLINK_TOPK}], got {topk!r}", code="bad_request"
            )
        downlink_dtype = req.get("downlink_dtype", "auto")
        if downlink_dtype not in DOWNLINK_DTYPES:
            raise ProtocolError(
                f"downlink_dtype must be one of {DOWNLINK_DTYPES}, got {downlink_dtype!r}", code="bad_request"
            )
        wire_dtype = req.get("dtype")
        if wire_dtype is not None and (type(wire_dtype) is not str or wire_dtype not in WIRE_DTYPES):
            raise ProtocolError(f"dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}", code="bad_request")
        spec = req.get("codec") or {}
        if not isinstance(spec, dict):
            raise ProtocolError(f"codec must be a JSON object, got {type(spec).__name__}", code="bad_request")
        codec = codec_from_spec(spec, max_elements=self.limits.max_step_elements)
        if codec.given_width is not None:
            raise ProtocolError(
                "the uplink codec's basis predicts each row from given rows, and an uplink step has none: chain it "
                "(predict_previous) or use a basis that predicts nothing",
                code="bad_request",
            )
        if codec.chains and self.encoder_kind:
            raise ProtocolError(
                "an encoder takes no chained codec (its requests are not sequences)", code="bad_request"
            )
        downlink_spec = req.get("downlink_codec")
        if downlink_spec is not None and (not isinstance(downlink_spec, dict) or downlink != "hidden"):
            raise ProtocolError("downlink_codec takes a codec spec, with downlink 'hidden' only", code="bad_request")
        max_elements = self.limits.max_session_batch * self.limits.max_step_tokens * self.hidden_size
        downlink_codec = codec_from_spec(downlink_spec, max_elements=max_elements) if downlink_spec else None
        predicts_from = downlink_codec.given_width if downlink_codec is not None else None
        if predicts_from is not None and (self.encoder_kind or predicts_from != self.hidden_size):
            raise ProtocolError(
                f"a downlink codec that predicts from the step's rows (width {predicts_from}) needs a decoder "
                f"server with rows of that width (this one: {self.encoder_kind or 'decoder'}, {self.hidden_size})",
                code="bad_request",
            )
        with self._lock:
            self._expire_idle()
            if self.draining:
                raise ProtocolError("server is draining: it takes no new sessions", code="draining")
            if len(self.sessions) >= self.limits.max_sessions:
                raise ProtocolError(f"server full: {self.limits.max_sessions} sessions open", code="too_many_sessions")
            cap, host = self.limits.max_sessions_per_client, client_host(client)
            if cap is not None and host and sum(client_host(s.client) == host for s in self.sessions.values()) >= cap:
                raise ProtocolError(
                    f"{host} holds {cap} sessions, the most one client may (--max-sessions-per-client): close one",
                    code="too_many_sessions",
                )
            per_position, per_sequence = self._kv_costs[k]
            least = self.store.block_size if self.store is not None else 1  # a step takes whole blocks
            what = f"a block of {least} positions" if least > 1 else "a position"
            what += f" and a state of {per_sequence:,} bytes" if per_sequence else ""
            needed = per_sequence + least * per_position
            if needed > self.limits.max_session_kv_bytes:
                raise ProtocolError(
                    f"session KV cap: {what} at split {k} needs {needed:,} bytes, over the cap of "
                    f"{self.limits.max_session_kv_bytes:,}",
                    code="kv_session_cap",
                )
            if self.kv_bytes_used + needed > self.kv_budget_bytes:
                raise ProtocolError(
                    f"KV memory budget full: {self.kv_bytes_used:,} of {self.kv_budget_bytes:,} bytes in use, "
                    f"{what} at split {k} needs {needed:,}",
                    code="kv_budget",
                )
            session = Session(
                next(self._ids),
                k,
                codec,
                downlink,
                topk,
                None if downlink_dtype == "auto" else getattr(torch, downlink_dtype),
                client,
                frozenset({WIRE_DTYPES[wire_dtype]}) if wire_dtype else frozenset(WIRE_DTYPES.values()),
                per_position,
                per_sequence,
            )
            session.downlink_codec = downlink_codec
            session.codec_key = json.dumps(codec.spec(), sort_keys=True)
            session.bare_replies = req.get("bare_replies") is True and downlink_codec is not None
            session.bare_replies &= not self.encoder_kind  # an encoder's reply shape is its own
            self.sessions[session.id] = session
        self.stats.add(sessions_opened=1)
        logger.info(
            "opened session %d for %s: split %d, codec %s, downlink %s",
            session.id,
            client or "?",
            k,
            codec.name,
            downlink,
        )
        return session

    def _admit(self, step: protocol.Step, owned: set[int] | None, found: list[Session]) -> None:
        """Check a step's header against its session and the limits, and reserve its KV memory; nothing sized by
        the message has been allocated yet. The session goes into `found` once its `busy` lock is taken (one step
        at a time per session); a step refused after that closes the session."""
        if owned is not None and step.session not in owned:
            raise ProtocolError(f"unknown session {step.session} on this stream", code="unknown_session")
        session = self.sessions.get(step.session)
        if session is None:
            raise ProtocolError(
                f"unknown session {step.session} (closed, expired, or from another server)", code="unknown_session"
            )
        if not session.busy.acquire(blocking=False):
            raise ProtocolError(f"session {session.id} already has a step in flight", code="busy")
        found.append(session)
        session.last_used = time.monotonic()
        if step.next:  # its start is implied: it must be the very next step, or the two sides would drift apart
            if self.encoder_kind:
                raise ProtocolError("an encoder takes whole STEP requests, not NEXT steps", code="bad_request")
            if session.seq < 0 or step.seq != session.seq + 1:
                raise ProtocolError(
                    f"next step {step.seq} does not follow step {session.seq}: a step was lost or replayed",
                    code="bad_seq",
                )
            step.start, step.batch = session.length, session.batch
        limits = self.limits
        if step.tokens > limits.max_step_tokens:
            raise ProtocolError(
                f"step of {step.tokens} tokens exceeds the limit {limits.max_step_tokens}", code="too_large"
            )
        if step.batch > limits.max_session_batch:
            raise ProtocolError(
                f"batch {step.batch} exceeds max_session_batch={limits.max_session_batch}", code="too_large"
            )
        width = self.width(session)
        if (values := step.batch * step.tokens * width) > limits.max_step_elements:
            raise ProtocolError(
                f"step of {step.batch} x {step.tokens} positions x {width} = {values:,} values exceeds "
                f"max_step_elements={limits.max_step_elements:,} by {values - limits.max_step_elements:,}: send "
                "fewer positions per step",
                code="too_large",
            )
        reply = self._reply_bytes(session, step) + REPLY_ENVELOPE_BYTES
        if reply > limits.max_message_bytes:  # refused before it is computed
            raise ProtocolError(
                f"this step's reply would take up to {reply:,} bytes, over max_message_bytes="
                f"{limits.max_message_bytes:,} by {reply - limits.max_message_bytes:,}: ask for fewer positions back",
                code="too_large",
            )
        if step.start + step.tokens > self.max_positions:
            table = " (this model's position table)" if self.max_positions < limits.max_context_tokens else ""
            raise ProtocolError(
                f"context of {step.start + step.tokens} tokens exceeds {self.max_positions}{table}", code="too_large"
            )
        if self.encoder_kind:
            self._check_encoder_step(session, step)
        if step.start > session.length:
            raise ProtocolError(
                f"step starts at position {step.start} but the session holds {session.length}: "
                "server state was lost, replay from 0",
                code="state_lost",
            )
        if step.start > 0 and step.batch != session.batch:
            raise ProtocolError(f"batch changed from {session.batch} to {step.batch} mid-sequence", code="bad_request")
        if step.seq <= session.seq:
            raise ProtocolError(
                f"step {step.seq} arrived after step {session.seq}: replayed or reordered", code="bad_seq"
            )
        positions, held = step.start + step.tokens, ""
        if self.store is not None:  # whole blocks
            positions = self.store.blocks_for(positions) * self.store.block_size
            held = f" (its {step.start + step.tokens} in blocks of {self.store.block_size})"
        state = session.kv_bytes_per_sequence
        needed = step.batch * (state + session.kv_bytes_per_position * positions)
        if state:
            held += f" and a state of {state:,} bytes each"
        if needed > limits.max_session_kv_bytes:
            raise ProtocolError(
                f"session KV cap: {step.batch} x {positions} positions{held} need {needed:,} bytes, "
                f"over the cap of {limits.max_session_kv_bytes:,} by {needed - limits.max_session_kv_bytes:,}",
                code="kv_session_cap",
            )
        with self._lock:
            if self.sessions.get(session.id) is not session:  # closed meanwhile (its stream ended, say)
                raise ProtocolError(f"session {session.id} was closed", code="unknown_session")
            others = self.kv_bytes_used - session.kv_bytes
            if others + needed > self.kv_budget_bytes:
                raise ProtocolError(
                    f"KV memory budget: this step needs {needed:,} bytes for its session, "
                    f"{self.kv_budget_bytes - others:,} of {self.kv_budget_bytes:,} are free "
                    f"(short by {others + needed - self.kv_budget_bytes:,})",
                    code="kv_budget",
                )
            # a step that goes back frees memory only once the compute thread cuts the cache (`begin_step`): until
            # then the reservation keeps what the cache holds, so no other step is admitted on memory still in use
            self._reserve(session, max(needed, session.kv_bytes))
            session.kv_bytes_after = needed
        session.seq = step.seq

    def _reserve(self, session: Session, kv_bytes: int) -> None:
        """Set the session's KV reservation (the caller holds `_lock`)."""
        self.kv_bytes_used += kv_bytes - session.kv_bytes
        session.kv_bytes = kv_bytes

    def _check_encoder_step(self, session: Session, step: protocol.Step) -> None:
        if step.start != 0:
            raise ProtocolError(f"an encoder request starts at position 0, got {step.start}", code="bad_request")
        feature_map = self.encoder_kind in ("grid", "map")
        if feature_map != (step.grid is not None):
            raise ProtocolError(
                f"this {self.model.config.model_type} split {'needs a' if feature_map else 'takes no'} feature grid",
                code="bad_request",
            )
        longest = compat.max_encoder_tokens(self.model)
        if longest is not None and step.tokens > longest:
            what = "its position embeddings"
            if self.encoder_kind != "text":
                what = f"an image {compat.PATCH_SIDE_SCALE}x its configured side"
            raise ProtocolError(
                f"a row of {step.tokens} tokens; this {self.model.config.model_type} takes at most {longest} ({what})",
                code="bad_request",
            )

    def close_session(self, session_id: int) -> bool:
        with self._lock:
            session = self.sessions.pop(session_id, None)
            if session is not None:  # a step still running keeps its cache until it ends; the memory is released
                self._reserve(session, 0)
                session.closed = True
                # queued before a step admitted on the memory given back can be: the scheduler frees the cache
                # before that step runs
                self.scheduler.release(session)
        if session is not None:
            self.stats.add(sessions_closed=1)
            logger.info("closed session %d after %d tokens", session_id, session.tokens)
        return session is not None

    def expire_idle(self) -> None:
        with self._lock:
            self._expire_idle()

    def _expire_idle(self) -> None:
        """Close the sessions idle for over `idle_timeout_s` (one with a step in flight is not idle)."""
        now = time.monotonic()
        timeout_s = self.limits.idle_timeout_s
        for sid in [s.id for s in self.sessions.values() if now - s.last_used > timeout_s and not s.busy.locked()]:
            logger.info("session %d idle for over %.0f s", sid, timeout_s)
            self.close_session(sid)

    def drain(self, on: bool = True) -> None:
        """Stop (or resume) taking new sessions; open sessions carry on."""
        if on != self.draining:  # a change, not every call (serve's start sets it off)
            logger.info("draining: %s", on)
        self.draining = on

    # ---------------------------------------------------------------- compute
    def _work(self, session: Session, step: protocol.Step) -> Work:
        """The compute thread's work for an admitted step (the caller holds `session.busy`): checked, its packet
        whole again, and the rows a chained packet continues from."""
        if self.encoder_kind and (
            step.positions is not None or (step.mask is not None and self.encoder_kind != "text")
        ):
            raise ProtocolError("encoder requests take no position ids, and masks only for text", code="bad_request")
        end = self.max_positions
        if step.positions is not None and not bool(((step.positions >= 0) & (step.positions < end)).all()):
            raise ProtocolError(f"position ids must lie in [0, {end})", code="bad_request")
        packet = step.payload
        if step.bare:
            if len(session.wire_dtypes) != 1:
                raise ProtocolError("a bare step needs the session's dtype announced at OPEN", code="bad_request")
            packet = session.codec.unbare(packet, self._shape(session, step), next(iter(session.wire_dtypes)))
        return Work(session, step, packet, self._chain_start(session, step))

    def decode_packets(self, works: list[Work]) -> None:
        """Decode the packets of `works` (on the compute thread, onto the server's device), those of sessions with
        the same codec together (`Codec.decode_batch`): each work gets its `hidden`, or its step fails alone with
        the codec's error (rows that are not all finite included: they are nobody's hidden states), or the machine's
        (out of memory: an internal error; where the group's shared work failed, its packets are decoded again one
        by one)."""
        groups: dict[tuple[str, frozenset[torch.dtype]], list[Work]] = defaultdict(list)
        for work in works:
            groups[work.session.codec_key, work.session.wire_dtypes].append(work)
        for group in groups.values():
            try:
                decoded = self._decode_group(group)
            except MACHINE_ERRORS as exc:  # in the group's shared work: each packet alone
                decoded = [exc] if len(group) == 1 else [self._decode_alone(work) for work in group]
            for work, hidden in zip(group, decoded):
                if isinstance(hidden, Exception):
                    work.future.set_exception(hidden)
                    continue
                if work.session.codec.chains:
                    work.session.last_rows = hidden[:, -1].cpu()
                if work.session.downlink_codec is not None and work.session.downlink_codec.given_width is not None:
                    # the reply is coded against the step's rows as the edge decodes them, before the model's dtype
                    work.reply_given = hidden[:, work.step.need_from :].cpu()
                work.hidden = hidden.to(self.dtype)

    def _decode_group(self, group: list[Work]) -> list[torch.Tensor | Exception]:
        return group[0].session.codec.decode_batch(  # the Triton kernels decode there on CUDA
            [w.packet for w in group],
            device=self.device,
            expect_shapes=[self._shape(w.session, w.step) for w in group],
            expect_dtypes=group[0].session.wire_dtypes,
            givens=[w.chain_from for w in group],
        )

    def _decode_alone(self, work: Work) -> torch.Tensor | Exception:
        try:
            return self._decode_group([work])[0]
        except MACHINE_ERRORS as exc:
            return exc

    def _shape(self, session: Session, step: protocol.Step) -> tuple[int, int, int]:
        return step.batch, step.tokens, self.width(session)

    @staticmethod
    def _chain_start(session: Session, step: protocol.Step) -> torch.Tensor | None:
        """The decoded rows a CHAINED step continues from (those at `start - 1`, held since the last step), or None
        for a step whose sequences start afresh; a CHAINED step this session cannot continue is refused, never
        decoded against other rows."""
        if not step.chained:
            return None
        if not session.codec.chains:
            raise ProtocolError("a CHAINED step needs a chained codec (predict_previous)", code="bad_request")
        held = session.last_rows
        if held is None or session.length != step.start or len(held) != step.batch:
            holds = "none" if held is None else f"{len(held)} at position {session.length - 1}"
            raise ProtocolError(
                f"step {step.seq} continues from the decoded rows of {step.batch} sequences at position "
                f"{step.start - 1}; this session holds {holds}",
                code="bad_seq",
            )
        return held

    def _reply_bytes(self, session: Session, step: protocol.Step) -> int:
        """The bytes of the outputs a step's reply is made of, as computed: its rows (`need_from` on) times their
        float32 logits (whole, for a top-k reply too) or hidden state (for an encoder: all positions, final width);
        what the edge sizes its steps by (`SuffixLink.reply_bytes`)."""
        config = self.model.config
        if self.encoder_kind:
            positions = compat.reply_positions(config, session.split_layer, step.tokens, step.grid)
            return step.batch * positions * compat.final_width(config) * 4
        rows = step.batch * (step.tokens - step.need_from)
        if session.downlink in ("logits", "topk_logits"):
            return rows * config.vocab_size * 4
        return rows * self.hidden_size * (session.downlink_dtype or self.dtype).itemsize

    def width(self, session: Session) -> int:
        """Features per row entering the session's split layer."""
        return compat.split_width(self.model.config, session.split_layer) if self.encoder_kind else self.hidden_size

    # ---------------------------------------------------------------- compute, on the scheduler's thread
    def begin_step(self, session: Session, step: protocol.Step) -> None:
        """Bring the session's K/V (its rows in the store, or its own transformers cache) and mask to `step.start`,
        and append the step's mask columns."""
        if step.start == 0 or (self.store is not None and not session.rows):
            self.release_session(session)
            session.mask, session.batch = None, step.batch
            if self.store is not None:
                session.rows = [self.store.new_row(session.split_layer) for _ in range(step.batch)]
            else:
                session.cache = compat.new_cache(self.model)
        elif self.store is not None:
            for row in session.rows:
                self.store.truncate(row, step.start)
        elif not compat.crop_cache(session.cache, step.start):
            raise ProtocolError(
                f"this session's sliding-window cache has dropped what going back from {session.length} to "
                f"{step.start} positions needs: replay from 0",
                code="state_lost",
            )
        if session.kv_bytes_after < session.kv_bytes:  # the cache is cut back: its reservation may follow
            with self._lock:
                if not session.closed:
                    self._reserve(session, session.kv_bytes_after)
        self._extend_mask(session, step)

    def forward_rows(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """One forward over the chunks of several sessions (any split layers, one downlink kind, equal chunk
        lengths): for each chunk, the outputs of its last `keep` positions."""
        ordered = sorted(chunks, key=lambda c: c.session.split_layer)
        rows = [row for chunk in ordered for row in chunk.session.rows]
        tokens = ordered[0].hidden.shape[1]
        longest = max(row.length for row in rows) + tokens
        valid = None
        if any(c.session.mask is not None for c in ordered):
            valid = torch.cat([_widen(c.session.mask, c.work.rows, longest) for c in ordered])
        keep = max(c.keep for c in ordered) if self.wants_logits(ordered[0].session) else None
        final = self.layers.store_forward(
            rows, torch.cat([c.hidden for c in ordered]), torch.cat([c.positions for c in ordered]), valid, keep
        )
        out, r0 = {}, 0
        for chunk in ordered:
            b = chunk.work.rows
            out[id(chunk)] = final[r0 : r0 + b, final.shape[1] - chunk.keep :]
            r0 += b
        return [out[id(c)] for c in chunks]

    def end_step(self, work: Work) -> None:
        """The session now holds the step's positions."""
        work.session.length = work.step.start + work.step.tokens

    def finish_step(self, work: Work, final: torch.Tensor) -> tuple[bytes, int]:
        """`end_step`, then the reply payload and kind for its outputs `final`."""
        self.end_step(work)
        return self.encode_output(work.session, final, work.reply_given)

    def wants_logits(self, session: Session) -> bool:
        return session.downlink != "hidden"

    def release_session(self, session: Session) -> None:
        """Free what a session holds (the scheduler calls this on its own thread)."""
        if self.store is not None:
            for row in session.rows:
                self.store.release(row)
        session.rows, session.cache = [], None

    def _extend_mask(self, session: Session, step: protocol.Step) -> None:
        """The session's 2D mask through the step (the step's `history`, where it has one, replaces the mask of the
        earlier positions); None while it masks nothing (what an unpadded edge sends), so a decode step builds no
        mask of its own."""
        session.mask = protocol.extend_mask(session.mask, step.mask, step.start, step.history)

    @torch.inference_mode()
    def run_chunk(self, chunk: Chunk) -> torch.Tensor:
        """The next positions of a step on the session's own transformers cache (no KV store): the outputs of its
        kept positions."""
        work, session = chunk.work, chunk.session  # `begin_step` has run
        end = work.step.start + work.done + chunk.hidden.shape[1]
        mask = session.mask[:, :end] if session.mask is not None else None  # through this chunk's positions
        return self.layers.run(
            session.split_layer, session.downlink, chunk.hidden, mask, chunk.positions, session.cache, chunk.keep
        )

    def encode_output(
        self, session: Session, final: torch.Tensor, given: torch.Tensor | None = None
    ) -> tuple[bytes, int]:
        """The reply payload and kind for a step's outputs `final` (`given`: the rows a predicting downlink codec
        codes them against)."""
        if session.downlink_dtype is not None and session.downlink != "topk_logits":
            final = final.to(session.downlink_dtype)
        if session.downlink_codec is not None:
            if session.bare_replies:  # float32 rows of the step's shape: the edge rebuilds the envelope
                packet = session.downlink_codec.encode(final.float().cpu(), given=given)
                body = session.downlink_codec.bare(packet, tuple(final.shape), torch.float32)
                return (packet, protocol.REPLY_HIDDEN) if body is None else (body, protocol.REPLY_HIDDEN_BARE)
            return session.downlink_codec.encode(final.cpu(), given=given), protocol.REPLY_HIDDEN
        if session.downlink == "hidden":
            return self._downlink_codec.encode(final.cpu()), protocol.REPLY_HIDDEN
        if session.downlink == "logits":
            return self._downlink_codec.encode(final.cpu()), protocol.REPLY_LOGITS
        top = final.topk(min(session.downlink_topk, final.shape[-1]), dim=-1)
        return protocol.encode_topk_logits(top.values.cpu(), top.indices.cpu(), final.shape[-1]), protocol.REPLY_TOPK

    def shutdown(self) -> None:
        """Stop the scheduler and reaper threads and drop every session; from now on every request is refused
        (`shutdown`)."""
        self.draining = True
        self._stopped.set()
        self.scheduler.stop()  # what is queued is refused as `shutdown` while its session is still open
        for session_id in list(self.sessions):
            self.close_session(session_id)

    def stats_dict(self) -> dict[str, Any]:
        s = self.stats.snapshot()
        return {
            **s,
            "sessions_active": len(self.sessions),
            "compute_s": round(s["compute_s"], 6),
            "compute_ms_per_token": round(1000 * s["compute_s"] / max(s["tokens"], 1), 4),
            "kv_store": int(self.store is not None),
            "kv_store_bytes": self.store.bytes_allocated() if self.store is not None else 0,
            "kv_bytes_used": self.kv_bytes_used,
            "kv_budget_bytes": self.kv_budget_bytes,
            "draining": int(self.draining),
            "prepacked_linears": self.prepacked,
            # as of the compute thread's last accounting, like scheduler_cpu_s: their difference is the other threads'
            "process_cpu_s": round(time.process_time() - self.scheduler.unaccounted_cpu_s(), 6),
        }


def _widen(mask: torch.Tensor | None, rows: int, width: int) -> torch.Tensor:
    """A session's key mask [rows, width]: its 2D mask cut or extended (with True) to `width` columns."""
    out = torch.ones(rows, width, dtype=torch.bool)
    if mask is not None:
        n = min(width, mask.shape[1])
        out[:, :n] = mask[:, :n]
    return out
