"""Cheap messages cannot exhaust a live server, and clients stay correct: every attack goes over the wire to a real
`slicer-hf serve` process, which must stay up, grow its RSS by less than 100 MB, and keep other sessions exact."""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live import LOSSLESS, CallbackStreamer, client, prompt, raw_open, step_header, wait_for
from transformers import AutoModelForCausalLM

from slicer_hf import ProtocolError, SlicerConfig, SlicerModelForCausalLM, TransportError, build_codec, protocol
from slicer_hf.codec.bits import write_varint
from slicer_hf.transport.grpc import DRAIN_METHOD, GrpcTransport

pytestmark = [pytest.mark.network, pytest.mark.slow]
RSS_LIMIT = 100 << 20
HIDDEN = 64  # the tiny llama's width


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def envelope(codec_id: int, dtype_code: int, shape: tuple[int, ...]) -> bytes:
    return bytes([codec_id, 1, dtype_code, len(shape)]) + b"".join(map(write_varint, shape))


HUGE = (1 << 6, 1 << 20)  # 2^26 elements: the codec's old ceiling
ATTACKS = {
    # 13 bytes that used to allocate torch.ones(4096, 2^24) before any check
    "mask all ones, huge claim": lambda s: step_header(s, 1, 0, 4096, (1 << 24) - 1, protocol.MASK_ONES),
    "mask all ones, unknown session": lambda s: step_header(s + 999, 1, 0, 4096, (1 << 24) - 1, protocol.MASK_ONES),
    # codec packets whose rows decode to zeros of the claimed shape without reading a byte per row
    "topk K=0, float64": lambda s: step_header(s, 1, 0, 1, 1) + envelope(5, 4, HUGE) + b"\x00\x00",
    "slicer K=0": lambda s: step_header(s, 1, 0, 1, 1) + envelope(6, 1, HUGE) + b"\x00\x00\x00\x00",
    "slicer ECSQ zero rows": lambda s: (
        step_header(s, 1, 0, 1, 1) + envelope(6, 1, HUGE) + bytes([16 | 1, 0]) + np.float16(0.3).tobytes() + bytes(128)
    ),
    # d = 2^20 used to run about 1,024 QR factorizations and cache gigabytes of rotations
    "slicer rotation d=2^20": lambda s: (
        step_header(s, 1, 0, 1, 1)
        + envelope(6, 1, (1, 1 << 20))
        + bytes([16 | 1, 0])
        + np.float16(0.3).tobytes()
        + np.float16(1.0).tobytes()
        + b"\x01"
    ),
    "right shape, float64": lambda s: step_header(s, 1, 0, 1, 1) + envelope(0, 4, (1, 1, HIDDEN)) + bytes(8 * HIDDEN),
    # a varint of 4 MiB of zero-valued continuation bytes used to be read to its end, a byte at a time (seconds)
    "varint of continuation bytes": lambda s: protocol.header(protocol.STEP) + b"\x80" * (4 << 20) + b"\x01",
    "varint in a packet's envelope": lambda s: step_header(s, 1, 0, 1, 1) + bytes([0, 1, 1, 3]) + b"\x80" * (4 << 20),
}


def test_cheap_messages_are_refused_before_they_cost_memory(server, model_dir, reference):
    srv = server("--max-step-tokens", "64", "--max-session-batch", "4")
    good = client(model_dir, srv.url)
    ids = prompt(21)
    outcomes = {}

    def attack():
        for name, make in ATTACKS.items():
            raw = GrpcTransport([srv.url], timeout_s=30)
            session = raw_open(raw, model_dir)
            before = rss_bytes(srv.proc.pid)
            started = time.monotonic()
            for _ in range(5):
                reply = raw.request(make(session))
                assert protocol.message_type(reply) == protocol.ERROR, name
                session = raw_open(raw, model_dir)  # the refused step closed its session
            outcomes[name] = (
                protocol.decode_json(reply)["code"],
                rss_bytes(srv.proc.pid) - before,
                time.monotonic() - started,
            )
            raw.close()

    # the attacks land in the middle of another client's generation, which must come out exact
    out = good.generate(ids, max_new_tokens=12, do_sample=False, streamer=CallbackStreamer(4, attack))
    assert torch.equal(out, reference.generate(ids, max_new_tokens=12, do_sample=False))
    assert set(outcomes) == set(ATTACKS)
    for name, (code, growth, _) in outcomes.items():
        assert growth < RSS_LIMIT, (name, growth)
        expected = "unknown_session" if "unknown" in name else ("too_large" if "mask" in name else "codec")
        expected = "malformed" if name == "varint of continuation bytes" else expected
        assert code == expected, (name, code)
    assert srv.proc.poll() is None


def test_clients_choose_codec_knobs_never_safety_bounds(server, model_dir):
    srv = server()
    raw = GrpcTransport([srv.url], timeout_s=30)
    spec = {**build_codec("identity").spec(), "max_elements": 10**13}
    with pytest.raises(ProtocolError, match="may not set max_elements"):
        raw_open(raw, model_dir, codec=spec)
    effort = {**build_codec("slicer").spec(), "zstd_level": 22}  # the server's encode CPU for its replies, 3x
    with pytest.raises(ProtocolError, match="may not set zstd_level"):
        raw_open(raw, model_dir, downlink="hidden", downlink_codec=effort)
    for bad in ({"downlink_topk": "many"}, {"downlink_topk": 0}, {"downlink_topk": 1 << 20}, {"dtype": "float64"}):
        with pytest.raises(ProtocolError) as info:
            raw_open(raw, model_dir, **bad)
        assert info.value.code == "bad_request", bad
    huge = {**build_codec("slicer").spec(), "bit_candidates": [4] * 100_000}  # parsed whole before any check
    with pytest.raises(ProtocolError, match="control messages take at most") as info:
        raw_open(raw, model_dir, codec=huge)
    assert info.value.code == "too_large"
    assert srv.stats()["sessions_active"] == 0
    raw.close()


def test_kv_memory_is_budgeted_in_bytes(server, model_dir, reference):
    # the tiny llama at split 2, in the server's KV store: 2 layers x K,V x 2 heads x 16 dims x 4 bytes = 512 B a
    # position, reserved in whole blocks of 16 positions
    per_position = 512
    srv = server("--kv-memory", str(40 * per_position), "--max-session-kv", str(32 * per_position))
    stats = srv.stats()
    assert stats["kv_budget_bytes"] == 40 * per_position and stats["kv_store"] == 1
    small = client(model_dir, srv.url)
    ids = prompt(22, 6)
    out = small.generate(ids, max_new_tokens=10, do_sample=False)  # 16 positions: inside both limits
    assert torch.equal(out, reference.generate(ids, max_new_tokens=10, do_sample=False))
    assert srv.stats()["kv_bytes_used"] == 16 * per_position  # 15 positions (the last token's K/V is never computed)
    with pytest.raises(ProtocolError, match="session KV cap") as info:
        client(model_dir, srv.url).generate(prompt(23, 40), max_new_tokens=2)
    assert info.value.code == "kv_session_cap" and "over the cap" in str(info.value)
    with pytest.raises(ProtocolError, match="KV memory budget") as info:
        client(model_dir, srv.url).generate(prompt(24, 28), max_new_tokens=2)
    assert "short by" in str(info.value)
    # the refused sessions were freed, the first one is untouched
    assert srv.stats()["kv_bytes_used"] == 16 * per_position
    out = small.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=10, do_sample=False))


def test_idle_streams_hold_no_worker_and_are_closed(server, model_dir, reference):
    srv = server("--max-sessions", "4", "--open-timeout-s", "1")
    idle = [GrpcTransport([srv.url], timeout_s=30) for _ in range(100)]  # 100 streams, many more than workers
    for transport in idle:
        transport.request(protocol.encode_json(protocol.CLOSE, {"session": 0}))
    ids = prompt(25)
    out = client(model_dir, srv.url).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False))
    assert wait_for(lambda: srv.stats()["errors"].get("stream_idle", 0) >= 100)
    with pytest.raises(TransportError, match="DEADLINE_EXCEEDED"):
        idle[0].request(protocol.encode_json(protocol.CLOSE, {"session": 0}))
    for transport in idle:
        transport.close()


def test_connections_that_hold_no_call_are_closed_so_they_cannot_use_up_the_servers_sockets(
    server, model_dir, reference
):
    """HTTP/2 connections that answer pings but never start a call held a socket each for good (at the fd limit,
    every new client was locked out); they go after `--open-timeout-s` without a call, and clients reconnect."""
    srv = server("--open-timeout-s", "1")
    address = srv.url.removeprefix("grpc://")
    states: list[list[grpc.ChannelConnectivity]] = []
    channels = [grpc.insecure_channel(address, options=protocol.channel_options(1 << 20)) for _ in range(20)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
        states.append([])
        channel.subscribe(states[-1].append)
    model = client(model_dir, srv.url)
    for _ in range(2):  # an honest client idling past it between two generations carries on
        ids = prompt(7)
        assert torch.equal(
            model.generate(ids, max_new_tokens=4, do_sample=False),
            reference.generate(ids, max_new_tokens=4, do_sample=False),
        )
        time.sleep(1.5)
    assert wait_for(lambda: all(grpc.ChannelConnectivity.IDLE in seen for seen in states), timeout_s=15)
    for channel in channels:
        channel.close()


def test_a_client_that_never_takes_its_replies_loses_its_session_and_its_stream_slot(server, model_dir, reference):
    """Sending steps without reading the replies used to hold the stream, its slot and its memory for good."""
    import queue

    from slicer_hf.transport.grpc import SESSION_METHOD

    srv = server("--max-streams", "2", "--idle-timeout-s", "2")
    channel = grpc.insecure_channel(srv.url.removeprefix("grpc://"), options=protocol.channel_options(64 << 20))
    requests = queue.Queue()
    call = channel.stream_stream(SESSION_METHOD)(iter(requests.get, None))
    fields = {"fingerprint": protocol.model_fingerprint(reference.config), "split_layer": 2}
    requests.put(protocol.encode_json(protocol.OPEN, {**fields, "codec": build_codec("identity").spec()}))
    session = protocol.decode_json(next(call))["session"]  # the last reply this client reads
    packet = build_codec("identity").encode(torch.randn(1, 1024, HIDDEN))
    for seq in range(1, 100):  # replies of 1024 positions pile up until flow control stops the server's writes
        requests.put(step_header(session, seq, 0, 1, 1024) + packet)
    assert wait_for(lambda: srv.stats()["errors"].get("stream_stalled") == 1, timeout_s=30)
    assert srv.stats()["sessions_active"] == 0 and srv.stats()["kv_bytes_used"] == 0
    ids = prompt(31)
    both = [client(model_dir, srv.url), client(model_dir, srv.url)]  # both stream slots are free again
    for model in both:
        model.generate(ids, max_new_tokens=1, do_sample=False)
    assert torch.equal(
        both[0].generate(ids, max_new_tokens=4, do_sample=False),
        reference.generate(ids, max_new_tokens=4, do_sample=False),
    )
    assert all(m.wire_stats().failovers == 0 for m in both)
    requests.put(None)
    call.cancel()
    channel.close()


def test_a_server_at_its_stream_limit_still_answers_health_stats_and_drain(server, model_dir):
    srv = server("--max-streams", "2")
    held = [GrpcTransport([srv.url], timeout_s=10) for _ in range(2)]
    for transport in held:
        raw_open(transport, model_dir)
    with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED.*limit of 2 session streams"):
        raw_open(GrpcTransport([srv.url], timeout_s=10), model_dir)
    with grpc.insecure_channel(srv.url.removeprefix("grpc://")) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert srv.stats()["sessions_active"] == 2 and srv.stats()["errors"]["too_many_streams"] == 1
    GrpcTransport([srv.url], timeout_s=10).unary(DRAIN_METHOD, json.dumps({"on": False}).encode())
    for transport in held:
        transport.close()


def test_a_full_server_is_retried_with_backoff(server, model_dir, reference):
    srv = server("--max-streams", "2", "--open-timeout-s", "1")
    held = [GrpcTransport([srv.url], timeout_s=30) for _ in range(2)]
    for transport in held:
        transport.request(protocol.encode_json(protocol.CLOSE, {"session": 0}))
    model = client(model_dir, srv.url)
    ids = prompt(26)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)  # RESOURCE_EXHAUSTED until the idle ones go
    assert torch.equal(out, reference.generate(ids, max_new_tokens=4, do_sample=False))
    assert model.wire_stats().failovers >= 1
    for transport in held:
        transport.close()


def test_a_timeout_is_not_a_dead_server(server, model_dir):
    srv = server("--threads", "1")
    model = client(model_dir, srv.url, timeout_s=0.001)
    with pytest.raises(TransportError, match="no (reply|answer) .* raise timeout_s to wait") as info:
        model.generate(prompt(27, 60), max_new_tokens=2)
    assert not info.value.retryable and model.wire_stats().failovers == 0
    assert srv.stats()["sessions_opened"] <= 1  # no replay piled onto the busy server


def test_drain_takes_the_admin_token_where_the_server_has_one_not_the_clients_token(server, model_dir, reference):
    """Every edge holds the clients' token: one of them could drain the server (again after each resume)."""
    import subprocess
    import sys

    srv = server("--token", "clients", "--admin-token", "operators")
    with pytest.raises(TransportError, match="Drain takes the admin token"):
        GrpcTransport([srv.url], token="clients", timeout_s=10).unary(DRAIN_METHOD, b'{"on": true}')
    for path in ("/" + DRAIN_METHOD, DRAIN_METHOD.lstrip("/")):  # other spellings had reached Drain unchecked
        with pytest.raises(TransportError, match="UNIMPLEMENTED"):
            GrpcTransport([srv.url], token="clients", timeout_s=10).unary(path, b'{"on": true}')
    assert srv.stats(token="clients")["draining"] == 0
    model = client(model_dir, srv.url, token="clients")
    ids = prompt(8)
    assert torch.equal(
        model.generate(ids, max_new_tokens=3, do_sample=False),
        reference.generate(ids, max_new_tokens=3, do_sample=False),
    )
    command = [sys.executable, "-c", "from slicer_hf.cli import main; main()", "drain", srv.url]
    done = subprocess.run([*command, "--admin-token", "operators"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "draining=True" in done.stdout, done.stderr[-2000:]


def test_without_an_admin_token_drain_is_taken_over_loopback_only():
    from slicer_hf.server.grpc_server import _local_peer

    for peer in ("ipv4:127.0.0.1:50000", "ipv6:[::1]:50000", "ipv6:%5B::1%5D:50000", "unix:/tmp/s"):
        assert _local_peer(peer), peer
    for peer in ("ipv4:192.0.2.2:50000", "ipv6:[fd00::2]:50000", "ipv4:10.0.0.1:1", ""):
        assert not _local_peer(peer), peer


def test_health_service_and_drain_mode(server, model_dir, reference):
    srv = server()
    with grpc.insecure_channel(srv.url.removeprefix("grpc://")) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        staying = client(model_dir, srv.url)
        ids = prompt(28)
        staying.generate(ids, max_new_tokens=3, do_sample=False)
        GrpcTransport([srv.url], timeout_s=10).unary(DRAIN_METHOD, json.dumps({"on": True}).encode())
        status = check(health_pb2.HealthCheckRequest(service=protocol.SERVICE)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(TransportError, match="draining"):
            client(model_dir, srv.url).generate(prompt(29), max_new_tokens=2)
        # open sessions carry on
        out = staying.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False))
        for body in (b'{"on": "false"}', b'{"on": 0}', b"[" * 100_000):  # no bool: refused, not taken as "drain"
            with pytest.raises(TransportError, match="drain takes"):
                GrpcTransport([srv.url], timeout_s=10).unary(DRAIN_METHOD, body)
        GrpcTransport([srv.url], timeout_s=10).unary(DRAIN_METHOD, json.dumps({"on": False}).encode())
        assert check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    client(model_dir, srv.url).generate(prompt(29), max_new_tokens=2)


def test_a_server_that_logs_a_lot_never_stalls(server, model_dir):
    srv = server("--log-level", "debug")
    raw = GrpcTransport([srv.url], timeout_s=30)
    for i in range(3000):  # each refusal logs a warning line: far more than a pipe holds
        junk = bytes([protocol.PROTOCOL_VERSION + 1 + i % 200]) + os.urandom(16)  # never a valid header (STATS, say)
        assert protocol.message_type(raw.request(junk)) == protocol.ERROR
    assert sum(srv.stats()["errors"].values()) >= 3000
    raw.close()


def test_a_token_without_tls_warns_off_loopback():
    with pytest.warns(UserWarning, match="without TLS"):
        GrpcTransport(["grpc://192.0.2.1:50051"], token="s3cret")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GrpcTransport(["grpc://127.0.0.1:50051"], token="s3cret")
        GrpcTransport(["grpcs://192.0.2.1:50051"], token="s3cret")


def test_a_server_at_its_stream_limit_is_not_said_to_be_missing(server, model_dir):
    """RESOURCE_EXHAUSTED comes from a server that runs: giving up quotes it, with no hint that none runs there."""
    from slicer_hf.link import SuffixLink

    srv = server("--max-streams", "1")
    held = GrpcTransport([srv.url], timeout_s=10)
    raw_open(held, model_dir)
    link = SuffixLink(
        GrpcTransport([srv.url], timeout_s=10), {"downlink": "hidden"}, build_codec("identity"), max_attempts=2
    )
    with pytest.raises(TransportError, match="gave up after 2 attempts; the last failure: .*RESOURCE_EXHAUSTED"):
        link.step_limits()
    held.close()


def unavailable(details: str) -> grpc.RpcError:
    """A call that failed UNAVAILABLE with these `details`, as grpc raises it."""

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return details

    return Failed()


def test_a_plain_stream_closed_after_replies_is_not_put_down_to_tls():
    """ "Is it grpcs://?" fits a first call a TLS server cut off, not a server that answered and then went away; either
    way something listened, so the link never asks whether a server runs there."""
    from slicer_hf.transport.grpc import _as_transport_error

    first = _as_transport_error(unavailable("Socket closed"), "grpc://h:1")
    assert "is it grpcs://" in str(first) and not first.unreachable
    later = _as_transport_error(unavailable("Socket closed"), "grpc://h:1", answered=True)
    assert "is it grpcs://" not in str(later) and not later.unreachable


def test_tls_asked_of_a_plain_server_says_so_at_once():
    from slicer_hf.transport.grpc import _as_transport_error

    # what grpc says where the server answers a TLS hello in plain HTTP/2
    plain = unavailable("failed to connect to all addresses; ... SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER")
    error = _as_transport_error(plain, "grpcs://h:1")
    assert "is it grpc://?" in str(error) and not error.retryable


def test_a_server_that_is_not_there_is_one_warning_and_a_hint(caplog):
    """The tries after the first go to the debug log; the error asks whether a server runs at that address."""
    import logging

    from slicer_hf.link import SuffixLink

    transport = GrpcTransport(["grpc://127.0.0.1:1"], timeout_s=5)
    link = SuffixLink(transport, {"downlink": "hidden"}, build_codec("identity"), max_attempts=3, backoff_s=0.01)
    gave_up = r"gave up after 3 attempts \(is a slicer-hf server running at grpc://127.0.0.1:1\?\)"
    with caplog.at_level(logging.DEBUG, logger="slicer_hf.link"), pytest.raises(TransportError, match=gave_up):
        link.step_limits()
    tries = [r for r in caplog.records if "trying again on grpc://127.0.0.1:1" in r.getMessage()]
    assert [r.levelno for r in tries] == [logging.WARNING, logging.DEBUG]  # none after the last


def test_a_server_that_answers_is_never_said_to_be_missing():
    """A server that refused (draining, here) ran: the error quotes its refusal, with no hint that none runs."""
    from conftest import tiny_model

    from slicer_hf.link import SuffixLink, open_request
    from slicer_hf.server import SplitServer
    from slicer_hf.transport import LocalTransport

    class Failover(LocalTransport):  # a list of servers: a refusal there is worth trying again
        def reset(self):
            return True

    server = SplitServer(tiny_model("llama"))
    server.drain()
    request = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", 2, build_codec("identity"))
    link = SuffixLink(Failover(server), request, build_codec("identity"), max_attempts=2, backoff_s=0)
    with pytest.raises(TransportError, match="gave up after 2 attempts; the last failure: .*draining"):
        link.step_limits()
    server.shutdown()


@pytest.mark.skipif(os.environ.get("SLICER_SKIP_LONG_IDLE") == "1", reason="opted out of the 65 s idle test")
def test_an_idle_session_survives_past_60_s(server, model_dir, reference):
    """Clients ping every 20 s; a server that allowed one ping per 5 minutes sent too_many_pings after ~60 s."""
    srv = server()
    model = client(model_dir, srv.url)
    ids = prompt(30)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    time.sleep(65)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=5, do_sample=False))
    assert model.wire_stats().failovers == 0
    assert srv.stats()["sessions_opened"] == 1


def test_concurrent_generate_on_one_model_is_refused_clearly(model_dir):
    model = SlicerModelForCausalLM.from_pretrained(model_dir, slicer_config=LOSSLESS)
    inside, release, errors = threading.Event(), threading.Event(), []

    def hold():
        inside.set()
        release.wait(30)

    first = threading.Thread(
        target=lambda: model.generate(prompt(31), max_new_tokens=3, streamer=CallbackStreamer(1, hold))
    )
    first.start()
    assert inside.wait(30)
    try:
        model.generate(prompt(32), max_new_tokens=3)
    except Exception as exc:  # checked below
        errors.append(exc)
    release.set()
    first.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    model.generate(prompt(32), max_new_tokens=3)  # turns taken: fine


def test_closing_the_session_while_another_thread_generates_is_refused_and_the_generation_stays_exact(model_dir):
    """close_session() from another thread returned, cancelled the running step and emptied the steps its failover
    replays: the generation gave up after 10 attempts."""
    from slicer_hf.modeling import ConcurrentUseError

    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    model = SlicerModelForCausalLM.from_pretrained(model_dir, slicer_config=LOSSLESS)
    inside, release, made = threading.Event(), threading.Event(), []

    def hold():
        inside.set()
        release.wait(30)

    ids = prompt(33)
    streamer = CallbackStreamer(2, hold)
    first = threading.Thread(
        target=lambda: made.append(model.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer))
    )
    first.start()
    assert inside.wait(30)
    try:
        with pytest.raises(ConcurrentUseError, match="another thread"):
            model.close_session()
        with pytest.raises(ConcurrentUseError):
            model.reset_wire_stats()
    finally:
        release.set()
        first.join()
    assert torch.equal(made[0], reference.generate(ids, max_new_tokens=6, do_sample=False))
    model.close_session()  # its turn now


def test_a_reply_for_another_step_is_refused(model_dir):
    model = SlicerModelForCausalLM.from_pretrained(model_dir, slicer_config=LOSSLESS)
    model.generate(prompt(33), max_new_tokens=2)
    transport = model._slicer_transport
    stale: list[bytes] = []
    plain = transport.request

    def replay_stale(data):
        reply = plain(data)
        if data[1] in (protocol.STEP, protocol.NEXT):
            stale.append(reply)
            return stale[0]  # always the first step's reply
        return reply

    transport.request = replay_stale
    with pytest.raises(ProtocolError, match="reply for step") as info:
        model.generate(prompt(34), max_new_tokens=3)
    assert info.value.code == "bad_seq"


def test_server_replies_are_checked_against_the_asked_shape(model_dir):
    config = LOSSLESS.replace(downlink="topk_logits", downlink_topk=8)
    model = SlicerModelForCausalLM.from_pretrained(model_dir, slicer_config=config)
    transport = model._slicer_transport
    plain = transport.request

    def hostile(data):
        reply = plain(data)
        if data[1] != protocol.STEP:
            return reply
        seq = protocol.decode_reply(reply)[0]
        body = b"".join(map(write_varint, (4096, 1, 8, 1 << 16)))  # would fill 4096 x 65536 logits: 1 GiB
        return protocol.encode_reply(seq, protocol.REPLY_TOPK, body)

    transport.request = hostile
    with pytest.raises(ProtocolError, match="expected") as info:
        model.generate(prompt(35), max_new_tokens=2)
    assert info.value.code == "bad_shape"


def test_an_in_process_split_model_is_garbage_collected(model_dir):
    import gc
    import weakref

    model = SlicerModelForCausalLM.from_pretrained(model_dir, slicer_config=LOSSLESS)
    model.generate(prompt(36), max_new_tokens=2)
    model_ref, server_ref = weakref.ref(model), weakref.ref(model.split_server)
    reaper = next(t for t in threading.enumerate() if t.name == "slicer-reaper" and t.is_alive())
    del model

    def collected() -> bool:  # the reaper holds its server for the moment of each sweep: a sweep may be running
        gc.collect()
        return model_ref() is None and server_ref() is None

    assert wait_for(collected, timeout_s=10)
    reaper.join(timeout=10)
    assert not reaper.is_alive()


def test_silently_wrong_options_are_refused_or_right(model_dir, reference):
    from slicer_hf import ConfigError

    model = SlicerModelForCausalLM.from_pretrained(model_dir, slicer_config=LOSSLESS)
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        model(prompt(37), output_hidden_states=True)
    for bad in (0, 1 << 17, 2.5, "64"):
        with pytest.raises(ConfigError, match="downlink_topk"):
            SlicerConfig(downlink_topk=bad)
    ids = prompt(38, 10)
    expected = reference(ids, labels=ids).loss
    for downlink in ("logits", "hidden"):
        split = SlicerModelForCausalLM.from_pretrained(model_dir, slicer_config=LOSSLESS.replace(downlink=downlink))
        assert torch.allclose(split(ids, labels=ids).loss, expected, atol=1e-6), downlink


def test_a_control_message_holding_an_integer_of_thousands_of_digits_is_malformed_not_an_internal_error():
    from conftest import tiny_model

    from slicer_hf.server import SplitServer

    huge = protocol.header(protocol.CLOSE) + b'{"session": ' + b"9" * 5000 + b"}"
    with pytest.raises(ProtocolError, match="malformed close message") as refused:
        protocol.decode_json(huge)
    assert refused.value.code == "malformed"
    server = SplitServer(tiny_model("llama"))
    reply = server.handle(huge)
    assert protocol.decode_json(reply)["code"] == "malformed" and server.stats_dict()["errors"] == {"malformed": 1}


@pytest.mark.parametrize(
    ("downlink", "reply_bytes"), [("logits", "163,904"), ("topk_logits", "163,904"), ("hidden", "81,984")]
)
def test_a_step_whose_reply_could_not_be_sent_is_refused_before_it_is_computed(downlink, reply_bytes):
    """22 bytes of zero rows used to make the compute thread build gigabytes of logits, then refuse the reply (or,
    for a top-k reply, send a few of them: the logits it is made from are counted)."""
    from conftest import tiny_model

    from slicer_hf.server import ServerLimits, SplitServer

    server = SplitServer(tiny_model("llama"), limits=ServerLimits(max_message_bytes=1 << 16))
    body = {
        "fingerprint": protocol.model_fingerprint(server.model.config),
        "split_layer": 2,
        "codec": build_codec("slicer").spec(),
        "downlink": downlink,
    }
    opened = server.handle(protocol.encode_json(protocol.OPEN, body))
    session = protocol.decode_json(opened)["session"]
    batch, tokens = 5, 64  # 320 positions back: float32 logits (vocab 128) or hidden states (width 64)
    packet = envelope(6, 1, (batch, tokens, 64)) + b"\x00\x00\x00\x00"  # a K=0 slicer packet: all zero rows
    reply = server.handle(step_header(session, 1, 0, batch, tokens) + packet)
    error = protocol.decode_json(reply)
    assert error["code"] == "too_large"
    assert f"this step's reply would take up to {reply_bytes} bytes" in error["message"]  # outputs, and headers
    assert server.stats_dict()["tokens"] == 0 and server.stats_dict()["compute_s"] == 0.0  # nothing ran
    reopened = protocol.decode_json(server.handle(protocol.encode_json(protocol.OPEN, body)))["session"]
    last_only = step_header(reopened, 1, 0, batch, tokens)[:-1] + write_varint(tokens - 1)  # need_from: the last
    assert protocol.message_type(server.handle(last_only + packet)) == protocol.REPLY


def test_replies_are_sized_to_what_this_edge_takes_where_the_server_would_send_more():
    """A server allowing 256 MiB messages named that in OPENED, the edge's channel took 64 MiB: every reply over
    that failed, and was retried ten times."""
    from conftest import tiny_model

    from slicer_hf.server import ServerLimits, SplitServer
    from slicer_hf.transport import LocalTransport

    transport = LocalTransport(SplitServer(tiny_model("llama"), limits=ServerLimits(max_message_bytes=256 << 20)))
    transport.max_message_bytes = 1 << 16
    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), LOSSLESS.replace(downlink="logits"), transport)
    assert model._link_for(2).step_limits().message_bytes == 1 << 16


def test_a_token_grpc_would_refuse_on_every_call_and_certificates_as_text_are_refused_up_front():
    with pytest.raises(TransportError, match="printable ASCII") as refused:
        GrpcTransport(["grpc://127.0.0.1:1"], token="s3cret\n")  # read from a file, its newline kept
    assert not refused.value.retryable
    from slicer_hf import ConfigError

    with pytest.raises(ConfigError, match="root_certificates must be PEM bytes, got str"):
        GrpcTransport(["grpcs://127.0.0.1:1"], root_certificates="-----BEGIN CERTIFICATE-----")


def test_a_link_that_gives_up_ends_its_stream():
    """After 'gave up', the session was gone but its stream and reader thread stayed until close_session()."""
    from conftest import tiny_model

    from slicer_hf.server import SplitServer
    from slicer_hf.transport import LocalTransport

    class Forgetful(LocalTransport):  # a server that loses every session's state at each step
        closed = 0

        def request(self, data: bytes) -> bytes:
            if protocol.message_type(data) == protocol.STEP:
                return protocol.encode_error("state_lost", "gone")
            return super().request(data)

        def close(self) -> None:
            Forgetful.closed += 1

    transport = Forgetful(SplitServer(tiny_model("llama")))
    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), LOSSLESS, transport)
    model._link_for(2).backoff_s = model._link_for(2).max_backoff_s = 0.0
    with pytest.raises(TransportError, match="gave up after"):
        model.generate(prompt(34), max_new_tokens=2)
    assert Forgetful.closed >= 1 and model._slicer_link.session is None


def test_a_message_over_a_size_limit_is_put_down_to_the_side_whose_limit_it_is():
    from slicer_hf.transport.grpc import MAX_REPLY_BYTES, _as_transport_error

    class Refused(grpc.RpcError):
        def __init__(self, limit):
            self.limit = limit

        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return f"Received message larger than max (99999999 vs. {self.limit})"

    assert "this edge takes replies up to" in str(_as_transport_error(Refused(MAX_REPLY_BYTES), "grpc://s:1"))
    assert "the server takes messages up to" in str(_as_transport_error(Refused(10), "grpc://s:1"))


def test_a_server_url_that_names_no_server_and_certificates_for_no_tls_server_are_refused_at_once():
    for url in ("grpc://", "grpc://127.0.0.1:99999", "grpc://127.0.0.1", "grpc://:50051"):
        with pytest.raises(TransportError, match="unsupported URL .*: use grpc://host:port") as caught:
            GrpcTransport([url])
        assert not caught.value.retryable
    with pytest.raises(TransportError, match="root certificates check grpcs:// servers"):
        GrpcTransport(["grpc://127.0.0.1:50051"], root_certificates=b"PEM")
