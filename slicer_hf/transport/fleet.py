"""`slicer+http://router:port`: split servers in a fleet behind a router (`slicer_hf.server.fleet`, on Ray Serve).

Before a session opens, the router picks a replica (`POST /session`) and answers with its gRPC endpoint; the
per-token stream then goes straight to that replica, never through Ray. When the replica is lost, refuses the
session or drains, `reset()` drops the stream and the next request asks the router again, leaving out the
endpoints that failed since the last good reply; the link replays the session on the new replica.

The client's auth token goes to the router (`Authorization: Bearer`) and to the replica; `slicer+https://` reaches
the router over TLS, and the replicas' endpoints say themselves whether they use TLS (`grpcs://`).
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import logging
import math
import ssl
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import NowhereElse, TransportError
from ..protocol import REPLY, TOKEN_RULE, fleet_router_url, is_loopback, usable_token
from .base import Transport, root_context, seconds
from .grpc import MAX_REPLY_BYTES, GrpcTransport

MAX_ANSWER_BYTES = 64 << 10  # an admission answer is a few hundred bytes of JSON
EXCLUDE_S = 10.0  # how long an endpoint that failed is left out (the router forgets a silent replica within 5 s)

logger = logging.getLogger(__name__)


class FleetTransport(Transport):
    """Client side of a fleet: asks the router where to go, then streams to that replica over gRPC.

    Args:
        url: the router, `slicer+http://host:port` (or `slicer+https://`).
        token: auth token for the router and the replicas.
        timeout_s: how long one request to a replica may wait for its reply.
        root_certificates: PEM CA bundle for replicas (and a router) with a private CA.
        router_timeout_s: how long one admission request to the router may take.
        admission_wait_s: how long admission waits while the router has no replica to offer (HTTP 503: none has
            registered yet, or all are full or draining), asking again after each answer's `Retry-After`: a replica
            that Serve restarts or adds registers within seconds, and waiting here spends none of the link's
            failover attempts.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 60.0,
        root_certificates: bytes | None = None,
        router_timeout_s: float = 10.0,
        admission_wait_s: float = 30.0,
    ) -> None:
        scheme, _, rest = url.partition("://")
        if scheme not in ("slicer+http", "slicer+https") or not rest:
            raise TransportError(f"a fleet URL looks like slicer+http://host:port, got {url!r}")
        if token == "":
            raise TransportError("the auth token is empty: give the fleet's token, or none at all", retryable=False)
        if token is not None and not usable_token(token):  # no HTTP header nor gRPC call would carry it
            raise TransportError(TOKEN_RULE, retryable=False)
        self.url, self.router = url, fleet_router_url(url)
        self.token, self.timeout_s, self.root_certificates = token, seconds("timeout_s", timeout_s), root_certificates
        self.router_timeout_s = seconds("router_timeout_s", router_timeout_s)
        self.admission_wait_s = seconds("admission_wait_s", admission_wait_s, zero=True)
        self._tls = root_context(root_certificates) if root_certificates else None
        host = rest.partition("/")[0].rpartition(":")[0] or rest.partition("/")[0]
        if token and scheme == "slicer+http" and not is_loopback(host):
            message = f"an auth token is sent to the router {url} without TLS: use slicer+https://"
            warnings.warn(message, stacklevel=2)
        self.max_message_bytes = MAX_REPLY_BYTES  # its replicas' streams take replies up to this
        self.admission: dict[str, Any] | None = None  # the router's last answer
        self._replica: GrpcTransport | None = None
        self._failed: dict[str, float] = {}  # endpoints that failed since the last good reply, and when
        self._refused: set[str] = set()  # those of them that ran and refused the session (no room)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._replica.name if self._replica is not None else self.url

    def admit(self) -> dict[str, Any]:
        """Ask the router for a replica: `{"endpoint", "replica", "ticket"}`, leaving out the endpoints that failed
        in the last `EXCLUDE_S`; raises `TransportError` when the router is unreachable or fails (retryable), still
        has no replica to offer after `admission_wait_s`, or refuses the request (a token, a route: not retryable)."""
        deadline = time.monotonic() + self.admission_wait_s
        while True:
            try:
                return self._ask_router()
            except _NoReplicaNow as busy:
                wait = min(busy.retry_after_s, deadline - time.monotonic())
                if wait <= 0:  # waited as long as asked: the link does not wait the same again
                    raise TransportError(
                        f"{busy.error} (still none after admission_wait_s={self.admission_wait_s:g} s)",
                        retryable=False,
                    ) from None
                logger.info("router %s has no replica to offer now: asking again in %.1f s", self.router, wait)
                time.sleep(wait)

    def _ask_router(self) -> dict[str, Any]:
        now = time.monotonic()
        self._failed = {e: t for e, t in self._failed.items() if now - t < EXCLUDE_S}
        self._refused &= self._failed.keys()
        body = json.dumps({"exclude": list(self._failed)}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(f"{self.router}/session", data=body, headers=headers, method="POST")
        opener = _opener(self._tls, deadline=time.monotonic() + self.router_timeout_s)
        try:
            with opener.open(request, timeout=self.router_timeout_s) as reply:
                answer = json.loads(_read_capped(reply))
        except urllib.error.HTTPError as exc:
            detail = _error_body(exc)
            message = f"router {self.router} refused a session: HTTP {exc.code}: {detail.get('error', exc.reason)}"
            if exc.code == 404:
                message += " (is a fleet deployed at this route prefix?)"
            error = TransportError(message, retryable=exc.code >= 500 or exc.code in (408, 429))
            every_one_refused = self._failed and self._failed.keys() <= self._refused
            if exc.code == 503 and every_one_refused and 0 < detail.get("left_out", 0) == detail.get("known"):
                raise NowhereElse(message) from None  # each replica runs and refused: waiting brings them back
            if exc.code == 503:
                raise _NoReplicaNow(error, _retry_after_s(exc.headers.get("Retry-After"))) from None
            raise error from None
        except (OSError, ValueError) as exc:  # URLError is an OSError
            if isinstance(reason := getattr(exc, "reason", exc), ssl.SSLCertVerificationError):  # no retry helps
                hint = "pass its CA with --root-cert (root_certificates=), and connect by a name it holds"
                raise TransportError(f"router {self.router}: {reason} ({hint})", retryable=False) from None
            raise TransportError(f"router {self.router} unreachable: {exc}", unreachable=True) from None
        except http.client.HTTPException as exc:  # a status line or headers that are not HTTP
            raise TransportError(f"router {self.router} sent a broken HTTP answer: {exc!r}") from None
        endpoint = answer.get("endpoint") if isinstance(answer, dict) else None
        if not isinstance(endpoint, str) or not endpoint.startswith(("grpc://", "grpcs://")):
            raise TransportError(f"router {self.router} answered without a gRPC endpoint: {answer!r}")
        self.admission = answer
        logger.info("router %s sent this session to %s", self.router, endpoint)
        return answer

    def request(self, data: bytes) -> bytes:
        return self._answered(self._connected().request(data))

    def pipeline(self, messages: Sequence[bytes]) -> Iterator[bytes]:
        """A replay's replies leave the endpoints left out as they are: that a replica rebuilt the steps another
        answered before says nothing of room for the next (two replicas short of KV memory were bounced between)."""
        return self._connected().pipeline(messages)

    def _connected(self) -> GrpcTransport:
        """The stream to this session's replica (the router is asked for one first, where there is none)."""
        if self._replica is None:
            endpoint = self.admit()["endpoint"]
            # the CA given may be the router's alone (TLS at Serve's proxy, plain gRPC replicas)
            roots = self.root_certificates if endpoint.startswith("grpcs://") else None
            self._replica = GrpcTransport([endpoint], self.token, self.timeout_s, roots, others=True)
        return self._replica

    def _answered(self, reply: bytes) -> bytes:
        if reply[1:2] == bytes([REPLY]):  # a step answered: the endpoints left out may serve again (an OPENED does
            self._failed.clear()  # not say that: the step after it may still be refused for want of room)
            self._refused.clear()
        return reply

    def refused(self) -> None:
        if self._replica is not None:
            self._refused.add(self._replica.name)

    def reset(self) -> bool:
        """Drop the replica's stream and leave its endpoint out of the next admission; always possible."""
        if self._replica is not None:
            self._failed[self._replica.name] = time.monotonic()
            self._replica.close()
            self._replica = None
        return True

    def has_alternatives(self) -> bool:
        return True

    def servers(self) -> int:
        return 2  # the router picks: a timeout moves the session once, to the replica it picks next

    def close(self) -> None:
        if self._replica is not None:
            self._replica.close()
            self._replica = None
        self._failed.clear()
        self._refused.clear()

    def unary(self, method: str, data: bytes = b"") -> bytes:
        """One unary call (stats, metrics) on the current replica."""
        if self._replica is None:
            raise TransportError("no replica yet: the router is asked when the first request goes out")
        return self._replica.unary(method, data)


class _NoReplicaNow(Exception):
    """The router's 503: no replica to offer now; ask again after `retry_after_s`."""

    def __init__(self, error: TransportError, retry_after_s: float) -> None:
        self.error, self.retry_after_s = error, retry_after_s


def _retry_after_s(header: str | None) -> float:
    """A `Retry-After` in seconds (1 if absent or not a number), kept within [0.05, 5]."""
    try:
        seconds = float(header) if header is not None else 1.0
    except ValueError:
        seconds = 1.0
    return min(5.0, max(0.05, seconds)) if math.isfinite(seconds) else 1.0


def _read_capped(reply: Any) -> bytes:
    """A router's answer of at most `MAX_ANSWER_BYTES`."""
    chunks, size = [], 0
    while chunk := reply.read1(1 << 16):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise OSError(f"an answer over {MAX_ANSWER_BYTES:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_body(exc: urllib.error.HTTPError) -> dict[str, Any]:
    """A router's error answer: `{"error": message, ...}` (its reason alone where the body is not such JSON)."""
    try:
        body = json.loads(exc.read(MAX_ANSWER_BYTES))
    except (ValueError, OSError, http.client.HTTPException):
        return {"error": exc.reason}
    return body if isinstance(body, dict) and "error" in body else {"error": str(body)}


def _opener(context: ssl.SSLContext | None, deadline: float) -> urllib.request.OpenerDirector:
    """urllib, with every connection reading its answer (status line, headers, body) by `deadline`: a socket
    timeout alone bounds each read, not a router that trickles bytes."""
    return urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline, context=context))


class _DeadlineHandler(urllib.request.AbstractHTTPHandler):
    def __init__(self, deadline: float, **options: Any) -> None:
        super().__init__(**options)
        self.deadline = deadline

    def do_open(self, http_class: Any, req: Any, **options: Any) -> Any:
        def connection(host: str, **connection_options: Any) -> http.client.HTTPConnection:
            made = http_class(host, **connection_options)
            made.response_class = functools.partial(_DeadlineResponse, deadline=self.deadline)
            return made

        return super().do_open(connection, req, **options)


class _HTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: Any, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, each read given only the time left before `deadline`."""

    def __init__(self, sock: Any, deadline: float) -> None:
        self.sock, self.raw, self.deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            return self.raw.readinto(buffer)
        except TimeoutError:
            raise TimeoutError("the router timeout passed before its whole answer came") from None

    def close(self) -> None:
        self.raw.close()
        super().close()
