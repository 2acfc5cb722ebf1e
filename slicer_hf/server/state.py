"""The server's records: its limits, a session, its counters, and a request's reply-to-be."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import threading
import time
import urllib.parse
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..codec import Codec
from ..errors import ConfigError
from .kvstore import Row

SERVER_DTYPES = ("float32", "bfloat16", "float16", "auto")  # what a server may load its weights in

WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


TRACEBACK_EVERY_S = 60.0  # an internal error's traceback is logged at most this often for each place it is raised
_tracebacks: dict[tuple[type, str, int], float] = {}
_tracebacks_lock = threading.Lock()


def log_internal(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Log an internal error with its traceback, unless one of the same type raised at the same place was logged
    within `TRACEBACK_EVERY_S` (then one line): an input that reaches a bug must not fill the log by repeating a
    small message (a reviewer's 300-byte step logged 4.5 KB)."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = (type(exc), frame.tb_frame.f_code.co_filename, frame.tb_lineno) if frame else (type(exc), "", 0)
    now = time.monotonic()
    with _tracebacks_lock:
        fresh = now - _tracebacks.get(where, -math.inf) >= TRACEBACK_EVERY_S
        if fresh:
            _tracebacks[where] = now
    if fresh:
        logger.error(what, exc_info=exc)
    else:
        logger.error("%s: %s (its traceback was logged in the last minute)", what, type(exc).__name__)


def default_kv_budget_bytes(device: torch.device) -> int:
    """Half of the memory free on `device` when the server starts."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


@dataclass
class ServerLimits:
    """Per-server limits, in bytes where memory is at stake; requests beyond them are refused with a clear error.

    Args:
        max_sessions: sessions open at once.
        max_sessions_per_client: sessions one client host (its address, whatever the port) may hold at once (None:
            no cap of its own; behind a proxy every client has the proxy's address).
        max_step_tokens: positions one STEP may carry.
        max_step_elements: values one STEP may carry (batch x positions x width), checked from its header: this
            bounds the memory that decoding one packet takes (up to about 90 bytes a value: a crafted blocks packet).
            An encoder's forward holds at most as many (several requests batched, as padded), one request alone.
        max_context_tokens: positions one session may hold.
        max_session_batch: sequences one session may run side by side.
        kv_budget_bytes: KV-cache memory of all sessions together (None: half of the free memory at start).
        max_session_kv_bytes: KV-cache memory of one session.
        max_message_bytes: size of one protocol message.
        max_batch_rows: rows of concurrent decode steps run in one forward.
        max_batch_tokens: positions one scheduler round runs: its decode rows (never held back: one position each),
            then prefill chunks while positions are left (the oldest prefill runs `prefill_chunk_tokens // 8`
            positions per round even when none are).
        prefill_chunk_tokens: the most positions of one prefill run in one forward.
        batch_wait_s: how long a round waits for the sessions that decoded in the last one (batching only).
        idle_timeout_s: sessions (and their streams) idle this long are closed.
        open_timeout_s: a stream that holds no session has this long to open one, counted from when it last held none.
        step_timeout_s: a step that waits this long for the compute thread is refused.
    """

    max_sessions: int = 64
    max_sessions_per_client: int | None = None
    max_step_tokens: int = 4096
    max_step_elements: int = 1 << 23
    max_context_tokens: int = 16384
    max_session_batch: int = 64
    kv_budget_bytes: int | None = None
    max_session_kv_bytes: int = 1 << 30
    max_message_bytes: int = 64 << 20
    max_batch_rows: int = 128
    max_batch_tokens: int = 512
    prefill_chunk_tokens: int = 256
    batch_wait_s: float = 0.025
    idle_timeout_s: float = 600.0
    open_timeout_s: float = 30.0
    step_timeout_s: float = 300.0

    def __post_init__(self) -> None:  # a limit of 0 (or a 0 s timeout) would serve nothing, or never end a round
        for name, value in vars(self).items():
            if value is None and name in ("kv_budget_bytes", "max_sessions_per_client"):
                continue
            if name.endswith("_s"):
                ok = isinstance(value, (int, float)) and (value >= 0 if name == "batch_wait_s" else value > 0)
                ok = ok and (math.isfinite(value) or name != "batch_wait_s")  # a round waits that long at most
                want = "a number of seconds" + (" (0 or more)" if name == "batch_wait_s" else " above 0")
            else:
                ok, want = type(value) is int and value >= 1, "an integer of at least 1"
            if not ok or isinstance(value, bool):
                raise ConfigError(f"server limit {name} must be {want}, got {value!r}")


@dataclass(eq=False)
class Session:
    id: int
    split_layer: int
    codec: Codec
    downlink: str
    downlink_topk: int
    downlink_dtype: torch.dtype | None = None  # None: as computed (exact)
    client: str = ""
    wire_dtypes: frozenset[torch.dtype] = frozenset(WIRE_DTYPES.values())  # what its packets may claim
    kv_bytes_per_position: int = 0  # what it is charged against the KV limits: per position of each sequence,
    kv_bytes_per_sequence: int = 0  # and per sequence whatever its length (a recurrent layer's state)
    cache: Any = None  # without a KV store: the session's own transformers cache
    rows: list[Row] = field(default_factory=list)  # with a KV store: one per sequence
    closed: bool = False
    mask: torch.Tensor | None = None  # [B, length] bool, the 2D attention mask so far
    batch: int = 0
    length: int = 0
    tokens: int = 0
    seq: int = -1  # the last step's sequence number
    kv_bytes: int = 0  # reserved for its cache: never less than what its cache holds
    kv_bytes_after: int = 0  # its reservation once the step in flight has cut its cache back (see `_admit`)
    last_used: float = field(default_factory=time.monotonic)
    busy: threading.Lock = field(default_factory=threading.Lock)  # one step at a time
    downlink_codec: Codec | None = None  # a lossy codec for hidden-state replies (None: exact)
    bare_replies: bool = False  # its replies through `downlink_codec` leave out what the edge already knows
    last_rows: torch.Tensor | None = None  # [B, d]: a chained codec's decoded rows at position length - 1
    codec_key: str = ""  # sessions with equal keys decode their packets together
    wait_skips: int = 0  # rounds the scheduler will not wait for its next step (it came too late when waited for)
    wait_backoff: int = 1  # how many rounds it skips after its next late step (doubles with each, halves when in time)


@dataclass
class ServerStats:
    """Counters, updated from every request thread under one lock."""

    sessions_opened: int = 0
    sessions_closed: int = 0
    tokens: int = 0
    steps: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    compute_s: float = 0.0  # wall time of model compute (one compute thread at a time)
    decode_compute_s: float = 0.0
    packet_decode_s: float = 0.0  # the compute and codec threads' time decoding packets (the codec's share)
    scheduler_cpu_s: float = 0.0  # CPU time of the compute and codec threads: packet decoding, forwards, replies, ...
    decode_compute_cpu_s: float = 0.0  # its CPU time in decode forwards (their wall time less preemption)
    packet_decode_cpu_s: float = 0.0
    prefill_compute_s: float = 0.0
    batches: int = 0  # decode forwards
    batched_rows: int = 0  # rows in them
    batch_retries: int = 0  # batched forwards that failed and ran again one step at a time
    late_steps: int = 0  # decode steps a round waited for in vain (`batch_wait_s`)
    errors: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: (dict(v) if k == "errors" else v) for k, v in self.__dict__.items() if not k.startswith("_")}


class Reply(Future[bytes]):
    """A request's reply-to-be (`SplitServer.submit`): done once the compute thread has answered its step."""

    def __init__(self, work: Future[tuple[bytes, int]] | None = None) -> None:
        super().__init__()
        self._work = work

    def withdraw(self) -> bool:
        """Withdraw a step the compute thread has not started: it is refused as timed out (True), or it has started
        and is answered soon (False)."""
        return self._work is not None and self._work.cancel()

    def cancel(self) -> bool:
        """A reply always comes (an ERROR at worst), so it is never cancelled: cancelling it (asyncio does, for a
        stream that ends while it waits) withdraws the step if it can."""
        self.withdraw()
        return False


def client_host(peer: str) -> str:
    """Whom a gRPC peer (`ipv4:10.0.0.7:5000`, `ipv6:%5B2001:db8::1%5D:5000`) counts as: one client, whatever
    connection it opens: its address less the port, an IPv6 one by its /64 (what one client holds); "" for an
    in-process caller ("" or "local"), which no per-client cap counts."""
    if not peer.startswith(("ipv4:", "ipv6:")):
        return "" if peer == "local" else peer
    address = urllib.parse.unquote(peer).partition(":")[2]
    host = address.rpartition(":")[0].strip("[]")
    return address_group(host) if host else peer


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 clients behind a NAT64 gateway, each by its IPv4 address


def address_group(host: str) -> str:
    """The client an IP address counts as: an IPv4 address itself (also one mapped into IPv6, or through NAT64), an
    IPv6 one by its /64 (a link-local one by itself: every link has the same /64); anything else as it is."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped or ip in NAT64:
                return str(ip.ipv4_mapped or ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return str(ip) if ip.is_link_local else str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return host
