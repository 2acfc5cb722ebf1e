"""Batch the decode steps of concurrent sessions into one forward pass.

One compute thread owns the model. Requests queue up while it works; each round it takes everything queued,
runs single-token steps of compatible sessions (same split layer and downlink, plain dynamic caches) together,
and everything else one by one. Batching merges the sessions' KV caches left-padded to a common length (the
padding is masked out), runs one forward, and hands each session its rows back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import torch

from .. import compat
from ..errors import ProtocolError

if TYPE_CHECKING:
    from .. import protocol
    from .engine import Session, SplitServer

logger = logging.getLogger(__name__)
_STOP = object()


class StepBatcher:
    """The compute thread of a `SplitServer` with batching on."""

    def __init__(self, server: SplitServer) -> None:
        self.server = weakref.proxy(server)  # the thread must not keep its server alive (`SplitServer` stops it)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="slicer-batcher", daemon=True)
        self._thread.start()

    def submit(
        self, session: Session, step: protocol.Step, hidden: torch.Tensor, timeout_s: float | None = None
    ) -> tuple[bytes, int]:
        """Queue a step and wait for its result; a step not started within `timeout_s` is withdrawn."""
        future: Future[tuple[bytes, int]] = Future()
        self._queue.put((session, step, hidden, future))
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            if future.cancel():  # not started: it never will be
                raise ProtocolError(f"no compute slot within {timeout_s} s", code="timeout") from None
            return future.result()  # already running: it finishes soon

    def stop(self, wait: bool = True) -> None:
        self._queue.put(_STOP)
        if wait:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(item is _STOP for item in items):
                for item in items:
                    if item is not _STOP and item[3].set_running_or_notify_cancel():
                        item[3].set_exception(ProtocolError("server shutting down", code="shutdown"))
                return
            items = [item for item in items if item[3].set_running_or_notify_cancel()]  # drop withdrawn steps
            if not items:
                continue
            started = time.perf_counter()
            self._run_round(items)
            self.server.stats.add(compute_s=time.perf_counter() - started)

    def _run_round(self, items: list[Any]) -> None:
        groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
        singles = []
        for item in items:
            session, step = item[0], item[1]
            if step.tokens == 1 and step.start > 0 and compat.cache_is_plain_dynamic(session.cache):
                groups[(session.split_layer, session.downlink)].append(item)
            else:
                singles.append(item)
        for group in groups.values():
            for chunk in _chunks(group, self.server.limits.max_batched_rows):
                if len(chunk) == 1:
                    singles.extend(chunk)
                elif not self._guard(chunk, lambda c=chunk: self._run_batch(c), report=False):
                    singles.extend(chunk)  # a failed batch is retried one by one: one bad session fails alone
        for item in singles:
            self._guard([item], lambda it=item: [self.server.run_one(*it[:3])])

    def _guard(self, items: list[Any], fn: Any, report: bool = True) -> bool:
        """Run `fn` for `items` and hand each its result; on failure report it to each (or, with `report=False`,
        leave them waiting for the caller's retry). The thread keeps serving either way."""
        try:
            results = fn()
        except Exception as exc:
            if report:
                for item in items:
                    item[3].set_exception(exc)
            return False
        for item, result in zip(items, results):
            item[3].set_result(result)
        return True

    @torch.inference_mode()
    def _run_batch(self, items: list[Any]) -> list[tuple[bytes, int]]:
        server = self.server
        for session, step, _, _ in items:
            server.prepare(session, step)
        lengths = [step.start for _, step, _, _ in items]
        longest = max(lengths)
        rows = [session.batch for session, _, _, _ in items]
        merged = compat.merge_caches([it[0].cache for it in items], lengths, server.model)
        mask = torch.cat(
            [
                _left_pad(
                    session.mask if session.mask is not None else torch.ones(b, length + 1, dtype=torch.bool),
                    longest + 1,
                )
                for (session, _, _, _), b, length in zip(items, rows, lengths)
            ]
        )
        positions = torch.cat([server.positions(step) for _, step, _, _ in items])
        hidden = torch.cat([h for _, _, h, _ in items])  # [rows, 1, d]
        session0 = items[0][0]
        final = server.run_model(session0.split_layer, session0.downlink, hidden, mask, positions, merged, 1)
        compat.split_cache(merged, [it[0].cache for it in items], rows, [longest - n for n in lengths])
        server.stats.add(batches=1, batched_rows=sum(rows))
        results, r0 = [], 0
        for (session, step, _, _), b in zip(items, rows):
            session.length = step.start + 1
            keep = 1 - step.need_from
            results.append(server.encode_output(session, final[r0 : r0 + b, final.shape[1] - keep :]))
            r0 += b
        return results


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([torch.zeros(mask.shape[0], width - mask.shape[1], dtype=torch.bool), mask.bool()], dim=1)


def _chunks(items: list[Any], max_rows: int) -> list[list[Any]]:
    out: list[list[Any]] = [[]]
    rows = 0
    for item in items:
        if out[-1] and rows + item[0].batch > max_rows:
            out.append([])
            rows = 0
        out[-1].append(item)
        rows += item[0].batch
    return out
