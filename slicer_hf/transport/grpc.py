"""gRPC transport: one bidirectional stream per session, raw protocol bytes as messages (no codegen).

URLs: `grpc://host:port` (plaintext) or `grpcs://host:port` (TLS). Several URLs are tried in order; when the
current server dies the link replays its session onto the next one (see `link.SuffixLink`).
"""

from __future__ import annotations

import atexit
import gc
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from ..errors import TransportError
from .base import Transport

SERVICE = "slicer_hf.v1.Split"
SESSION_METHOD = f"/{SERVICE}/Session"
STATS_METHOD = f"/{SERVICE}/Stats"
METRICS_METHOD = f"/{SERVICE}/Metrics"
_END = object()
_OPEN: weakref.WeakSet[GrpcTransport] = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    """Cancel streams still open at exit: a reader thread blocked in gRPC's core at shutdown aborts the process."""
    for transport in list(_OPEN):
        transport.close()
    gc.collect()  # destroy closed channels now, while the gRPC runtime is still up


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def open_channel(url: str, root_certificates: bytes | None = None, max_message_bytes: int = 64 << 20) -> grpc.Channel:
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
    ) -> None:
        if not urls:
            raise TransportError("no server URL given")
        self.urls, self.token, self.timeout_s, self.root_certificates = list(urls), token, timeout_s, root_certificates
        self.index = 0
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._inbox: queue.Queue[Any] = queue.Queue()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.urls[self.index]

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _connect(self) -> None:
        self._channel = open_channel(self.urls[self.index], self.root_certificates)
        stream = self._channel.stream_stream(SESSION_METHOD)
        outbox, inbox = queue.Queue(), queue.Queue()
        self._outbox, self._inbox = outbox, inbox

        def requests() -> Iterator[bytes]:
            while (item := outbox.get()) is not _END:
                yield item

        self._call = stream(requests(), metadata=self._metadata())
        call = self._call
        _OPEN.add(self)

        def pump() -> None:  # replies -> inbox; errors end the stream
            try:
                for reply in call:
                    inbox.put(reply)
                inbox.put(TransportError(f"server {self.name} closed the stream"))
            except grpc.RpcError as exc:
                inbox.put(_as_transport_error(exc, self.name))

        self._reader = threading.Thread(target=pump, name="slicer-grpc-reader", daemon=True)
        self._reader.start()

    def request(self, data: bytes) -> bytes:
        if self._call is None:
            self._connect()
        self._outbox.put(bytes(data))
        try:
            reply = self._inbox.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise TransportError(f"no reply from {self.name} within {self.timeout_s} s") from None
        if isinstance(reply, Exception):
            self.close()
            raise reply
        return reply

    def reset(self) -> bool:
        self.close()
        self.index = (self.index + 1) % len(self.urls)
        return True

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


def _as_transport_error(exc: grpc.RpcError, name: str) -> TransportError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    permanent = {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
    return TransportError(f"{name}: {code.name if code else 'error'}: {details}", retryable=code not in permanent)
