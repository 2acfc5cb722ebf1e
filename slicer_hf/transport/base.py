"""The `Transport` interface and the in-process transport."""

from __future__ import annotations

import importlib
import inspect
import math
import ssl
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, TransportError

if TYPE_CHECKING:
    from ..server.engine import SplitServer


def root_context(root_certificates: bytes) -> ssl.SSLContext:
    """A TLS client context trusting `root_certificates` (PEM); anything else is a `ConfigError`."""
    if not isinstance(root_certificates, bytes):
        raise ConfigError(f"root_certificates must be PEM bytes, got {type(root_certificates).__name__}")
    try:
        return ssl.create_default_context(cadata=root_certificates.decode("ascii"))
    except (ValueError, ssl.SSLError) as exc:  # not text, or no PEM certificate in it
        raise ConfigError(f"root_certificates must be PEM CA certificates (BEGIN CERTIFICATE): {exc}") from None


def seconds(name: str, value: Any, zero: bool = False) -> float:
    """A transport's timeout `value`, checked: a finite number of seconds above 0 (or 0, with `zero`); anything else
    is a `ConfigError` now, rather than a confusing error (or an overflow, for infinity) at the first request."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "above 0"
        raise ConfigError(f"{name} must be a finite number of seconds, {least} (a long wait: 3600), got {value!r}")
    return float(value)


class Transport(ABC):
    """Carries one request to the server and brings its reply back, as bytes.

    `frees_sessions_on_close` is True where a session lives on a stream of its own, which the server frees when it
    ends (so `close()` gives the session up without another message).
    """

    name: str = "transport"
    frees_sessions_on_close: bool = True
    max_message_bytes: int | None = None  # the largest reply it takes (None: any)

    @abstractmethod
    def request(self, data: bytes) -> bytes:
        """Send one message and wait for its reply; raises `TransportError` when the peer is unreachable."""

    def pipeline(self, messages: Sequence[bytes]) -> Iterator[bytes]:
        """Send `messages` in order and yield their replies in order. A transport that can sends each without
        waiting for the replies before it (one round trip for all, not one a message); by default, one `request`
        at a time. A caller that stops early (a refusal) leaves the connection clean: what was not read is dropped."""
        for data in messages:
            yield self.request(data)

    def reset(self) -> bool:
        """Drop the connection after a failure and move to the next endpoint. False when this transport cannot
        reconnect at all (the in-process one); a network transport returns True and the caller decides, with
        backoff, how often to try."""
        return False

    def refused(self) -> None:
        """The server answered a refusal for want of room (full, its KV budget): called before `reset()`. A
        transport that waits for servers to come back (a fleet's) need not wait on one that runs and refused."""
        return None

    def close(self) -> None:
        """Release the connection (nothing to release by default)."""
        return None

    def has_alternatives(self) -> bool:
        """Whether `reset()` may reach another server, which may have room where this one refused a session."""
        return False

    def servers(self) -> int:
        """How many servers `reset()` goes round: a session that timed out on as many gives up (where all are slow,
        moving on would only replay it on each in turn)."""
        return 1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class LocalTransport(Transport):
    """The server lives in this process; messages still go through their bytes. It holds no connection, so closing
    it frees nothing on the server: a link that gives up a session sends CLOSE (which answers at once here)."""

    name = "local"
    frees_sessions_on_close = False

    def __init__(self, server: SplitServer) -> None:
        self.server = server

    def request(self, data: bytes) -> bytes:
        return self.server.handle(bytes(data), client="local")


# URL scheme -> (module under slicer_hf.transport, class): transports are found here, imported on first use
SCHEMES: dict[str, tuple[str, str]] = {
    "grpc": ("grpc", "GrpcTransport"),
    "grpcs": ("grpc", "GrpcTransport"),
    "slicer+http": ("fleet", "FleetTransport"),
    "slicer+https": ("fleet", "FleetTransport"),
}


def make_transport(spec: str | Sequence[str] | Transport, **options: Any) -> Transport:
    """A transport from a URL (`grpc://host:port`, `slicer+http://router:port` for a fleet), a list of gRPC URLs
    tried in order, or an instance."""
    if isinstance(spec, Transport):
        return spec
    urls = [spec] if isinstance(spec, str) else list(spec)
    # grpc:// and grpcs:// URLs may share a failover list: the one transport class opens each URL by its scheme
    targets = {SCHEMES.get(u.partition("://")[0]) if isinstance(u, str) and "://" in u else None for u in urls}
    target = targets.pop() if len(targets) == 1 else None
    if not urls or target is None or (target[0] == "fleet" and len(urls) > 1):
        bare = next((u for u in urls if isinstance(u, str) and "://" not in u and ":" in u), None)
        hint = f" (a server at {bare}: grpc://{bare})" if bare else ""
        raise TransportError(
            "transport must be 'local', a grpc:// or grpcs:// URL (or a list of them), or one slicer+http:// or "
            f"slicer+https:// fleet router URL, got {spec!r}{hint}"
        )
    module, name = target
    cls = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    known = [p for p in inspect.signature(cls).parameters if p not in ("url", "urls")]
    if unknown := sorted(set(options) - set(known)):
        raise ConfigError(f"unknown transport option {', '.join(map(repr, unknown))} for {spec!r}; it takes {known}")
    return cls(urls[0], **options) if module == "fleet" else cls(urls, **options)
