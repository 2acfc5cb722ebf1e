"""`slicer-hf`: serve the suffix of a model, run the end-to-end demo, query a server, evaluate and benchmark."""

from __future__ import annotations

import enum
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SLICER split inference for Hugging Face LMs.")

ServeModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hub id, local folder, 'smollm2' (embedded) or 'minilm' (all-MiniLM-L6-v2)."),
]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Causal LM: Hub id, local folder or 'smollm2' (embedded).")
]
SERVER_DTYPES = ("float32", "bfloat16", "float16", "auto")
PEM_FILE = {"exists": True, "dir_okay": False, "readable": True}  # checked before anything loads
RootCertOpt = Annotated[
    Path | None,
    typer.Option(help="PEM CA certificate to check a grpcs:// server's certificate against (private CA).", **PEM_FILE),
]


class LogLevel(str, enum.Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


INFEASIBLE_EXIT = 3  # `search` found no candidate within the constraints (2 is a usage error)
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'512MB', '4GB', '1.5GiB', '1000000' -> bytes."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", text.strip().lower())
    if match is None or match.group(2) not in SIZE_UNITS:
        raise typer.BadParameter(f"expected a size like 512MB, 4GB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def _writable(out: Path) -> None:
    """Refuse, before any work, an --out this user cannot write: under a file, or in a folder not writable."""
    held = out.expanduser()
    while not held.exists() and held != held.parent:  # the deepest part of the path that exists
        held = held.parent
    if held != out.expanduser() and not held.is_dir():
        raise typer.BadParameter(f"{out}: {held} is a file, not a folder", param_hint="--out")
    if not os.access(held if held.is_dir() else held.parent, os.W_OK):
        raise typer.BadParameter(f"{out}: {held} is not writable", param_hint="--out")


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


def _root_cert(path: Path | None) -> bytes | None:
    """--root-cert's PEM bytes, refused here unless they hold a certificate."""
    if path is None:
        return None
    from .errors import ConfigError
    from .transport.base import root_context

    pem = path.read_bytes()
    try:
        root_context(pem)
    except ConfigError as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--root-cert") from None
    return pem


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
    if token == "":
        option = f"--{(param.name or 'token').replace('_', '-')}"
        raise typer.BadParameter("an empty token locks everyone out: give one, or leave it out", param_hint=option)
    return token


def _weights_dtype(dtype: str) -> str:
    if dtype not in SERVER_DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(SERVER_DTYPES)}", param_hint="--dtype")
    return dtype


def _profiled_dtype(dtype: str) -> str:
    from .tuning.profile import PROFILE_DTYPES

    if dtype not in PROFILE_DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(PROFILE_DTYPES)}", param_hint="--dtype")
    return dtype


def _torch_device(device: str) -> str:
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"{device!r} is not a device (cpu, cuda, cuda:1)", param_hint="--device") from None
    return device


def _here(device: str) -> None:
    """Refuse a CUDA device this process's torch does not see (a fleet's replicas run on the cluster's nodes)."""
    import torch

    where = torch.device(device)
    if where.type == "cuda" and (where.index or 0) >= (held := torch.cuda.device_count()):
        raise typer.BadParameter(
            f"{device!r}: this torch sees {held} CUDA device{'s' * (held != 1)}"
            + (" (a CPU-only build, or no GPU here)" if not held else ""),
            param_hint="--device",
        )


def _parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if match is None or not 0 < int(match.group(1)) <= int(match.group(2)):
        raise typer.BadParameter(f"expected MIN,MAX with 0 < MIN <= MAX, got {text!r}", param_hint="--autoscale")
    return int(match.group(1)), int(match.group(2))


def _checked(make: Callable[..., T], **options: Any) -> T:
    """`make(**options)`, with a `ConfigError` shown as a bad command-line option (not a traceback)."""
    from .errors import ConfigError

    try:
        return make(**options)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
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
    max_context_tokens: Annotated[int, typer.Option(help="Positions one session may hold.")] = 16384,
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
        str, typer.Option(help="Where the layers and the KV store live: cpu, cuda, cuda:1.", callback=_torch_device)
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
        int, typer.Option(help="--ray: the router's HTTP port (clients: slicer+http://).", min=0, max=65535)
    ] = 8000,
    replica_cpus: Annotated[float, typer.Option(help="--ray: CPUs Ray reserves per replica.")] = 1.0,
    replica_gpus: Annotated[float, typer.Option(help="--ray: GPUs Ray reserves per replica.")] = 0.0,
    ray_address: Annotated[str | None, typer.Option(help="--ray: a Ray cluster to join (default: local).")] = None,
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
    from .server import ServerLimits
    from .server.build import load_server, settle_heap
    from .server.grpc_server import serve as grpc_serve

    limits = _checked(
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
    from .errors import SlicerError
    from .loading import model_error

    _here(device)
    try:
        server = load_server(
            model, min_split_layer, dtype, device, limits, batching, kv_store, basis or (), prepack=prepack
        )
    except SlicerError:  # says what it is already (a ConfigError is a ValueError too)
        raise
    except (OSError, ValueError) as exc:  # transformers': no such folder or Hub repo, or a folder with no model
        raise model_error(model, exc) from None
    settle_heap()
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
    scheme = "grpcs" if cert else "grpc"
    if running.metrics_port is not None:
        print(f"metrics on {'https' if cert else 'http'}://{host}:{running.metrics_port}/metrics", flush=True)
    print(f"slicer-hf serving {model} on {scheme}://{host}:{running.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _until(stop)
    running.stop(grace_s=2.0)  # the engine too


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
        from .server.fleet import FleetOptions, deploy, undeploy
    except ImportError as exc:
        raise typer.BadParameter(f"--ray needs the ray extra: pip install 'slicer-hf[ray]' ({exc})") from None
    from .loading import missing_folder, model_config
    from .protocol import is_loopback

    if options["ray_address"] is not None and options["advertise_host"] is None and is_loopback(options["host"]):
        warnings.warn(  # a cluster of one machine is served so; replicas elsewhere would point clients to their own
            f"--ray-address joins a cluster, and its replicas listen on {options['host']}: on a cluster of several "
            "machines no client reaches those on other nodes; give --host 0.0.0.0 (with --token and TLS)",
            stacklevel=1,
        )
    if options["ray_address"] is None:  # replicas on this machine, which would each fail to load a model not here
        if missing_folder(options["model"]):
            raise typer.BadParameter(f"{options['model']!r}: no such folder", param_hint="--model")
        from .data import resolve_model

        # a Hub id: its config now (cached, or one request) rather than from every replica after Ray starts
        if resolve_model(options["model"]) == options["model"]:  # (an alias is this package's own model)
            model_config(options["model"], options["model"])
    fleet = _checked(
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


@app.command()
def stats(
    url: Annotated[str, typer.Argument(help="Server URL, grpc://host:port.")],
    token: Annotated[str | None, typer.Option(envvar="SLICER_HF_TOKEN", help="The server's auth token.")] = None,
    prometheus: Annotated[bool, typer.Option(help="Prometheus text instead of JSON.")] = False,
    root_cert: RootCertOpt = None,
) -> None:
    """Print a server's counters."""
    from . import protocol
    from .transport.grpc import METRICS_METHOD, STATS_METHOD, GrpcTransport

    transport = GrpcTransport([url], token=token, timeout_s=10, root_certificates=_root_cert(root_cert))
    if prometheus:
        print(transport.unary(METRICS_METHOD).decode(), end="")
    else:
        print(json.dumps(protocol.decode_json(transport.unary(STATS_METHOD)), indent=2))


@app.command()
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
    from . import protocol
    from .transport.grpc import DRAIN_METHOD, GrpcTransport

    bearer = admin_token or token
    transport = GrpcTransport([url], token=bearer, timeout_s=10, root_certificates=_root_cert(root_cert))
    reply = transport.unary(DRAIN_METHOD, json.dumps({"on": not resume}).encode())
    stats = protocol.decode_json(reply)
    print(f"{url}: draining={bool(stats['draining'])}, sessions_active={stats['sessions_active']}")


@app.command()
def demo(
    model: ModelOpt = "smollm2",
    prompt: Annotated[str, typer.Option(help="What to ask the model.")] = "What is the capital of France?",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.", min=1)] = 32,
    config: Annotated[
        str | None,
        typer.Option(
            help="SlicerConfig folder or preset name (configs/); default: the model folder's own slicer_config.json, "
            "else the SmolLM2 preset for SmolLM2, else SlicerConfig's defaults."
        ),
    ] = None,
    split_layer: Annotated[int | None, typer.Option(help="Override the config's split layer.")] = None,
) -> None:
    """Start a server process, split-generate against it from this process, and show what crossed the wire."""
    from .demo import run_demo

    run_demo(model=model, prompt=prompt, max_new_tokens=max_new_tokens, config=config, split_layer=split_layer)


ServerOpt = Annotated[
    list[str], typer.Option("--server", "-s", help="Server URL (grpc://host:port); repeat for failover.")
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        help="SlicerConfig: preset name, folder or Hub repo (default: the model folder's own slicer_config.json; "
        "else the SmolLM2 preset for SmolLM2, by alias, Hub id or converted folder; else SlicerConfig's defaults)."
    ),
]
DoSampleOpt = Annotated[bool, typer.Option("--do-sample/--greedy", help="Sample instead of greedy.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
TopKOpt = Annotated[int, typer.Option(help="Sample from the k most likely tokens.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for sampling.")]
ServerTokenOpt = Annotated[str | None, typer.Option(envvar="SLICER_HF_TOKEN", help="The servers' auth token.")]


def _sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int | None):
    options = locals()
    from .client import Sampling

    return _checked(Sampling, **options)  # a bad combination (temperature 0 with sampling) is a usage error


@app.command()
def generate(
    server: ServerOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to ask.")],
    model: ModelOpt = "smollm2",
    config: ConfigOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.", min=1)] = 128,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 50,
    seed: SeedOpt = None,
    token: ServerTokenOpt = None,
    root_cert: RootCertOpt = None,
) -> None:
    """Split-generate against a running server: the reply streams as it comes, wire stats at the end."""
    from .client import Client

    sampling = _sampling(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    client = Client(server, model, config, token, _root_cert(root_cert))
    _, elapsed, new = client.reply([{"role": "user", "content": prompt}], sampling)
    print("\n" + client.summary(elapsed, new))
    client.close()


@app.command()
def chat(
    server: ServerOpt,
    model: ModelOpt = "smollm2",
    config: ConfigOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per reply at most.", min=1)] = 256,
    do_sample: DoSampleOpt = False,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 50,
    seed: SeedOpt = None,
    token: ServerTokenOpt = None,
    root_cert: RootCertOpt = None,
) -> None:
    """Chat with a split model on a running server (one line per turn; /exit or end of input to leave).

    Ctrl-C stops a reply and drops its turn; at the prompt, it leaves."""
    from .client import Client
    from .errors import ConfigError, ProtocolError

    sampling = _sampling(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    client = Client(server, model, config, token, _root_cert(root_cert))
    messages: list[dict[str, str]] = []
    total_s, total_new = 0.0, 0
    print("chat with the split model (/exit to leave; Ctrl-C stops a reply)", flush=True)
    try:
        for line in sys.stdin:
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if not text:
                continue
            messages.append({"role": "user", "content": text})
            try:
                reply, elapsed, new = client.reply(messages, sampling)
            except (ProtocolError, ConfigError) as exc:  # the server refused this turn (it outgrew the context, say)
                messages.pop()
                print(f"\nerror: {exc} (this message is dropped; /exit to leave)", flush=True)
                continue
            except KeyboardInterrupt:  # stops this reply, not the chat
                messages.pop()
                client.restart()
                print("\n(stopped: this message is dropped; /exit to leave)", flush=True)
                continue
            messages.append({"role": "assistant", "content": reply})
            total_s, total_new = total_s + elapsed, total_new + new
    except KeyboardInterrupt:  # at the prompt: leave as /exit does
        pass
    print("\n" + client.summary(total_s, total_new))
    client.close()


@app.command("eval")
def eval_(
    model: ModelOpt = "smollm2",
    text: Annotated[str | None, typer.Option(help="A text file to score.")] = None,
    dataset: Annotated[str | None, typer.Option(help="wikitext-2-raw-v1[:split] or wikitext-2-v1[:split].")] = None,
    split_layer: Annotated[int | None, typer.Option(help="Split layer (default: the config's).")] = None,
    codec: Annotated[str | None, typer.Option(help="Codec name (overrides the config's).")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="SlicerConfig: preset name, folder or Hub repo (default: for SmolLM2 its preset, as for generate; "
            "else SlicerConfig's defaults)."
        ),
    ] = None,
    window: Annotated[int, typer.Option(help="Tokens per scored window.")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="Score at most this many tokens.")] = None,
    downlink_step: Annotated[
        float | None, typer.Option(help="Send the final hidden states back through SLICER ECSQ at this step.")
    ] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """Perplexity, KL to the unsplit model, top-1 agreement and bits per token (both ways) of a split."""
    from .evaluate import evaluate, format_result

    if bool(text) == bool(dataset):  # an empty one is none
        raise typer.BadParameter("give exactly one of --text FILE or --dataset wikitext-2-raw-v1[:split]")
    source = text or f"{dataset}{'' if ':' in str(dataset) else ':test'}"
    from .client import default_config

    knobs = {"downlink_step": downlink_step} if downlink_step is not None else None
    config = config or default_config(model)  # the config generate, chat and demo use
    result = evaluate(model, source, split_layer, codec, config, window, max_tokens, json_out, codec_params=knobs)
    print(format_result(result))


@app.command()
def profile(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder (gets profile.json) or a .json file.")],
    model: ModelOpt = "smollm2",
    text: Annotated[
        str, typer.Option(help="Calibration text: a file or a wikitext split.")
    ] = "wikitext-2-v1:validation",  # data.CALIBRATION_TEXT (this module imports no torch)
    tokens: Annotated[int, typer.Option(help="Calibration tokens scored per point.")] = 1024,
    window: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    splits: Annotated[
        str | None, typer.Option(help="Candidate split layers, e.g. 8,16,24 (default: about ten spread out).")
    ] = None,
    steps: Annotated[str | None, typer.Option(help="ECSQ steps of the uplink points, e.g. 0.2,0.3,0.6.")] = None,
    downlink_steps: Annotated[str | None, typer.Option(help="ECSQ steps of the downlink points ('' for none).")] = None,
    rate_distortion: Annotated[
        bool, typer.Option(help="Measure the codec's rate-distortion (a server profile may skip it).")
    ] = True,
    threads: Annotated[
        int | None, typer.Option(help="torch threads, as the device will run (default: torch's).", min=1)
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1.", callback=_torch_device)] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="Weights dtype: float32, bfloat16, float16.", callback=_profiled_dtype)
    ] = "float32",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt of the timing run.", min=2)] = 128,
    decode_tokens: Annotated[int, typer.Option(help="New tokens of the timing run.", min=2)] = 32,
) -> None:
    """Measure what a split of MODEL costs on this machine: per-layer prefill and decode time, weights and KV per
    token, and the codec's rate-distortion at each candidate split. Run it on the edge and on the server."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from .data import load_text, load_tokenizer, resolve_model, token_windows
    from .tuning.profile import DEFAULT_DOWNLINK_STEPS, DEFAULT_STEPS, profile_model

    if out.is_file() and out.suffix != ".json":
        raise typer.BadParameter(
            f"{out} is a file: give a folder (it gets profile.json) or a .json file", param_hint="--out"
        )
    _writable(out)
    _here(device)
    path = resolve_model(model)
    windows = None
    if rate_distortion:  # the text's mistakes are found before the weights load
        tokenizer = load_tokenizer(path, "to read the calibration text (--no-rate-distortion profiles costs alone)")
        windows = token_windows(tokenizer, load_text(text), window=window, max_tokens=tokens)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    result = profile_model(
        lm,
        model,
        windows,
        text,
        _numbers(splits, int),
        _numbers(steps, float) or DEFAULT_STEPS,
        DEFAULT_DOWNLINK_STEPS if downlink_steps is None else _numbers(downlink_steps, float) or (),
        prompt_tokens,
        decode_tokens,
    )
    written = result.save(out)
    e, n = result.edge, result.num_layers
    print(
        f"{model}: {n} layers, decode step {e['decode_step_ms']:.1f} ms (layers "
        f"{sum(layer.decode_ms for layer in result.layers):.1f}, overhead {e['step_overhead_ms']:.1f}) with "
        f"{result.machine['torch_threads']} torch thread(s); {len(result.rate_distortion)} rate-distortion points "
        f"at splits {result.split_layers()}; written to {written}"
    )


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the config and its basis files.")],
    model: ModelOpt = "smollm2",
    config: Annotated[
        str | None, typer.Option(help="Config to start from: a folder, a preset name or a Hub id (default: ECSQ).")
    ] = None,
    split_layer: Annotated[int | None, typer.Option(help="Split layer (default: the config's).")] = None,
    outliers: Annotated[
        int | None,
        typer.Option(
            help="Exact outliers per row (default: the --config's, else 0: the massive channels stay in the basis, "
            "out of the RMS).",
            min=0,
        ),
    ] = None,
    downlink: Annotated[
        bool, typer.Option(help="Also calibrate the compressed downlink (the last layer's output).")
    ] = False,
    predict: Annotated[
        bool,
        typer.Option(
            help="The downlink's basis predicts each reply from the rows the edge sent (both sides hold them)."
        ),
    ] = True,
    predict_previous: Annotated[
        bool | None,
        typer.Option(
            help="The uplink basis predicts each row from the decoded row before it (closed loop; default: the "
            "--config's, else off)."
        ),
    ] = None,
    text: Annotated[
        str, typer.Option(help="Calibration text: a file or a wikitext split. Keep test text for testing.")
    ] = "wikitext-2-v1:validation",  # data.CALIBRATION_TEXT (this module imports no torch)
    tokens: Annotated[
        int, typer.Option(help="Calibration tokens, used in whole windows (at least 2 x the hidden size).")
    ] = 24576,
    window: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the sampled tokens whose gradients estimate the metric.")] = 0,
) -> None:
    """Fit calibrated SLICER bases for MODEL on calibration text and write a config that uses them
    (rotation='calibrated'): the uplink at the split layer, and with --downlink the compressed downlink."""
    from .config import SlicerConfig
    from .tuning.calibrate import calibrate as fit

    if out.is_file():
        raise typer.BadParameter(f"{out} is a file: the config and its basis files go in a folder", param_hint="--out")
    _writable(out)
    base = SlicerConfig.from_pretrained(config) if config else SlicerConfig(outliers=0)
    if outliers is not None:
        base = base.replace(outliers=outliers)
    chained = base.predict_previous if predict_previous is None else predict_previous  # a preset refits as it was
    fitted = fit(model, base, split_layer, downlink, predict, chained, text, tokens, window, seed)
    written = fitted.save_pretrained(out)
    downlink_basis = f", downlink basis {fitted.downlink_basis}" if downlink else ""
    print(
        f"calibrated on {text}: uplink basis {fitted.basis} at split {fitted.split_layer}{downlink_basis}; config "
        f"written to {written}"
    )


def _numbers(text: str | None, kind: type) -> list[Any] | None:
    if text is None or not text.strip():
        return None
    try:
        return [kind(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


@app.command()
def search(
    edge_profile: Annotated[Path, typer.Option(help="Profile of the client device (slicer-hf profile).")],
    server_profile: Annotated[Path, typer.Option(help="Profile of the server machine.")],
    uplink_mbps: Annotated[float, typer.Option(help="Uplink rate, Mbit/s.")],
    downlink_mbps: Annotated[float, typer.Option(help="Downlink rate, Mbit/s.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the chosen SlicerConfig folder here.")] = None,
    rtt_ms: Annotated[float, typer.Option(help="Round-trip time, ms.")] = 0.0,
    max_kl: Annotated[float | None, typer.Option(help="Mean KL to the unsplit model, nats/token.")] = None,
    max_ppl_increase: Annotated[float | None, typer.Option(help="Perplexity increase, percent.")] = None,
    edge_memory_gb: Annotated[float | None, typer.Option(help="The edge's weights + KV cache, GB.")] = None,
    max_token_latency_ms: Annotated[float | None, typer.Option(help="Per decode token, ms.")] = None,
    objective: Annotated[str, typer.Option(help="latency, server-compute or uplink.")] = "latency",
    context_tokens: Annotated[int, typer.Option(help="Positions the edge's KV cache must hold.")] = 2048,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for the time-to-first-token figure.")] = 64,
    overhead_ms: Annotated[float, typer.Option(help="Per-step gRPC/protocol/scheduling time.")] = 2.0,
    burst_bytes: Annotated[
        int, typer.Option(help="Token bucket of a shaped link, bytes (0: a physical line, every byte is serialized).")
    ] = 0,
    splits: Annotated[str | None, typer.Option(help="Consider only these split layers, e.g. 20,24.")] = None,
    compress_downlink: Annotated[bool, typer.Option(help="Consider ECSQ on the downlink too.")] = True,
    adaptive: Annotated[
        bool, typer.Option(help="Write an adaptive-bitrate ladder holding --max-token-latency-ms.")
    ] = False,
    base_config: Annotated[str | None, typer.Option(help="SlicerConfig whose other fields the choice keeps.")] = None,
    push_to_hub: Annotated[str | None, typer.Option(help="Also upload the choice to this Hub repo.")] = None,
) -> None:
    """Choose the split layer and codec knobs for a client's device, link and quality budget: prints the Pareto
    candidates with their predicted figures and writes the chosen SlicerConfig with the predictions beside it. Exits
    with status 3 when no candidate meets the constraints."""
    from .config import SlicerConfig
    from .errors import ConfigError
    from .tuning.planner import Constraints, InfeasibleError, LinkSpec
    from .tuning.planner import search as run_search

    if max_kl is not None and max_ppl_increase is not None:
        raise typer.BadParameter("give --max-kl or --max-ppl-increase, not both")
    if out is not None:
        _writable(out)
    try:
        result = run_search(
            edge_profile,
            server_profile,
            LinkSpec(uplink_mbps, downlink_mbps, rtt_ms, overhead_ms, burst_bytes=burst_bytes),
            Constraints(max_kl, max_ppl_increase, edge_memory_gb, max_token_latency_ms, context_tokens, prompt_tokens),
            objective,
            SlicerConfig.from_pretrained(base_config) if base_config else None,
            _numbers(splits, int),
            compress_downlink,
            adaptive,
        )
    except InfeasibleError as exc:
        print(f"infeasible: {exc}", file=sys.stderr)
        raise typer.Exit(INFEASIBLE_EXIT) from exc
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    print(result.summary() + "\n")
    print(result.table())
    if out is not None:
        print(f"\nwritten to {result.save(out)}")
    if push_to_hub:
        print(f"pushed to {result.push_to_hub(push_to_hub)}")


BENCH_SUITES = {
    "rate-distortion": "rate_distortion",
    "server-compute": "server_compute",
    "codec-speed": "codec_speed",
    "drift": "drift",
    "link": "link",
    "concurrency": "concurrency",
    "soak": "soak",
    "summary": "summary",
    "architectures": "architectures",
    "encoders": "encoders",
    "fleet": "fleet",
    "search": "search",
    "calibrated": "calibrated",
    "prediction": "prediction",
}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(
    ctx: typer.Context,
    suite: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCH_SUITES)}, or 'all'.")],
    torch_threads: Annotated[int, typer.Option(help="torch threads for this process.")] = 1,
) -> None:
    """Run a benchmark suite; it prints a table and writes JSON (and plots) under docs/benchmarks/.

    Extra options go to the suite (`slicer-hf bench SUITE --help` lists them); `--torch-threads` sets torch's threads
    for any suite (the link suite's own `--threads` sets its processes').
    """
    import importlib

    if suite in ("--help", "-h"):  # --help after a suite goes to the suite
        print(ctx.get_help())
        return

    if suite == "all" and ctx.args:  # each suite takes options of its own: none fits them all
        raise typer.BadParameter(f"'all' runs every suite with its defaults; {' '.join(ctx.args)} goes to one suite")
    if torch_threads < 1:
        raise typer.BadParameter(f"must be at least 1, got {torch_threads}", param_hint="--torch-threads")

    import torch

    torch.set_num_threads(torch_threads)
    names = list(BENCH_SUITES) if suite == "all" else [suite]
    for name in names:
        if name not in BENCH_SUITES:
            raise typer.BadParameter(f"unknown suite {name!r}; choose from {', '.join(BENCH_SUITES)} or 'all'")
        print(f"== {name}", flush=True)
        program, sys.argv[0] = sys.argv[0], f"slicer-hf bench {name}"  # what the suite's --help and errors name
        try:
            importlib.import_module(f"slicer_hf.bench.{BENCH_SUITES[name]}").main(ctx.args if suite != "all" else [])
        finally:
            sys.argv[0] = program


def main() -> None:
    from .errors import SlicerError

    # a warning for the user, not a traceback frame: one line, as the errors below
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        app()
    except (SlicerError, NotImplementedError) as exc:  # a refusal, a dead link, a bad config, a family not split
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
