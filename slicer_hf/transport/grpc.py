"""gRPC transport: one bidirectional stream per session, raw protocol bytes as messages (no codegen).

URLs: `grpc://host:port` (plaintext) or `grpcs://host:port` (TLS). Several URLs are tried in order; when the
current server dies the link replays its session onto the next one (see `link.SuffixLink`).
"""

from __future__ import annotations

import atexit
import contextvars
import gc
import queue
import re
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from ..errors import ProtocolError, TransportError
from ..protocol import (  # noqa: F401 (re-exported for callers of this module)
    DRAIN_METHOD,
    METRICS_METHOD,
    SERVICE,
    SESSION_METHOD,
    STATS_METHOD,
    TOKEN_RULE,
    channel_options,
    is_loopback,
    usable_token,
)
from .base import Transport, root_context, seconds

_END = object()
_OPEN: weakref.WeakSet[GrpcTransport] = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    """Cancel streams still open at exit: a reader thread blocked in gRPC's core at shutdown aborts the process."""
    if not _OPEN:
        return
    for transport in list(_OPEN):
        transport.close()
    gc.collect()  # destroy closed channels now, while the gRPC runtime is still up
    # gRPC's per-channel spin threads (daemon threads running `_run`) leave once their cancelled calls complete; one
    # still inside the core when the interpreter tears down aborts it ("terminate called without an active
    # exception"), so give them a moment.
    deadline = time.monotonic() + 2.0
    for thread in threading.enumerate():
        if thread.daemon and thread.name.endswith("(_run)") and thread is not threading.current_thread():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


MAX_REPLY_BYTES = 64 << 20  # the largest message an edge's channel receives (a server's replies are sized to fit)


def open_channel(
    url: str, root_certificates: bytes | None = None, max_message_bytes: int = MAX_REPLY_BYTES
) -> grpc.Channel:
    scheme, _, address = url.partition("://")
    if scheme == "grpc":
        return grpc.insecure_channel(address, options=channel_options(max_message_bytes))
    if scheme == "grpcs":
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.secure_channel(address, creds, options=channel_options(max_message_bytes))
    raise TransportError(f"unsupported URL {url!r}: use grpc://host:port or grpcs://host:port")


class GrpcTransport(Transport):
    """Client side of the gRPC transport.

    Args:
        urls: server URLs, tried in order (failover cycles through them).
        token: auth token sent as `authorization: Bearer <token>` metadata.
        timeout_s: how long one request may wait for its reply.
        root_certificates: PEM CA bundle for `grpcs://` servers with a private CA.
    """

    def __init__(
        self,
        urls: Sequence[str],
        token: str | None = None,
        timeout_s: float = 60.0,
        root_certificates: bytes | None = None,
        others: bool = False,
    ) -> None:
        """`others`: the caller has servers beyond `urls` to go to (a fleet's router): one that never answered a new
        stream is then left for them, as for another URL of the list."""
        if not urls:
            raise TransportError("no server URL given")
        if token == "":
            raise TransportError("the auth token is empty: give the server's token, or none at all", retryable=False)
        if token is not None and not usable_token(token):  # gRPC would refuse it on every call, as INTERNAL
            raise TransportError(TOKEN_RULE, retryable=False)
        if root_certificates is not None and not any(url.startswith("grpcs://") for url in urls):
            raise TransportError("root certificates check grpcs:// servers, and none is given", retryable=False)
        if root_certificates is not None:
            root_context(root_certificates)  # a ConfigError now, rather than a handshake that fails on every call
        self.urls, self.token, self.root_certificates = list(urls), token, root_certificates
        self.timeout_s = seconds("timeout_s", timeout_s)
        for url in self.urls:
            host, _, port = url.partition("://")[2].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 1 << 16:  # tried 10 times, to no end
                message = f"unsupported URL {url!r}: use grpc://host:port or grpcs://host:port"
                raise TransportError(message, retryable=False)
            if token and url.startswith("grpc://") and not is_loopback(host):
                message = f"an auth token is sent to {url} without TLS: use grpcs:// so it does not cross in clear"
                warnings.warn(message, stacklevel=2)
        self.index, self.others = 0, others
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._answered = False  # whether a stream of this transport ever got a reply (then a closed socket is not TLS)
        self._stream_answered = False  # whether the current stream got one
        self.max_message_bytes = MAX_REPLY_BYTES

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.urls[self.index]

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _connect(self) -> None:
        self._channel = open_channel(self.urls[self.index], self.root_certificates, self.max_message_bytes)
        self._stream_answered = False
        stream = self._channel.stream_stream(SESSION_METHOD)
        outbox, inbox = queue.Queue(), queue.Queue()
        self._outbox, self._inbox = outbox, inbox

        def requests() -> Iterator[bytes]:
            while (item := outbox.get()) is not _END:
                yield item

        self._call = stream(requests(), metadata=self._metadata())
        call = self._call
        _OPEN.add(self)

        asked = threading.Semaphore(0)  # one per request not yet answered: a server answers, it does not push
        self._asked = asked

        def pump() -> None:  # replies -> inbox; errors end the stream
            try:
                for reply in call:
                    if not asked.acquire(blocking=False):
                        call.cancel()
                        inbox.put(TransportError(f"server {self.name} sent a message no request asked for"))
                        return
                    inbox.put(reply)
                inbox.put(TransportError(f"server {self.name} closed the stream"))
            except grpc.RpcError as exc:
                inbox.put(_stream_error(exc, self.name, self._answered))

        self._reader = threading.Thread(target=pump, name="slicer-grpc-reader", daemon=True)
        self._reader.start()

    def request(self, data: bytes) -> bytes:
        self._send(data)
        return self._reply()

    def pipeline(self, messages: Sequence[bytes]) -> Iterator[bytes]:
        """All of `messages` go on the stream at once (the server answers them in order); the replies follow."""
        for data in messages:
            self._send(data)
        taken = 0
        try:
            for _ in messages:
                reply = self._reply()
                taken += 1
                yield reply
        finally:
            if taken < len(messages):  # replies still on their way would answer the next requests
                self.close()

    def _send(self, data: bytes) -> None:
        if self._call is None:  # gRPC's threads keep the context they start in: a clean one holds no caller's model
            contextvars.Context().run(self._connect)
        self._asked.release()
        self._outbox.put(bytes(data))

    def _reply(self) -> bytes:
        """The reply to the oldest request not yet answered on this stream."""
        try:
            reply = self._inbox.get(timeout=self.timeout_s)
        except queue.Empty:  # frozen, partitioned, or only slow: where another server may take the session, it moves
            self.close()  # there (its replay adds load, but a session held up timeout_s is lost otherwise), once
            fresh = not self._stream_answered  # a new stream: frozen, or its port taken by something else
            message = f"no {'answer' if fresh else 'reply'} from {self.name} within {self.timeout_s} s"
            elsewhere = bool(self.others) or self.has_alternatives()
            if elsewhere:
                message += " on a new stream" if fresh else " (stalled or too busy)"
            elif not self._answered:  # nothing ever answered here: a slow server, or something else on the port
                message += " (busy or stalled, or no slicer-hf server there: raise timeout_s to wait)"
            else:
                message += " (busy or stalled: raise timeout_s to wait)"
            raise TransportError(message, retryable=elsewhere, unreachable=fresh, timed_out=True) from None
        except BaseException:  # interrupted (Ctrl-C): the reply may still come; a fresh stream will not mix it up
            self.close()
            raise
        if isinstance(reply, Exception):
            self.close()
            raise reply
        self._answered = self._stream_answered = True
        return reply

    def reset(self) -> bool:
        """Drop the stream and move to the next URL (back to the first after the last); always possible."""
        self.close()
        self.index = (self.index + 1) % len(self.urls)
        return True

    def has_alternatives(self) -> bool:
        return len(self.urls) > 1

    def servers(self) -> int:
        return len(self.urls)

    def close(self) -> None:
        if self._call is not None:
            self._outbox.put(_END)
            self._call.cancel()
            self._call = None
            self._reader.join(timeout=5)
            _OPEN.discard(self)
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def unary(self, method: str, data: bytes = b"") -> bytes:
        """One unary call (stats, metrics) on the current server."""
        with open_channel(self.urls[self.index], self.root_certificates) as channel:
            try:
                return channel.unary_unary(method)(data, metadata=self._metadata(), timeout=self.timeout_s)
            except grpc.RpcError as exc:
                raise _as_transport_error(exc, self.name) from exc


def _stream_error(exc: grpc.RpcError, name: str, answered: bool) -> Exception:
    """What ended a session stream: the server's close of an idle stream took the session with it, and the server
    is well (an `unknown_session` refusal: the same server takes a new one); else the `TransportError`."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and details.startswith("stream idle"):
        return ProtocolError(f"{name} closed the stream ({details}): its session is gone", code="unknown_session")
    return _as_transport_error(exc, name, answered)


def _as_transport_error(exc: grpc.RpcError, name: str, answered: bool = False) -> TransportError:
    """The `TransportError` of a failed call to `name`; `answered`: whether it ever replied before."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    permanent = {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
    message = f"{name}: {code.name if code else 'error'}: {details}"
    lowered = details.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:  # no retry will trust it
        hint = "the server's TLS certificate is not trusted here: pass its CA with --root-cert (root_certificates=)"
        return TransportError(f"{message} ({hint})", retryable=False)
    if "hostname verification" in lowered:
        hint = "the server's TLS certificate does not name the host in the URL: connect by a name it holds"
        return TransportError(f"{message} ({hint})", retryable=False)
    if name.startswith("grpc://") and "socket closed" in lowered and not answered:  # something listens: not unreachable
        message += " (a server that speaks TLS closes plain connections: is it grpcs://?)"
        return TransportError(message, retryable=True)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "received message larger than max" in lowered:
        limit = re.search(r"vs\.? ?(\d+)\)", details)  # "(size vs. limit)": whose limit it is tells the side
        edge = limit is not None and int(limit.group(1)) == MAX_REPLY_BYTES
        whose = "this edge takes replies" if edge else "the server takes messages"
        return TransportError(f"{message} ({whose} up to its max_message_bytes)", retryable=False)
    if "wrong_version_number" in lowered:  # TLS asked of a server that speaks plain gRPC
        return TransportError(f"{message} (the server speaks plain gRPC: is it grpc://?)", retryable=False)
    if "invalid metadata" in lowered:  # a token no header can carry
        return TransportError(message, retryable=False)
    unreachable = code == grpc.StatusCode.UNAVAILABLE and not answered
    return TransportError(message, retryable=code not in permanent, unreachable=unreachable)
