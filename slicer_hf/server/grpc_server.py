"""The network face of `SplitServer`: a `grpc.aio` server with one bidirectional stream per session, the standard
gRPC health service (with a drain mode), and Prometheus metrics over HTTP.

Streams are coroutines, not threads, so idle clients hold no worker; a step goes from the event loop straight to the
engine's compute thread and is awaited there, other requests (OPEN may read files) run on a small thread pool. A
stream ends when its client closes it, cancels it or vanishes (keepalive), or when it idles: `open_timeout_s` without
a message while it holds no session, `idle_timeout_s` while it holds one, and `idle_timeout_s` with a reply its client
does not take (a client that sends and never reads). Whatever ends it, the sessions it opened are closed and their
memory freed. `max_streams` counts session streams only: health checks, stats, metrics and drain keep slots of their
own (`CONTROL_SLOTS`), so a server full of sessions still answers its operator.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as ResultTimeout  # builtins' TimeoutError from Python 3.11
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .. import protocol
from ..errors import ConfigError
from .engine import SplitServer
from .state import address_group, client_host

logger = logging.getLogger(__name__)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
CONTROL_SLOTS = 32  # calls gRPC admits beyond the session streams: health, stats, metrics, drain
METRICS_CONNECTIONS = 16  # HTTP connections the metrics endpoint serves at once (a scraper needs one)
METRICS_PER_ADDRESS = 4  # of those, from any one address (20 idle sockets from one had kept scrapes out)
METRICS_TIMEOUT_S = 3.0  # how long one connection may take, and each of its reads (a scrape takes milliseconds)


CONTROL_WAIT_S = 5.0  # how long a control call may take to send its request (one that never does held a slot)
CONTROL_PER_PEER = 4  # control calls one address (an IPv6 /64) may have in flight at once
HEALTH_WAIT_S = 1.0  # the same, for health checks (no token: anyone may send them)
HEALTH_PER_PEER = 2
MAX_MS = (1 << 31) - 1  # the longest time a gRPC option takes (an int32 of milliseconds: about 25 days)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


class _InFlight:
    """Calls in flight: at most `slots` of them, `per_peer` from one peer. Thread-safe (the metrics endpoint admits on
    one thread and lets go on another; the event loop's checks never wait on it)."""

    def __init__(self, slots: int, per_peer: int) -> None:
        self.slots, self.per_peer = slots, per_peer
        self.held = collections.Counter[str]()
        self._lock = threading.Lock()

    def admit(self, peer: str) -> bool:
        """Count a call from `peer` in, unless that passes a bound."""
        with self._lock:
            if self.held.total() >= self.slots or self.held[peer] >= self.per_peer:
                return False
            self.held[peer] += 1
            return True

    def leave(self, peer: str) -> None:
        with self._lock:
            self.held -= collections.Counter({peer: 1})  # drops the peer at zero


class _ControlCalls:
    """Control calls (health checks, stats, metrics, drain) take a call slot from when they start, before their
    request comes, and a health check needs no token: a thousand checks that never sent their request held every
    slot, and the server refused everyone. Each is served as a read of its one request within `wait_s`, and at most
    `slots` of them are in flight, `per_peer` from one address. Health checks count apart from the others (which show
    the token first, where there is one), so that stalled checks keep no operator out."""

    def __init__(self, slots: int, per_peer: int, wait_s: float) -> None:
        self.calls, self.wait_s = _InFlight(slots, per_peer), wait_s

    def handler(self, handle: Callable[[Any, Any], Any], **serializers: Any) -> Any:
        """A handler for a unary call, `handle(request, context)`, that reads its request itself (with a deadline)."""

        async def read_then_handle(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            peer = client_host(context.peer())
            if not self.calls.admit(peer):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many control calls in flight")
            try:
                try:
                    request = await asyncio.wait_for(context.read(), self.wait_s)
                except asyncio.TimeoutError:
                    request = None
                if request is None or request is grpc.aio.EOF:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no request within {self.wait_s} s")
                return await handle(request, context)
            finally:
                self.calls.leave(peer)

        return grpc.stream_unary_rpc_method_handler(read_then_handle, **serializers)


class _Gate(grpc.aio.ServerInterceptor):
    """Every call but a health check shows the token as it starts, before gRPC waits for a request message: a call
    that never sends one would otherwise hold a call slot, its token unchecked. Health's `Watch` (a stream held open
    for as long as a client likes, with no token) is not served: each would hold a slot, and a thousand of them every
    slot; probes poll `Check`, served by `control`."""

    def __init__(
        self,
        engine: SplitServer,
        checks: _ControlCalls,
        health_servicer: Any,
        token: str | None,
        admin_token: str | None = None,
    ) -> None:
        self.engine, self.token, self.admin_token = engine, token, admin_token
        self.check = checks.handler(
            health_servicer.Check,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method == HEALTH_WATCH:
            return _refusal(grpc.StatusCode.UNIMPLEMENTED, "Health/Watch is not served: poll Health/Check")
        if details.method == HEALTH_CHECK:
            return self.check
        sent = str(dict(details.invocation_metadata or ()).get("authorization", "")).encode()
        if details.method == protocol.DRAIN_METHOD and self.admin_token is not None:  # the operators', not the clients'
            if not _authorized(sent, self.admin_token, self.engine):
                return _refusal(grpc.StatusCode.UNAUTHENTICATED, "Drain takes the admin token")
        elif not _authorized(sent, self.token, self.engine):
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")
        return await continuation(details)


def _authorized(sent: bytes, token: str | None, engine: SplitServer) -> bool:
    """Whether an `authorization` value is `Bearer <token>` (anything is, without a token); a refusal is counted."""
    if token is None or hmac.compare_digest(sent, f"Bearer {token}".encode()):
        return True
    engine.stats.error("unauthenticated")
    return False


def _local_peer(peer: str) -> bool:
    """Whether a gRPC peer (`ipv4:127.0.0.1:5000`, `ipv6:%5B::1%5D:5000`, `unix:...`) came over loopback."""
    kind, _, address = urllib.parse.unquote(peer).partition(":")
    return kind == "unix" or (kind in ("ipv4", "ipv6") and protocol.is_loopback(address.rpartition(":")[0]))


def _refusal(code: grpc.StatusCode, message: str) -> Any:
    """A handler that ends the call with `code` as soon as it starts (a streaming handler reads no request first)."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        if code == grpc.StatusCode.UNAUTHENTICATED:
            logger.warning("refused %s: %s", context.peer(), message)
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


class _SplitService(grpc.GenericRpcHandler):
    def __init__(
        self,
        engine: SplitServer,
        pool: ThreadPoolExecutor,
        health: Any,
        control: _ControlCalls,
        max_streams: int,
        remote_drain: bool,
    ) -> None:
        self.engine, self.pool, self.health, self.remote_drain = engine, pool, health, remote_drain
        self.max_streams, self.streams = max_streams, 0  # session streams open (the event loop's count)
        self.client_streams = collections.Counter[str]()  # of those, each client's (by address, as sessions count)
        self.methods = {
            "Session": grpc.stream_stream_rpc_method_handler(self.session),
            "Stats": control.handler(self.stats),
            "Metrics": control.handler(self.metrics),
            "Drain": control.handler(self.drain),
        }

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        """The handler of a method named exactly (`/service/method`): the interceptor checks tokens by exact name,
        so another spelling of Drain's must not reach it."""
        service, _, method = details.method.removeprefix("/").partition("/")
        return self.methods.get(method) if details.method.startswith("/") and service == protocol.SERVICE else None

    async def session(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        host, cap = client_host(context.peer()), self.engine.limits.max_sessions_per_client
        per_client = None if cap is None or not host else 2 * cap  # a stream a session, and as many opening again
        full = self.streams >= self.max_streams
        if full or per_client is not None and self.client_streams[host] >= per_client:
            self.engine.stats.error("too_many_streams")
            why = (
                f"server at its limit of {self.max_streams} session streams"
                if full
                else f"{host} holds {per_client} session streams, twice the server's --max-sessions-per-client"
            )
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        self.streams += 1
        self.client_streams[host] += 1
        try:
            await self._session(context)
        finally:
            self.streams -= 1
            self.client_streams -= collections.Counter({host: 1})  # drops the client at zero

    async def _session(self, context: grpc.aio.ServicerContext) -> None:
        peer, opened = context.peer(), set()
        limits = self.engine.limits
        idle = _IdleTimer(asyncio.current_task())
        answer: Future[bytes] | None = None
        bare_since: float | None = time.monotonic()  # since when the stream has held no session
        try:
            while True:
                for gone in [s for s in opened if s not in self.engine.sessions]:  # closed: by CLOSE, a refusal...
                    opened.discard(gone)
                if opened:
                    bare_since, timeout_s = None, limits.idle_timeout_s
                else:  # a stream holding no session has open_timeout_s to open one, whatever else it sends meanwhile
                    bare_since = bare_since or time.monotonic()
                    timeout_s = max(0.0, limits.open_timeout_s - (time.monotonic() - bare_since))
                idle.reading(timeout_s)
                try:
                    data = await context.read()
                except asyncio.CancelledError:
                    if not idle.expired:
                        raise
                    self.engine.stats.error("stream_idle")
                    why = f"idle for {timeout_s:.1f} s" if opened else f"held no session for {limits.open_timeout_s} s"
                    logger.info("stream from %s %s: closed", peer, why)
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"stream {why}")
                idle.reading(None)
                if data is grpc.aio.EOF:
                    return
                answer, settled = self._answer(data, peer, opened)
                reply = await settled
                idle.reading(limits.idle_timeout_s)  # the client must take its reply: gRPC holds what it sends
                try:
                    await context.write(reply)
                except asyncio.CancelledError:
                    if not idle.expired:
                        raise
                    self.engine.stats.error("stream_stalled")
                    logger.info("stream from %s took no reply for %.1f s: closed", peer, limits.idle_timeout_s)
                    raise  # no status can follow a reply stuck in flow control: the call is cancelled
                idle.reading(None)
        finally:  # the stream is gone: nothing it opened may outlive it, a session its last request opens included
            idle.stop()

            def free(_: Any = None) -> None:
                for session_id in list(opened):
                    if self.engine.close_session(session_id):
                        logger.info("stream from %s ended: freed session %d", peer, session_id)

            free()
            if answer is not None:  # an OPEN still running on the pool frees its session once it is done
                answer.add_done_callback(free)

    def _answer(self, data: bytes, peer: str, opened: set[int]) -> tuple[Future[bytes], asyncio.Future[bytes]]:
        """The reply-to-be, and the event loop's future of it. A step goes straight to the engine's compute thread
        (admitting it is cheap), to be withdrawn if it has not started within `step_timeout_s` or if the stream ends
        first; any other request runs on the pool (an OPEN may read files)."""
        if data[1:2] not in (bytes([protocol.STEP]), bytes([protocol.NEXT])):
            reply = self.pool.submit(self.engine.handle, data, peer, opened)
            return reply, asyncio.wrap_future(reply)
        step = self.engine.submit(data, peer, opened)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.engine.limits.step_timeout_s, step.withdraw)
        settled = loop.create_future()

        def settle() -> None:  # one wake-up of the loop per reply: stop the timer, hand the reply (or a bug) on
            timer.cancel()
            if settled.done():
                return
            error = step.exception()
            if error is None:
                settled.set_result(step.result())
            else:
                settled.set_exception(error)

        def left(future: asyncio.Future[bytes]) -> None:  # the stream ended first: its sessions close, then the step
            if future.cancelled():  # is withdrawn, so that it ends quietly with them (not as a timeout)
                for session_id in list(opened):
                    self.engine.close_session(session_id)
                step.withdraw()

        step.add_done_callback(lambda _: _call_soon(loop, settle))
        settled.add_done_callback(left)
        return step, settled

    async def stats(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return protocol.encode_json(protocol.STATS_REPLY, self.engine.stats_dict())

    async def metrics(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return prometheus_text(self.engine)

    async def drain(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Body `{"on": bool}` (default true): stop or resume taking new sessions; health follows. Without an admin
        token, only over loopback (clients hold the clients' token, and one of them could drain the server)."""
        if not self.remote_drain and not _local_peer(context.peer()):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "Drain is taken over loopback only: start the server with --admin-token to drain it otherwise",
            )
        try:
            on = json.loads(request.decode() or "{}").get("on", True)
        except (ValueError, AttributeError, RecursionError):
            on = None
        if type(on) is not bool:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'drain takes {"on": true|false}')
        await set_draining(self.engine, self.health, on)
        return protocol.encode_json(protocol.STATS_REPLY, self.engine.stats_dict())


class _IdleTimer:
    """Cancels a stream's task once it has waited `timeout_s` for its client (its next message, or taking a reply).
    One timer per stream, moved on when it fires, stands in for a timeout per wait (`asyncio.wait_for` costs a task
    per message)."""

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        assert task is not None, "a stream runs as a task"
        self.task, self.loop = task, task.get_loop()
        self.since: float | None = None  # when the current read began (None: not reading)
        self.timeout_s = float("inf")
        self.expired = False  # the task was cancelled for idling
        self._timer: asyncio.TimerHandle | None = None

    def reading(self, timeout_s: float | None) -> None:
        """A wait on the client (a read, or a write it must take) starts, to last at most `timeout_s`; None: it is
        over."""
        if timeout_s is None:
            self.since = None
            return
        self.since, self.timeout_s = self.loop.time(), timeout_s
        due = self.since + timeout_s
        if self._timer is not None and self._timer.when() > due:  # a shorter timeout than the one armed
            self.stop()
        if self._timer is None and timeout_s < float("inf"):
            self._timer = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.since is None:  # not reading: the next read arms the timer again
            return
        due = self.since + self.timeout_s
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check)
        else:  # a read that completed in this very pass of the loop resumes first, and keeps its message
            self.loop.call_soon(self._expire)

    def _expire(self) -> None:
        if self.since is not None:
            self.expired = True
            self.task.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _warn_of_message_memory(max_streams: int, max_message_bytes: int) -> None:
    """Messages being received are held whole, one a stream: where that bound passes this machine's memory, a client
    (without a token, anyone) can take the server down with messages it never finishes."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return
    if (held := max_streams * max_message_bytes) > memory:
        logger.warning(
            "--max-streams %d x --max-message-bytes %s: messages being received may hold %.1f GiB, more than this "
            "machine's %.1f GiB; lower either (a float32 step at the default --max-step-elements is 32 MiB)",
            max_streams,
            f"{max_message_bytes:,}",
            held / 2**30,
            memory / 2**30,
        )


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """`callback` on `loop` from another thread, unless the loop has closed (the server stopped: nobody waits)."""
    with contextlib.suppress(RuntimeError):  # closed between the check and the call
        if not loop.is_closed():
            loop.call_soon_threadsafe(callback)


async def set_draining(engine: SplitServer, health_servicer: Any, on: bool) -> None:
    engine.drain(on)
    for name in ("", protocol.SERVICE):
        await health_servicer.set(name, NOT_SERVING if on else SERVING)


class _StatsCollector:
    """Reads the engine's counters for prometheus_client at each scrape."""

    GAUGES = (
        "sessions_active",
        "compute_ms_per_token",
        "kv_bytes_used",
        "kv_budget_bytes",
        "draining",
        "prepacked_linears",
        "kv_store",  # whether the server runs the KV store: a flag
        "kv_store_bytes",  # what its pools hold now: they shrink when compacted
    )

    def __init__(self, engine: SplitServer) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for key, value in sorted(self.engine.stats_dict().items()):
            if key == "errors":
                family = CounterMetricFamily("slicer_errors", "Refused requests by error code", labels=["code"])
                for code, count in sorted(value.items()):
                    family.add_metric([code], count)
                yield family
            elif key in self.GAUGES:
                yield GaugeMetricFamily(f"slicer_{key}", key.replace("_", " "), value=value)
            else:
                yield CounterMetricFamily(f"slicer_{key}", key.replace("_", " "), value=value)


def metrics_registry(engine: SplitServer) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(engine))
    return registry


def _metrics_server(
    host: str, port: int, engine: SplitServer, token: str | None, tls: tuple[bytes, bytes] | None
) -> Any:
    """`GET /metrics` over HTTP on its own thread, over HTTPS with the server's certificate where it has one (a token
    must not cross the network in clear); with a token, only for `Authorization: Bearer <token>` (what Prometheus
    sends with `authorization: {credentials: ...}` in its scrape config)."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(metrics_registry(engine))

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if not _authorized(environ.get("HTTP_AUTHORIZATION", "").encode("latin-1"), token, engine):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"missing or wrong auth token\n"]
        return metrics(environ, start_response)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        connections = _InFlight(METRICS_CONNECTIONS, METRICS_PER_ADDRESS)  # a thread each: past these, closed

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.connections.admit(address_group(client_address[0])):
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            deadline = threading.Timer(METRICS_TIMEOUT_S, _hang_up, args=(request,))  # for the whole exchange: a
            deadline.daemon = True  # client trickling a byte at a time would hold its slot however long reads wait
            deadline.start()
            try:
                super().process_request_thread(request, client_address)
            finally:
                deadline.cancel()
                self.connections.leave(address_group(client_address[0]))

        def handle_error(self, request: Any, client_address: Any) -> None:  # a client that stalled or went away
            logger.debug("metrics request from %s failed", client_address, exc_info=True)

    class Quiet(WSGIRequestHandler):
        timeout = METRICS_TIMEOUT_S  # for the TLS handshake and each read (the whole exchange has as long)

        def log_message(self, *args: Any) -> None:  # scrapes are not news
            pass

    server = make_server(host, port, app, server_class=Server, handler_class=Quiet)
    if tls is not None:  # the handshake runs on the request's thread: a slow client stalls no other scrape
        server.socket = _tls_context(*tls).wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="slicer-metrics", daemon=True).start()
    return server


def _hang_up(connection: Any) -> None:
    """End a metrics connection that outlived its deadline (its thread's read returns and the thread ends)."""
    with contextlib.suppress(OSError):
        connection.shutdown(2)  # socket.SHUT_RDWR


def _tls_context(cert: bytes, key: bytes) -> Any:
    """A server TLS context from PEM bytes (the ssl module reads them from files: private ones, removed at once)."""
    import os
    import ssl
    import tempfile

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="slicer-metrics-tls-") as folder:
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem"))
    return context


def prometheus_text(engine: SplitServer) -> bytes:
    """The engine's counters in the Prometheus text format (what GET /metrics serves)."""
    from prometheus_client import generate_latest

    return generate_latest(metrics_registry(engine))


class RunningServer:
    """A started server: its gRPC port, its metrics port, and `stop()`. The aio server runs on its own event-loop
    thread, so callers stay synchronous."""

    def __init__(
        self,
        engine: SplitServer,
        host: str,
        port: int,
        token: str | None,
        tls_cert: bytes | None,
        tls_key: bytes | None,
        max_streams: int,
        workers: int,
        metrics_port: int | None,
        admin_token: str | None = None,
    ) -> None:
        self.engine = engine
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slicer-rpc")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="slicer-grpc-loop", daemon=True)
        self._thread.start()
        try:
            self.port = self._run(self._start(host, port, (token, admin_token), tls_cert, tls_key, max_streams))
        except BaseException:  # a port that cannot be bound, say: leave no thread or loop behind
            self._close_loop()
            raise
        self.metrics_port = None
        self._metrics: Any = None
        if metrics_port is not None:
            tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
            try:
                self._metrics = _metrics_server(host, metrics_port, engine, token, tls)
            except (OSError, OverflowError) as exc:  # a port in use, or none at all: stop what started, say why
                self.stop(grace_s=0, engine=False)  # the engine is the caller's, to serve again
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ConfigError(
                    f"cannot serve metrics on {protocol.host_port(host, metrics_port)}: {reason}"
                ) from None
            self.metrics_port = self._metrics.server_port
        if token is not None and tls_cert is None and not protocol.is_loopback(host):
            logger.warning("an auth token is required on %s without TLS: tokens cross the network in clear", host)
        _warn_of_message_memory(max_streams, engine.limits.max_message_bytes)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(
        self,
        host: str,
        port: int,
        tokens: tuple[str | None, str | None],
        cert: bytes | None,
        key: bytes | None,
        max_streams: int,
    ) -> int:
        """Serve on host:port; `tokens`: the clients' and the admin token."""
        limits = self.engine.limits
        self.health = health.aio.HealthServicer()
        checks = _ControlCalls(CONTROL_SLOTS // 4, HEALTH_PER_PEER, HEALTH_WAIT_S)
        control = _ControlCalls(CONTROL_SLOTS // 2, CONTROL_PER_PEER, CONTROL_WAIT_S)
        self.server = grpc.aio.server(
            # no SO_REUSEPORT: a second server on a taken port fails to start instead of sharing its connections
            options=[
                *protocol.channel_options(self.engine.limits.max_message_bytes, server=True),
                ("grpc.so_reuseport", 0),
                # a connection without a call holds a socket: after open_timeout_s it goes (clients reconnect)
                ("grpc.max_connection_idle_ms", max(1, round(1000 * min(limits.open_timeout_s, MAX_MS / 1000)))),
            ],
            maximum_concurrent_rpcs=max_streams + CONTROL_SLOTS,  # the session streams are counted by the service
            interceptors=[_Gate(self.engine, checks, self.health, *tokens)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service = _SplitService(
            self.engine, self.pool, self.health, control, max_streams, remote_drain=tokens[1] is not None
        )
        self.server.add_generic_rpc_handlers((service,))
        address = protocol.host_port(host, port)
        try:
            if cert is not None:
                bound = self.server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                bound = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # gRPC's word for a port in use, an address not on this machine, a bad certificate
            tls = ", or is the TLS certificate/key invalid" if cert else ""
            raise ConfigError(f"cannot listen on {address}: is another server there{tls}? ({exc})") from None
        await self.server.start()
        await set_draining(self.engine, self.health, False)
        return bound

    def drain(self, on: bool = True) -> None:
        self._run(set_draining(self.engine, self.health, on))

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()

    def stop(self, grace_s: float = 2.0, engine: bool = True) -> None:
        """Refuse new sessions (draining: an OPEN on a stream already open gets `draining`, so a client with other
        servers moves on), give open calls `grace_s` to finish, stop the engine (`engine`; else it is left as it
        was, to serve again), then close everything."""
        if not self._thread.is_alive():
            return
        self._run(set_draining(self.engine, self.health, True))
        self._run(self.health.enter_graceful_shutdown())
        self._run(self.server.stop(grace_s))
        if self._metrics is not None:  # no scrape reads the engine's counters while it stops
            self._metrics.shutdown()
            self._metrics.server_close()
        if engine:
            self.engine.shutdown()  # before the loop closes: the steps it ends hand their replies to the loop
        else:
            self.engine.drain(False)
        self._close_loop()

    def _close_loop(self) -> None:
        if self.loop.is_running():  # let what gRPC leaves running end, rather than destroy it pending
            finishing = asyncio.run_coroutine_threadsafe(_finish_tasks(timeout_s=2.0), self.loop)
            with contextlib.suppress(ResultTimeout):
                finishing.result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


async def _finish_tasks(timeout_s: float) -> None:
    """Cancel the loop's other tasks and wait (at most `timeout_s`) for them to end."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)


def serve(
    server: SplitServer,
    host: str = "127.0.0.1",
    port: int = 50051,
    token: str | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    max_streams: int = 1024,
    workers: int | None = None,
    metrics_port: int | None = None,
    admin_token: str | None = None,
) -> RunningServer:
    """Start serving `server` on host:port (port 0 picks a free one).

    Args:
        token: the clients' auth token (None: any client).
        admin_token: the token Drain takes (None: Drain only over loopback, with the clients' token).
        max_streams: session streams open at once; more are refused with RESOURCE_EXHAUSTED (clients back off and
            retry). Health, stats, metrics and drain calls have `CONTROL_SLOTS` more of their own.
        workers: threads for OPEN, CLOSE and the unary methods (steps hold none: they wait on the event loop).
        metrics_port: serve GET /metrics on this port (0 picks one), over HTTPS where the server has a certificate,
            behind the token where there is one; None: no HTTP endpoint.
    """
    if token == "" or admin_token == "":
        raise ConfigError("an auth token is empty: give one, or None to require none")
    if not all(protocol.usable_token(t) for t in (token, admin_token) if t is not None):  # no client could send it
        raise ConfigError(protocol.TOKEN_RULE)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("give tls_cert and tls_key together (a PEM certificate and its key), or neither")
    workers = workers or 8
    return RunningServer(
        server, host, port, token, tls_cert, tls_key, max_streams, workers, metrics_port, admin_token=admin_token
    )
