"""Pluggable transports: how the edge's protocol messages reach a server (`request(bytes) -> bytes`)."""

from .base import LocalTransport, Transport, make_transport

__all__ = ["LocalTransport", "Transport", "make_transport"]
