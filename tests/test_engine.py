"""The engine in-process: sizes are checked before allocation, locks never block session bookkeeping, waits are
bounded, counters are exact under threads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_model
from live import gate_rounds, wait_for

from slicer_hf import CodecError, ConfigError, ProtocolError, TransportError, build_codec, protocol
from slicer_hf.codec import codec_from_spec
from slicer_hf.codec.bits import Reader, write_varint
from slicer_hf.config import SlicerConfig
from slicer_hf.link import StepLimits, SuffixLink, open_request
from slicer_hf.server import ServerLimits, SplitServer
from slicer_hf.server.grpc_server import _IdleTimer, serve
from slicer_hf.server.state import ServerStats
from slicer_hf.transport.grpc import STATS_METHOD, GrpcTransport


@pytest.fixture
def engine():
    def make(batching=False, **limits):
        return SplitServer(tiny_model("llama"), limits=ServerLimits(**limits), batching=batching)

    return make


def open_session(server: SplitServer, config: SlicerConfig | None = None) -> int:
    config = config or SlicerConfig(codec="identity")
    body = open_request(config, server.model.config, "tiny", 2, build_codec(config))
    reply = server.handle(protocol.encode_json(protocol.OPEN, body))
    protocol.raise_if_error(reply)
    return protocol.decode_json(reply)["session"]


def step(
    server: SplitServer, session: int, seq: int, start: int = 0, tokens: int = 3, codec=None, seed: int | None = None
) -> bytes:
    """A step of `tokens` random hidden states (seeded by `seed`, if given) of one sequence."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, server.hidden_size, generator=generator)
    payload = (codec or build_codec("identity")).encode(hidden)
    return server.handle(protocol.encode_step(protocol.Step(session, seq, start, 1, tokens, 0, payload)))


def test_the_step_header_is_checked_before_the_mask_is_built():
    message = protocol.encode_step(
        protocol.Step(1, 1, 0, 4096, (1 << 24) - 1, 0, b"", mask=torch.ones(1, 1, dtype=torch.bool))
    )
    seen = []

    def refuse(header):
        seen.append((header.batch, header.tokens, header.mask))
        raise ProtocolError("refused", code="too_large")

    # the encoder sized the message from the mask it had; rewrite the claim the way an attacker would
    with pytest.raises(ProtocolError, match="refused"):
        protocol.decode_step(message, check=refuse)
    assert seen == [(4096, (1 << 24) - 1, None)]


def test_codec_packets_are_checked_against_the_expected_shape_and_dtype_first():
    codec = build_codec("slicer")
    packet = codec.encode(torch.randn(2, 3, 64))
    assert codec.decode(packet, expect_shape=(2, 3, 64)).shape == (2, 3, 64)
    with pytest.raises(CodecError, match="claims shape"):
        codec.decode(packet, expect_shape=(1, 3, 64))
    with pytest.raises(CodecError, match="claims dtype"):
        codec.decode(packet, expect_dtypes=frozenset({torch.bfloat16}))
    with pytest.raises(CodecError, match="may not set max_elements"):
        codec_from_spec({**codec.spec(), "max_elements": 10**13})
    assert codec_from_spec(codec.spec(), max_elements=99).max_elements == 99


def test_top_k_replies_are_checked_against_the_asked_shape():
    values, indices = torch.randn(1, 2, 4), torch.randint(0, 100, (1, 2, 4))
    body = protocol.encode_topk_logits(values, indices, 100)
    assert protocol.decode_topk_logits(body, (1, 2, 100), max_k=4).shape == (1, 2, 100)
    for expect, k in (((1, 3, 100), 4), ((1, 2, 101), 4), ((1, 2, 100), 3)):
        with pytest.raises(ProtocolError, match="expected"):
            protocol.decode_topk_logits(body, expect, max_k=k)
    empty = protocol.encode_topk_logits(torch.zeros(1, 2, 0), torch.zeros(1, 2, 0, dtype=torch.long), 100)
    with pytest.raises(ProtocolError, match="1 <= k"):  # no logit at all: every probability NaN
        protocol.decode_topk_logits(empty, (1, 2, 100), max_k=4)


def test_a_busy_model_never_blocks_open_and_close(engine):
    server = engine(step_timeout_s=0.3)
    session, busy = open_session(server), open_session(server)
    stuck, release, _ = gate_rounds(server)
    running = threading.Thread(target=lambda: step(server, busy, 1))  # a long forward
    running.start()
    try:
        assert stuck.wait(10)
        other = open_session(server)
        assert server.close_session(other)
        assert running.is_alive()  # both answered while the forward still held the model
        reply = step(server, session, 1)
        with pytest.raises(ProtocolError, match="no compute slot") as info:
            protocol.raise_if_error(reply)
        assert info.value.code == "timeout"
    finally:
        release.set()
        running.join()
    session = open_session(server)
    protocol.raise_if_error(step(server, session, 1))


def test_a_step_that_waits_too_long_is_withdrawn(engine):
    server = engine(step_timeout_s=0.3, batching=True)
    stuck, release, ran = gate_rounds(server)
    first, second = open_session(server), open_session(server)
    waiting = threading.Thread(target=lambda: step(server, first, 1))
    waiting.start()
    assert stuck.wait(10)
    reply = step(server, second, 1)  # queued behind a round that does not end in time
    with pytest.raises(ProtocolError, match="no compute slot"):
        protocol.raise_if_error(reply)
    release.set()
    waiting.join()
    server.shutdown()
    assert ran == [1]  # the withdrawn step never ran


def test_a_split_model_that_is_dropped_closes_its_grpc_session():
    """gRPC's threads keep the context they start in; the model's split plan must not be in it."""
    import copy
    import gc
    import weakref

    from slicer_hf import SlicerModelForCausalLM

    ref = tiny_model("llama")
    server = SplitServer(copy.deepcopy(ref))
    running = serve(server, port=0)
    config = SlicerConfig(codec="identity", split_layer=2)
    try:
        model = SlicerModelForCausalLM.from_model(
            copy.deepcopy(ref), config, transport=f"grpc://127.0.0.1:{running.port}"
        )
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
        assert len(server.sessions) == 1
        alive = weakref.ref(model)
        del model
        gc.collect()
        assert alive() is None  # and so its weights are freed
        assert wait_for(lambda: not server.sessions)
    finally:
        running.stop()
        server.shutdown()


def test_over_grpc_a_step_the_busy_compute_thread_has_not_started_is_withdrawn(engine):
    server = engine(step_timeout_s=0.3, batching=True)
    running = serve(server, port=0)
    url = f"grpc://127.0.0.1:{running.port}"
    body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))

    def session_step(transport: GrpcTransport) -> bytes:
        session = protocol.decode_json(transport.request(protocol.encode_json(protocol.OPEN, body)))["session"]
        payload = build_codec("identity").encode(torch.randn(1, 3, server.hidden_size))
        return transport.request(protocol.encode_step(protocol.Step(session, 1, 0, 1, 3, 0, payload)))

    first, second = GrpcTransport([url], timeout_s=30), GrpcTransport([url], timeout_s=30)
    try:
        stuck, release, ran = gate_rounds(server)
        waiting = threading.Thread(target=lambda: protocol.raise_if_error(session_step(first)))
        waiting.start()
        assert stuck.wait(10)
        with pytest.raises(ProtocolError, match="no compute slot") as info:
            protocol.raise_if_error(session_step(second))  # queued behind a round that does not end in time
        assert info.value.code == "timeout" and waiting.is_alive()  # answered while that round still ran
        release.set()
        waiting.join(10)
        assert ran == [1] and len(server.sessions) == 1  # the withdrawn step never ran; its session is closed
    finally:
        release.set()
        first.close()
        second.close()
        running.stop()
        server.shutdown()


def test_a_step_whose_client_leaves_while_it_is_queued_ends_quietly_not_as_a_timeout(engine, caplog):
    """The step was withdrawn before the stream's session closed: a timeout in the counters and a warning."""
    import queue

    import grpc

    server = engine(batching=True)
    running = serve(server, port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stuck, release, ran = gate_rounds(server)
    holder = open_session(server)
    try:
        held = threading.Thread(target=lambda: step(server, holder, 1))  # a round that keeps the compute thread
        held.start()
        assert stuck.wait(10)
        requests = queue.Queue()
        call = channel.stream_stream(protocol.SESSION_METHOD)(iter(requests.get, None))
        body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
        requests.put(protocol.encode_json(protocol.OPEN, body))
        session = protocol.decode_json(next(call))["session"]
        payload = build_codec("identity").encode(torch.randn(1, 3, server.hidden_size))
        requests.put(protocol.encode_step(protocol.Step(session, 1, 0, 1, 3, 0, payload)))
        assert wait_for(lambda: server.scheduler._queue.qsize() == 1)
        call.cancel()  # its client leaves
        assert wait_for(lambda: session not in server.sessions)
        release.set()
        held.join(10)
        assert ran[0] == 1 and server.stats_dict()["errors"] == {}
        assert not [r for r in caplog.records if r.name == "slicer_hf.server.engine" and r.levelname == "WARNING"]
    finally:
        release.set()
        channel.close()
        running.stop()
        server.shutdown()


def test_at_shutdown_a_queued_step_is_refused_as_shutdown_not_as_an_unknown_session(engine, caplog):
    """Sessions were closed before the queue was refused: the client replayed on the stopping server first."""
    server = engine(batching=True)
    stuck, release, _ = gate_rounds(server)
    first, second = open_session(server), open_session(server)
    replies = {}
    running = threading.Thread(target=lambda: replies.update(first=step(server, first, 1)))
    running.start()
    assert stuck.wait(10)
    queued = threading.Thread(target=lambda: replies.update(second=step(server, second, 1)))
    queued.start()
    assert wait_for(lambda: server.scheduler._queue.qsize() == 1)
    stopping = threading.Thread(target=server.shutdown)
    stopping.start()
    assert wait_for(lambda: server._stopped.is_set())
    release.set()
    for thread in (running, queued, stopping):
        thread.join(10)
    protocol.raise_if_error(replies["first"])  # the step that ran is answered
    with pytest.raises(ProtocolError) as refused:
        protocol.raise_if_error(replies["second"])
    assert refused.value.code == "shutdown" and not server.sessions
    assert not [r for r in caplog.records if r.name == "slicer_hf.server.engine" and r.levelname == "WARNING"]


def test_an_infinite_step_timeout_waits_without_one(engine):
    server = engine(step_timeout_s=float("inf"))  # Future.result(timeout=inf) had raised OverflowError
    protocol.raise_if_error(step(server, open_session(server), 1))
    server.shutdown()


def test_a_packet_whose_decode_runs_out_of_memory_fails_its_own_step_as_internal_and_no_other(engine, monkeypatch):
    """A machine error in one packet's decode had failed every step decoded in its round."""
    from slicer_hf.codec import ops

    server = engine(batching=True)
    stuck, release, _ = gate_rounds(server)
    config = SlicerConfig(codec="slicer")
    holder, big, small = open_session(server), open_session(server, config), open_session(server, config)
    dequantize = ops.dequantize_rows

    def out_of_memory_at_64_rows(positions, *args, **kwargs):
        if positions.shape[0] >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return dequantize(positions, *args, **kwargs)

    monkeypatch.setattr(ops, "dequantize_rows", out_of_memory_at_64_rows)
    replies = {}

    def send(name, session, tokens, codec):
        payload = codec.encode(torch.randn(1, tokens, server.hidden_size))
        replies[name] = server.handle(protocol.encode_step(protocol.Step(session, 1, 0, 1, tokens, 0, payload)))

    threads = [threading.Thread(target=send, args=("holder", holder, 1, build_codec("identity")))]
    threads[0].start()
    assert stuck.wait(10)
    for name, session, tokens in (("big", big, 64), ("small", small, 3)):  # queued for one round
        threads.append(threading.Thread(target=send, args=(name, session, tokens, build_codec(config))))
        threads[-1].start()
    assert wait_for(lambda: server.scheduler._queue.qsize() == 2)
    release.set()
    for thread in threads:
        thread.join(20)
    protocol.raise_if_error(replies["small"])
    with pytest.raises(ProtocolError, match="OutOfMemoryError") as refused:
        protocol.raise_if_error(replies["big"])
    assert refused.value.code == "internal" and sorted(server.sessions) == sorted([holder, small])
    server.shutdown()


def test_steps_of_one_session_do_not_overlap_and_seq_only_grows(engine):
    server = engine()
    session = open_session(server)
    protocol.raise_if_error(step(server, session, 5))
    with pytest.raises(ProtocolError, match="replayed or reordered"):
        protocol.raise_if_error(step(server, session, 5, start=3, tokens=1))
    assert session not in server.sessions  # a refused step closes its session


def test_counters_are_exact_under_threads():
    stats = ServerStats()

    def hammer():
        for _ in range(5000):
            stats.add(tokens=1, bytes_in=2)
            stats.error("x")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap["tokens"] == 40000 and snap["bytes_in"] == 80000 and snap["errors"] == {"x": 40000}


def decode_together(server, blocking, sessions, meanwhile=lambda: None) -> tuple[dict[int, bytes], list[int]]:
    """Hold the compute thread on a decode step of `blocking`, queue one of each of `sessions` behind it (they then
    run in one round), run `meanwhile`, and let it all go: each session's reply, and the sizes of the rounds run.
    Every session has prefilled 3 positions (step 1)."""
    stuck, release, rounds = gate_rounds(server)
    blocker = threading.Thread(target=lambda: step(server, blocking, 2, start=3, tokens=1))
    blocker.start()
    assert stuck.wait(10)
    replies = {}
    waiting = [
        threading.Thread(target=lambda s=s: replies.__setitem__(s, step(server, s, 2, start=3, tokens=1, seed=s)))
        for s in sessions
    ]
    for t in waiting:
        t.start()
    assert wait_for(lambda: server.scheduler._queue.qsize() >= len(sessions))  # all queued behind the held round
    meanwhile()
    release.set()
    for t in [blocker, *waiting]:
        t.join(10)
    return replies, rounds


def final_rows(reply: bytes) -> torch.Tensor:
    """The final hidden states a reply of the identity downlink holds."""
    return build_codec("identity").decode(protocol.decode_reply(reply)[2])


def alone(engine, seed: int) -> torch.Tensor:
    """What a session's decode step (seeded `seed`, after a prefill seeded `-seed`) gets on a server of its own."""
    server = engine()
    session = open_session(server)
    protocol.raise_if_error(step(server, session, 1, seed=-seed))
    rows = final_rows(step(server, session, 2, start=3, tokens=1, seed=seed))
    server.shutdown()
    return rows


def test_a_step_past_what_the_session_holds_is_refused_as_state_lost(engine):
    """The server holds 3 positions; a step at 4 would leave position 3 out of every later attention."""
    server = engine()
    session = open_session(server)
    protocol.raise_if_error(step(server, session, 1, tokens=3))
    with pytest.raises(ProtocolError, match="starts at position 4 but the session holds 3") as refused:
        protocol.raise_if_error(step(server, session, 2, start=4, tokens=1))
    assert refused.value.code == "state_lost" and session not in server.sessions
    server.shutdown()


def test_a_session_with_a_step_in_flight_is_not_idle(engine):
    """The idle reaper closes sessions quiet for idle_timeout_s; one whose step is running (a long forward, or one
    queued behind it) has not gone quiet, however long ago its client last sent."""
    server = engine(batching=True, idle_timeout_s=0.2)
    session = open_session(server)
    protocol.raise_if_error(step(server, session, 1))
    stuck, release, _ = gate_rounds(server)
    reply = []
    running = threading.Thread(target=lambda: reply.append(step(server, session, 2, start=3, tokens=1)))
    running.start()
    assert stuck.wait(10)
    time.sleep(0.3)  # past the idle timeout since the step arrived (the thing under test is a duration)
    server.expire_idle()
    assert session in server.sessions
    release.set()
    running.join(10)
    protocol.raise_if_error(reply[0])
    server.shutdown()


def test_closing_a_session_mid_batch_leaves_the_others_exact(engine):
    server = engine(batching=True)
    first, second, third = open_session(server), open_session(server), open_session(server)
    for session in (first, second, third):  # prefill each
        protocol.raise_if_error(step(server, session, 1, seed=-session))
    replies, _ = decode_together(server, third, (first, second), meanwhile=lambda: server.close_session(first))
    torch.testing.assert_close(final_rows(replies[second]), alone(engine, second))  # its own rows, unharmed
    assert server.kv_bytes_used == server.sessions[second].kv_bytes + server.sessions[third].kv_bytes
    server.shutdown()


@pytest.mark.parametrize(
    "where, retries",
    [("forward_rows", 1), ("encode_output", 0)],  # the forward itself: run again one session at a time
)
def test_a_session_that_fails_in_a_batched_round_fails_alone(engine, monkeypatch, where, retries):
    server = engine(batching=True)
    healthy, broken, blocking = open_session(server), open_session(server), open_session(server)
    for session in (healthy, broken, blocking):
        protocol.raise_if_error(step(server, session, 1, seed=-session))
    plain = getattr(server, where)

    def breaks(first, *args):  # forward_rows(chunks) or encode_output(session, final, given)
        sessions = [c.session.id for c in first] if where == "forward_rows" else [first.id]
        if broken in sessions:
            raise RuntimeError(f"{where} broke")
        return plain(first, *args)

    monkeypatch.setattr(server, where, breaks)
    replies, rounds = decode_together(server, blocking, (healthy, broken))
    assert 2 in rounds  # the two steps were in one round
    with pytest.raises(ProtocolError, match=f"{where} broke"):
        protocol.raise_if_error(replies[broken])
    torch.testing.assert_close(final_rows(replies[healthy]), alone(engine, healthy))  # its own rows
    protocol.raise_if_error(step(server, healthy, 3, start=4, tokens=1))  # its session goes on from position 4
    assert broken not in server.sessions and server.stats_dict()["batch_retries"] == retries
    server.shutdown()


def test_a_packet_of_nan_or_infinite_rows_is_refused_as_a_codec_error(engine):
    server = engine()
    for bad in (float("nan"), float("inf")):
        session = open_session(server)
        rows = torch.full((1, 3, server.hidden_size), bad)  # as a broken client sends them (ours refuses to)
        packet = build_codec("identity").envelope(tuple(rows.shape), torch.float32) + rows.numpy().tobytes()
        reply = server.handle(protocol.encode_step(protocol.Step(session, 1, 0, 1, 3, 0, packet)))
        with pytest.raises(ProtocolError, match="NaN or infinite") as info:
            protocol.raise_if_error(reply)
        assert info.value.code == "codec" and session not in server.sessions
    server.shutdown()


def test_cancelling_a_reply_withdraws_its_step_and_the_reply_still_comes(engine):
    server = engine()
    session = open_session(server)
    stuck, release, _ = gate_rounds(server)
    blocker = threading.Thread(target=lambda: step(server, open_session(server), 1))
    blocker.start()
    assert stuck.wait(10)
    payload = build_codec("identity").encode(torch.randn(1, 3, server.hidden_size))
    reply = server.submit(protocol.encode_step(protocol.Step(session, 1, 0, 1, 3, 0, payload)))
    assert reply.cancel() is False and not reply.cancelled()  # asyncio cancels it when its stream ends
    release.set()
    with pytest.raises(ProtocolError, match="no compute slot") as info:
        protocol.raise_if_error(reply.result(timeout=10))
    assert info.value.code == "timeout"
    blocker.join(10)
    server.shutdown()


def test_a_bug_while_decoding_fails_those_steps_and_the_compute_thread_serves_on(engine, monkeypatch):
    server = engine(batching=True)
    session = open_session(server)
    codec = server.sessions[session].codec
    monkeypatch.setattr(codec, "decode_batch", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ProtocolError, match="ZeroDivisionError") as info:
        protocol.raise_if_error(step(server, session, 1))
    assert info.value.code == "internal" and session not in server.sessions
    protocol.raise_if_error(step(server, open_session(server), 1))  # a new session (a fresh codec) is served
    server.shutdown()


def test_an_internal_error_repeated_by_small_messages_logs_its_traceback_once(engine, monkeypatch, caplog):
    """A client that found an input reaching a bug must not fill the log: one traceback for each place it is raised
    in a minute, a line for each repeat (besides the refusal's own line)."""
    from slicer_hf.server import state

    monkeypatch.setattr(state, "_tracebacks", {})
    server = engine(batching=True)
    monkeypatch.setattr(type(server.sessions[open_session(server)].codec), "decode_batch", lambda *a, **k: 1 / 0)
    with caplog.at_level("ERROR", logger="slicer_hf.server"):
        for _ in range(4):
            with pytest.raises(ProtocolError, match="ZeroDivisionError"):
                protocol.raise_if_error(step(server, open_session(server), 1))
    traced = [r for r in caplog.records if r.exc_info]
    repeats = [r for r in caplog.records if "traceback was logged in the last minute" in r.getMessage()]
    assert len(traced) == 1 and len(repeats) >= 3  # the steps after the first: each reported in a line
    server.shutdown()


def test_a_bug_while_a_round_gathers_its_steps_fails_those_it_took_and_the_compute_thread_serves_on(
    engine, monkeypatch
):
    from slicer_hf.server import scheduler

    server = engine(batching=True)
    session = open_session(server)
    real = scheduler.Scheduler._gather
    monkeypatch.setattr(scheduler.Scheduler, "_gather", lambda *args: 1 / 0)
    with pytest.raises(ProtocolError, match="ZeroDivisionError"):  # not a step left waiting out its timeout
        protocol.raise_if_error(step(server, session, 1))
    monkeypatch.setattr(scheduler.Scheduler, "_gather", real)
    protocol.raise_if_error(step(server, open_session(server), 1))
    server.shutdown()


def test_a_step_over_max_step_elements_is_refused_from_its_header_and_opened_names_the_limits(engine):
    server = engine(max_step_elements=10 * 64)  # ten positions of the tiny llama's width
    body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
    opened = protocol.decode_json(server.handle(protocol.encode_json(protocol.OPEN, body)))
    assert (opened["max_step_tokens"], opened["max_step_elements"]) == (4096, 640)
    protocol.raise_if_error(step(server, opened["session"], 1, tokens=10))
    claim = protocol.encode_step(protocol.Step(opened["session"], 2, 10, 1, 11, 0, b""))  # no packet: never read
    with pytest.raises(ProtocolError, match="1 x 11 positions x 64 = 704 values exceeds max_step_elements=640 by 64"):
        protocol.raise_if_error(server.handle(claim))
    assert server.stats_dict()["errors"] == {"too_large": 1} and not server.sessions
    server.shutdown()


def test_step_limits_cut_steps_to_what_the_server_named_and_ignore_what_it_did_not():
    limits = StepLimits.from_opened({"max_step_tokens": 100, "max_step_elements": 3 * 10 * 64})
    assert limits.positions(3, 64, wanted=256) == 10 and limits.positions(1, 64, wanted=256) == 30
    assert limits.positions(1, 64, wanted=8) == 8 and limits.positions(1, 1, wanted=256) == 100
    assert limits.positions(100, 64, wanted=256) == 1  # not even one position fits: the server refuses it clearly
    assert limits.rows(5, 64, wanted=16) == 6 and limits.rows(5, 64, wanted=4) == 4
    for older in ({"session": 1}, {"max_step_tokens": "9", "max_step_elements": True}, {"max_step_elements": 0}):
        assert StepLimits.from_opened(older) == StepLimits()
    assert StepLimits().positions(64, 4096, wanted=256) == 256 and StepLimits().rows(512, 768, wanted=64) == 64


def test_kv_reservations_return_to_zero(engine):
    server = engine()
    for seq in range(3):
        session = open_session(server)
        protocol.raise_if_error(step(server, session, seq))
        assert server.kv_bytes_used > 0
        server.close_session(session)
        assert server.kv_bytes_used == 0


def test_memory_a_step_going_back_frees_is_not_promised_to_another_step_before_its_cache_is_cut(engine):
    """A step that goes back (a new `generate()` on the session) frees blocks only once the compute thread cuts its
    cache. Until then admission keeps them reserved: a step admitted on them would fail in the store, after admission
    said it fits, and lose its session. Once the cache is cut, the memory is free for others."""
    block = 16 * 512  # one block of 16 positions at split 2 of the tiny Llama
    server = engine(batching=True, kv_budget_bytes=6 * block)

    def message(session: int, seq: int, start: int, tokens: int) -> bytes:
        payload = build_codec("identity").encode(torch.randn(1, tokens, server.hidden_size))
        return protocol.encode_step(protocol.Step(session, seq, start, 1, tokens, 0, payload))

    a, b, c = (open_session(server) for _ in range(3))
    for session, tokens in ((a, 64), (b, 16), (c, 1)):  # 4 + 1 + 1 blocks: the whole budget
        protocol.raise_if_error(server.handle(message(session, 1, 0, tokens)))
    assert server.kv_bytes_used == 6 * block
    stuck, release, _ = gate_rounds(server)  # the compute thread is busy with another step
    busy = server.submit(message(c, 2, 1, 1))
    assert stuck.wait(10)
    rewind = server.submit(message(a, 2, 0, 2))  # needs 1 block, but its 4 are still in the store
    grows = server.submit(message(b, 2, 16, 1))  # needs a 2nd block: there is none yet
    assert grows.done(), "refused at admission, not by the store later"
    with pytest.raises(ProtocolError, match="KV memory budget: this step needs 16,384 bytes") as refused:
        protocol.raise_if_error(grows.result())
    assert refused.value.code == "kv_budget"
    release.set()
    protocol.raise_if_error(busy.result(10))
    protocol.raise_if_error(rewind.result(10))
    assert server.kv_bytes_used == server.sessions[a].kv_bytes + server.sessions[c].kv_bytes == 2 * block
    newcomer = open_session(server)  # what the step going back freed now serves another session
    protocol.raise_if_error(server.handle(message(newcomer, 1, 0, 64)))
    assert server.kv_bytes_used == 6 * block == server.store.blocks_in_use() * block // 2


def test_a_reply_over_the_message_limit_is_refused_clearly(engine):
    server = engine(max_message_bytes=3000)
    body = open_request(
        SlicerConfig(codec="identity", downlink="logits"), server.model.config, "tiny", 2, build_codec("identity")
    )
    session = protocol.decode_json(server.handle(protocol.encode_json(protocol.OPEN, body)))["session"]
    with pytest.raises(ProtocolError, match="reply would take up to 4,160 bytes, over max_message_bytes=3,000") as info:
        protocol.raise_if_error(step(server, session, 1, tokens=8))  # 8 x 128 float32 logits: 4 KB back, and headers
    assert info.value.code == "too_large"


def test_a_reply_whose_outputs_alone_fit_the_message_limit_is_refused_before_it_is_computed(engine):
    """Outputs of exactly the limit, with the reply's headers beyond it: refused at admission, not after a forward."""
    server = engine(max_message_bytes=8 * 128 * 4)  # 8 positions of float32 logits, to the byte
    body = open_request(
        SlicerConfig(codec="identity", downlink="logits"), server.model.config, "tiny", 2, build_codec("identity")
    )
    session = protocol.decode_json(server.handle(protocol.encode_json(protocol.OPEN, body)))["session"]
    forwards = []
    run = server.forward_rows
    server.forward_rows = lambda chunks: forwards.append(chunks) or run(chunks)
    with pytest.raises(ProtocolError, match="reply would take up to") as info:
        protocol.raise_if_error(step(server, session, 1, tokens=8))
    assert info.value.code == "too_large" and not forwards


def test_a_lossy_downlink_sends_fewer_bytes_and_decodes_close_to_the_exact_reply():
    from slicer_hf import ConfigError, SlicerModelForCausalLM

    with pytest.raises(ConfigError, match="downlink_step"):
        SlicerConfig(downlink_step=0.0)
    with pytest.raises(ConfigError, match="downlink"):
        SlicerConfig(downlink="logits", downlink_step=0.3)
    hidden = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(1))
    finals = {}
    for step in (None, 0.1):
        model = SlicerModelForCausalLM.from_model(tiny_model("llama"), SlicerConfig(split_layer=2, downlink_step=step))
        link = model._link_for(2)
        assert ("downlink_codec" in link.open_request) is (step is not None)
        _, finals[step] = link.step(hidden, 0, None, None, 0)
        finals[(step, "bytes")] = model.wire_stats().downlink_bytes
    error = (finals[0.1] - finals[None]).norm() / finals[None].norm()
    assert 0 < error < 0.05
    assert finals[(0.1, "bytes")] < finals[(None, "bytes")] / 3


def test_the_server_refuses_a_downlink_codec_it_cannot_use(engine):
    server = engine()
    request = open_request(SlicerConfig(), server.model.config, "tiny", 2, build_codec("identity"))
    for bad in (
        {**request, "downlink_codec": "slicer"},
        {**request, "downlink": "logits", "downlink_codec": {"name": "identity", "version": 1}},
    ):
        with pytest.raises(ProtocolError, match="downlink_codec") as info:
            protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, bad)))
        assert info.value.code == "bad_request"


def test_the_compute_threads_cpu_time_is_counted_and_its_parts_fit_in_it(engine):
    server = engine(batching=True)
    session = open_session(server)
    before = server.stats_dict()
    protocol.raise_if_error(step(server, session, 1, tokens=3))
    for seq in range(2, 6):
        protocol.raise_if_error(step(server, session, seq, start=seq + 1, tokens=1))
    server.shutdown()  # the compute thread has ended: all it did is counted
    spent = {key: value - before[key] for key, value in server.stats_dict().items() if key.endswith("cpu_s")}
    assert spent["decode_compute_cpu_s"] > 0 and spent["packet_decode_cpu_s"] > 0
    parts = spent["decode_compute_cpu_s"] + spent["packet_decode_cpu_s"]  # prefill forwards are not among them
    assert parts < spent["scheduler_cpu_s"] <= spent["process_cpu_s"]


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_positions_past_a_learned_position_table_are_refused_before_they_reach_the_forward(family):
    """GPT-2's and OPT's positions index a table: one past it had failed inside the forward, as `internal` (on CUDA a
    device assert that ends every session), and broke the decode batch it shared with other sessions."""
    server = SplitServer(tiny_model(family), batching=True)
    table = server.model.config.max_position_embeddings  # GPT-2's n_positions; OPT's table holds 2 more, its offset
    assert server.max_positions == table
    honest, hostile = open_session(server), open_session(server)
    protocol.raise_if_error(step(server, honest, 1, tokens=3))
    with pytest.raises(ProtocolError, match=f"context of {table + 1} tokens exceeds {table} .this model's position"):
        protocol.raise_if_error(step(server, hostile, 1, tokens=table + 1))
    payload = build_codec("identity").encode(torch.randn(1, 1, server.hidden_size))
    past = protocol.Step(open_session(server), 1, 0, 1, 1, 0, payload, positions=torch.tensor([[table + 10]]))
    with pytest.raises(ProtocolError, match=rf"position ids must lie in \[0, {table}\)") as refused:
        protocol.raise_if_error(server.handle(protocol.encode_step(past)))
    assert refused.value.code == "bad_request"
    protocol.raise_if_error(step(server, honest, 2, start=3, tokens=1))  # the other session serves on
    last = protocol.Step(open_session(server), 1, 0, 1, 1, 0, payload, positions=torch.tensor([[table - 1]]))
    protocol.raise_if_error(server.handle(protocol.encode_step(last)))  # the table's last row is a position
    assert server.stats_dict()["batch_retries"] == 0
    server.shutdown()


def test_stats_read_after_the_compute_thread_ended_do_not_crash_the_process():
    """A scrape while the server stops reads the compute thread's CPU clock after it ended: asking for an ended
    thread's clock by its handle had crashed the process (SIGSEGV) once other threads had started since."""
    script = (
        "import threading, time\n"
        "from conftest import tiny_model\n"
        "from slicer_hf.server import SplitServer\n"
        "for _ in range(10):\n"
        "    server = SplitServer(tiny_model('llama'))\n"
        "    server.shutdown()\n"
        "    for _ in range(100):\n"
        "        server.stats_dict()\n"
        "    threads = [threading.Thread(target=time.sleep, args=(0.01,)) for _ in range(5)]\n"
        "    [t.start() for t in threads]; [t.join() for t in threads]\n"
        "    assert server.stats_dict()['process_cpu_s'] > 0\n"
        "print('read')\n"
    )
    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode, done.stdout.strip()) == (0, "read"), done.stderr[-2000:]


def test_the_process_cpu_time_read_mid_round_holds_no_more_of_the_compute_thread_than_its_own_count(engine):
    """Both counts stand as of the compute thread's last accounting, so their difference (the other threads') is
    never the round in progress, nor negative once that round is counted."""
    server = engine(batching=True)
    session = open_session(server)
    spinning, plain = threading.Event(), server.scheduler._round

    def busy(pending):  # a long round: 0.4 s of CPU on the compute thread
        spinning.set()
        until = time.thread_time() + 0.4
        while time.thread_time() < until:
            pass
        return plain(pending)

    server.scheduler._round = busy
    before = server.stats_dict()
    waiting = threading.Thread(target=lambda: step(server, session, 1))
    waiting.start()
    assert spinning.wait(10)
    time.sleep(0.3)
    mid = server.stats_dict()
    others = (mid["process_cpu_s"] - before["process_cpu_s"]) - (mid["scheduler_cpu_s"] - before["scheduler_cpu_s"])
    waiting.join()
    server.shutdown()
    assert -1e-3 < others < 0.15  # the spinning round is in neither count yet


def test_a_stream_idles_out_on_the_timeout_that_applies_now_and_not_while_it_talks(engine):
    server = engine(open_timeout_s=60, idle_timeout_s=2.0)  # its first read waits up to 60 s, its later ones 2 s
    running = serve(server, port=0)
    transport = GrpcTransport([f"grpc://127.0.0.1:{running.port}"], timeout_s=30)
    try:
        body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
        session = protocol.decode_json(transport.request(protocol.encode_json(protocol.OPEN, body)))["session"]
        for seq in range(1, 13):  # a step every 0.25 s, for longer than the idle timeout in all (8x its gaps)
            time.sleep(0.25)
            payload = build_codec("identity").encode(torch.randn(1, 1, server.hidden_size))
            reply = transport.request(protocol.encode_step(protocol.Step(session, seq, seq - 1, 1, 1, 0, payload)))
            protocol.raise_if_error(reply)

        def closed() -> bool:  # the stream idled out, and its session is freed
            return server.stats_dict()["errors"].get("stream_idle") == 1 and session not in server.sessions

        assert wait_for(closed, timeout_s=30)  # the stream's 60 s open timeout no longer applies
    finally:
        transport.close()
        running.stop()


def test_a_session_whose_stream_idled_out_reopens_on_the_same_server_not_the_next(engine, caplog):
    """The server's close of an idle stream had read as a failed server: a warning, and a move to the next URL."""
    import copy

    from slicer_hf import SlicerModelForCausalLM

    idling, other = engine(idle_timeout_s=0.5), engine()
    running = [serve(idling, port=0), serve(other, port=0)]
    urls = [f"grpc://127.0.0.1:{r.port}" for r in running]
    reference = tiny_model("llama")
    model = SlicerModelForCausalLM.from_model(
        copy.deepcopy(reference), SlicerConfig(codec="identity", split_layer=2), transport=urls
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    try:
        model.generate(ids, max_new_tokens=3, do_sample=False)
        assert wait_for(lambda: idling.stats_dict()["errors"].get("stream_idle") == 1)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, reference.generate(ids, max_new_tokens=3, do_sample=False))
        assert len(idling.sessions) == 1 and other.stats_dict()["sessions_opened"] == 0
        assert not [r for r in caplog.records if r.name == "slicer_hf.link" and r.levelname == "WARNING"]
    finally:
        model.close_session()
        for r in running:
            r.stop()


def test_a_stream_whose_session_closed_waits_only_the_open_timeout(engine):
    """A stream that holds no session, because it never opened one or because its session is closed, is a free
    stream slot's worth of nothing: it gets the open timeout, not a session's idle timeout."""
    server = engine(open_timeout_s=0.5, idle_timeout_s=60)
    running = serve(server, port=0)
    transport = GrpcTransport([f"grpc://127.0.0.1:{running.port}"], timeout_s=30)
    try:
        body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
        session = protocol.decode_json(transport.request(protocol.encode_json(protocol.OPEN, body)))["session"]
        protocol.raise_if_error(transport.request(protocol.encode_json(protocol.CLOSE, {"session": session})))
        assert wait_for(lambda: server.stats_dict()["errors"].get("stream_idle") == 1, timeout_s=10)
    finally:
        transport.close()
        running.stop()


def test_a_stream_that_talks_without_opening_a_session_is_closed_after_the_open_timeout(engine):
    """STATS every 0.3 s used to reset the timer, so a few streams held every stream slot with no session."""
    server = engine(open_timeout_s=1.0, idle_timeout_s=60)
    running = serve(server, port=0)
    transport = GrpcTransport([f"grpc://127.0.0.1:{running.port}"], timeout_s=30)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match="held no session for 1.0 s"):
            while time.monotonic() - started < 10:
                protocol.raise_if_error(transport.request(protocol.encode_json(protocol.STATS, {})))
                time.sleep(0.3)
        assert server.stats_dict()["errors"].get("stream_idle") == 1  # within the loop: its STATS reset nothing
    finally:
        transport.close()
        running.stop()


def test_a_call_without_the_token_is_refused_as_it_starts_and_health_watch_holds_no_slot(engine):
    """A Stats call that never sent its request held a call slot with its token unchecked, and so did every
    Health/Watch stream: a thousand of them locked out the clients that had the token."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = serve(engine(), port=0, token="s3cret", max_streams=1)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        never = threading.Event()

        def silent():  # a request that never comes
            never.wait(30)
            yield b""

        stats = channel.stream_stream(f"/{protocol.SERVICE}/Stats")
        with pytest.raises(grpc.RpcError) as refused:
            list(stats(silent(), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as watch:
            next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
        assert watch.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        never.set()
        reply = GrpcTransport([f"grpc://127.0.0.1:{running.port}"], token="s3cret").request(
            protocol.encode_json(protocol.STATS, {})
        )
        assert protocol.decode_json(reply)["errors"]["unauthenticated"] == 1
    finally:
        channel.close()
        running.stop()


def test_control_calls_count_by_address_less_its_port_an_ipv6_one_by_its_64():
    from slicer_hf.server.grpc_server import _InFlight
    from slicer_hf.server.state import client_host

    assert client_host("ipv4:10.0.0.7:5000") == client_host("ipv4:10.0.0.7:6001") == "10.0.0.7"
    assert client_host("ipv6:%5B2001:db8::1%5D:5000") == client_host("ipv6:%5B2001:db8::ffff:2%5D:7") == "2001:db8::/64"
    assert client_host("ipv6:%5B2001:db8:0:1::1%5D:5000") != client_host("ipv6:%5B2001:db8::1%5D:5000")
    from slicer_hf.server.state import address_group  # the metrics endpoint's addresses, with no port

    assert address_group("2001:db8::1") == address_group("2001:db8::2") == "2001:db8::/64"  # had been one each
    assert address_group("::ffff:192.0.2.7") == "192.0.2.7" != address_group("::ffff:192.0.2.8")  # not one /64
    assert address_group("192.0.2.7") == "192.0.2.7" == address_group("64:ff9b::192.0.2.7")  # through NAT64
    assert address_group("fe80::1%eth0") != address_group("fe80::2%eth0")  # every link has the same /64
    calls = _InFlight(slots=3, per_peer=2)
    assert calls.admit("a") and calls.admit("a") and not calls.admit("a")  # two from one address
    assert calls.admit("b") and not calls.admit("c")  # three in all
    calls.leave("a")
    assert calls.admit("c") and not calls.admit("b")


def test_health_checks_that_never_send_their_request_hold_no_slot_for_long_nor_many(engine):
    """A health check needs no token, and gRPC gives a call its slot before the request comes: 40 checks that never
    sent one held every slot for good, and the clients with the token were refused (RESOURCE_EXHAUSTED)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import slicer_hf.server.grpc_server as grpc_server

    running = serve(engine(), port=0, token="s3cret", max_streams=1)
    url, never = f"grpc://127.0.0.1:{running.port}", threading.Event()

    def silent():  # a request that never comes
        never.wait(60)
        return
        yield

    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        check = channel.stream_stream(grpc_server.HEALTH_CHECK)
        calls = [check(silent()) for _ in range(40)]
        time.sleep(0.3)  # (no assertion on time: the calls have started, or the next step finds them still coming)
        transport = GrpcTransport([url], token="s3cret", timeout_s=30)
        reply = transport.request(protocol.encode_json(protocol.OPEN, {"fingerprint": "x"}))
        assert protocol.decode_json(reply)["code"] == "model_mismatch"  # answered: a slot was free for it
        stats = protocol.decode_json(transport.unary(STATS_METHOD))  # the operator's calls count apart from checks
        assert stats["sessions_active"] == 0
        codes = [call.code() for call in calls]  # each ends: on its deadline, or refused as one too many
        assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        # two from one address at a time (HEALTH_PER_PEER): the rest refused, bar any that came as those ran out
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 30, codes
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as fresh:
            answer = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        transport.close()
    finally:
        never.set()
        channel.close()
        running.stop()


def test_the_metrics_endpoint_bounds_its_connections_and_frees_the_stalled_ones(engine, monkeypatch):
    """500 half-sent requests held 500 threads, none of which ever timed out; 16 clients trickling a byte at a time
    would hold every slot for good if only each read had a deadline."""
    import contextlib
    import socket
    import urllib.request

    import slicer_hf.server.grpc_server as grpc_server

    monkeypatch.setattr(grpc_server, "METRICS_CONNECTIONS", 4)
    monkeypatch.setattr(grpc_server, "METRICS_TIMEOUT_S", 0.5)
    running = serve(engine(), port=0, metrics_port=0)
    before = threading.active_count()
    stalled = [socket.create_connection(("127.0.0.1", running.metrics_port)) for _ in range(20)]
    try:
        for sock in stalled:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        time.sleep(0.2)
        assert threading.active_count() <= before + 2 * 4  # a handler thread and a deadline timer a connection
        for _ in range(5):  # a byte every 0.3 s: each read comes in time, the whole exchange does not
            time.sleep(0.3)
            for sock in stalled:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")
        assert threading.active_count() <= before
        with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5) as scrape:
            assert b"slicer_sessions_active" in scrape.read()
    finally:
        for sock in stalled:
            sock.close()
        running.stop()


def test_malformed_requests_are_refused_as_malformed_or_bad_requests_not_internal_errors(engine):
    server = engine()
    body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
    cases = {
        "a varint of 2,100 continuation bytes": (
            protocol.header(protocol.STEP) + b"\x80" * 2100 + b"\x01",
            "malformed",
        ),
        "JSON nested 50,000 deep": (protocol.header(protocol.OPEN) + b"[" * 50_000, "malformed"),
        "a wire dtype that is a list": (protocol.encode_json(protocol.OPEN, {**body, "dtype": []}), "bad_request"),
    }
    for name, (message, code) in cases.items():
        assert protocol.decode_json(server.handle(message))["code"] == code, name
    # a refusal that quotes the client's value stays a message the client can read (JSON escaping doubles "\\")
    quoting = protocol.encode_json(protocol.OPEN, {**body, "split_layer": "\\" * 20_000})
    assert len(quoting) < protocol.MAX_JSON_BYTES
    refusal = protocol.decode_json(server.handle(quoting))
    assert refusal["code"] == "bad_split" and refusal["message"].endswith("characters in all)")
    server.shutdown()


@pytest.mark.parametrize(
    "limit",
    [{"prefill_chunk_tokens": 0}, {"max_sessions": -1}, {"max_batch_rows": 2.5}, {"kv_budget_bytes": 0},
     {"idle_timeout_s": 0}, {"step_timeout_s": float("nan")}, {"batch_wait_s": -0.1},
     {"batch_wait_s": float("inf")}],  # a round would wait for ever, holding the steps it took
)  # fmt: skip
def test_limits_that_would_serve_nothing_are_refused_when_the_server_is_configured(limit):
    with pytest.raises(ConfigError, match=next(iter(limit))):
        ServerLimits(**limit)
    ServerLimits(batch_wait_s=0, idle_timeout_s=float("inf"), open_timeout_s=0.5, kv_budget_bytes=None)


def test_a_second_server_on_a_taken_port_fails_to_start(engine):
    first = serve(engine(), port=0)
    try:
        with pytest.raises(ConfigError, match="cannot listen"):  # not a silent half of the first one's connections
            serve(engine(), port=first.port)
    finally:
        first.stop()


@pytest.mark.parametrize("min_split_layer", [0, 4])
def test_a_server_runs_at_least_one_layer_and_leaves_the_edge_one(min_split_layer):
    with pytest.raises(ConfigError, match=r"min_split_layer must be in \[1, 3\]"):
        SplitServer(tiny_model("llama"), min_split_layer=min_split_layer)


def test_a_varint_is_refused_once_it_is_longer_than_its_limit_needs_not_read_to_its_end():
    reader = Reader(b"\x80" * 1_000_000 + b"\x01")  # zero-valued continuation bytes: the value stays 0
    with pytest.raises(CodecError, match="exceeds the limit"):
        reader.varint(limit=1 << 40)
    assert reader.pos <= 7  # 41 bits fit in 6 bytes
    assert Reader(write_varint(1 << 40)).varint(limit=1 << 40) == 1 << 40


def test_a_session_keeps_a_mask_only_once_one_masks_something(engine):
    server = engine(batching=True)

    def send(session: int, seq: int, start: int, mask: torch.Tensor) -> None:
        payload = build_codec("identity").encode(torch.randn(1, mask.shape[1], server.hidden_size))
        step = protocol.Step(session, seq, start, 1, mask.shape[1], 0, payload, mask)
        protocol.raise_if_error(server.handle(protocol.encode_step(step)))

    unpadded, padded = open_session(server), open_session(server)
    send(unpadded, 1, 0, torch.ones(1, 3, dtype=torch.bool))
    send(padded, 1, 0, torch.tensor([[False, True, True]]))
    send(unpadded, 2, 3, torch.ones(1, 1, dtype=torch.bool))  # decode steps, each with its all-True column
    send(padded, 2, 3, torch.ones(1, 1, dtype=torch.bool))
    assert server.sessions[unpadded].mask is None  # nothing masked: no mask to build at each step
    assert server.sessions[padded].mask.tolist() == [[False, True, True, True]]  # the padding is remembered
    server.shutdown()


def test_a_message_that_arrives_as_the_idle_deadline_passes_is_kept_not_dropped():
    async def run() -> tuple[str, bool]:
        loop = asyncio.get_running_loop()
        message = loop.create_future()

        async def stream() -> str:  # as `_SplitService.session` reads
            idle = _IdleTimer(asyncio.current_task())
            idle.reading(0.05)
            timer.append(idle)
            data = await message
            idle.reading(None)
            idle.stop()
            return data

        timer: list[_IdleTimer] = []
        task = asyncio.ensure_future(stream())
        await asyncio.sleep(0)
        # the message completes in the same pass of the loop as the deadline, just before it
        loop.call_at(timer[0]._timer.when() - 1e-9, message.set_result, "step")
        return await task, timer[0].expired

    assert asyncio.run(run()) == ("step", False)


# ---------------------------------------------------------------- the edge's gRPC stream against a misbehaving server
def fake_server(session):
    """A gRPC server whose Session stream runs `session(requests, context)`; returns (server, url)."""
    import grpc

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.stream_stream_rpc_method_handler(session) if details.method == protocol.SESSION_METHOD else None

    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"grpc://127.0.0.1:{port}"


def test_a_server_that_pushes_messages_nobody_asked_for_ends_the_stream_and_fills_no_memory():
    def session(requests, context):
        next(iter(requests))
        yield protocol.encode_json(protocol.OPENED, {"session": 1})
        for _ in range(200):  # unasked: a reader that kept them all would hold 200 MB
            yield protocol.encode_reply(9, protocol.REPLY_HIDDEN, bytes(1 << 20))

    server, url = fake_server(session)
    transport = GrpcTransport([url], timeout_s=10)
    try:
        transport.request(protocol.encode_json(protocol.OPEN, {}))
        assert wait_for(lambda: transport._inbox.qsize() == 1, timeout_s=10)
        time.sleep(0.2)
        assert transport._inbox.qsize() == 1  # the stream ended at the first unasked message
        with pytest.raises(TransportError, match="no request asked for"):
            transport.request(protocol.encode_json(protocol.STATS, {}))
    finally:
        transport.close()
        server.stop(0)


def test_a_server_listens_on_an_ipv6_address_and_clients_reach_it_in_brackets(engine):
    import socket

    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    assert protocol.host_port("::1", 50051) == "[::1]:50051" and protocol.host_port("10.0.0.1", 1) == "10.0.0.1:1"
    running = serve(engine(), host="::1", port=0)  # had been "cannot listen on ::1:0"
    transport = GrpcTransport([f"grpc://[::1]:{running.port}"], timeout_s=30)
    try:
        assert "sessions_active" in protocol.decode_json(transport.request(protocol.encode_json(protocol.STATS, {})))
    finally:
        transport.close()
        running.stop()


def test_a_compressed_message_is_taken_as_the_bytes_that_came_never_inflated(engine):
    """gRPC applied --max-message-bytes after inflating: 60 KiB of gzip had made 60 MiB on the server."""
    import grpc
    from live import step_header

    running = serve(engine(), port=0)
    big = step_header(1, 1, 0, 1, 1) + bytes((8 << 20) - 20)  # an unknown session's step, were it inflated
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.max_send_message_length", 16 << 20)])
    try:
        call = channel.stream_stream(protocol.SESSION_METHOD)(iter([big]), compression=grpc.Compression.Gzip)
        with pytest.raises(ProtocolError) as refused:
            protocol.raise_if_error(next(call))
        assert refused.value.code != "unknown_session"  # the gzip bytes themselves: no message of ours
        call.cancel()
    finally:
        channel.close()
        running.stop()


def test_one_client_holds_at_most_twice_its_session_cap_in_session_streams(engine):
    """With --max-sessions-per-client, one address had held all 1,024 stream slots without opening a session."""
    running = serve(engine(max_sessions_per_client=1), port=0)
    url = f"grpc://127.0.0.1:{running.port}"
    streams = [GrpcTransport([url], timeout_s=30) for _ in range(3)]
    try:
        for transport in streams[:2]:  # a stream that holds no session yet, as when it opens or fails over
            protocol.decode_json(transport.request(protocol.encode_json(protocol.STATS, {})))
        with pytest.raises(TransportError, match="127.0.0.1 holds 2 session streams"):
            streams[2].request(protocol.encode_json(protocol.STATS, {}))
        streams[0].close()

        def answered() -> bool:  # once the server has seen the stream end, its slot is taken again
            with contextlib.suppress(TransportError):
                return bool(streams[2].request(protocol.encode_json(protocol.STATS, {})))
            return False

        assert wait_for(answered, timeout_s=10)
    finally:
        for transport in streams:
            transport.close()
        running.stop()


def test_a_stalled_server_costs_one_timeout_and_one_stream_not_a_second_for_a_close():
    seen, streams = [], []

    def session(requests, context):
        streams.append(context)
        for data in requests:
            seen.append(protocol.MESSAGE_NAMES[protocol.message_type(data)])
            if protocol.message_type(data) == protocol.OPEN:
                yield protocol.encode_json(protocol.OPENED, {"session": 1})
            # anything else: no answer, ever

    server, url = fake_server(session)
    config = SlicerConfig(codec="identity")
    model = tiny_model("llama")
    request = open_request(config, model.config, "tiny", 2, build_codec("identity"))
    link = SuffixLink(GrpcTransport([url], timeout_s=0.5), request, build_codec("identity"))
    try:
        with pytest.raises(TransportError, match="no reply"):
            link.step(torch.randn(1, 3, 64), 0, None, None, 0)
        assert seen == ["open", "step"] and len(streams) == 1  # the stream's end frees the session: no CLOSE
    finally:
        link.transport.close()
        server.stop(0)


def test_a_request_that_times_out_moves_its_session_once_then_the_timeout_is_the_answer():
    """Where every server is slow, moving on each timeout had replayed the session 10 times (10 x timeout_s)."""
    seen = []

    def session(requests, context):
        for data in requests:
            seen.append(protocol.MESSAGE_NAMES[protocol.message_type(data)])
            if protocol.message_type(data) == protocol.OPEN:
                yield protocol.encode_json(protocol.OPENED, {"session": 1})

    (first, url_a), (second, url_b) = fake_server(session), fake_server(session)
    codec = build_codec("identity")
    request = open_request(SlicerConfig(codec="identity"), tiny_model("llama").config, "tiny", 2, codec)
    link = SuffixLink(GrpcTransport([url_a, url_b], timeout_s=0.5), request, codec)
    try:
        with pytest.raises(TransportError, match="no reply") as stalled:
            link.step(torch.randn(1, 3, 64), 0, None, None, 0)
        assert stalled.value.timed_out and seen == ["open", "step"] * 2  # one server, then the other, then done
    finally:
        link.transport.close()
        first.stop(0)
        second.stop(0)


def test_servers_frozen_from_the_start_cost_two_timeouts_not_ten():
    """A timeout on a new stream had counted as unreachable, not as a timeout: the session moved on each one."""
    seen = []

    def session(requests, context):
        for data in requests:
            seen.append(protocol.MESSAGE_NAMES[protocol.message_type(data)])  # and never an answer
        yield from ()

    (first, url_a), (second, url_b) = fake_server(session), fake_server(session)
    codec = build_codec("identity")
    request = open_request(SlicerConfig(codec="identity"), tiny_model("llama").config, "tiny", 2, codec)
    link = SuffixLink(GrpcTransport([url_a, url_b], timeout_s=0.5), request, codec)
    try:
        with pytest.raises(TransportError, match="no answer .* on a new stream") as frozen:
            link.step(torch.randn(1, 3, 64), 0, None, None, 0)
        assert frozen.value.timed_out and seen == ["open", "open"]  # one server, then the other, then done
    finally:
        link.transport.close()
        first.stop(0)
        second.stop(0)
    alone, url = fake_server(session)
    link = SuffixLink(GrpcTransport([url], timeout_s=0.5), request, codec)
    try:
        with pytest.raises(TransportError, match="no answer .* or no slicer-hf server there") as silent:
            link.step(torch.randn(1, 3, 64), 0, None, None, 0)
        assert silent.value.unreachable and not silent.value.retryable
    finally:
        link.transport.close()
        alone.stop(0)


def test_a_session_moves_past_two_frozen_servers_to_a_third_that_answers(engine):
    """Two timeouts had ended the session with three servers given, the third never tried."""

    def frozen(requests, context):
        for _ in requests:
            pass
        yield from ()

    (first, url_a), (second, url_b) = fake_server(frozen), fake_server(frozen)
    server = engine()
    running = serve(server, port=0)
    codec = build_codec("identity")
    request = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, codec)
    urls = [url_a, url_b, f"grpc://127.0.0.1:{running.port}"]
    link = SuffixLink(GrpcTransport(urls, timeout_s=0.5), request, codec)
    try:
        link.step(torch.randn(1, 3, server.hidden_size), 0, None, None, 0)
        assert len(server.sessions) == 1 and link.stats.failovers == 1
    finally:
        link.transport.close()
        first.stop(0)
        second.stop(0)
        running.stop()


def test_an_interrupted_request_leaves_no_stale_reply_for_the_next_one(engine):
    server = engine()
    running = serve(server, port=0)
    transport = GrpcTransport([f"grpc://127.0.0.1:{running.port}"], timeout_s=30)
    try:
        transport.request(protocol.encode_json(protocol.STATS, {}))

        class Interrupted:  # Ctrl-C while the edge waits for the reply
            def get(self, timeout=None):
                raise KeyboardInterrupt

        transport._inbox = Interrupted()
        with pytest.raises(KeyboardInterrupt):
            transport.request(protocol.encode_json(protocol.STATS, {}))
        body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
        reply = transport.request(protocol.encode_json(protocol.OPEN, body))  # its own answer, not the stats'
        assert protocol.message_type(reply) == protocol.OPENED
    finally:
        transport.close()
        running.stop()


def test_one_client_address_holds_at_most_max_sessions_per_client(engine):
    """Counted by address, whatever the port (each connection has its own), and freed as its sessions close."""
    server = engine(max_sessions_per_client=2)
    body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
    opening = protocol.encode_json(protocol.OPEN, body)

    def open_from(peer):
        reply = server.handle(opening, client=peer)
        return protocol.decode_json(reply)["session"] if protocol.message_type(reply) == protocol.OPENED else reply

    first, second = open_from("ipv4:10.0.0.7:50001"), open_from("ipv4:10.0.0.7:50002")
    refused = open_from("ipv4:10.0.0.7:50003")
    with pytest.raises(ProtocolError, match=r"10.0.0.7 holds 2 sessions.*--max-sessions-per-client") as info:
        protocol.raise_if_error(refused)
    assert info.value.code == "too_many_sessions"
    assert isinstance(open_from("ipv6:[::1]:50001"), int)  # another client
    # an IPv6 client counts by its /64: the addresses in it are one client's (16 of them had opened 16 sessions)
    assert all(isinstance(open_from(f"ipv6:%5B2001:db8:1:2::{i}%5D:5"), int) for i in (1, 2))
    with pytest.raises(ProtocolError, match=r"2001:db8:1:2::/64 holds 2 sessions"):
        protocol.raise_if_error(open_from("ipv6:%5B2001:db8:1:2::3%5D:5"))
    assert all(isinstance(open_from(peer), int) for peer in ("", "local", "local", "local"))  # in-process: no cap
    assert server.close_session(first)
    assert isinstance(open_from("ipv4:10.0.0.7:50004"), int)
    assert second in server.sessions
    server.shutdown()


def test_a_step_whose_client_left_ends_quietly_not_as_a_server_error(engine, caplog):
    """The stream ended (the client closed, was cancelled or killed) while its step waited: its session is closed
    and nobody reads the reply. That was counted and logged as a `timeout` or `unknown_session` error."""
    server = engine(batching=True)
    stuck, release, _ = gate_rounds(server)
    busy, leaving = open_session(server), open_session(server)
    first = threading.Thread(target=lambda: step(server, busy, 1))
    first.start()
    assert stuck.wait(10)
    reply = server.submit(protocol.encode_step(protocol.Step(leaving, 1, 0, 1, 3, 0, identity_rows(server, 3))))
    server.close_session(leaving)  # what the end of its stream does
    release.set()
    with caplog.at_level("WARNING", logger="slicer_hf.server.engine"):
        with pytest.raises(ProtocolError) as info:
            protocol.raise_if_error(reply.result(timeout=30))
        first.join()
    assert info.value.code == "unknown_session"
    assert server.stats_dict()["errors"] == {} and not caplog.records
    server.shutdown()


def test_a_server_that_has_shut_down_refuses_every_request_at_once(engine):
    server = engine()
    session = open_session(server)
    server.shutdown()
    for message in (
        protocol.encode_json(protocol.OPEN, {"split_layer": 2}),
        protocol.encode_step(protocol.Step(session, 1, 0, 1, 3, 0, identity_rows(server, 3))),
    ):
        with pytest.raises(ProtocolError, match="shutting down") as info:
            protocol.raise_if_error(server.handle(message))
        assert info.value.code == "shutdown"  # not "timeout": nothing waited for a compute slot


def test_the_compute_thread_survives_a_bug_outside_every_steps_guard(engine, monkeypatch):
    server = engine()
    plain, failures = server.release_session, []

    def release_once(session):
        if not failures:
            failures.append(session)
            raise RuntimeError("a bug")
        return plain(session)

    monkeypatch.setattr(server, "release_session", release_once)
    server.close_session(open_session(server))  # its release on the compute thread raises
    assert wait_for(lambda: failures)
    session = open_session(server)
    protocol.raise_if_error(step(server, session, 1))  # served: the thread lives on
    server.shutdown()


def identity_rows(server: SplitServer, tokens: int) -> bytes:
    return build_codec("identity").encode(torch.randn(1, tokens, server.hidden_size))


def test_a_serve_that_fails_on_its_metrics_port_leaves_the_engine_to_serve_again(engine):
    import socket

    server = engine()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            serve(server, port=0, metrics_port=taken.getsockname()[1])
    running = serve(server, port=0)
    try:
        transport = GrpcTransport([f"grpc://127.0.0.1:{running.port}"], timeout_s=30)
        body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
        protocol.raise_if_error(transport.request(protocol.encode_json(protocol.OPEN, body)))  # not 'shutdown'
        transport.close()
    finally:
        running.stop()


@pytest.mark.parametrize("where", ["packet", "reply"])
def test_large_codec_work_runs_beside_the_rounds_so_other_sessions_carry_on(engine, where):
    """A prefill's packet (or its reply through a lossy downlink codec) is coded on the codec thread: a client's
    costly codec cannot hold up every other session's rounds (a chained trellis reply of 12,288 positions took 6 s)."""
    server = engine(batching=True)
    config = SlicerConfig(
        codec="identity" if where == "reply" else "slicer", downlink_step=0.1 if where == "reply" else None
    )
    big = open_session(server, config)  # SLICER's codec up, or down: costly
    small = open_session(server)
    held, threads = threading.Event(), []
    name = "decode_packets" if where == "packet" else "encode_output"
    real = getattr(server, name)

    def slow(*args):  # the big step's codec work waits until the other session has been served
        first = args[0][0].session if where == "packet" else args[0]
        if first.id == big:
            threads.append(threading.current_thread().name)
            assert held.wait(60)
        return real(*args)

    setattr(server, name, slow)
    with ThreadPoolExecutor(2) as pool:
        large = pool.submit(step, server, big, 1, 0, 40 if where == "reply" else 512, build_codec(config))
        assert wait_for(lambda: threads)
        for seq in range(1, 4):  # the other session prefills, then decodes, meanwhile
            reply = pool.submit(step, server, small, seq, 0 if seq == 1 else seq + 1, 3 if seq == 1 else 1)
            assert protocol.decode_reply(reply.result(timeout=30))[0] == seq
        assert not large.done()
        held.set()
        got, kind, _ = protocol.decode_reply(large.result(timeout=30))
    assert got == 1 and kind in (protocol.REPLY_HIDDEN, protocol.REPLY_HIDDEN_BARE)
    assert threads[0].startswith("slicer-codec")
    server.shutdown()


def test_a_step_decoded_aside_runs_once_however_fast_the_codec_thread_hands_it_back(engine, caplog):
    """The codec thread may finish before the compute thread has moved on: the step must not also stay in the round
    (it ran twice, and its second answer failed other sessions' steps)."""
    server = engine()
    runs = []
    real_forward = server.forward_rows
    server.forward_rows = lambda chunks: runs.append([c.session.id for c in chunks]) or real_forward(chunks)
    real = server.scheduler._codec.submit
    server.scheduler._codec.submit = lambda fn: (lambda job: (job.result(), job)[1])(real(fn))  # done at once
    costly = SlicerConfig(codec="slicer")
    big, small = open_session(server, costly), open_session(server)
    codec = build_codec(costly)
    wide = protocol.Step(big, 1, 0, 16, 32, 0, codec.encode(torch.randn(16, 32, server.hidden_size)))  # aside
    protocol.raise_if_error(server.handle(protocol.encode_step(wide)))
    protocol.raise_if_error(step(server, small, 1))
    assert [row.length for row in server.sessions[big].rows] == [32] * 16  # its positions, once
    assert runs == [[big], [small]] and not [r for r in caplog.records if r.levelname == "ERROR"]
    server.shutdown()


def test_steps_on_the_codec_thread_as_the_server_stops_are_answered_not_left_waiting(engine):
    """One decodes aside while another's forward holds the compute thread; the server stops meanwhile, and the
    step comes back from the codec thread after the stop: it is refused, not left waiting for ever."""
    server = engine(batching=True)
    costly = SlicerConfig(codec="slicer")
    aside, busy = open_session(server, costly), open_session(server)
    decoding, forwarding = threading.Event(), threading.Event()
    real_decode, real_forward = server.decode_packets, server.forward_rows

    def slow_decode(works):  # a costly codec
        if works[0].session.id == aside:
            decoding.set()
            time.sleep(0.6)
        return real_decode(works)

    def slow_forward(chunks):  # a long forward
        if chunks[0].session.id == busy:
            forwarding.set()
            time.sleep(1.2)
        return real_forward(chunks)

    server.decode_packets, server.forward_rows = slow_decode, slow_forward
    with ThreadPoolExecutor(2) as pool:
        large = pool.submit(step, server, aside, 1, 0, 512, build_codec(costly))
        assert decoding.wait(30)
        other = pool.submit(step, server, busy, 1, 0, 3)
        assert forwarding.wait(30)
        server.shutdown()  # before the codec thread hands its step back
        for reply in (large, other):
            with contextlib.suppress(ProtocolError):  # answered, or refused: never left waiting
                protocol.raise_if_error(reply.result(timeout=30))


def test_a_decode_steps_reply_is_encoded_in_its_round_whatever_its_batch(engine):
    """One output a sequence (what `generate()` asks for) is encoded on the compute thread: set aside, every token of
    a 32-sequence edge with a lossy downlink waited behind other clients' large packets on the codec thread."""
    server = engine(batching=True)
    session = open_session(server, SlicerConfig(codec="identity", downlink_step=0.1))
    threads = []
    real = server.encode_output
    server.encode_output = lambda *args: threads.append(threading.current_thread().name) or real(*args)
    for seq, (start, tokens) in enumerate([(0, 3), (3, 1)], 1):  # a prompt's last outputs, then a decode step
        payload = build_codec("identity").encode(torch.randn(32, tokens, server.hidden_size))
        step_ = protocol.Step(session, seq, start, 32, tokens, tokens - 1, payload)
        protocol.raise_if_error(server.handle(protocol.encode_step(step_)))
    assert threads == ["slicer-scheduler"] * 2
    server.shutdown()


def large_packets_in_one_round(engine, pool, on_codec_thread):
    """Three sessions' large packets queued up for one round while a fourth's forward holds the compute thread, then
    let go: the codec thread calls `on_codec_thread(works)` before it decodes each. Returns the server, the fourth's
    reply, the three sessions and their replies (futures on `pool`)."""
    server = engine(batching=True)
    costly = SlicerConfig(codec="slicer")
    busy, *large = [open_session(server, None if i == 0 else costly) for i in range(4)]
    forwarding, release = threading.Event(), threading.Event()
    real_decode, real_forward = server.decode_packets, server.forward_rows

    def slow_forward(chunks):
        if chunks[0].session.id == busy:
            forwarding.set()
            assert release.wait(30)
        return real_forward(chunks)

    def slow_decode(works):
        if threading.current_thread().name.startswith("slicer-codec"):
            on_codec_thread(works)
        return real_decode(works)

    server.decode_packets, server.forward_rows = slow_decode, slow_forward
    first = pool.submit(step, server, busy, 1, 0, 3)
    assert forwarding.wait(30)
    replies = [pool.submit(step, server, sid, 1, 0, 512, build_codec(costly)) for sid in large]
    assert wait_for(lambda: server.scheduler._queue.qsize() == 3)
    release.set()
    return server, first, large, replies


def test_packets_set_aside_together_are_not_decoded_once_the_server_stops(engine):
    """The process waits for the codec thread at exit: a stop while it decodes the first of a round's large packets
    refuses the others undecoded (they had all been decoded first, a second or so each)."""
    decoding, decoded = threading.Event(), []

    def slowly(works):
        decoded.append(works)
        decoding.set()
        time.sleep(0.5)

    with ThreadPoolExecutor(4) as pool:
        server, first, _, replies = large_packets_in_one_round(engine, pool, slowly)
        assert decoding.wait(30)
        server.shutdown()
        for reply in [first, *replies]:
            with contextlib.suppress(ProtocolError):  # answered, or refused: never left waiting
                protocol.raise_if_error(reply.result(timeout=30))
    assert len(decoded) == 1 and len(decoded[0]) == 1


def test_packets_set_aside_for_sessions_closed_meanwhile_are_not_decoded(engine):
    """A client that sends a large packet and goes (its stream cancelled) left its packet to be decoded all the
    same: ten such cost a reviewer's server 18 s of codec time for 3.5 KB sent, and no limit held them back."""
    decoding, gone, decoded = threading.Event(), threading.Event(), []

    def until_the_others_left(works):
        decoded.append(works)
        decoding.set()
        assert gone.wait(30)

    with ThreadPoolExecutor(4) as pool:
        server, first, large, replies = large_packets_in_one_round(engine, pool, until_the_others_left)
        assert decoding.wait(30)
        kept = decoded[0][0].session.id
        for sid in large:  # the other clients leave while the first packet decodes
            if sid != kept:
                server.close_session(sid)
        gone.set()
        protocol.raise_if_error(first.result(timeout=30))
        for sid, reply in zip(large, replies):
            if sid == kept:
                protocol.raise_if_error(reply.result(timeout=30))
            else:
                with pytest.raises(ProtocolError, match="was closed"):
                    protocol.raise_if_error(reply.result(timeout=30))
    assert len(decoded) == 1 and len(decoded[0]) == 1
    server.shutdown()


@pytest.mark.parametrize("open_timeout_s", [float("inf"), 3e6])  # past what gRPC's idle-connection option holds
def test_a_server_without_an_open_timeout_starts(engine, open_timeout_s):
    running = serve(engine(open_timeout_s=open_timeout_s), port=0)
    transport = GrpcTransport([f"grpc://127.0.0.1:{running.port}"], timeout_s=30)
    try:
        assert "sessions_active" in protocol.decode_json(transport.unary(STATS_METHOD))  # it serves
    finally:
        transport.close()
        running.stop()


def test_a_refusal_quoting_a_clients_long_value_is_logged_cut_short(engine, caplog):
    """The log line of a refusal quoted the client's value whole: 50 OPENs of 64 KB wrote 8 MB to a server's log."""
    server = engine()
    body = {"fingerprint": "x", "split_layer": 2, "model": "\U000e0001" * 16000}  # 64 KB; quoted escaped, 10x
    with caplog.at_level("WARNING", logger="slicer_hf.server.engine"):
        reply = server.handle(protocol.header(protocol.OPEN) + json.dumps(body, ensure_ascii=False).encode())
    assert protocol.message_type(reply) == protocol.ERROR and len(reply) < 5000
    (record,) = caplog.records
    assert "characters in all" in record.getMessage() and len(record.getMessage()) < 500
    server.shutdown()


def test_a_prompt_of_one_token_repeated_is_served_however_far_its_packet_compresses(engine):
    """Repeated positions give identical rows, which zstd packs to almost nothing: a floor of one bit per 64 values
    (against all-zero packets that ask a full forward for a few bytes) refused such honest prompts, so there is none;
    a client's work is bounded by the step limits, one step in flight a stream, and the token."""
    server = engine()
    config = SlicerConfig(codec="slicer", sparsity=0.9)
    session = open_session(server, config)
    rows = torch.randn(1, 1, server.hidden_size).expand(1, 2048, -1)  # one hidden state, 2,048 times
    packet = build_codec(config).encode(rows.contiguous())
    assert 8 * len(packet) * 64 < rows.numel()
    protocol.raise_if_error(server.handle(protocol.encode_step(protocol.Step(session, 1, 0, 1, 2048, 2047, packet))))
    server.shutdown()


def test_a_server_whose_streams_may_hold_more_than_the_machine_says_so_at_start(engine, caplog):
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with caplog.at_level("WARNING", logger="slicer_hf.server.grpc_server"):
        serve(engine(), port=0, max_streams=memory // (64 << 20) + 1).stop()  # at the default 64 MiB messages
        assert "messages being received may hold" in caplog.text
        caplog.clear()
        serve(engine(), port=0, max_streams=8).stop()
    assert "messages being received" not in caplog.text


def test_idle_metrics_connections_from_one_address_keep_no_other_address_from_scraping(engine):
    """20 idle sockets from one address held every metrics slot: 32 of 35 scrapes from elsewhere failed."""
    import http.client
    import socket

    running = serve(engine(), port=0, metrics_port=0)
    idle = [socket.create_connection(("127.0.0.1", running.metrics_port)) for _ in range(20)]
    try:
        time.sleep(0.2)  # (they are accepted meanwhile; none sends a request)
        scraper = http.client.HTTPConnection(
            "127.0.0.1", running.metrics_port, timeout=10, source_address=("127.0.0.2", 0)
        )
        scraper.request("GET", "/metrics")
        assert b"slicer_sessions_active" in scraper.getresponse().read()
        scraper.close()
    finally:
        for sock in idle:
            sock.close()
        running.stop()


def test_a_session_late_for_the_batch_wait_is_not_waited_for_in_its_next_rounds(engine):
    """A client that paused just past `batch_wait_s` after each step made every round wait for it (three such
    sessions took another client's decode from 3 to 31 ms a token). Late once, a session is not waited for in its
    next round; each late step in a row doubles that."""
    server = engine(batching=True, batch_wait_s=0.05)
    a, b = open_session(server), open_session(server)
    for session in (a, b):
        protocol.raise_if_error(step(server, session, 1))  # prefills of 3 positions
    late = server.sessions[b]
    scheduler = server.scheduler

    def a_decodes_after_a_round_with_b(seq):  # b decoded beside a last round, and sends nothing now
        scheduler._decoded_last = {server.sessions[a], late}
        protocol.raise_if_error(step(server, a, seq, start=seq + 1, tokens=1))
        return server.stats_dict()["late_steps"]

    assert a_decodes_after_a_round_with_b(2) == 1  # waited for in vain
    assert (late.wait_skips, late.wait_backoff) == (1, 2)
    assert a_decodes_after_a_round_with_b(3) == 1  # not waited for
    assert a_decodes_after_a_round_with_b(4) == 2  # waited for again, late again: skipped twice now
    assert (late.wait_skips, late.wait_backoff) == (2, 4)
    assert [a_decodes_after_a_round_with_b(seq) for seq in (5, 6, 7)] == [2, 2, 3]
    server.shutdown()


def test_draining_is_logged_when_it_changes_not_at_every_call(engine, caplog):
    server = engine()
    with caplog.at_level("INFO", logger="slicer_hf.server.engine"):
        server.drain(False)  # what serve's start does
        server.drain(True)
        server.drain(True)
    assert [r.getMessage() for r in caplog.records if "draining" in r.getMessage()] == ["draining: True"]
    server.shutdown()


def test_a_forward_takes_up_to_max_batch_rows_rows_inclusive():
    """max_batch_rows is the most rows of one forward: a group that reaches it exactly is not cut."""
    from types import SimpleNamespace

    from slicer_hf.server.scheduler import _by_rows

    works = [SimpleNamespace(rows=r) for r in (1, 1, 1, 1)]
    assert [len(g) for g in _by_rows(works, 4)] == [4]
    works = [SimpleNamespace(rows=r) for r in (2, 2, 1)]
    assert [[w.rows for w in g] for g in _by_rows(works, 4)] == [[2, 2], [1]]
    assert [len(g) for g in _by_rows([SimpleNamespace(rows=1)] * 3, 1)] == [1, 1, 1]


def _step(server, session, seq, start, tokens):
    payload = build_codec("identity").encode(torch.randn(1, tokens, server.hidden_size))
    return server.handle(protocol.encode_step(protocol.Step(session, seq, start, 1, tokens, tokens - 1, payload)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_max_context_tokens_bounds_a_sessions_context_with_or_without_a_larger_position_table(family):
    """max_context_tokens bounds the context, prompt and decode alike, on a rotary model and below a learned
    position table (GPT-2's 256) alike."""
    server = SplitServer(tiny_model(family), limits=ServerLimits(max_context_tokens=32, idle_timeout_s=float("inf")))
    assert server.max_positions == 32
    with pytest.raises(ProtocolError, match="context of 33 tokens exceeds 32$") as refused:
        protocol.raise_if_error(_step(server, open_session(server), 1, 0, 33))
    assert refused.value.code == "too_large"
    session = open_session(server)
    protocol.raise_if_error(_step(server, session, 1, 0, 32))  # the whole context, to the last position
    with pytest.raises(ProtocolError, match="context of 33 tokens exceeds 32$"):
        protocol.raise_if_error(_step(server, session, 2, 32, 1))
    server.shutdown()


def test_extend_mask_after_going_back_keeps_only_the_positions_before_the_step():
    held = torch.tensor([[True, False, True, True]])
    assert protocol.extend_mask(held, torch.tensor([[True]]), 2) is not None
    assert protocol.extend_mask(held, torch.tensor([[True]]), 2).tolist() == [[True, False, True]]
    assert protocol.extend_mask(held, torch.ones(1, 3, dtype=torch.bool), 1) is None  # nothing hidden any more


def test_a_step_going_back_over_a_masked_position_no_longer_hides_it():
    """The server's mask after a rewind is the one before `start` and the step's own columns: a position the earlier
    step hid, now rewritten, is visible (as on a fresh session given the same rows)."""
    server = SplitServer(tiny_model("llama"), limits=ServerLimits(idle_timeout_s=float("inf")))
    codec = build_codec("identity")
    torch.manual_seed(0)
    x, y = torch.randn(1, 4, server.hidden_size), torch.randn(1, 3, server.hidden_size)

    def send(session, seq, start, rows, mask):
        step = protocol.Step(session, seq, start, 1, rows.shape[1], rows.shape[1] - 1, codec.encode(rows), mask=mask)
        reply = server.handle(protocol.encode_step(step))
        protocol.raise_if_error(reply)
        return codec.decode(protocol.decode_reply(reply)[2], expect_shape=(1, 1, server.hidden_size))

    rewound = open_session(server)
    send(rewound, 1, 0, x, torch.tensor([[True, False, True, True]]))
    got = send(rewound, 2, 1, y, torch.ones(1, 3, dtype=torch.bool))
    fresh = send(open_session(server), 1, 0, torch.cat([x[:, :1], y], 1), torch.ones(1, 4, dtype=torch.bool))
    server.shutdown()
    torch.testing.assert_close(got, fresh, rtol=1e-4, atol=1e-5)
