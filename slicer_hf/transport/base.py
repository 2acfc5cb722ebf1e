"""The `Transport` interface and the in-process transport."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import TransportError

if TYPE_CHECKING:
    from ..server.engine import SplitServer


class Transport(ABC):
    """Carries one request to the server and brings its reply back, as bytes.

    `session_stream` marks transports that keep one stream per session (the server then ties the session's
    life to the stream); `failover` lists other endpoints to try when this one dies.
    """

    name: str = "transport"

    @abstractmethod
    def request(self, data: bytes) -> bytes:
        """Send one message and wait for its reply; raises `TransportError` when the peer is unreachable."""

    def reset(self) -> bool:
        """Drop the connection after a failure and move to the next endpoint. False when this transport cannot
        reconnect at all (the in-process one); a network transport returns True and the caller decides, with
        backoff, how often to try."""
        return False

    def close(self) -> None:
        """Release the connection (nothing to release by default)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class LocalTransport(Transport):
    """The server lives in this process; messages still go through their bytes."""

    name = "local"

    def __init__(self, server: SplitServer) -> None:
        self.server = server

    def request(self, data: bytes) -> bytes:
        return self.server.handle(bytes(data), client="local")


def make_transport(spec: str | Sequence[str] | Transport, **options: Any) -> Transport:
    """A transport from a URL (`grpc://host:port`), a list of URLs tried in order, or an instance."""
    if isinstance(spec, Transport):
        return spec
    urls = [spec] if isinstance(spec, str) else list(spec)
    if not urls or not all(isinstance(u, str) and u.startswith(("grpc://", "grpcs://")) for u in urls):
        raise TransportError(f"transport must be 'local', a grpc:// or grpcs:// URL, or a list of them, got {spec!r}")
    from .grpc import GrpcTransport

    return GrpcTransport(urls, **options)
