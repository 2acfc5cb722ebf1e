"""The compute thread of a `SplitServer`: one scheduler for prefill and decode (continuous batching).

Request threads (or the gRPC event loop) queue admitted steps, packets still encoded, and are answered through each
step's future. Each round the scheduler takes what has arrived, decodes the new packets (here rather than on request
threads, which would only fight this one over the GIL), then runs:

- every decode step that is ready (one position per row), as one forward per downlink kind, at most
  `max_batch_rows` rows each, shortest contexts first; a forward's rows attend over the longest row's context, so
  rows much longer than the rest run in a forward of their own (`SPLIT_PADDING`), and one long session cannot
  make every other session's step cost its length; sessions join and leave between any two rounds, at any split
  layer. Before a
  round it waits up to `batch_wait_s` for the sessions that decoded in the last one, so that clients answered
  together stay together rather than splitting into two alternating half batches; a session whose step came too
  late for that wait is not waited for in its next rounds (1, then 2, 4 ... 64 after each late step in a row), so a
  client that pauses just past the wait cannot make every round wait for it;
- prefill in chunks of at most `prefill_chunk_tokens` positions, from the oldest waiting prefill on, while the
  round's `max_batch_tokens` allow, so a long prompt cannot stall decoding; however many rows decode, the oldest
  prefill runs at least `prefill_chunk_tokens // 8` positions per round, so decoding cannot stall it either.

Encoder requests (one step each, no cache) run together when they share a split layer and a shape
(`encoder_batch.py`), at most `max_batch_rows` rows per forward.

Large codec work through a costly codec (`Codec.costly`: SLICER's) goes to a codec thread beside this one: a causal
LM's packet of more positions than an edge's prompt chunk is decoded there, and a reply of as many positions as a
whole forward asks for through such a downlink codec is encoded there (`OFFLOAD_PACKET_POSITIONS`,
`OFFLOAD_REPLY_POSITIONS`; a decode step's reply, one position a sequence, stays here), so that a client's costly
codec (a chained trellis reply of 12,288 positions took 6 s) cannot hold up every other session's rounds; the step
rejoins the rounds once decoded, and is answered from there once encoded. The codec's entropy coder runs in slices
(`codec.entropy.SLICE`): it holds the GIL through a call, which would stop this thread as surely.

A forward over several sessions that fails is retried one session at a time, so one bad session fails alone; once a
forward has run, a failure finishing one session's step (encoding its reply) fails that step alone.
Without a KV store (a model the store does not cover) one step runs at a time on its session's transformers cache, a
long one in chunks with other sessions' steps between them; where that cache cannot carry a forward on exactly
(`SplitServer.whole_steps`: Mamba, Moshi) a step runs whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import queue
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ProtocolError
from .encoder_batch import batch_key, run_encoder_batch
from .state import log_internal

if TYPE_CHECKING:
    from .. import protocol
    from .engine import SplitServer
    from .state import Session

logger = logging.getLogger(__name__)
SPLIT_PADDING = 8192  # positions of padding (rows x context) that make a decode row run in a forward of its own
# (about what a forward's fixed cost, reading every weight once, is worth against attending over padded keys)
ENCODER_SPLIT_PADDING = 256  # the same for encoder requests, whose padded positions run every layer's matmuls
# a costly codec's packet or reply of this many positions is coded aside: packets above an edge's prompt chunk (256
# positions by default: a thread hop costs an honest prefill about a quarter more CPU), replies any a forward asks
# for whole (generate() asks for one row)
OFFLOAD_PACKET_POSITIONS, OFFLOAD_REPLY_POSITIONS = 512, 32
IDLE_TRIM_S = 5.0  # idle this long, the compute thread gives the KV pools' unused blocks back (`KVStore.trim`)
IDLE_HEAP_TRIM_S = 60.0  # and, while it stays idle, the C heap's free pages this often
_STOP = object()


@dataclass(eq=False)
class Work:
    """One admitted step, in the scheduler's hands until its last position has run."""

    session: Session
    step: protocol.Step
    packet: bytes  # as the codec decodes it
    chain_from: torch.Tensor | None = None  # the rows a chained packet continues from
    future: Future[tuple[bytes, int]] = field(default_factory=Future)  # its reply payload and kind
    hidden: torch.Tensor | None = None  # [b, t, d], once decoded
    reply_given: torch.Tensor | None = None  # the decoded rows a predicting downlink codes the reply against
    done: int = 0  # positions run so far
    outputs: list[torch.Tensor] = field(default_factory=list)  # the kept positions' outputs, chunk by chunk
    aside: bool = False  # on the codec thread (its packet decoding, or its reply encoding)

    @property
    def rows(self) -> int:
        return self.step.batch

    def positions(self, a: int, b: int) -> torch.Tensor:
        """`[rows, b - a]` position ids of the step's positions `a..b-1` (sent, or counted from its start)."""
        step = self.step
        positions = step.positions[:, a:b] if step.positions is not None else step.start + torch.arange(a, b)
        return positions.expand(self.rows, -1)

    def chunk(self, tokens: int) -> Chunk:
        """The next `tokens` positions of this step."""
        a, b = self.done, self.done + tokens
        keep = max(0, b - max(self.step.need_from, a))
        return Chunk(self, self.hidden[:, a:b], self.positions(a, b), keep)


@dataclass(eq=False)
class Chunk:
    """Positions of one work item that run in one forward."""

    work: Work
    hidden: torch.Tensor  # [b, c, d]
    positions: torch.Tensor  # [b, c]
    keep: int  # outputs wanted for the last `keep` positions

    @property
    def session(self) -> Session:
        return self.work.session


class Scheduler:
    """Runs every model forward of a `SplitServer` on one thread.

    Args:
        server: the server (held weakly: the thread must not keep it alive).
        batching: run the decode steps of concurrent sessions together (off: one session per forward).
    """

    def __init__(self, server: SplitServer, batching: bool) -> None:
        self.server = weakref.proxy(server)
        self.batching = batching
        self._queue: queue.Queue[Any] = queue.Queue()
        self._decoded_last: set[Session] = set()  # sessions of the last round's decode forwards
        self._cpu_mark = 0.0  # this thread's CPU time when it was last added to the stats
        self._codec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slicer-codec")
        self._aside: set[Work] = set()  # the steps on the codec thread
        self._handoff = threading.Lock()  # between the codec thread's hand-back and a stop
        self._stopped = False
        self._clock: int | None = None  # this thread's CPU clock while it runs (where the platform has them)
        self._thread = threading.Thread(target=self._loop, name="slicer-scheduler", daemon=True)
        self._thread.start()

    def submit(self, work: Work) -> None:
        """Queue a step; its future is answered once it has run (a step still queued may be withdrawn by cancelling
        its future)."""
        self._queue.put(work)

    def release(self, session: Session) -> None:
        """Give back what a closed session holds in the KV store (on this thread: no forward is using it then)."""
        self._queue.put(("release", session))

    def stop(self, wait: bool = True) -> None:
        self._queue.put(_STOP)
        if wait and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # no per-thread CPU clocks on this platform
            self._clock = time.pthread_getcpuclockid(threading.get_ident())
        try:
            self._rounds()
        finally:
            self._clock = None  # a thread that has ended has no clock to read (its id may be another's next)

    def _rounds(self) -> None:
        pending: list[Work] | None = []
        while pending is not None:
            self._taken: list[Any] = []  # what this cycle took from the queue, until it is in `pending`
            try:
                pending = self._cycle(pending)
                self._account()
            except ReferenceError:  # the server is gone
                return
            except Exception as exc:  # a bug outside every step's guard: its steps fail, the thread serves on
                logger.exception("scheduler round failed; its steps are refused")
                taken = [i for i in self._taken if isinstance(i, Work)]
                taken += [i[1] for i in self._taken if isinstance(i, tuple) and i[0] == "decoded"]
                for work in pending + taken:
                    _fail(work, exc)
                pending = []

    def _cycle(self, pending: list[Work]) -> list[Work] | None:
        """Take what has arrived (waiting for it when idle), then run one round; None once stopped."""
        items = self._taken
        if not pending:
            try:
                items.append(self._queue.get(timeout=IDLE_TRIM_S))
            except queue.Empty:  # idle: what a burst left in the pools goes back, then wait for work
                self._trim()
                while True:
                    try:
                        items.append(self._queue.get(timeout=IDLE_HEAP_TRIM_S))
                        break
                    except queue.Empty:  # what other threads freed meanwhile (gRPC's, a refused message's) too
                        _trim_heap()
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._gather(items, pending)
        for index, item in enumerate(items):
            if item is _STOP:
                self._stop(pending, items[index + 1 :])
                return None
            if isinstance(item, Work):
                if item.future.set_running_or_notify_cancel():  # withdrawn steps are dropped
                    pending.append(item)
            elif item[0] == "decoded":  # back from the codec thread
                item[1].aside = False
                pending.append(item[1])
            else:
                self.server.release_session(item[1])
        for work in [w for w in pending if w.session.closed]:
            _fail(work, ProtocolError(f"session {work.session.id} was closed", code="unknown_session"))
        pending = [w for w in pending if not w.session.closed]
        heavy = [w for w in pending if w.hidden is None and self._costly_packet(w)]
        pending = [w for w in pending if w not in heavy]  # out of the rounds before the codec thread has them
        if heavy:  # one at a time, each back in the rounds once decoded
            self._set_aside(heavy, self._decode_aside)
        fresh = [w for w in pending if w.hidden is None]
        if fresh:
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                self.server.decode_packets(fresh)
            except Exception as exc:  # a bug (a bad packet fails its own step): not the thread
                log_internal(logger, f"decoding {len(fresh)} packets failed", exc)
                for work in fresh:
                    _fail(work, exc)
            self._account(
                packet_decode_s=time.perf_counter() - started, packet_decode_cpu_s=time.thread_time() - cpu_started
            )
            pending = [w for w in pending if not w.future.done()]
        return self._round(pending) if pending else pending

    def _gather(self, items: list[Any], pending: list[Work]) -> None:
        """Wait a moment (`batch_wait_s` at most) for the next steps of the sessions that decoded last round, so
        they run in one forward rather than in alternating halves; whatever else arrives meanwhile goes to `items`
        too."""
        if not self.batching:
            return
        present = {w.session for w in pending} | {i.session for i in items if isinstance(i, Work)}
        missing = set()
        for session in {s for s in self._decoded_last if not s.closed} - present:
            if session.wait_skips > 0:  # late when last waited for: not waited for this round
                session.wait_skips -= 1
            else:
                missing.add(session)
        awaited = set(missing)
        deadline = time.monotonic() + self.server.limits.batch_wait_s
        while missing and (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            items.append(item)
            if item is _STOP:
                return
            if isinstance(item, Work):
                missing.discard(item.session)
        for session in awaited - missing:  # in time
            session.wait_backoff = max(1, session.wait_backoff // 2)
        for session in missing:  # too late: not waited for in its next rounds, longer each time in a row
            session.wait_skips, session.wait_backoff = session.wait_backoff, min(64, 2 * session.wait_backoff)
        if missing:
            self.server.stats.add(late_steps=len(missing))

    def _round(self, pending: list[Work]) -> list[Work]:
        server = self.server
        if server.encoder_kind:
            groups: dict[tuple, list[Work]] = defaultdict(list)
            for work in pending:
                groups[batch_key(server, work)].append(work)
            max_rows = server.limits.max_batch_rows if self.batching else 1
            for group in groups.values():  # texts of one length together: a forward pads its rows to its longest
                if self.batching:
                    similars = _by_length(group, lambda w: w.step.tokens, ENCODER_SPLIT_PADDING)
                else:
                    similars = [group]
                for similar in similars:  # a forward of at most a step's values (the activations scale with it)
                    for works in _by_rows(similar, max_rows, server.limits.max_step_elements, _encoder_row_values):
                        self._run_batch(works, lambda w: w, lambda ws: run_encoder_batch(server, ws), prefill=False)
            return []
        limits = server.limits
        if server.store is None:  # one step at a time on its own cache, a chunk a round: others' steps run between
            work, rest = pending[0], pending[1:]
            whole = server.whole_steps  # its cache cannot carry a forward on exactly
            tokens = work.step.tokens if whole else min(work.step.tokens - work.done, limits.prefill_chunk_tokens)
            self._run([work.chunk(tokens)], prefill=work.step.tokens > 1)
            return rest if work.future.done() or work.aside else [*rest, work]
        decode = [w for w in pending if w.step.tokens == 1]
        prefill = [w for w in pending if w.step.tokens > 1]
        by_kind: dict[bool, list[Work]] = defaultdict(list)
        for work in decode:
            by_kind[server.wants_logits(work.session)].append(work)
        self._decoded_last = {w.session for w in decode}
        max_rows = limits.max_batch_rows if self.batching else 1
        for group in by_kind.values():
            for similar in _by_length(group, lambda w: w.session.length, SPLIT_PADDING) if self.batching else [group]:
                for works in _by_rows(similar, max_rows):
                    self._run([w.chunk(1) for w in works], prefill=False)
        budget = limits.max_batch_tokens - sum(w.rows for w in decode)
        least = max(1, limits.prefill_chunk_tokens // 8)  # positions the oldest prefill moves on, however busy
        for work in prefill:  # oldest first; the others within what the round has left
            floor = max(1, least // work.rows) if work is prefill[0] else 0  # (per sequence: `least` in all)
            tokens = min(work.step.tokens - work.done, limits.prefill_chunk_tokens, max(budget // work.rows, floor))
            if tokens < 1:  # too many sequences for what is left: one with fewer may still fit
                if budget <= 0:
                    break
                continue
            self._run([work.chunk(tokens)], prefill=True)
            budget -= tokens * work.rows
        return [w for w in pending if not w.future.done() and not w.aside]

    def _run(self, chunks: list[Chunk], prefill: bool) -> None:
        """One forward over `chunks`; a failure is retried chunk by chunk, and then fails that step only."""
        self._run_batch(chunks, lambda c: c.work, self._forward, prefill)

    def _run_batch(self, items: list[Any], work_of: Any, forward: Any, prefill: bool) -> None:
        """`forward(items)` (one reply or None per item, in order), retried one item at a time if it fails for
        several, so a bad item fails alone; then the time and rows go into the server's stats."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        done: list[tuple[float, float]] = []  # when the last forward returned: handing on its replies wakes the
        # event loop, which may take the GIL and send them before this thread reads the clock again

        def timed(part: list[Any]) -> Any:
            try:
                return forward(part)
            finally:
                done.append((time.perf_counter(), time.thread_time()))

        works = [work_of(item) for item in items]
        forwards = 1
        failure = self._guard(works, lambda: timed(items), report=len(items) == 1)
        if failure is not None and len(items) > 1:
            logger.warning("a forward of %d steps failed (%r); running them one at a time", len(items), failure)
            self.server.stats.add(batch_retries=1)
            for item in items:
                self._guard([work_of(item)], lambda i=item: timed([i]))
            forwards += len(items)
        (ended, cpu_ended), rows = done[-1], sum(w.rows for w in works)
        elapsed, cpu = ended - started, cpu_ended - cpu_started
        if prefill:
            self._account(compute_s=elapsed, prefill_compute_s=elapsed)
        else:
            self._account(compute_s=elapsed, decode_compute_s=elapsed, decode_compute_cpu_s=cpu)
            self.server.stats.add(batches=forwards, batched_rows=rows)

    def _forward(self, chunks: list[Chunk]) -> list[tuple[bytes, int] | Exception | None]:
        """One forward over `chunks`: if it fails, nothing has moved on (it may be retried); once it has run,
        each chunk is done, and a failure finishing one step (encoding its reply) is that step's alone."""
        server = self.server
        for chunk in chunks:
            if chunk.work.done == 0:
                server.begin_step(chunk.session, chunk.work.step)
        if server.store is not None:
            outputs = server.forward_rows(chunks)
        else:  # one chunk (`_round`), on its session's own cache
            outputs = [server.run_chunk(chunk) for chunk in chunks]
        return [self._advance(chunk, output) for chunk, output in zip(chunks, outputs)]

    def _advance(self, chunk: Chunk, output: torch.Tensor) -> tuple[bytes, int] | Exception | None:
        """Count a chunk as run: None while its step has positions left, then the step's reply or its error."""
        work = chunk.work
        work.done += chunk.hidden.shape[1]
        work.outputs.append(output)
        if work.done < work.step.tokens:
            return None
        final = torch.cat(work.outputs, 1)
        each = work.step.tokens - work.step.need_from  # outputs of each sequence
        # a decode step's reply (one output a sequence, at most max_session_batch) stays: set aside, it would wait
        # behind another client's large packet
        if each > 1 and self._costly(work.session.downlink_codec, work.rows * each, packet=False):
            self.server.end_step(work)
            self._set_aside([work], self._encode_aside, final)
            return None
        try:
            return self.server.finish_step(work, final)
        except Exception as exc:
            return exc

    # ---------------------------------------------------------------- the codec thread
    def _costly(self, codec: Any, positions: int, packet: bool) -> bool:
        """Whether `positions` rows of `codec` (a packet's, or a reply's) are coded on the codec thread: a causal
        LM's (an encoder's requests are batched as they come, and decoded together), through a costly codec."""
        least = OFFLOAD_PACKET_POSITIONS if packet else OFFLOAD_REPLY_POSITIONS
        return codec is not None and codec.costly and positions >= least and not self.server.encoder_kind

    def _costly_packet(self, work: Work) -> bool:
        return self._costly(work.session.codec, work.rows * work.step.tokens, packet=True)

    def _set_aside(self, works: list[Work], job: Callable[..., None], *args: Any) -> None:
        """Run `job(works, *args)` on the codec thread (`works` are out of the rounds until they come back, if
        ever); its CPU time is counted as this thread's is."""
        for work in works:
            work.aside = True
        with self._handoff:
            if self._stopped:
                for work in works:
                    _fail(work, _shutting_down())
                return
            self._aside.update(works)

        def run() -> None:
            cpu = time.thread_time()
            try:
                job(works, *args)
            except Exception as exc:  # a bug: the steps fail, not the thread
                for work in works:
                    _fail(work, exc)
            finally:
                self._aside.difference_update(works)
                self.server.stats.add(scheduler_cpu_s=time.thread_time() - cpu)

        self._codec.submit(run)

    def _decode_aside(self, works: list[Work]) -> None:
        """Decode large packets one at a time, handing each step back to the rounds as it is decoded; once the
        scheduler has stopped, the rest are not decoded (the process waits for this thread at exit)."""
        for work in works:
            if self._stopped or work.session.closed:  # nobody waits for a closed session's step: no work for it
                _fail(work, _shutting_down() if self._stopped else _closed(work))
                continue
            if not work.future.done():
                started, cpu = time.perf_counter(), time.thread_time()
                self.server.decode_packets([work])
                self.server.stats.add(
                    packet_decode_s=time.perf_counter() - started, packet_decode_cpu_s=time.thread_time() - cpu
                )
            with self._handoff:  # never into a queue the compute thread has stopped reading
                if work.future.done():
                    continue
                if self._stopped:
                    _fail(work, _shutting_down())
                else:
                    self._queue.put(("decoded", work))

    def _encode_aside(self, works: list[Work], final: torch.Tensor) -> None:
        """Encode a large reply and answer its step with it."""
        (work,) = works
        if work.session.closed:
            _fail(work, _closed(work))
        else:
            _answer(work, self.server.encode_output(work.session, final, work.reply_given))

    def _stop(self, pending: list[Work], after: list[Any]) -> None:
        """Refuse every step still held: in the rounds, on the codec thread, or queued (after `_STOP` too)."""
        with self._handoff:
            self._stopped = True
        self._codec.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                after.append(self._queue.get_nowait())
            except queue.Empty:
                break
        queued = [i for i in after if isinstance(i, Work) and i.future.set_running_or_notify_cancel()]
        queued += [i[1] for i in after if isinstance(i, tuple) and i[0] == "decoded"]
        for work in pending + list(self._aside) + queued:
            _fail(work, _shutting_down())

    def _trim(self) -> None:
        store = self.server.store
        if store is not None and (freed := store.trim()):
            logger.info("idle: the KV pools gave back %s bytes", f"{freed:,}")
        _trim_heap()

    def _account(self, **counters: float) -> None:
        """Add `counters` to the server's stats together with the CPU time this thread has used since it last did:
        a reader never sees a part of that time (a forward's, a decode's) without the whole."""
        now = time.thread_time()
        mark, self._cpu_mark = self._cpu_mark, now  # moved first: a reader may count a delta twice, never miss it
        self.server.stats.add(scheduler_cpu_s=now - mark, **counters)

    def unaccounted_cpu_s(self) -> float:
        """CPU time this thread has used that the stats do not hold yet (the round it is in), where the platform
        lets another thread read it (0 elsewhere)."""
        clock = self._clock  # taken by the thread itself: asking for an ended thread's clock crashes the process
        if clock is None:
            return 0.0
        try:
            return max(0.0, time.clock_gettime(clock) - self._cpu_mark)
        except OSError:  # the thread ended since
            return 0.0

    def _guard(self, works: list[Work], fn: Any, report: bool = True) -> Exception | None:
        """Run `fn` and hand each finished step its reply (or its own error); if `fn` fails, report it to each
        (or, with `report=False`, leave them for a retry) and return the failure. The thread serves on either way."""
        try:
            results = fn()
        except Exception as exc:
            if report:
                for work in works:
                    _fail(work, exc)
            return exc
        for work, result in zip(works, results):
            if isinstance(result, Exception):
                _fail(work, result)
            elif result is not None:
                _answer(work, result)
        return None


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system: glibc keeps what a large step freed (1.5 GB of a server's
    RSS after one of a tiny Mamba's, until the process ended)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _answer(work: Work, result: tuple[bytes, int]) -> None:
    """Answer a step, unless it has its answer already (a refusal as the server stopped, say)."""
    with contextlib.suppress(InvalidStateError):
        work.future.set_result(result)


def _fail(work: Work, exc: BaseException) -> None:
    """Fail a step, unless it has its answer already."""
    with contextlib.suppress(InvalidStateError):
        work.future.set_exception(exc)


def _shutting_down() -> ProtocolError:
    return ProtocolError("server shutting down", code="shutdown")


def _closed(work: Work) -> ProtocolError:
    return ProtocolError(f"session {work.session.id} was closed", code="unknown_session")


def _by_length(works: list[Work], length: Callable[[Work], int], padding: int) -> list[list[Work]]:
    """`works` by `length` (a session's context, an encoder request's tokens), shortest first, cut where the next
    would pad the rows before it to its length by more than `padding` positions in all."""
    out: list[list[Work]] = [[]]
    rows = held = 0  # the rows of the forward being filled, and the positions they hold
    for work in sorted(works, key=length):
        if out[-1] and rows * length(work) - held > padding:
            out.append([])
            rows = held = 0
        out[-1].append(work)
        rows, held = rows + work.rows, held + work.rows * length(work)
    return out


def _encoder_row_values(work: Work) -> int:
    return work.step.tokens * work.hidden.shape[-1]  # positions x width (decoded by now)


def _by_rows(
    works: list[Work], max_rows: int, max_values: int | None = None, row_values: Callable[[Work], int] | None = None
) -> list[list[Work]]:
    """Consecutive groups of at most `max_rows` rows and, given `max_values`, at most that many values as a forward
    pads them (its rows x the most `row_values` of one); a step larger than that runs alone."""
    out: list[list[Work]] = [[]]
    rows = largest = 0
    for work in works:
        values = row_values(work) if row_values else 0
        more, wider = rows + work.rows, max(largest, values)
        if out[-1] and (more > max_rows or max_values is not None and more * wider > max_values):
            out.append([])
            more, wider = work.rows, values
        out[-1].append(work)
        rows, largest = more, wider
    return out
