"""slicer-hf serve with real processes on loopback: concurrency, failover, bad input, limits, auth, cleanup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch
from conftest import tiny_model
from live import LOSSLESS, CallbackStreamer, client, prompt, raw_open, self_signed_localhost, step_header, wait_for
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from slicer_hf import ConfigError, ProtocolError, TransportError, build_codec, protocol
from slicer_hf.cli import app
from slicer_hf.transport.grpc import METRICS_METHOD, GrpcTransport

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_concurrent_clients_are_exact_and_batched(server, model_dir, reference):
    srv = server("--batching")
    results, errors = {}, []

    def run(i):
        try:
            model = client(model_dir, srv.url)
            ids = prompt(i, 4 + i % 5)
            results[i] = (model.generate(ids, max_new_tokens=16, do_sample=False), ids)
            model.close_session()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for out, ids in results.values():
        assert torch.equal(out, reference.generate(ids, max_new_tokens=16, do_sample=False))
    stats = srv.stats()
    assert stats["sessions_opened"] == 8 and stats["tokens"] > 8 * 16
    assert stats["batches"] > 0 and stats["batched_rows"] > stats["batches"]
    assert wait_for(lambda: srv.stats()["sessions_active"] == 0)


def test_kill_9_fails_over_to_the_next_server_exactly(server, model_dir, reference):
    first, second = server(), server()
    model = client(model_dir, [first.url, second.url])
    ids = prompt(11)
    out = model.generate(ids, max_new_tokens=20, do_sample=False, streamer=CallbackStreamer(8, first.kill))
    assert torch.equal(out, reference.generate(ids, max_new_tokens=20, do_sample=False))
    assert model.wire_stats().failovers >= 1
    assert second.stats()["sessions_opened"] == 1


def test_a_pipeline_is_answered_in_order_and_one_left_early_leaves_a_clean_stream(server, model_dir):
    srv = server()
    transport = GrpcTransport([srv.url], timeout_s=30)
    try:
        first = raw_open(transport, model_dir)
        step = protocol.encode_json(protocol.CLOSE, {"session": first})
        unknown = step_header(first, 0, 0, 1, 1)  # a step on the session just closed
        replies = list(transport.pipeline([step, unknown, unknown]))
        assert [protocol.message_type(r) for r in replies] == [protocol.CLOSED, protocol.ERROR, protocol.ERROR]
        assert all(b"unknown session" in r for r in replies[1:])

        again = raw_open(transport, model_dir)
        left = transport.pipeline([protocol.encode_json(protocol.CLOSE, {"session": again}), unknown, unknown])
        assert protocol.message_type(next(left)) == protocol.CLOSED
        left.close()  # two replies unread: they must not answer what follows
        assert raw_open(transport, model_dir) > again  # its own OPENED, not a reply left over
    finally:
        transport.close()


def test_a_first_server_that_never_answers_sends_the_client_on_within_its_timeout(server, model_dir, reference):
    """A frozen server's port still accepts connections: with timeout_s under gRPC's 20 s connect timeout, every
    generate() failed there and the second server was never tried. (Resumed, the server must still stop on SIGTERM:
    the signal may reach another thread than the one waiting for it.)"""
    import signal

    frozen, good = server(), server()
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        model = client(model_dir, [frozen.url, good.url], timeout_s=3)
        ids = prompt(12)
        assert torch.equal(
            model.generate(ids, max_new_tokens=6, do_sample=False),
            reference.generate(ids, max_new_tokens=6, do_sample=False),
        )
        assert model.wire_stats().failovers == 1
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)


def test_a_server_that_freezes_mid_generation_hands_its_session_to_the_next_one(server, model_dir, reference):
    """A stalled server (alive, not answering) had ended the generation with its timeout, another server at hand."""
    import signal

    from transformers import LogitsProcessor, LogitsProcessorList

    frozen, good = server(), server()

    class FreezeAtThirdToken(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 3:
                os.kill(frozen.proc.pid, signal.SIGSTOP)
            return scores

    try:
        model = client(model_dir, [frozen.url, good.url], timeout_s=3)
        ids = prompt(12)
        freeze = LogitsProcessorList([FreezeAtThirdToken()])
        assert torch.equal(
            model.generate(ids, max_new_tokens=6, do_sample=False, logits_processor=freeze),
            reference.generate(ids, max_new_tokens=6, do_sample=False),
        )
        assert model.wire_stats().failovers == 1
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)


def test_closing_a_session_on_a_frozen_server_does_not_wait_for_it(server, model_dir):
    """Ending the stream frees the session on the server: a CLOSE waited out timeout_s (60 s) on a frozen one."""
    import signal
    import weakref

    srv = server()
    model = client(model_dir, srv.url, timeout_s=30)
    model.generate(prompt(13), max_new_tokens=2, do_sample=False)
    link = weakref.ref(model._slicer_link)
    os.kill(srv.proc.pid, signal.SIGSTOP)
    sent = []
    model._slicer_link.transport.request = lambda data: sent.append(data)  # a CLOSE would wait on the frozen server
    try:
        model.close_session()
        assert sent == []  # the stream's end is the close
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    assert wait_for(lambda: srv.stats()["sessions_active"] == 0)
    import gc

    gc.collect()
    assert link() is None  # nothing keeps a closed link (its finalizer was kept until the model went)


def test_reconnects_to_a_restarted_server(server, model_dir, reference):
    srv = server()
    holder = {"srv": srv}
    model = client(model_dir, srv.url)

    def restart():
        holder["srv"].kill()
        holder["srv"] = server(port=srv.port)

    ids = prompt(12)
    out = model.generate(ids, max_new_tokens=16, do_sample=False, streamer=CallbackStreamer(5, restart))
    assert torch.equal(out, reference.generate(ids, max_new_tokens=16, do_sample=False))
    assert holder["srv"].stats()["sessions_opened"] == 1


def test_garbage_on_the_port_and_in_the_stream_is_survived(server, model_dir, reference):
    srv = server()
    good = client(model_dir, srv.url)
    ids = prompt(3)
    good.generate(ids, max_new_tokens=4, do_sample=False)  # a session that must survive what follows
    for junk in (b"\x00" * 64, os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(junk)
    raw = GrpcTransport([srv.url], timeout_s=10)
    for bad in (b"", b"\x01", os.urandom(200), protocol.header(protocol.STEP) + b"\xff\xff\xff"):
        reply = raw.request(bad)
        assert protocol.message_type(reply) == protocol.ERROR
    with pytest.raises(ProtocolError, match="protocol version 9"):
        protocol.raise_if_error(raw.request(bytes([9, protocol.OPEN]) + b"{}"))
    raw.close()
    assert torch.equal(
        good.generate(ids, max_new_tokens=6, do_sample=False),
        reference.generate(ids, max_new_tokens=6, do_sample=False),
    )
    assert srv.proc.poll() is None
    assert srv.stats()["errors"]["malformed"] >= 3


def test_truncated_and_corrupted_packets_get_clear_errors_and_close_only_their_session(server, model_dir):
    srv = server()
    other = client(model_dir, srv.url)
    other.generate(prompt(5), max_new_tokens=2, do_sample=False)
    model = client(model_dir, srv.url)
    model.generate(prompt(4), max_new_tokens=2, do_sample=False)
    link = model._slicer_link
    packets = {
        "truncated": lambda s: protocol.encode_step(
            protocol.Step(s, 9, 0, 1, 3, 0, link.codec.encode(torch.randn(1, 3, 64)))
        )[:-10],
        "bit-flipped header": lambda s: protocol.encode_step(
            protocol.Step(s, 9, 0, 1, 3, 0, b"\x01\x01\x09" + bytes(40))
        ),
        "wrong shape": lambda s: protocol.encode_step(
            protocol.Step(s, 9, 0, 1, 3, 0, link.codec.encode(torch.randn(1, 3, 32)))
        ),
    }
    for name, make in packets.items():
        link.open()  # each bad packet closes the session it came on: start from a fresh one
        with pytest.raises(ProtocolError) as info:
            protocol.raise_if_error(link.transport.request(make(link.session)))
        assert info.value.code in ("codec", "bad_shape"), name
        with pytest.raises(ProtocolError, match="unknown session"):
            protocol.raise_if_error(link.transport.request(make(link.session)))
    assert srv.proc.poll() is None
    stats = srv.stats()
    # `other` and the first session of `model` live on; the three broken ones were freed
    assert stats["sessions_active"] == 2 and stats["errors"]["codec"] == 3
    ids = prompt(5)
    assert other.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_wrong_model_and_unknown_session_are_refused(server, model_dir, tmp_path):
    srv = server()
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(tiny_model("qwen2").config).save_pretrained(other)
    with pytest.raises(ProtocolError, match="model mismatch"):
        client(str(other), srv.url).generate(prompt(1), max_new_tokens=2)
    raw = GrpcTransport([srv.url], timeout_s=10)
    step = protocol.encode_step(protocol.Step(12345, 1, 0, 1, 1, 0, b""))
    with pytest.raises(ProtocolError, match="unknown session") as info:
        protocol.raise_if_error(raw.request(step))
    assert info.value.code == "unknown_session"
    raw.close()


def test_edges_cut_prefills_to_the_step_limit_and_the_server_refuses_steps_over_it(server, model_dir, reference):
    srv = server("--max-step-tokens", "8", "--max-sessions", "2")
    ids = prompt(1, 20)
    edge = client(model_dir, srv.url, LOSSLESS.replace(prefill_chunk_tokens=64))  # 64 asked, 8 sent: OPENED says so
    got = edge.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, reference.generate(ids, max_new_tokens=3, do_sample=False))
    assert edge.wire_stats().uplink_messages == 1 + 3 + 2  # OPEN, the prompt in 8 + 8 + 4, two decode steps
    edge.close_session()
    raw = GrpcTransport([srv.url], timeout_s=30)
    step = step_header(raw_open(raw, model_dir), 1, 0, 1, 9)  # an edge that does not cut: refused from its header
    with pytest.raises(ProtocolError, match="step of 9 tokens exceeds the limit 8"):
        protocol.raise_if_error(raw.request(step))
    raw.close()
    assert wait_for(lambda: srv.stats()["sessions_active"] == 0)
    held = [client(model_dir, srv.url) for _ in range(2)]
    for model in held:
        model.generate(prompt(2), max_new_tokens=2, do_sample=False)
    with pytest.raises(ProtocolError, match="server full: 2 sessions"):
        client(model_dir, srv.url).generate(prompt(2), max_new_tokens=2)
    held[0].close_session()
    assert wait_for(lambda: srv.stats()["sessions_active"] == 1)
    client(model_dir, srv.url).generate(prompt(2), max_new_tokens=2)


def test_idle_sessions_expire_and_clients_recover(server, model_dir, reference):
    srv = server("--idle-timeout-s", "0.5")
    model = client(model_dir, srv.url)
    ids = prompt(5)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert wait_for(lambda: srv.stats()["sessions_active"] == 0)
    # the next generate() finds its session gone, opens a new one and carries on
    assert torch.equal(
        model.generate(ids, max_new_tokens=5, do_sample=False),
        reference.generate(ids, max_new_tokens=5, do_sample=False),
    )


@pytest.mark.parametrize("timeout_s", [-1, 0, float("inf"), float("nan"), "30", True])
def test_a_transports_timeout_is_checked_when_it_is_made_not_at_its_first_request(timeout_s):
    """-1 and '30' failed at the first request with gRPC's or Python's own errors, infinity with an OverflowError."""
    from slicer_hf.transport.fleet import FleetTransport

    with pytest.raises(ConfigError, match="timeout_s must be a finite number of seconds, above 0"):
        GrpcTransport(["grpc://127.0.0.1:50051"], timeout_s=timeout_s)
    with pytest.raises(ConfigError, match="router_timeout_s must be a finite number of seconds"):
        FleetTransport("slicer+http://127.0.0.1:8000", router_timeout_s=timeout_s)


def test_auth_token_is_required_when_configured(server, model_dir):
    srv = server("--token", "s3cret")
    with pytest.raises(TransportError, match="UNAUTHENTICATED"):
        client(model_dir, srv.url, timeout_s=10).generate(prompt(1), max_new_tokens=2)
    with pytest.raises(TransportError, match="UNAUTHENTICATED"):
        client(model_dir, srv.url, token="wrong", timeout_s=10).generate(prompt(1), max_new_tokens=2)
    out = client(model_dir, srv.url, token="s3cret").generate(prompt(1), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 8)
    assert srv.stats(token="s3cret")["errors"]["unauthenticated"] == 2


def test_vanished_client_frees_its_session(server, model_dir):
    srv = server()
    script = (
        "import sys, torch, time\n"
        "from slicer_hf import SlicerConfig, SlicerModelForCausalLM\n"
        f"m = SlicerModelForCausalLM.from_pretrained({model_dir!r}, slicer_config=SlicerConfig(codec='identity', "
        f"split_layer=2), transport={srv.url!r})\n"
        "m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert srv.stats()["sessions_active"] == 1
    proc.kill()
    proc.wait()
    assert wait_for(lambda: srv.stats()["sessions_active"] == 0)
    assert srv.stats()["sessions_closed"] == 1


def test_tls(server, model_dir, tmp_path, reference):
    cert_pem = self_signed_localhost(tmp_path)
    srv = server(
        "--host", "localhost", "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")
    )
    assert srv.url.startswith("grpcs://localhost:")
    ids = prompt(8)
    out = client(model_dir, srv.url, root_certificates=cert_pem).generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=4, do_sample=False))
    stats = CliRunner().invoke(app, ["stats", srv.url, "--root-cert", str(tmp_path / "cert.pem")])  # a private CA
    assert stats.exit_code == 0 and '"sessions_opened": 1' in stats.output, stats.output
    untrusting = client(model_dir, srv.url)  # no root certificate: no retry will make it trust the server
    with pytest.raises(TransportError, match="not trusted here: pass its CA with --root-cert") as refused:
        untrusting.generate(ids, max_new_tokens=2, do_sample=False)
    assert not refused.value.retryable and untrusting.wire_stats().retries == 0
    elsewhere = client(model_dir, srv.url.replace("localhost", "127.0.0.1"), root_certificates=cert_pem)
    with pytest.raises(TransportError, match="certificate does not name the host in the URL") as refused:
        elsewhere.generate(ids, max_new_tokens=2, do_sample=False)  # the certificate names localhost only
    assert not refused.value.retryable and elsewhere.wire_stats().retries == 0
    plain = GrpcTransport([srv.url.replace("grpcs://", "grpc://")], timeout_s=30)
    with pytest.raises(TransportError, match="is it grpcs://"):
        plain.request(protocol.encode_json(protocol.CLOSE, {"session": 0}))
    plain.close()
    from slicer_hf.link import SuffixLink

    plain = GrpcTransport([srv.url.replace("grpcs://", "grpc://")], timeout_s=30)
    link = SuffixLink(plain, {"downlink": "hidden"}, build_codec("identity"), max_attempts=2, backoff_s=0)
    with pytest.raises(TransportError, match="gave up after 2 attempts") as refused:
        link.step_limits()  # the server ran: the link does not ask whether one runs there
    assert "is it grpcs://" in str(refused.value) and "is a slicer-hf server running" not in str(refused.value)
    plain.close()


def test_metrics_are_prometheus_text_over_http_and_grpc(server, model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = server("--metrics-port", str(port))
    client(model_dir, srv.url).generate(prompt(1), max_new_tokens=3, do_sample=False)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    over_grpc = GrpcTransport([srv.url], timeout_s=10).unary(METRICS_METHOD).decode()
    for text in (scraped, over_grpc):
        assert "# TYPE slicer_tokens_total counter" in text
        assert "slicer_sessions_opened_total 1.0" in text
        assert "# TYPE slicer_kv_bytes_used gauge" in text
        assert "# TYPE slicer_kv_store gauge" in text and "# TYPE slicer_kv_store_bytes gauge" in text  # not counted


def test_with_a_token_the_http_metrics_want_it_too(server):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server("--metrics-port", str(port), "--token", "s3cret")
    url = f"http://127.0.0.1:{port}/metrics"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert refused.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert 'slicer_errors_total{code="unauthenticated"} 2.0' in response.read().decode()


def test_a_tls_server_serves_its_metrics_over_https_so_the_token_never_crosses_in_clear(server, tmp_path):
    import ssl

    self_signed_localhost(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tls = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    server("--host", "localhost", *tls, "--metrics-port", str(port), "--token", "s3cret")
    with pytest.raises(OSError):  # plain HTTP is not spoken there (a refused handshake, a closed connection)
        urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10)
    trusting = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    request = urllib.request.Request(f"https://localhost:{port}/metrics", headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=10, context=trusting) as response:
        assert "# TYPE slicer_tokens_total counter" in response.read().decode()


def test_a_full_server_sends_the_client_to_the_next_one(server, model_dir, reference):
    full, spare = server("--max-sessions", "1"), server()
    holder = client(model_dir, full.url)
    holder.generate(prompt(13), max_new_tokens=2, do_sample=False)  # takes the only session
    model = client(model_dir, [full.url, spare.url])
    ids = prompt(14)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False))
    assert spare.stats()["sessions_opened"] == 1 and full.stats()["errors"]["too_many_sessions"] == 1


def test_serve_refuses_an_empty_token_half_a_tls_pair_and_names_a_bad_certificate():
    """An empty token would lock every client out; a certificate without its key would serve in clear."""
    from types import SimpleNamespace

    from slicer_hf.server import ServerLimits
    from slicer_hf.server.grpc_server import serve

    engine = SimpleNamespace(limits=ServerLimits())  # enough for a server that never starts
    with pytest.raises(ConfigError, match="token is empty"):
        serve(engine, port=0, token="")
    with pytest.raises(ConfigError, match="printable ASCII"):  # no client could send it: every call refused
        serve(engine, port=0, token="tok\n")
    for half in ({"tls_cert": b"PEM"}, {"tls_key": b"PEM"}):
        with pytest.raises(ConfigError, match="tls_cert and tls_key together"):
            serve(engine, port=0, **half)
    with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:0: .* TLS certificate/key invalid"):
        serve(engine, port=0, tls_cert=b"not a certificate", tls_key=b"not a key")


def test_serve_logs_its_own_lines_once_and_another_librarys_once():
    """A library with a handler of its own (huggingface_hub's retries) had each line printed twice: through it, and
    through the root logger serve configured."""
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from slicer_hf.cli.serving import _setup_logging\n"
        "_setup_logging('info')\n"
        "library = logging.getLogger('a_library')\n"
        "library.addHandler(logging.StreamHandler())\n"
        "library.warning('retrying in 8s')\n"
        "logging.getLogger('slicer_hf.server.engine').info('serving')\n"
        "logging.getLogger('slicer_hf.server.engine').debug('below the level')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("retrying in 8s") == 1
    assert done.stderr.count("INFO slicer_hf.server.engine: serving") == 1 and "below the level" not in done.stderr
