"""`slicer-hf serve` (one server, or a Ray Serve fleet), `stats` and `drain`."""

from __future__ import annotations

import enum
import errno
import gc
import inspect
import json
import logging
import re
import signal
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import PEM_FILE, RootCertOpt, checked, on_this_machine, read_root_cert, torch_device

ServeModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hub id, local folder, 'smollm2' (embedded) or 'minilm' (all-MiniLM-L6-v2)."),
]


class LogLevel(str, enum.Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _setup_logging(level: str) -> None:
    """slicer_hf's loggers to stderr at `level`. The root logger is left alone: a library with a handler of its own
    (huggingface_hub's retries) had printed each line twice, once through it and once through the root's."""
    ours = logging.getLogger("slicer_hf")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(level.upper())


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'512MB', '4GB', '1.5GiB', '1000000' -> bytes."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", text.strip().lower())
    if match is None or match.group(2) not in SIZE_UNITS:
        raise typer.BadParameter(f"expected a size like 512MB, 4GB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def _size(option: str, text: str, least: int = 1) -> int:
    """A size option's bytes: at least `least`."""
    try:
        size = parse_bytes(text)
    except typer.BadParameter as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
    if size < least:
        unit = "byte" if least == 1 else "bytes"
        raise typer.BadParameter(f"a size of at least {least:,} {unit}, got {text!r}", param_hint=option)
    return size


MIN_MESSAGE_BYTES = 64 << 10  # a server's messages: an OPEN with its codec takes about 500 bytes, a token's row kBs


def _tls_pair(cert: Path | None, key: Path | None) -> tuple[bytes, bytes] | None:
    """--tls-cert and --tls-key's PEM bytes: both or neither, refused here unless the key is the certificate's."""
    import ssl

    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise typer.BadParameter("give --tls-cert and --tls-key together", param_hint="--tls-cert/--tls-key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except (ValueError, ssl.SSLError) as exc:  # not PEM, an encrypted key, or a key of another certificate
        message = f"{cert} and {key} are not a PEM certificate and its unencrypted private key ({exc})"
        raise typer.BadParameter(message, param_hint="--tls-cert/--tls-key") from None
    return cert.read_bytes(), key.read_bytes()


def _no_empty_token(param: typer.CallbackParam, token: str | None) -> str | None:
    from ..protocol import TOKEN_RULE, usable_token

    option = f"--{(param.name or 'token').replace('_', '-')}"
    if token == "":
        raise typer.BadParameter("an empty token locks everyone out: give one, or leave it out", param_hint=option)
    if token is not None and not usable_token(token):
        raise typer.BadParameter(TOKEN_RULE, param_hint=option)
    return token


def _weights_dtype(dtype: str) -> str:
    from ..server.state import SERVER_DTYPES

    if dtype not in SERVER_DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(SERVER_DTYPES)}", param_hint="--dtype")
    return dtype


def _parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if match is None or not 0 < int(match.group(1)) <= int(match.group(2)):
        raise typer.BadParameter(f"expected MIN,MAX with 0 < MIN <= MAX, got {text!r}", param_hint="--autoscale")
    return int(match.group(1)), int(match.group(2))


def serve(
    model: ServeModelOpt = "smollm2",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port (0 picks a free one; with --ray, see --router-port).", min=0, max=65535)
    ] = 50051,
    token: Annotated[
        str | None, typer.Option(envvar="SLICER_HF_TOKEN", help="Require this auth token.", callback=_no_empty_token)
    ] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="SLICER_HF_ADMIN_TOKEN",
            help="Token `slicer-hf drain` must give; without it, drain is taken over loopback only.",
            callback=_no_empty_token,
        ),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve TLS (grpcs://).", **PEM_FILE)] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert.", **PEM_FILE)] = None,
    min_split_layer: Annotated[int, typer.Option(help="Shallowest split accepted; layers below are not kept.")] = 1,
    max_sessions: Annotated[int, typer.Option(help="Concurrent sessions allowed.")] = 64,
    max_sessions_per_client: Annotated[
        int | None, typer.Option(help="Sessions one client address may hold (default: no cap of its own).", min=1)
    ] = None,
    max_step_tokens: Annotated[int, typer.Option(help="Tokens one step message may carry.")] = 4096,
    max_step_elements: Annotated[
        int, typer.Option(help="Values (batch x tokens x width) one step may carry; bounds a packet's decode memory.")
    ] = 1 << 23,
    max_context_tokens: Annotated[
        int, typer.Option(help="Positions one session may hold (at most a learned position table's rows, as GPT-2's).")
    ] = 16384,
    max_session_batch: Annotated[int, typer.Option(help="Sequences one session may run side by side.")] = 64,
    kv_memory: Annotated[
        str | None, typer.Option(help="KV-cache budget of all sessions, e.g. 4GB (default: half the free memory).")
    ] = None,
    max_session_kv: Annotated[str, typer.Option(help="KV-cache cap of one session, e.g. 1GiB.")] = "1GiB",
    max_message_bytes: Annotated[
        str, typer.Option(help="Largest protocol message, e.g. 64MiB (at least 64KiB).")
    ] = "64MiB",
    max_streams: Annotated[int, typer.Option(help="Streams open at once (more get RESOURCE_EXHAUSTED).", min=1)] = 1024,
    idle_timeout_s: Annotated[float, typer.Option(help="Close sessions and their streams idle this long.")] = 600.0,
    open_timeout_s: Annotated[float, typer.Option(help="A stream with no session has this long to open one.")] = 30.0,
    batching: Annotated[bool, typer.Option(help="Batch decode steps of concurrent sessions.")] = True,
    kv_store: Annotated[
        bool, typer.Option(help="Keep K/V in the server's block store (else per-session caches).")
    ] = True,
    prepack: Annotated[
        bool, typer.Option(help="Causal LMs on the CPU: run the served layers' matmuls on weights packed for oneDNN.")
    ] = True,
    max_batch_rows: Annotated[int, typer.Option(help="Decode rows one forward may run.")] = 128,
    max_batch_tokens: Annotated[int, typer.Option(help="Positions one scheduler round may run.")] = 512,
    prefill_chunk_tokens: Annotated[int, typer.Option(help="Prefill positions run in one forward.")] = 256,
    batch_wait_ms: Annotated[
        float, typer.Option(help="How long a decode round waits for the sessions of the last one.", min=0)
    ] = 25.0,
    device: Annotated[
        str, typer.Option(help="Where the layers and the KV store live: cpu, cuda, cuda:1.", callback=torch_device)
    ] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="Weights dtype: float32, bfloat16, float16, auto.", callback=_weights_dtype)
    ] = "float32",
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default: torch's choice).", min=1)
    ] = None,
    basis: Annotated[
        list[Path] | None,
        typer.Option(help="Calibrated SLICER basis clients may use (a file, or a config folder); repeatable."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus GET /metrics over HTTP on this port (0 picks one).", min=0, max=65535),
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Serve a fleet of replicas on Ray Serve behind a router.")] = False,
    replicas: Annotated[int, typer.Option(help="--ray: replicas (fixed count).", min=1)] = 1,
    autoscale: Annotated[
        str | None, typer.Option(help="--ray: MIN,MAX replicas, scaled on active sessions per replica.")
    ] = None,
    advertise_host: Annotated[
        str | None,
        typer.Option(
            help="--ray: the host name clients reach the router and the replicas at, the one a TLS certificate "
            "names (default: --host; for 0.0.0.0, 127.0.0.1 for the router and this node's address for replicas)."
        ),
    ] = None,
    sessions_per_replica: Annotated[int, typer.Option(help="--ray: the autoscaling target.")] = 16,
    router_port: Annotated[
        int, typer.Option(help="--ray: the router's HTTP port (clients: slicer+http://).", min=1, max=65535)
    ] = 8000,
    replica_cpus: Annotated[float, typer.Option(help="--ray: CPUs Ray reserves per replica.")] = 1.0,
    replica_gpus: Annotated[float, typer.Option(help="--ray: GPUs Ray reserves per replica.")] = 0.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="--ray: a Ray cluster to join (`auto`: the one `ray start` runs here; default: RAY_ADDRESS, else a "
            "new local one)."
        ),
    ] = None,
    drain_timeout_s: Annotated[
        float, typer.Option(help="--ray: how long a stopping replica waits for its open sessions.", min=0.0)
    ] = 30.0,
    app_name: Annotated[
        str, typer.Option(help="--ray: the Serve application's name; another fleet on the cluster needs its own.")
    ] = "slicer",
    route_prefix: Annotated[
        str, typer.Option(help="--ray: the router's path under the cluster's one ingress (slicer+http://H:P/PREFIX).")
    ] = "/",
    log_level: Annotated[LogLevel, typer.Option(help="Logging level.", case_sensitive=False)] = LogLevel.info,
) -> None:
    """Serve blocks `k..L-1` of MODEL (a causal LM, or an encoder or vision model) to split clients over gRPC.

    SIGTERM or Ctrl-C drains (no new sessions), gives open calls 2 s, then stops. With --ray, a fleet: replicas
    on Ray Serve, each with its own gRPC server, and a router at slicer+http://HOST:ROUTER_PORT that sends each new
    session to a replica; stopping, each replica waits up to --drain-timeout-s for its open sessions.
    """
    _setup_logging(log_level.value)
    tls = _tls_pair(tls_cert, tls_key)
    scale = _parse_autoscale(autoscale)
    fleet_only = dict(
        replicas=replicas,
        autoscale=autoscale,
        advertise_host=advertise_host,
        sessions_per_replica=sessions_per_replica,
        router_port=router_port,
        replica_cpus=replica_cpus,
        replica_gpus=replica_gpus,
        ray_address=ray_address,
        drain_timeout_s=drain_timeout_s,
        app_name=app_name,
        route_prefix=route_prefix,
    )
    defaults = inspect.signature(serve).parameters  # what the user did not set
    given = [f"--{name.replace('_', '-')}" for name, value in fleet_only.items() if value != defaults[name].default]
    if given and not ray:
        raise typer.BadParameter(f"{', '.join(given)} configure a fleet: add --ray", param_hint=given[0])
    if scale is not None and "--replicas" in given:
        message = "give a fixed count (--replicas) or a range (--autoscale), not both"
        raise typer.BadParameter(message, param_hint="--replicas")
    if scale is None and "--sessions-per-replica" in given:
        message = "the autoscaling target goes with --autoscale MIN,MAX"
        raise typer.BadParameter(message, param_hint="--sessions-per-replica")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from ..server import ServerLimits
    from ..server.build import load_server, settle_heap
    from ..server.grpc_server import serve as grpc_serve

    limits = checked(
        ServerLimits,
        max_sessions=max_sessions,
        max_sessions_per_client=max_sessions_per_client,
        max_step_tokens=max_step_tokens,
        max_step_elements=max_step_elements,
        max_context_tokens=max_context_tokens,
        max_session_batch=max_session_batch,
        kv_budget_bytes=_size("--kv-memory", kv_memory) if kv_memory else None,
        max_session_kv_bytes=_size("--max-session-kv", max_session_kv),
        max_message_bytes=_size("--max-message-bytes", max_message_bytes, MIN_MESSAGE_BYTES),
        max_batch_rows=max_batch_rows,
        max_batch_tokens=max_batch_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens,
        batch_wait_s=batch_wait_ms / 1000,
        idle_timeout_s=idle_timeout_s,
        open_timeout_s=open_timeout_s,
    )
    if ray:
        if metrics_port is not None:  # each replica's gRPC server is its own; their metrics are per replica
            raise typer.BadParameter(
                "a fleet has no one metrics port: ask each replica (slicer-hf stats)", param_hint="--metrics-port"
            )
        if port != defaults["port"].default:
            raise typer.BadParameter(
                "a fleet's replicas take free ports and its router --router-port", param_hint="--port"
            )
        if admin_token is not None:
            raise typer.BadParameter(
                "a fleet's replicas are drained by Serve as it stops them, not by slicer-hf drain",
                param_hint="--admin-token",
            )
        _serve_fleet({**locals(), "autoscale": scale}, limits, tls)
        return
    from ..loading import model_loading

    on_this_machine(device)
    _check_listen(host, port)  # before the model loads, which takes a while
    with model_loading(model):  # transformers' errors: no such folder or Hub repo, or a folder with no model
        server = load_server(
            model, min_split_layer, dtype, device, limits, batching, kv_store, basis or (), prepack=prepack
        )
    settle_heap()
    try:
        cert, key = tls or (None, None)
        running = grpc_serve(
            server,
            host,
            port,
            token=token,
            tls_cert=cert,
            tls_key=key,
            max_streams=max_streams,
            metrics_port=metrics_port,
            admin_token=admin_token,
        )
        from ..protocol import host_port

        scheme = "grpcs" if cert else "grpc"
        if running.metrics_port is not None:
            metrics = f"{'https' if cert else 'http'}://{host_port(host, running.metrics_port)}/metrics"
            print(f"metrics on {metrics}", flush=True)
        print(f"slicer-hf serving {model} on {scheme}://{host_port(host, running.port)}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        _until(stop)
        running.stop(grace_s=2.0)  # the engine too
    finally:  # a frozen heap is never freed at exit: nanobind (Triton's) would report each object as leaked
        gc.unfreeze()


def _check_listen(host: str, port: int) -> None:
    """Refuse an address this machine cannot listen on now: a host it does not resolve or hold, or a port another
    process has (gRPC binds as this probe does: SO_REUSEADDR, no SO_REUSEPORT)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise typer.BadParameter(f"{host!r} does not resolve here ({exc.strerror})", param_hint="--host") from None
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            message = f"port {port} on {host} is taken: is another server there?" if taken else exc.strerror
            raise typer.BadParameter(message, param_hint="--port" if taken else "--host") from None


def _until(stop: threading.Event) -> None:
    """Wait for `stop` (set by SIGINT or SIGTERM) a second at a time: Python runs a signal's handler on the main
    thread only, and a signal the kernel hands another thread (as after SIGSTOP and SIGCONT) would never wake a
    wait without a timeout."""
    while not stop.wait(1.0):
        pass


def _serve_fleet(options: dict[str, Any], limits: Any, tls: tuple[bytes, bytes] | None) -> None:
    """`serve --ray`: deploy the fleet, print the router URL, serve until interrupted."""
    import dataclasses

    try:
        from ..server.fleet import FleetOptions, deploy, undeploy
    except ImportError as exc:
        raise typer.BadParameter(f"--ray needs the ray extra: pip install 'slicer-hf[ray]' ({exc})") from None
    from ..loading import missing_folder, model_config
    from ..protocol import is_loopback

    if options["ray_address"] is not None and options["advertise_host"] is None and is_loopback(options["host"]):
        warnings.warn(  # a cluster of one machine is served so; replicas elsewhere would point clients to their own
            f"--ray-address joins a cluster, and its replicas listen on {options['host']}: on a cluster of several "
            "machines no client reaches those on other nodes; give --host 0.0.0.0 (with --token and TLS)",
            stacklevel=1,
        )
    if options["ray_address"] is None:  # replicas on this machine, which would each fail to load a model not here
        if missing_folder(options["model"]):
            raise typer.BadParameter(f"{options['model']!r}: no such folder", param_hint="--model")
        from ..data import resolve_model

        # a Hub id: its config now (cached, or one request) rather than from every replica after Ray starts
        if resolve_model(options["model"]) == options["model"]:  # (an alias is this package's own model)
            model_config(options["model"], options["model"])
    fleet = checked(
        FleetOptions,
        model=options["model"],
        min_split_layer=options["min_split_layer"],
        dtype=options["dtype"],
        device=options["device"],
        batching=options["batching"],
        kv_store=options["kv_store"],
        prepack=options["prepack"],
        threads=options["threads"],
        bases=tuple(str(p.resolve()) for p in options["basis"] or ()),
        limits=dataclasses.asdict(limits),
        max_streams=options["max_streams"],
        replicas=options["replicas"],
        autoscale=options["autoscale"],
        sessions_per_replica=options["sessions_per_replica"],
        token=options["token"],
        tls_cert=tls[0].decode() if tls else None,
        tls_key=tls[1].decode() if tls else None,
        host=options["host"],
        advertise_host=options["advertise_host"],
        router_host=options["host"],
        router_port=options["router_port"],
        app_name=options["app_name"],
        route_prefix=options["route_prefix"],
        replica_cpus=options["replica_cpus"],
        replica_gpus=options["replica_gpus"],
        drain_timeout_s=options["drain_timeout_s"],
    )
    url = deploy(fleet, address=options["ray_address"])
    print(f"slicer-hf serving {options['model']} (a Ray Serve fleet, its router) on {url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _until(stop)
    undeploy(fleet)


def stats(
    url: Annotated[str, typer.Argument(help="Server URL, grpc://host:port.")],
    token: Annotated[str | None, typer.Option(envvar="SLICER_HF_TOKEN", help="The server's auth token.")] = None,
    prometheus: Annotated[bool, typer.Option(help="Prometheus text instead of JSON.")] = False,
    root_cert: RootCertOpt = None,
) -> None:
    """Print a server's counters."""
    from .. import protocol
    from ..transport.grpc import METRICS_METHOD, STATS_METHOD, GrpcTransport

    transport = GrpcTransport([url], token=token, timeout_s=10, root_certificates=read_root_cert(root_cert))
    if prometheus:
        print(transport.unary(METRICS_METHOD).decode(), end="")
    else:
        print(json.dumps(protocol.decode_json(transport.unary(STATS_METHOD)), indent=2))


def drain(
    url: Annotated[str, typer.Argument(help="Server URL, grpc://host:port.")],
    token: Annotated[str | None, typer.Option(envvar="SLICER_HF_TOKEN", help="The server's auth token.")] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(envvar="SLICER_HF_ADMIN_TOKEN", help="The server's --admin-token (sent instead of --token)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Take new sessions again.")] = False,
    root_cert: RootCertOpt = None,
) -> None:
    """Put a server in drain mode: open sessions carry on, new ones are refused, health turns NOT_SERVING. A server
    started without --admin-token takes this over loopback only."""
    from .. import protocol
    from ..transport.grpc import DRAIN_METHOD, GrpcTransport

    bearer = admin_token or token
    transport = GrpcTransport([url], token=bearer, timeout_s=10, root_certificates=read_root_cert(root_cert))
    reply = transport.unary(DRAIN_METHOD, json.dumps({"on": not resume}).encode())
    stats = protocol.decode_json(reply)
    print(f"{url}: draining={bool(stats['draining'])}, sessions_active={stats['sessions_active']}")
