"""`SplitServer`: turns protocol messages into suffix forward passes, one KV cache per session.

Transport-agnostic: `handle(bytes) -> bytes` is all a transport calls, in-process or behind gRPC. Every failure
becomes an ERROR reply for that request only; a failing session is closed and its memory freed, the others go on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from .. import compat, protocol
from ..codec import Codec, build_codec, codec_from_spec
from ..config import DOWNLINK_DTYPES, DOWNLINKS
from ..errors import CodecError, ProtocolError
from ..hooks import SplitPlan, attach_hooks, split_plan
from .batching import StepBatcher

logger = logging.getLogger(__name__)


def model_fingerprint(config: Any) -> str:
    """Identity of an architecture and its sizes: edge and server must agree on it."""
    keys = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    )
    ident = {key: getattr(config, key, None) for key in keys}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ServerLimits:
    """Per-server limits; requests beyond them are refused with a clear error."""

    max_sessions: int = 64
    max_step_tokens: int = 4096
    max_context_tokens: int = 16384
    max_batch: int = 64
    idle_timeout_s: float = 600.0
    max_message_bytes: int = 64 << 20
    max_batch_rows: int = 64  # rows of concurrent decode steps run in one forward


@dataclass
class Session:
    id: int
    split_layer: int
    codec: Codec
    downlink: str
    downlink_topk: int
    downlink_dtype: torch.dtype | None = None  # None: as computed (exact)
    client: str = ""
    cache: Any = None
    mask: torch.Tensor | None = None  # [B, length] bool, the 2D attention mask so far
    batch: int = 0
    length: int = 0
    tokens: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class ServerStats:
    sessions_opened: int = 0
    sessions_closed: int = 0
    tokens: int = 0
    steps: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    compute_s: float = 0.0  # wall time of model compute (one compute thread at a time)
    batches: int = 0
    batched_rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class SplitServer:
    """Runs the suffix of a split model for many sessions.

    Args:
        model: the causal LM (all layers from `min_split_layer` on must hold real weights).
        model_name: a name reported to clients.
        limits: session and request limits.
        min_split_layer: the shallowest split this server accepts (layers below it may be absent).
        batching: run the decode steps of concurrent sessions together (one compute thread).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        model_name: str = "",
        limits: ServerLimits | None = None,
        min_split_layer: int = 1,
        batching: bool = False,
    ) -> None:
        self.model = model.eval()
        self.model_name = model_name or getattr(model.config, "_name_or_path", "")
        self.limits = limits or ServerLimits()
        self.min_split_layer = min_split_layer
        self.num_layers = compat.num_layers(model.config)
        self.fingerprint = model_fingerprint(model.config)
        self.dtype = next(model.parameters()).dtype
        self.device = next(p.device for p in model.parameters() if p.device.type != "meta")
        self.sessions: dict[int, Session] = {}
        self.stats = ServerStats()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._downlink_codec = build_codec("identity")
        attach_hooks(model)
        self.batcher = StepBatcher(self) if batching else None
        self._stopped = threading.Event()
        if self.limits.idle_timeout_s < float("inf"):
            threading.Thread(target=self._reap_idle, name="slicer-reaper", daemon=True).start()

    def _reap_idle(self) -> None:
        while not self._stopped.wait(min(max(self.limits.idle_timeout_s / 4, 0.05), 5.0)):
            with self._lock:
                self._expire_idle()

    # ---------------------------------------------------------------- entry point
    def handle(self, data: bytes, client: str = "", owned: set[int] | None = None) -> bytes:
        """Answer one request; never raises for bad input.

        Args:
            data: one protocol message.
            client: the peer, for logs.
            owned: when given, the sessions this caller opened: steps for any other session are refused.
        """
        self.stats.bytes_in += len(data)
        session_id = None
        try:
            if len(data) > self.limits.max_message_bytes:
                raise ProtocolError(
                    f"message of {len(data)} bytes exceeds {self.limits.max_message_bytes}", code="too_large"
                )
            kind = protocol.message_type(data)
            if kind == protocol.OPEN:
                reply = self._open(protocol.decode_json(data), client)
            elif kind == protocol.STEP:
                step = protocol.decode_step(data)
                if owned is not None and step.session not in owned:
                    raise ProtocolError(f"unknown session {step.session} on this stream", code="unknown_session")
                session_id = step.session
                reply = self._step(step)
            elif kind == protocol.CLOSE:
                target = protocol.decode_json(data).get("session", -1)
                if isinstance(target, int) and (owned is None or target in owned):
                    self.close_session(target)
                reply = protocol.encode_json(protocol.CLOSED, {})
            elif kind == protocol.STATS:
                reply = protocol.encode_json(protocol.STATS_REPLY, self.stats_dict())
            else:
                raise ProtocolError(f"a client may not send {protocol.MESSAGE_NAMES[kind]!r}", code="malformed")
        except (ProtocolError, CodecError) as exc:
            code = exc.code if isinstance(exc, ProtocolError) else "codec"
            reply = self._refuse(code, str(exc), session_id)
        except Exception as exc:  # a bug or an unforeseen input must not take the server down
            logger.exception("internal error while handling a request")
            reply = self._refuse("internal", f"{type(exc).__name__}: {exc}", session_id)
        self.stats.bytes_out += len(reply)
        return reply

    def _refuse(self, code: str, message: str, session_id: int | None) -> bytes:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        if session_id is not None and code not in ("unknown_session",):
            self.close_session(session_id)  # a broken stream cannot be trusted to continue
        logger.warning("refused request (session %s): %s: %s", session_id, code, message)
        return protocol.encode_error(code, message)

    # ---------------------------------------------------------------- sessions
    def _open(self, req: dict[str, Any], client: str) -> bytes:
        if req.get("fingerprint") != self.fingerprint:
            raise ProtocolError(
                f"model mismatch: client runs {req.get('model')!r} ({req.get('fingerprint')}), "
                f"server serves {self.model_name!r} ({self.fingerprint})",
                code="model_mismatch",
            )
        k = req.get("split_layer")
        if not isinstance(k, int) or not self.min_split_layer <= k < self.num_layers:
            raise ProtocolError(
                f"split_layer must be in [{self.min_split_layer}, {self.num_layers - 1}] on this server, got {k!r}",
                code="bad_split",
            )
        downlink = req.get("downlink", "hidden")
        if downlink not in DOWNLINKS:
            raise ProtocolError(f"downlink must be one of {DOWNLINKS}, got {downlink!r}", code="bad_request")
        codec = codec_from_spec(dict(req.get("codec") or {}))
        downlink_dtype = req.get("downlink_dtype", "auto")
        if downlink_dtype not in DOWNLINK_DTYPES:
            raise ProtocolError(
                f"downlink_dtype must be one of {DOWNLINK_DTYPES}, got {downlink_dtype!r}", code="bad_request"
            )
        with self._lock:
            self._expire_idle()
            if len(self.sessions) >= self.limits.max_sessions:
                raise ProtocolError(f"server full: {self.limits.max_sessions} sessions open", code="too_many_sessions")
            session = Session(
                next(self._ids),
                k,
                codec,
                downlink,
                int(req.get("downlink_topk", 64)),
                None if downlink_dtype == "auto" else getattr(torch, downlink_dtype),
                client,
            )
            self.sessions[session.id] = session
            self.stats.sessions_opened += 1
        logger.info(
            "opened session %d for %s: split %d, codec %s, downlink %s",
            session.id,
            client or "?",
            k,
            codec.name,
            downlink,
        )
        return protocol.encode_json(
            protocol.OPENED, {"session": session.id, "server": self.model_name, "num_layers": self.num_layers}
        )

    def close_session(self, session_id: int) -> bool:
        with self._lock:
            session = self.sessions.pop(session_id, None)
        if session is not None:
            self.stats.sessions_closed += 1
            logger.info("closed session %d after %d tokens", session_id, session.tokens)
        return session is not None

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for sid in [s.id for s in self.sessions.values() if now - s.last_used > self.limits.idle_timeout_s]:
            logger.info("session %d idle for over %.0f s", sid, self.limits.idle_timeout_s)
            self.close_session(sid)

    # ---------------------------------------------------------------- compute
    def _step(self, step: protocol.Step) -> bytes:
        session = self.sessions.get(step.session)
        if session is None:
            raise ProtocolError(
                f"unknown session {step.session} (closed, expired, or from another server)", code="unknown_session"
            )
        session.last_used = time.monotonic()
        if step.tokens > self.limits.max_step_tokens:
            raise ProtocolError(
                f"step of {step.tokens} tokens exceeds the limit {self.limits.max_step_tokens}", code="too_large"
            )
        if step.batch > self.limits.max_batch:
            raise ProtocolError(f"batch {step.batch} exceeds max_batch={self.limits.max_batch}", code="too_large")
        if step.start + step.tokens > self.limits.max_context_tokens:
            raise ProtocolError(
                f"context of {step.start + step.tokens} tokens exceeds {self.limits.max_context_tokens}",
                code="too_large",
            )
        if step.start > session.length:
            raise ProtocolError(
                f"step starts at position {step.start} but the session holds {session.length}: "
                "server state was lost, replay from 0",
                code="state_lost",
            )
        if step.start > 0 and step.batch != session.batch:
            raise ProtocolError(f"batch changed from {session.batch} to {step.batch} mid-sequence", code="bad_request")
        hidden = session.codec.decode(step.payload)
        d = self.model.config.hidden_size
        if tuple(hidden.shape) != (step.batch, step.tokens, d):
            raise ProtocolError(
                f"hidden states of shape {tuple(hidden.shape)}, expected {(step.batch, step.tokens, d)}",
                code="bad_shape",
            )
        payload, kind = self._compute(session, step, hidden.to(self.device, self.dtype))
        with self._lock:
            self.stats.tokens += step.batch * step.tokens
            self.stats.steps += 1
        session.tokens += step.batch * step.tokens
        return protocol.encode_reply(step.seq, kind, payload)

    def _compute(self, session: Session, step: protocol.Step, hidden: torch.Tensor) -> tuple[bytes, int]:
        if self.batcher is not None:
            return self.batcher.submit(session, step, hidden)
        with self._lock:
            started = time.perf_counter()
            try:
                return self.run_one(session, step, hidden)
            finally:
                self.stats.compute_s += time.perf_counter() - started

    def prepare(self, session: Session, step: protocol.Step) -> None:
        """Bring the session's cache and mask to `step.start` and append the step's mask columns."""
        if step.start == 0:
            session.cache, session.mask, session.batch = compat.new_cache(self.model), None, step.batch
        else:
            compat.crop_cache(session.cache, step.start)
        if step.mask is None:
            session.mask = None
        else:
            prefix = (
                session.mask[:, : step.start]
                if session.mask is not None
                else torch.ones(step.batch, step.start, dtype=torch.bool)
            )
            session.mask = torch.cat([prefix, step.mask], dim=1)

    def positions(self, step: protocol.Step) -> torch.Tensor:
        if step.positions is not None:
            return step.positions
        return (step.start + torch.arange(step.tokens)).unsqueeze(0).expand(step.batch, -1)

    @torch.inference_mode()
    def run_one(self, session: Session, step: protocol.Step, hidden: torch.Tensor) -> tuple[bytes, int]:
        self.prepare(session, step)
        final = self.run_model(
            session.split_layer,
            session.downlink,
            hidden,
            session.mask,
            self.positions(step),
            session.cache,
            step.tokens - step.need_from,
        )
        session.length = step.start + step.tokens
        return self.encode_output(session, final)

    @torch.inference_mode()
    def run_model(
        self,
        split_layer: int,
        downlink: str,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: Any,
        keep: int,
    ) -> torch.Tensor:
        """Layers `split_layer..L-1` on `hidden` [B, T, d]; returns the last `keep` positions' final hidden states
        (downlink 'hidden') or float32 logits."""
        kwargs = {
            "inputs_embeds": torch.zeros_like(hidden),
            "attention_mask": mask.to(self.device) if mask is not None else None,
            "position_ids": positions.to(self.device),
            compat.cache_kwarg(self.model): cache,
            "use_cache": True,
        }
        b, t = hidden.shape[:2]
        with split_plan(SplitPlan("server", split_layer, inject=hidden)) as plan:
            if downlink == "hidden":
                compat.base_model(self.model)(**kwargs)
                return plan.final[:, t - keep :]
            if not keep:
                return torch.zeros(b, 0, self.model.config.vocab_size)
            whole = getattr(type(self.model), "_slicer_base", type(self.model)).forward  # not the split forward
            return whole(self.model, **kwargs, logits_to_keep=keep).logits[:, -keep:].float()

    def encode_output(self, session: Session, final: torch.Tensor) -> tuple[bytes, int]:
        if session.downlink_dtype is not None and session.downlink != "topk_logits":
            final = final.to(session.downlink_dtype)
        if session.downlink == "hidden":
            return self._downlink_codec.encode(final), protocol.REPLY_HIDDEN
        if session.downlink == "logits":
            return self._downlink_codec.encode(final), protocol.REPLY_LOGITS
        top = final.topk(min(session.downlink_topk, final.shape[-1]), dim=-1)
        return protocol.encode_topk_logits(top.values, top.indices, final.shape[-1]), protocol.REPLY_TOPK

    def shutdown(self) -> None:
        """Stop the batching and reaper threads and drop every session."""
        self._stopped.set()
        if self.batcher is not None:
            self.batcher.stop()
        for session_id in list(self.sessions):
            self.close_session(session_id)

    def stats_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "sessions_active": len(self.sessions),
            "sessions_opened": s.sessions_opened,
            "sessions_closed": s.sessions_closed,
            "tokens": s.tokens,
            "steps": s.steps,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "compute_s": round(s.compute_s, 6),
            "compute_ms_per_token": round(1000 * s.compute_s / max(s.tokens, 1), 4),
            "errors": dict(s.errors),
            "batches": s.batches,
            "batched_rows": s.batched_rows,
            "process_cpu_s": round(time.process_time(), 6),
        }
