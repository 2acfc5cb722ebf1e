"""A fleet on Ray Serve (local Ray, 2 CPUs, a tiny Llama): sessions spread over replicas, a killed replica, a
restarting router, stale endpoints and refusals end in exact output or a clear error, never a hang. The fleet
client (`slicer+http://`) against a stand-in router is tested without Ray first."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time
import types
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from live import CallbackStreamer, client, prompt, wait_for

from slicer_hf import ProtocolError, TransportError, protocol
from slicer_hf.transport import make_transport
from slicer_hf.transport.fleet import FleetTransport
from slicer_hf.transport.grpc import DRAIN_METHOD, GrpcTransport

TOKEN = "fleet-secret"


# ---------------------------------------------------------------------------------------------------- without Ray
def answer_json(handler, status, answer, headers=()):
    """A stand-in router's HTTP answer: `answer` as JSON with `status`."""
    data = json.dumps(answer).encode()
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class StandInRouter:
    """An HTTP router that answers `POST /session` from a script of (status, body) replies."""

    def __init__(self, replies, retry_after=None):
        self.replies, self.requests = list(replies), []
        headers = () if retry_after is None else (("Retry-After", retry_after),)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                status, answer = outer.replies.pop(0) if outer.replies else (503, {"error": "script ended"})
                answer_json(self, status, answer, headers if status == 503 else ())

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"slicer+http://127.0.0.1:{self.http.server_address[1]}"

    def close(self):
        self.http.shutdown()


def forbid_waiting(monkeypatch, module):
    """From now on `module` may not sleep (its clock stays the real one): a test of an answer "at once" checks that
    nothing waited, not how long it took."""

    def sleep(seconds):
        raise AssertionError(f"{module.__name__} waited {seconds:g} s")

    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep))


@pytest.fixture
def no_admission_wait(monkeypatch):
    """The fleet client may not wait for a router to offer a replica."""
    from slicer_hf.transport import fleet as fleet_transport

    forbid_waiting(monkeypatch, fleet_transport)


def test_the_core_package_and_the_fleet_client_never_import_ray():
    import subprocess
    import sys

    code = (
        "import sys, slicer_hf, slicer_hf.transport.fleet, slicer_hf.server, slicer_hf.cli; print('ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_fleet_urls_make_a_fleet_transport_and_bad_ones_are_refused():
    assert isinstance(make_transport("slicer+http://router:8000", token="t"), FleetTransport)
    for bad in (["slicer+http://a:1", "slicer+http://b:1"], "http://router:8000", ["grpc://a:1", "slicer+http://b:1"]):
        with pytest.raises(TransportError, match="fleet router URL"):
            make_transport(bad)
    with pytest.raises(TransportError, match=r"got '127.0.0.1:50061' \(a server at 127.0.0.1:50061: grpc://127"):
        make_transport("127.0.0.1:50061")  # the scheme left out


@pytest.mark.network
@pytest.mark.slow
def test_the_client_leaves_out_failed_endpoints_and_surfaces_router_errors(server, model_dir, reference):
    live = server()
    router = StandInRouter(
        [
            (200, {"endpoint": "grpc://127.0.0.1:9", "replica": "dead"}),  # a stale endpoint
            (200, {"endpoint": live.url, "replica": "live"}),
        ]
    )
    try:
        model = client(model_dir, router.url)
        ids = prompt(3)
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False))
        assert [r[2]["exclude"] for r in router.requests] == [[], ["grpc://127.0.0.1:9"]]
        assert model.wire_stats().failovers == 1
    finally:
        router.close()
    for status, retryable in ((401, False), (404, False), (502, True), (503, False)):  # 503: after admission_wait_s
        refusing = StandInRouter([(status, {"error": "nope"})])
        try:
            with pytest.raises(TransportError, match=f"HTTP {status}: nope") as info:
                FleetTransport(refusing.url, token="t", admission_wait_s=0).request(b"x")
            assert info.value.retryable is retryable
            assert refusing.requests[0][1] == "Bearer t"
        finally:
            refusing.close()
    with pytest.raises(TransportError, match="without a gRPC endpoint"):
        odd = StandInRouter([(200, {"endpoint": "http://nope"})])
        try:
            FleetTransport(odd.url).request(b"x")
        finally:
            odd.close()


@pytest.mark.network
@pytest.mark.slow
def test_replicas_that_each_refuse_for_want_of_room_stay_left_out_until_the_refusal_is_the_answer(
    server, model_dir, no_admission_wait
):
    """Each replica opens the session, then refuses its prompt step (a KV budget too small): an OPENED is no sign
    that the replicas left out before may serve, so the client asks for neither again and answers with the
    refusal, instead of bouncing between them until its attempts run out."""
    small = [server("--kv-memory", "64KiB") for _ in range(2)]
    everyone_refused = (503, {"error": "every replica refused", "left_out": 2, "known": 2})
    router = StandInRouter([(200, {"endpoint": s.url, "replica": str(i)}) for i, s in enumerate(small)])
    router.replies.append(everyone_refused)
    try:
        with pytest.raises(ProtocolError, match="KV") as caught:
            client(model_dir, router.url).generate(prompt(4, length=200), max_new_tokens=2, do_sample=False)
        assert caught.value.code == "kv_budget"
        assert [r[2]["exclude"] for r in router.requests] == [[], [small[0].url], [small[0].url, small[1].url]]
    finally:
        router.close()


@pytest.mark.network
@pytest.mark.slow
def test_a_session_that_outgrows_every_replica_mid_generation_is_refused_not_bounced_between_them(server, model_dir):
    """The prompt fits, the generation outgrows the budget: the replay on the second replica answered steps, which
    put the first back in play, and the client went back and forth, replaying everything each time, until its
    attempts ran out (then a chat ended, where one server's refusal only drops the turn)."""
    small = [server("--kv-memory", "64KiB") for _ in range(2)]
    everyone_refused = (503, {"error": "every replica refused", "left_out": 2, "known": 2})
    router = StandInRouter([(200, {"endpoint": s.url, "replica": str(i)}) for i, s in enumerate(small)])
    router.replies.append(everyone_refused)
    try:
        with pytest.raises(ProtocolError, match="KV") as caught:
            client(model_dir, router.url).generate(prompt(4, length=8), max_new_tokens=1000, do_sample=False)
        assert caught.value.code == "kv_budget"
        assert [r[2]["exclude"] for r in router.requests] == [[], [small[0].url], [small[0].url, small[1].url]]
    finally:
        router.close()


@pytest.mark.network
@pytest.mark.slow
def test_a_replica_that_never_answers_a_new_stream_is_left_for_another_from_the_router(server, model_dir, reference):
    import socket

    frozen = socket.create_server(("127.0.0.1", 0))  # takes connections (the kernel's backlog), never answers
    live = server()
    router = StandInRouter(
        [(200, {"endpoint": f"grpc://127.0.0.1:{frozen.getsockname()[1]}"}), (200, {"endpoint": live.url})]
    )
    try:
        ids = prompt(2)
        got = client(model_dir, router.url, timeout_s=3).generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, reference.generate(ids, max_new_tokens=4, do_sample=False))
    finally:
        router.close()
        frozen.close()


def test_a_fleet_client_sizes_its_steps_to_the_replies_its_streams_take():
    """The link cuts steps so that their replies fit the edge's channel, as for a grpc:// server."""
    assert (
        FleetTransport("slicer+http://127.0.0.1:1").max_message_bytes == GrpcTransport(["grpc://a:1"]).max_message_bytes
    )


def test_while_the_router_has_no_replica_to_offer_admission_waits_as_told_and_leaves_failed_endpoints_out(
    monkeypatch,
):
    """A replica restarting (the only one, say) is gone from the router for a few seconds: admission asks again
    after each 503's Retry-After for up to `admission_wait_s`, instead of spending the link's failover attempts,
    and keeps leaving out the endpoint that failed (`EXCLUDE_S`)."""
    busy = (503, {"error": "none of 1 replicas takes a session now"})
    router = StandInRouter([busy, busy, (200, {"endpoint": "grpc://127.0.0.1:9", "replica": "new"})], "0.1")
    try:
        transport = FleetTransport(router.url, admission_wait_s=10)
        transport._failed["grpc://127.0.0.1:7"] = time.monotonic()  # what reset() records for a lost replica
        slept, sleep = [], time.sleep
        main = threading.main_thread()  # the admission's sleeps, not the stand-in router's
        monkeypatch.setattr(
            time, "sleep", lambda s: (threading.current_thread() is main and slept.append(round(s, 3)), sleep(s))
        )
        assert transport.admit()["replica"] == "new"
        assert slept == [0.1, 0.1]  # each 503's Retry-After
        monkeypatch.undo()
        assert [r[2]["exclude"] for r in router.requests] == [["grpc://127.0.0.1:7"]] * 3
        router.replies = [busy] * 100
        with pytest.raises(
            TransportError, match="HTTP 503: none of 1.*still none after admission_wait_s=0.3 s"
        ) as info:
            FleetTransport(router.url, admission_wait_s=0.3).admit()
        assert not info.value.retryable  # the link does not wait admission_wait_s again, up to 10 times
    finally:
        router.close()


def test_a_router_answer_past_its_size_cap_is_refused_not_read_whole():
    router = StandInRouter([(200, {"endpoint": "grpc://127.0.0.1:9", "pad": "A" * (1 << 20)})])
    try:
        with pytest.raises(TransportError, match="an answer over 65,536 bytes"):
            FleetTransport(router.url).admit()
    finally:
        router.close()


class RawRouter:
    """A TCP server that answers the first request with `reply(connection)`: broken or trickled HTTP. `sends` counts
    the answer's writes begun."""

    def __init__(self, reply):
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"slicer+http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sends = 0

        def answer():
            connection, _ = self.listener.accept()
            with connection, contextlib.suppress(OSError):  # OSError: the client gave up
                connection.recv(1 << 16)
                reply(types.SimpleNamespace(sendall=functools.partial(self._send, connection)))

        threading.Thread(target=answer, daemon=True).start()

        threading.Thread(target=answer, daemon=True).start()

    def _send(self, connection, data):
        self.sends += 1  # before the write: a client that read the whole answer finds it counted
        connection.sendall(data)

    def close(self):
        self.listener.close()


TRICKLE = 20  # writes, 0.5 s apart


def trickled_headers(connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\n")
    for i in range(TRICKLE):
        connection.sendall(b"X-Slow-%d: a\r\n" % i)
        time.sleep(0.5)
    connection.sendall(b"Content-Length: 2\r\n\r\n{}")


def trickled_error_body(connection):
    connection.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(TRICKLE):
        connection.sendall(b" ")
        time.sleep(0.5)


def test_a_router_answer_that_is_not_http_is_a_retryable_transport_error():
    router = RawRouter(lambda connection: connection.sendall(b"garbage\r\n"))
    try:
        with pytest.raises(TransportError, match="broken HTTP answer") as caught:
            FleetTransport(router.url).admit()
        assert caught.value.retryable
    finally:
        router.close()


@pytest.mark.parametrize(
    "reply, match", [(trickled_headers, "before its whole answer came"), (trickled_error_body, "HTTP 503: Busy")]
)
def test_a_router_that_trickles_its_answer_is_given_up_on_within_the_router_timeout(reply, match):
    """router_timeout_s bounds the whole answer, headers and error bodies included, not each read: the client gives
    up while the router is still trickling (a write every 0.5 s for 10 s)."""
    router = RawRouter(reply)
    try:
        with pytest.raises(TransportError, match=match):
            FleetTransport(router.url, router_timeout_s=1.0, admission_wait_s=0).admit()
        assert router.sends <= TRICKLE  # the answer's last write not begun
    finally:
        router.close()


def test_an_empty_token_or_a_certificate_that_is_not_pem_is_refused_up_front():
    from slicer_hf import ConfigError

    with pytest.raises(TransportError, match="token is empty"):
        FleetTransport("slicer+http://router:8000", token="")
    with pytest.raises(TransportError, match="token is empty"):
        GrpcTransport(["grpc://127.0.0.1:1"], token="")
    with pytest.raises(TransportError, match="printable ASCII") as unusable:  # a token file's newline: no HTTP header
        FleetTransport("slicer+http://router:8000", token="tok\n")  # carries it (it had been retried for 10 s
    assert not unusable.value.retryable  # as an unreachable router)
    for not_pem in (b"not a certificate", b"\x30\x82\xff"):
        with pytest.raises(ConfigError, match="PEM CA certificates"):
            FleetTransport("slicer+https://router:8000", root_certificates=not_pem)
        with pytest.raises(ConfigError, match="PEM CA certificates"):  # not a handshake failing on every call
            GrpcTransport(["grpcs://127.0.0.1:1"], root_certificates=not_pem)


@pytest.mark.network
def test_a_ca_for_the_router_alone_leaves_plain_replicas_reachable(server, model_dir, reference, tmp_path):
    """TLS at the router (Serve's proxy) with plain gRPC replicas: the client's CA is the router's, not theirs."""
    from live import self_signed_localhost

    live = server()
    router = StandInRouter([(200, {"endpoint": live.url, "replica": "plain"})])
    try:
        model = client(model_dir, router.url, root_certificates=self_signed_localhost(tmp_path))
        ids = prompt(3)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, reference.generate(ids, max_new_tokens=4, do_sample=False))
    finally:
        router.close()


def test_a_failover_list_may_mix_grpc_and_grpcs():
    transport = make_transport(["grpc://a:1", "grpcs://b:1"])
    assert isinstance(transport, GrpcTransport) and transport.urls == ["grpc://a:1", "grpcs://b:1"]


class HttpsReplicaList:
    """An HTTPS `GET /replicas` with a certificate for `localhost`, answering 401 to a wrong token."""

    def __init__(self, folder, token=None):
        import ssl

        from live import self_signed_localhost

        self.cert = self_signed_localhost(folder).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if token and self.headers.get("Authorization") != f"Bearer {token}":
                    status, answer = 401, {"error": "missing or wrong auth token"}
                else:
                    status, answer = 200, {"replicas": [{"endpoint": "grpcs://localhost:1"}]}
                answer_json(self, status, answer)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.port = self.http.server_address[1]

    def close(self):
        self.http.shutdown()


def test_waiting_for_replicas_stops_at_once_on_a_certificate_for_another_host_or_a_refused_token(tmp_path, monkeypatch):
    """deploy() waits for the router at the advertised host: a certificate that does not name it, or a refused
    token, is an error at once, not five minutes of silence."""
    pytest.importorskip("ray")
    from slicer_hf.server import fleet as fleet_module
    from slicer_hf.server.fleet import wait_for_replicas

    router = HttpsReplicaList(tmp_path, token=TOKEN)
    try:
        assert len(wait_for_replicas(f"slicer+https://localhost:{router.port}", 1, TOKEN, router.cert)) == 1
        forbid_waiting(monkeypatch, fleet_module)  # neither is asked again
        with pytest.raises(TransportError, match="TLS with router .* failed.*--advertise-host"):
            wait_for_replicas(f"slicer+https://127.0.0.1:{router.port}", 1, TOKEN, router.cert, timeout_s=60)
        with pytest.raises(TransportError, match="refused the token: HTTP 401"):
            wait_for_replicas(f"slicer+https://localhost:{router.port}", 1, "wrong", router.cert, timeout_s=60)
    finally:
        router.close()
    plain = StandInRouter([])  # HTTPS asked of a router that speaks plain HTTP (a Serve started without TLS)
    try:
        with pytest.raises(TransportError, match="does not speak HTTPS"):
            wait_for_replicas(plain.url.replace("slicer+http:", "slicer+https:"), 1, timeout_s=60)
    finally:
        plain.close()


def test_a_router_whose_certificate_is_untrusted_or_names_another_host_is_refused_at_once(tmp_path):
    """Both had been retried ten times as an unreachable router (is a slicer-hf server running there?)."""
    router = HttpsReplicaList(tmp_path)
    try:
        for host, roots in (("localhost", None), ("127.0.0.1", router.cert.encode())):
            transport = FleetTransport(f"slicer+https://{host}:{router.port}", root_certificates=roots)
            with pytest.raises(TransportError, match="certificate verify failed.*pass its CA with --root-cert") as no:
                transport.admit()
            assert not no.value.retryable
    finally:
        router.close()


def test_the_autoscaling_policy_asks_for_replicas_by_active_sessions():
    pytest.importorskip("ray")
    from slicer_hf.server.fleet import SessionsPolicy

    class Context:
        capacity_adjusted_min_replicas, capacity_adjusted_max_replicas = 1, 4

        def __init__(self, sessions):
            self.aggregated_metrics = {"active_sessions": dict(enumerate(sessions))}

    policy = SessionsPolicy(sessions_per_replica=8)
    assert [policy(Context(s))[0] for s in ([], [3], [8, 1], [8, 8, 8], [40, 40])] == [1, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------- on Ray
def test_a_cluster_address_nothing_answers_at_is_refused_at_once_not_retried_for_minutes(monkeypatch):
    pytest.importorskip("ray")
    import ray

    from slicer_hf import ConfigError
    from slicer_hf.server import fleet

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match="no Ray cluster answers at 127.0.0.1:1"):  # Ray: about 13 minutes
        fleet.deploy(fleet.FleetOptions(), address="127.0.0.1:1")

    def no_cluster(**options):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)  # `auto` with none running: a traceback before
    with pytest.raises(ConfigError, match="cannot join the Ray cluster at 'auto': Could not find"):
        fleet.deploy(fleet.FleetOptions(), address="auto")


def test_with_no_cluster_named_the_fleet_starts_ray_of_its_own_not_one_ray_start_left_running(monkeypatch):
    pytest.importorskip("ray")
    import ray

    from slicer_hf import ConfigError
    from slicer_hf.server import fleet

    asked = []

    def init(address=None, **options):
        asked.append(address)
        raise ConnectionError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError):
        fleet.deploy(fleet.FleetOptions())
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # named by the environment: Ray's to join
    monkeypatch.setattr(fleet, "_check_reachable", lambda address: None)
    with pytest.raises(ConfigError):
        fleet.deploy(fleet.FleetOptions())
    assert asked == ["local", None]  # ray.init() alone joins whatever cluster `ray start` left on this machine


def test_fleet_options_are_checked_and_a_serve_config_builds_the_app():
    pytest.importorskip("ray")
    from slicer_hf.server.fleet import FleetOptions, app_builder

    for bad, match in (
        ({"replicas": 0}, "replicas"),
        ({"autoscale": (3, 2)}, "autoscale"),
        ({"limits": {"nope": 1}}, "nope"),
        ({"token": ""}, "token"),
        ({"tls_cert": "PEM"}, "tls_cert and tls_key"),
        ({"autoscale": (1, 4), "limits": {"max_sessions": 16}}, r"sessions_per_replica \(16\) must be below"),
        ({"autoscale": (0.5, 2)}, "two integers"),  # had become (0, 2): no replica at all
        ({"autoscale": "1,4,9"}, "two integers"),
        ({"autoscale": 4}, "two integers"),
        ({"replicas": 2.5}, "replicas must be an integer"),
        ({"sessions_per_replica": 0}, "sessions_per_replica must be an integer >= 1"),
        ({"heartbeat_s": 0}, "heartbeat_s must be a number of at least 0.1"),  # every replica forgotten at once
        ({"heartbeat_s": 1e-4}, "heartbeat_s must be a number of at least 0.1"),  # 10,000 router calls a second
        ({"router_port": 0}, "router_port must be a port number"),  # Serve took it, then never said where it was
        ({"router_port": 70000}, "router_port must be a port number"),
        ({"route_prefix": "/scale/"}, "route_prefix must start with '/' and not end with one"),  # Serve, after Ray
        ({"token": "tok "}, "printable ASCII"),  # no client could send it
        ({"token": "t\u00f6ken"}, "printable ASCII"),
        ({"threads": 0}, "threads must be an integer >= 1"),  # had been ignored
        ({"min_split_layer": -5}, "min_split_layer must be an integer >= 1"),
        ({"dtype": "float33"}, "dtype must be one of float32, bfloat16, float16, auto"),
        ({"drain_timeout_s": -10}, "drain_timeout_s must be a number >= 0"),
        ({"replica_cpus": -1}, "replica_cpus must be a number >= 0"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            FleetOptions(**bad)
    assert FleetOptions(autoscale="1, 4").autoscale == (1, 4)  # as a YAML string
    app = app_builder({"model": "smollm2", "autoscale": [1, 3], "token": "t"})  # what `serve run fleet.yaml` calls
    assert type(app).__name__ == "Application"
    # replicas that may share a node share its free memory, unless each is given its budget
    assert FleetOptions(replicas=4).replica_limits(8 << 30).kv_budget_bytes == 2 << 30
    assert FleetOptions(autoscale=(1, 8)).replica_limits(8 << 30).kv_budget_bytes == 1 << 30
    gpus = {1.0: 8 << 30, 0.5: 4 << 30, 0.25: 2 << 30}  # a GPU of its own, or a half or a quarter of one
    for share, budget in gpus.items():
        on_gpus = FleetOptions(replicas=4, replica_gpus=share, device="cuda")
        assert on_gpus.replica_limits(8 << 30).kv_budget_bytes == budget
    # GPUs reserved for replicas that run on the CPU: they share the node's memory all the same
    assert FleetOptions(replicas=4, replica_gpus=1.0).replica_limits(8 << 30).kv_budget_bytes == 2 << 30
    given = FleetOptions(replicas=4, limits={"kv_budget_bytes": 3 << 30})
    assert given.replica_limits(8 << 30).kv_budget_bytes == 3 << 30


def test_a_sigterm_while_the_fleet_deploys_unwinds_like_ctrl_c_through_its_clean_up():
    """Ray's own SIGTERM handler had ended `serve --ray` midway, its application and a copy of its TLS key left."""
    pytest.importorskip("ray")
    import signal

    from slicer_hf.server.fleet import _sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _sigterm_unwinds():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal lands here
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_router_forgets_silent_replicas_and_says_why_it_has_none_to_offer():
    pytest.importorskip("ray")
    import asyncio
    import inspect

    from slicer_hf.server.fleet import Router

    router = Router(heartbeat_s=0.1)
    assert router.unavailable(set()) == {"error": "no replica has registered yet", "known": 0, "left_out": 0}
    # a report runs on the router's event loop, as `pick` does, never on a thread beside it
    assert inspect.iscoroutinefunction(Router.register)
    info = {"endpoint": "grpc://a:1", "sessions_active": 0, "max_sessions": 1, "kv_free_bytes": 1, "draining": False}
    asyncio.run(router.register({**info, "replica": "a"}))
    asyncio.run(router.register({**info, "endpoint": "grpc://b:1", "replica": "b", "sessions_active": 0}))
    # the clients sent since a report spread a burst over the replicas, but only reports make one full: 128
    # admissions a second with no session opened had kept every replica full
    assert [router.pick(set())["endpoint"] for _ in range(4)] == ["grpc://a:1", "grpc://b:1"] * 2
    assert all(router.pick(set()) is not None for _ in range(128))
    asyncio.run(router.register({**info, "endpoint": "grpc://b:1", "replica": "b", "draining": True}))
    assert {router.pick(set())["endpoint"] for _ in range(4)} == {"grpc://a:1"}  # a draining replica takes none
    assert "1 draining" in router.unavailable({"grpc://a:1"})["error"]
    asyncio.run(router.register({**info, "endpoint": "grpc://b:1", "replica": "b"}))
    asyncio.run(router.register({**info, "replica": "a", "sessions_active": 1}))  # a reports its session
    assert router.pick({"grpc://b:1"}) is None
    assert router.unavailable({"grpc://b:1"}) == {  # each reason counted: a full one, and one the client left out
        "error": "none of 2 replicas takes a session now: 1 full (max_sessions 1), 1 left out (they failed or "
        "refused this client)",
        "known": 2,
        "left_out": 1,
    }
    time.sleep(0.6)  # five heartbeats without a report
    assert router.fresh() == [] and router.replicas == {}
    assert router.unavailable(set())["error"] == "no replica has reported in the last 0.5 s (2 stopped reporting)"


@pytest.mark.parametrize("blip", [False, True])
def test_a_refusal_no_other_replica_can_mend_is_the_answer_at_once(server, model_dir, blip, no_admission_wait):
    """The only replica runs and refused the session (it is full): the router has no other to offer, and waiting out
    the client's own exclusion would only send it back there. The client gives that refusal at once, even where the
    router failed once in between (`blip`)."""
    live = server("--max-sessions", "1")
    holder = client(model_dir, live.url)
    holder.generate(prompt(3), max_new_tokens=1, do_sample=False)  # holds the one session
    busy = (503, {"error": "none of 1 replicas takes a session now", "known": 1, "left_out": 1})
    between = [(502, {"error": "bad gateway"})] if blip else []
    router = StandInRouter([(200, {"endpoint": live.url, "replica": "live"}), *between, busy])
    try:
        with pytest.raises(ProtocolError, match="sessions") as refused:
            client(model_dir, router.url).generate(prompt(3), max_new_tokens=2, do_sample=False)
        assert refused.value.code == "too_many_sessions"
        assert [r[2]["exclude"] for r in router.requests] == [[]] + [[live.url]] * (1 + blip)
    finally:
        router.close()
        holder.close_session()


@pytest.mark.network
@pytest.mark.slow
def test_slicer_hf_serve_ray_runs_a_fleet_with_tls_and_a_token(model_dir, reference, tmp_path):
    """`slicer-hf serve --ray --replicas 2` with a certificate and a token (its own local Ray): the router answers
    over HTTPS, the replicas over grpcs://, and a client reaches them through the printed router URL."""
    pytest.importorskip("ray")
    import sys
    import tempfile
    from pathlib import Path

    from live import self_signed_localhost

    from slicer_hf.launch import start_server, stop_server
    from slicer_hf.server.fleet import wait_for_replicas

    copies = set(Path(tempfile.gettempdir()).glob("slicer-fleet-tls-*"))  # where the router reads its TLS files
    cert = self_signed_localhost(tmp_path)
    port = _free_port()
    command = [sys.executable, "-m", "slicer_hf.cli", "serve", "--model", model_dir, "--ray", "--replicas", "2"]
    command += ["--router-port", str(port), "--replica-cpus", "0.5", "--threads", "1", "--log-level", "warning"]
    command += ["--host", "0.0.0.0", "--advertise-host", "localhost", "--token", TOKEN]  # the name the cert has
    command += ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    proc, url = start_server(command, timeout_s=300)
    try:
        assert url == f"slicer+https://localhost:{port}"
        fleet = wait_for_replicas(url, 2, TOKEN, cert.decode())
        assert all(r["endpoint"].startswith("grpcs://localhost:") for r in fleet)
        ids = prompt(61)
        model = client(model_dir, url, token=TOKEN, root_certificates=cert)
        assert torch.equal(
            model.generate(ids, max_new_tokens=4, do_sample=False),
            reference.generate(ids, max_new_tokens=4, do_sample=False),
        )
        with pytest.raises(TransportError, match="certificate verify failed.*--root-cert") as untrusted:
            FleetTransport(url, token=TOKEN).request(b"x")  # HTTPS without the CA: refused at once
        assert not untrusted.value.retryable
    finally:
        stop_server(proc, timeout_s=60)
    assert set(Path(tempfile.gettempdir()).glob("slicer-fleet-tls-*")) == copies, "the key's copy outlived the fleet"


@pytest.fixture(scope="module")
def fleet(model_dir):
    """Two replicas of the tiny Llama and a router on a local Ray (2 CPUs), with an auth token."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from slicer_hf.server.fleet import FleetOptions, deploy, wait_for_replicas

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    options = FleetOptions(
        model=model_dir,
        replicas=2,
        replica_cpus=0.5,
        threads=1,
        token=TOKEN,
        host="127.0.0.1",
        router_port=_free_port(),
        drain_timeout_s=2.0,
    )
    url = deploy(options)
    wait_for_replicas(url, 2, TOKEN)
    yield url
    serve.shutdown()
    ray.shutdown()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas(url, count=1):
    from slicer_hf.server.fleet import wait_for_replicas

    return {r["replica"]: r for r in wait_for_replicas(url, count, TOKEN)}


def router_handle():
    from ray import serve

    from slicer_hf.server.fleet import ROUTER

    return serve.get_deployment_handle(ROUTER, app_name="slicer")


@pytest.mark.network
@pytest.mark.slow
def test_sessions_spread_over_two_replicas_and_stay_exact(fleet, model_dir, reference):
    models = [client(model_dir, fleet, token=TOKEN) for _ in range(4)]
    for i, model in enumerate(models):
        ids = prompt(20 + i)
        assert torch.equal(
            model.generate(ids, max_new_tokens=5, do_sample=False),
            reference.generate(ids, max_new_tokens=5, do_sample=False),
        )
    places = [m._slicer_transport.admission["replica"] for m in models]
    assert len(set(places)) == 2 and places.count(places[0]) == 2
    assert wait_for(lambda: sorted(r["sessions_active"] for r in replicas(fleet).values()) == [2, 2])
    for model in models:
        model.close_session()


@pytest.mark.network
@pytest.mark.slow
def test_the_token_guards_the_router_and_the_replicas(fleet, model_dir):
    with pytest.raises(TransportError, match="HTTP 401"):
        client(model_dir, fleet).generate(prompt(1), max_new_tokens=2)
    endpoint = next(iter(replicas(fleet).values()))["endpoint"]
    with pytest.raises(TransportError, match="UNAUTHENTICATED"):
        GrpcTransport([endpoint], token="wrong").request(protocol.encode_json(protocol.STATS, {}))


@pytest.mark.slow
def test_a_fleet_whose_replicas_cannot_start_says_why_and_undeploy_leaves_other_applications_running(fleet, tmp_path):
    from ray import serve

    from slicer_hf import ConfigError
    from slicer_hf.server.fleet import FleetOptions, deploy, undeploy, wait_for_replicas

    port = int(fleet.rpartition(":")[2])  # the running fleet's router: the one Serve proxy of this cluster
    broken = FleetOptions(
        model=str(tmp_path / "gone"), app_name="broken", route_prefix="/broken", router_port=port, replica_cpus=0.5
    )
    with pytest.raises(ConfigError, match=r"the fleet did not deploy: .*gone"):
        deploy(broken)
    assert "broken" not in serve.status().applications  # deploy removed what it had started
    undeploy(broken)  # and undeploying it again is harmless
    assert len(wait_for_replicas(fleet, 2, TOKEN, timeout_s=30)) == 2  # the other fleet serves on


@pytest.mark.slow
def test_a_second_fleet_of_the_same_name_is_refused_and_the_first_serves_on(fleet, model_dir):
    """serve.run would have replaced the first fleet: its clients met another model and token."""
    from slicer_hf import ConfigError
    from slicer_hf.server.fleet import FleetOptions, deploy

    port = int(fleet.rpartition(":")[2])
    same = FleetOptions(model=model_dir, replica_cpus=0.5, router_port=port)  # the default app name, "slicer"
    with pytest.raises(ConfigError, match="named 'slicer' already runs"):
        deploy(same)
    assert len(replicas(fleet, 2)) == 2


def test_replicas_the_cluster_has_no_cpus_for_are_refused_on_a_ray_of_its_own_and_announced_on_one_it_joins(
    monkeypatch, caplog
):
    """serve --ray --replicas 2 on a 2-CPU machine used to hang without a word while Serve waited for CPUs."""
    pytest.importorskip("ray")
    import slicer_hf.server.fleet as fleet_module
    from slicer_hf import ConfigError
    from slicer_hf.server.fleet import FleetOptions

    monkeypatch.setattr(fleet_module.ray, "available_resources", lambda: {"CPU": 2.0})
    big = FleetOptions(model="unused", replicas=2)  # a replica takes 1 CPU by default
    with pytest.raises(
        ConfigError, match=r"needs 2.1 CPUs \(2 replicas x 1 \(replica_cpus\), and 0.1 for the router\)"
    ):
        fleet_module._check_room(big, strict=True)
    with caplog.at_level("WARNING", logger=fleet_module.__name__):
        fleet_module._check_room(big, strict=False)  # a cluster's autoscaler may add nodes
    assert "Serve waits until nodes with free resources join" in caplog.text
    fleet_module._check_room(FleetOptions(model="unused", replicas=1), strict=True)  # room enough
    gpus = FleetOptions(model="unused", replicas=1, replica_gpus=1)  # a GPU the cluster does not have
    with pytest.raises(ConfigError, match=r"needs 1 GPUs \(1 replicas x 1 \(replica_gpus\)\), and the cluster has 0"):
        fleet_module._check_room(gpus, strict=True)
    monkeypatch.setattr(fleet_module.ray, "available_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match=r"needs 3 GPUs \(3 replicas x 0.6"):  # two 0.6 shares do not fit one GPU
        fleet_module._check_room(FleetOptions(model="unused", replicas=3, replica_gpus=0.6), strict=True)
    fleet_module._check_room(FleetOptions(model="unused", replicas=4, replica_gpus=0.5), strict=True)


@pytest.mark.slow
def test_a_second_fleet_asking_for_another_router_port_is_refused_at_once(fleet, model_dir, monkeypatch):
    """One cluster has one Serve ingress: a fleet that asks for another port would wait for a router never there."""
    from slicer_hf import ConfigError
    from slicer_hf.server.fleet import FleetOptions, deploy

    port = int(fleet.rpartition(":")[2])
    other = FleetOptions(
        model=model_dir, replica_cpus=0.5, app_name="other", route_prefix="/other", router_port=_free_port()
    )
    from slicer_hf.server import fleet as fleet_module

    def waited(*args, **kwargs):
        raise AssertionError("deploy waited for replicas of a router that would never answer")

    monkeypatch.setattr(fleet_module, "wait_for_replicas", waited)
    with pytest.raises(ConfigError, match=rf"HTTP ingress at 127.0.0.1:{port}.*--router-port {port}"):
        deploy(other)
    from ray import serve

    assert "other" not in serve.status().applications


@pytest.mark.network
@pytest.mark.slow
def test_a_killed_replica_mid_generation_moves_its_sessions_by_replay(fleet, model_dir, reference):
    model = client(model_dir, fleet, token=TOKEN)
    ids = prompt(31)
    model.generate(ids, max_new_tokens=1, do_sample=False)  # admitted: the session has a replica
    victim = replicas(fleet)[model._slicer_transport.admission["replica"]]
    kill = CallbackStreamer(4, lambda: os.kill(victim["pid"], signal.SIGKILL))
    out = model.generate(ids, max_new_tokens=16, do_sample=False, streamer=kill)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=16, do_sample=False))
    assert model.wire_stats().failovers >= 1
    assert model._slicer_transport.admission["endpoint"] != victim["endpoint"]
    # Serve replaces the dead replica; it registers with the router again
    assert wait_for(lambda: len(replicas(fleet)) == 2 and victim["replica"] not in replicas(fleet), timeout_s=120)


@pytest.mark.network
@pytest.mark.slow
def test_stale_endpoints_and_refusing_replicas_send_the_client_elsewhere(fleet, model_dir, reference):
    fleet_now = list(replicas(fleet, 2).values())
    refusing, other = fleet_now[0], fleet_now[1]
    drain = GrpcTransport([refusing["endpoint"]], token=TOKEN)
    drain.unary(DRAIN_METHOD, json.dumps({"on": True}).encode())
    try:
        for ghost in ("grpc://127.0.0.1:9", refusing["endpoint"]):  # dead, then alive but draining
            fake = {**refusing, "replica": f"ghost-{ghost}", "endpoint": ghost, "sessions_active": -100}
            fake["draining"] = False
            router_handle().register.remote(fake).result(timeout_s=10)
            model = client(model_dir, fleet, token=TOKEN)
            ids = prompt(41)
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
            assert torch.equal(out, reference.generate(ids, max_new_tokens=4, do_sample=False))
            assert model._slicer_transport.admission["endpoint"] == other["endpoint"], ghost
            assert model.wire_stats().failovers >= 1
            model.close_session()
    finally:
        drain.unary(DRAIN_METHOD, json.dumps({"on": False}).encode())


@pytest.mark.network
@pytest.mark.slow
def test_a_restarting_router_gives_a_clear_error_or_a_retry_and_open_sessions_go_on(fleet, model_dir, reference):
    busy = client(model_dir, fleet, token=TOKEN)
    ids = prompt(51)
    busy.generate(ids, max_new_tokens=1, do_sample=False)
    with urllib.request.urlopen(
        urllib.request.Request(
            "http://" + fleet.partition("://")[2] + "/replicas", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    ) as reply:
        router_pid = json.loads(reply.read())["pid"]
    os.kill(router_pid, signal.SIGKILL)
    # a session already admitted streams straight to its replica: the router's death does not touch it
    out = busy.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False))
    newcomer, outcome = client(model_dir, fleet, token=TOKEN), []

    def admit():
        try:
            outcome.append(newcomer.generate(prompt(52), max_new_tokens=2, do_sample=False))
        except TransportError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=admit)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "a client hung on a restarting router"
    assert isinstance(outcome[0], torch.Tensor) or "router" in str(outcome[0]), outcome
    assert wait_for(lambda: len(replicas(fleet)) == 2, timeout_s=120)  # the new router relearns the fleet
    late = client(model_dir, fleet, token=TOKEN)
    assert torch.equal(
        late.generate(ids, max_new_tokens=3, do_sample=False),
        reference.generate(ids, max_new_tokens=3, do_sample=False),
    )


@pytest.mark.network
@pytest.mark.slow
def test_autoscaling_follows_active_sessions_and_scale_down_drains(fleet, model_dir, reference):
    """A second fleet (1..2 replicas, one session each) beside the first: two sessions bring a second replica;
    when they close, one replica drains and goes."""
    from ray import serve

    from slicer_hf.server.fleet import FleetOptions, deploy

    options = FleetOptions(
        model=model_dir,
        autoscale=(1, 2),
        sessions_per_replica=1,
        replica_cpus=0.2,
        threads=1,
        host="127.0.0.1",
        router_port=int(fleet.rsplit(":", 1)[1]),
        route_prefix="/scale",
        app_name="slicer-scale",
        upscale_delay_s=1.0,
        downscale_delay_s=3.0,
        drain_timeout_s=1.0,
    )
    url = deploy(options)
    try:
        assert url.endswith("/scale")
        models = [client(model_dir, url) for _ in range(2)]
        for i, model in enumerate(models):
            ids = prompt(70 + i)
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
            assert torch.equal(out, reference.generate(ids, max_new_tokens=3, do_sample=False))
        listed = lambda: wait_for_replicas_of(url)  # noqa: E731
        assert wait_for(lambda: len(listed()) == 2, timeout_s=180), listed()
        for model in models:
            model.close_session()
        assert wait_for(lambda: len(listed()) == 1, timeout_s=180), listed()
    finally:
        serve.delete(options.app_name)


def wait_for_replicas_of(url):
    from slicer_hf.server.fleet import wait_for_replicas

    return wait_for_replicas(url, 1)
