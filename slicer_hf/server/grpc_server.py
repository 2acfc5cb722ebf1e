"""The network face of `SplitServer`: a gRPC server with one bidirectional stream per session.

A session lives as long as its stream: when the client closes it, cancels it or vanishes (keepalive), the
session is closed and its KV cache freed.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from .. import protocol
from ..transport.grpc import SERVICE, channel_options
from .engine import SplitServer

logger = logging.getLogger(__name__)


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, server: SplitServer, token: str | None) -> None:
        self.server, self.token = server, token
        self.methods = {
            "Session": grpc.stream_stream_rpc_method_handler(self.session),
            "Stats": grpc.unary_unary_rpc_method_handler(self.stats),
            "Metrics": grpc.unary_unary_rpc_method_handler(self.metrics),
        }

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        service, _, method = details.method.lstrip("/").partition("/")
        return self.methods.get(method) if service == SERVICE else None

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            self.server.stats.errors["unauthenticated"] = self.server.stats.errors.get("unauthenticated", 0) + 1
            logger.warning("refused %s: missing or wrong auth token", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

    def session(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._authorize(context)
        peer, opened = context.peer(), set()
        try:
            for data in requests:
                reply = self.server.handle(data, client=peer, owned=opened)
                if len(data) > 1 and data[1] == protocol.OPEN and reply[1:2] == bytes([protocol.OPENED]):
                    opened.add(int(protocol.decode_json(reply)["session"]))
                yield reply
        finally:  # the stream is gone: nothing it opened may outlive it
            for session_id in opened:
                if self.server.close_session(session_id):
                    logger.info("stream from %s ended: freed session %d", peer, session_id)

    def stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._authorize(context)
        return protocol.encode_json(protocol.STATS_REPLY, self.server.stats_dict())

    def metrics(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._authorize(context)
        return prometheus_text(self.server.stats_dict()).encode()


def prometheus_text(stats: dict[str, Any]) -> str:
    """Server counters in the Prometheus text exposition format."""
    lines = []
    for key, value in sorted(stats.items()):
        if key == "errors":
            lines.append("# TYPE slicer_errors_total counter")
            lines += [f'slicer_errors_total{{code="{code}"}} {n}' for code, n in sorted(value.items())]
        else:
            kind = "gauge" if key in ("sessions_active", "compute_ms_per_token") else "counter"
            lines += [f"# TYPE slicer_{key} {kind}", f"slicer_{key} {value}"]
    return "\n".join(lines) + "\n"


def serve(
    server: SplitServer,
    host: str = "127.0.0.1",
    port: int = 50051,
    token: str | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    max_workers: int | None = None,
) -> tuple[grpc.Server, int]:
    """Start serving `server` on host:port (port 0 picks a free one); returns the gRPC server and its port."""
    workers = max_workers or server.limits.max_sessions + 8
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slicer-rpc"),
        options=channel_options(server.limits.max_message_bytes),
        maximum_concurrent_rpcs=workers,
    )
    grpc_server.add_generic_rpc_handlers((_Handler(server, token),))
    address = f"{host}:{port}"
    if tls_cert is not None:
        bound = grpc_server.add_secure_port(address, grpc.ssl_server_credentials([(tls_key, tls_cert)]))
    else:
        bound = grpc_server.add_insecure_port(address)
    grpc_server.start()
    return grpc_server, bound
