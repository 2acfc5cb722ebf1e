"""A fleet of split servers on Ray Serve: replicas that each run the gRPC stream server, and a router.

Ray Serve places the replicas, restarts them, health-checks and autoscales them. Tokens never go through Ray (a
handle call costs milliseconds, a stream message a fraction of one): each `SplitReplica` loads the model's suffix
and runs the ordinary gRPC server (`grpc_server.py`) on a port of its own, and clients stream to it directly. The
`Router` (the HTTP ingress, `POST /session`) only says where a new session should go: the fresh, not draining
replica with the fewest active sessions (then the most free KV memory). Replicas report to it every
`heartbeat_s`; a router that restarts relearns the fleet within one heartbeat, a replica that stops reporting is
left out after five (and a client that cannot reach a replica asks again without it at once).

Autoscaling follows active sessions per replica (`SessionsPolicy` on the replicas' `record_autoscaling_stats`).
A replica that Serve stops drains first: it takes no new sessions and waits up to `drain_timeout_s` for its
sessions to end; sessions still open then move to another replica by replay (the client asks the router again).

This module needs the `ray` extra (`pip install "slicer-hf[ray]"`); nothing else in slicer_hf imports it.

    slicer-hf serve --model smollm2 --ray --replicas 2 --router-port 8000      # CLI
    deploy(FleetOptions(model="smollm2", replicas=2))                          # Python
    serve run fleet.yaml                                                       # Serve config (docs/serving.md)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hmac
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import ConfigError, TransportError
from ..protocol import TOKEN_RULE, fleet_router_url, host_port, usable_token
from .state import SERVER_DTYPES, ServerLimits, default_kv_budget_bytes

logger = logging.getLogger(__name__)
ROUTER, REPLICA = "SlicerRouter", "SlicerReplica"
ROUTER_CPUS = 0.1  # the router only answers admissions and heartbeats
MIN_HEARTBEAT_S = 0.1  # each replica's heartbeat is a call to the router
_TLS_FOLDERS: dict[str, Path] = {}  # per application: the copies of its certificate and key the router reads


@dataclass
class FleetOptions:
    """How to deploy a fleet; every field travels to the replicas as JSON.

    Args:
        model: Hub id, folder or alias ('smollm2', 'minilm') every replica loads.
        min_split_layer, dtype, device, batching, kv_store, prepack, threads, bases: as for `slicer-hf serve`.
        limits: `ServerLimits` fields for every replica. Without `kv_budget_bytes`, each replica takes half the
            memory free at its start divided by the most replicas the fleet may run (replicas on one node would
            otherwise each count the same free memory): give it to size each replica's budget yourself.
        max_streams: streams each replica holds open at once.
        replicas: fixed replica count (ignored with `autoscale`).
        autoscale: (min, max) replicas, scaled on active sessions per replica.
        sessions_per_replica: the autoscaling target.
        token: auth token the router and every replica require.
        tls_cert, tls_key: PEM text; replicas then serve grpcs:// and the router HTTPS (slicer+https://).
        host: address replicas bind; advertise_host: the host name clients reach the router and the replicas at,
            the one a TLS certificate names (default: the router's bind address, each replica's node address).
        router_host, router_port, route_prefix: the HTTP ingress (clients: `slicer+http://host:port/prefix`).
        replica_cpus, replica_gpus: Ray resources per replica.
        heartbeat_s: how often replicas report to the router.
        drain_timeout_s: how long a replica that is being stopped waits for its sessions.
        upscale_delay_s, downscale_delay_s: how long autoscaling waits before adding or removing a replica.
        app_name: the Serve application name.
    """

    model: str = "smollm2"
    min_split_layer: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    batching: bool = True
    kv_store: bool = True
    prepack: bool = True
    threads: int | None = None
    bases: tuple[str, ...] = ()
    limits: dict[str, Any] = field(default_factory=dict)
    max_streams: int = 1024
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    sessions_per_replica: int = 16
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    host: str = "0.0.0.0"
    advertise_host: str | None = None
    router_host: str = "127.0.0.1"
    router_port: int = 8000
    route_prefix: str = "/"
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    heartbeat_s: float = 1.0
    drain_timeout_s: float = 30.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 60.0
    app_name: str = "slicer"

    def __post_init__(self) -> None:
        if isinstance(self.autoscale, str):  # "1,4", as the command line and a config file may give it
            self.autoscale = tuple(int(n) if n.strip().isdigit() else n for n in self.autoscale.split(","))
        if self.autoscale is not None:
            pair = tuple(self.autoscale) if isinstance(self.autoscale, (tuple, list)) else ()
            if len(pair) != 2 or not all(_count(n) for n in pair) or not 0 < pair[0] <= pair[1]:
                raise ConfigError(f"autoscale must be MIN,MAX, two integers with 0 < MIN <= MAX, got {self.autoscale}")
            self.autoscale = (pair[0], pair[1])
        for name in ("replicas", "sessions_per_replica", "max_streams"):
            if not _count(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (_number(self.heartbeat_s) and self.heartbeat_s >= MIN_HEARTBEAT_S):  # each one calls the router
            raise ConfigError(f"heartbeat_s must be a number of at least {MIN_HEARTBEAT_S}, got {self.heartbeat_s!r}")
        if not _count(self.router_port) or not 1 <= self.router_port <= 65535:  # Serve takes 0, then says nothing
            raise ConfigError(f"router_port must be a port number 1..65535, got {self.router_port!r}")
        if not _count(self.min_split_layer) or self.min_split_layer < 1:
            raise ConfigError(f"min_split_layer must be an integer >= 1, got {self.min_split_layer!r}")
        if self.threads is not None and (not _count(self.threads) or self.threads < 1):
            raise ConfigError(f"threads must be an integer >= 1, or None for torch's choice, got {self.threads!r}")
        if self.dtype not in SERVER_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(SERVER_DTYPES)}, got {self.dtype!r}")
        for name in ("drain_timeout_s", "upscale_delay_s", "downscale_delay_s", "replica_cpus", "replica_gpus"):
            if not (_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        prefix = self.route_prefix
        if not prefix.startswith("/") or prefix != "/" and prefix.endswith("/") or "{" in prefix or "}" in prefix:
            raise ConfigError(  # Serve's own rule, which it applies only once Ray has started
                f"route_prefix must start with '/' and not end with one (but '/' itself), no braces: got {prefix!r}"
            )
        if not self.app_name:
            raise ConfigError("app_name must not be empty")
        if self.token == "":
            raise ConfigError("token must not be empty: give the fleet's token, or None for no token")
        if self.token is not None and not usable_token(self.token):  # no client could send it
            raise ConfigError(TOKEN_RULE)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give tls_cert and tls_key together, or neither")
        limits = ServerLimits(**self.limits)  # unknown limit names fail here, not in a replica
        if self.autoscale is not None and self.sessions_per_replica >= limits.max_sessions:
            raise ConfigError(
                f"sessions_per_replica ({self.sessions_per_replica}) must be below each replica's max_sessions "
                f"({limits.max_sessions}): full replicas refuse new sessions, so the count that asks for another "
                "replica would never be reached"
            )

    def replica_limits(self, free_bytes: int) -> ServerLimits:
        """A replica's limits, given the KV budget it would take alone (`default_kv_budget_bytes`)."""
        limits = ServerLimits(**self.limits)
        if limits.kv_budget_bytes is None:  # a share of what replicas on one device all see as free
            most = self.autoscale[1] if self.autoscale else self.replicas
            on_gpus = self.replica_gpus > 0 and self.device != "cpu"  # CPU replicas share one node's memory
            per_device = max(1, math.floor(1 / self.replica_gpus)) if on_gpus else most  # GPU shares
            limits.kv_budget_bytes = free_bytes // min(most, per_device)
        return limits

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SessionsPolicy:
    """Serve autoscaling policy: enough replicas for `sessions_per_replica` active sessions each."""

    def __init__(self, sessions_per_replica: int = 16) -> None:
        self.sessions_per_replica = max(1, int(sessions_per_replica))

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        per_replica = (ctx.aggregated_metrics or {}).get("active_sessions", {})
        sessions = sum(per_replica.values())
        wanted = math.ceil(sessions / self.sessions_per_replica) if sessions else 0
        low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return max(low, min(high, wanted)), {"active_sessions": sessions}


class SplitReplica:
    """One split server: loads the suffix, serves gRPC on its own port, reports to the router."""

    def __init__(self, options: dict[str, Any]) -> None:
        import torch

        from .build import load_server, settle_heap
        from .grpc_server import serve as grpc_serve

        self.options = FleetOptions(**options)
        opts = self.options
        if opts.threads:
            torch.set_num_threads(opts.threads)
        limits = opts.replica_limits(default_kv_budget_bytes(torch.device(opts.device)))
        self.server = load_server(
            opts.model,
            opts.min_split_layer,
            opts.dtype,
            opts.device,
            limits,
            opts.batching,
            opts.kv_store,
            opts.bases,
            prepack=opts.prepack,
        )
        settle_heap()  # a replica's process serves for its life
        cert = opts.tls_cert.encode() if opts.tls_cert else None
        key = opts.tls_key.encode() if opts.tls_key else None
        self.running = grpc_serve(
            self.server, opts.host, 0, token=opts.token, tls_cert=cert, tls_key=key, max_streams=opts.max_streams
        )
        host = opts.advertise_host or _node_address(opts.host)
        self.endpoint = f"{'grpcs' if cert else 'grpc'}://{host_port(host, self.running.port)}"
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._router = serve.get_deployment_handle(ROUTER, app_name=context.app_name)
        self._stopped, self._wake = threading.Event(), threading.Event()
        threading.Thread(target=self._heartbeat, name="slicer-fleet-heartbeat", daemon=True).start()
        logger.info("replica %s serving %s on %s", self.replica_id, opts.model, self.endpoint)

    def info(self) -> dict[str, Any]:
        """What the router needs: where this replica is, how loaded, whether it takes sessions."""
        stats = self.server.stats_dict()
        return {
            "replica": self.replica_id,
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "sessions_active": stats["sessions_active"],
            "max_sessions": self.server.limits.max_sessions,
            "kv_free_bytes": stats["kv_budget_bytes"] - stats["kv_bytes_used"],
            "draining": bool(stats["draining"]),
            "tokens": stats["tokens"],
        }

    def _heartbeat(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.options.heartbeat_s)  # or at once, when woken (draining)
            self._wake.clear()
            if not self._stopped.is_set():
                self._report()

    def _report(self) -> None:
        try:
            self._router.register.remote(self.info()).result(timeout_s=5)
        except Exception as exc:  # the router is restarting: the next beat tries again
            logger.debug("heartbeat to the router failed: %s", exc)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"active_sessions": float(len(self.server.sessions))}

    def check_health(self) -> None:
        if self.running.stopped:
            raise RuntimeError("the gRPC server of this replica has stopped")

    def __del__(self) -> None:
        """Serve is stopping this replica (scale-down, redeploy): drain, let sessions finish, then stop."""
        if not hasattr(self, "running") or self.running.stopped:
            return
        self.running.drain(True)
        self._wake.set()  # the router hears of it now (a report from here, on Serve's event loop, cannot wait)
        deadline = time.monotonic() + self.options.drain_timeout_s
        while self.server.sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        self._stopped.set()
        self.running.stop(grace_s=1.0)  # the engine too
        gc.unfreeze()  # as `serve` does: a heap left frozen at exit is reported object by object as leaked


class Router:
    """HTTP ingress: `POST /session` picks a replica for a new session; `GET /replicas` lists the fleet."""

    def __init__(self, replicas: Any = None, token: str | None = None, heartbeat_s: float = 1.0) -> None:
        self.token = token  # `replicas` (their handle) ties the two deployments into one application
        self.stale_s = 5 * heartbeat_s
        self.replicas: dict[str, dict[str, Any]] = {}
        self.admitted = 0
        self.silent = 0  # replicas forgotten after they stopped reporting

    async def register(self, info: dict[str, Any]) -> None:
        """A replica's report. A coroutine, so that it runs on the router's event loop with `pick` (Serve runs a
        plain method on a thread, which could change the table while `pick` reads it)."""
        self.replicas[info["replica"]] = {**info, "seen": time.monotonic()}

    def fresh(self) -> list[dict[str, Any]]:
        """The replicas that reported in the last `stale_s`; the others are forgotten."""
        now = time.monotonic()
        gone = [name for name, r in self.replicas.items() if now - r["seen"] >= self.stale_s]
        for name in gone:
            del self.replicas[name]
        self.silent += len(gone)
        return list(self.replicas.values())

    def unavailable(self, exclude: set[str]) -> dict[str, Any]:
        """Why `pick` found no replica: the 503's body, its message and how many replicas were left out at the
        client's request (`left_out`) of those known (`known`)."""
        fresh = self.fresh()
        full = [r for r in fresh if r["sessions_active"] >= r["max_sessions"]]
        draining = [r for r in fresh if r["draining"]]
        left_out = [r for r in fresh if r["endpoint"] in exclude]
        counts = {"known": len(fresh), "left_out": len(left_out)}
        if fresh:
            parts = [f"{len(full)} full (max_sessions {'/'.join(sorted({str(r['max_sessions']) for r in full}))})"]
            parts += [f"{len(draining)} draining", f"{len(left_out)} left out (they failed or refused this client)"]
            reasons = ", ".join(p for p in parts if not p.startswith("0 "))
            return {"error": f"none of {len(fresh)} replicas takes a session now: {reasons}", **counts}
        if self.silent:
            message = f"no replica has reported in the last {self.stale_s:g} s ({self.silent} stopped reporting)"
            return {"error": message, **counts}
        return {"error": "no replica has registered yet", **counts}

    def pick(self, exclude: set[str]) -> dict[str, Any] | None:
        open_ = [
            r
            for r in self.fresh()
            if not r["draining"] and r["endpoint"] not in exclude and r["sessions_active"] < r["max_sessions"]
        ]
        if not open_:
            return None
        best = min(open_, key=lambda r: (r["sessions_active"] + r.get("sent", 0), -r["kv_free_bytes"]))
        # the clients sent to it since its report rank it, so that a burst spreads out, but never make it full:
        # admissions are not sessions (128 POSTs a second, no session opened, had kept every replica full)
        best["sent"] = best.get("sent", 0) + 1
        return best

    async def __call__(self, request: Request) -> JSONResponse:
        if self.token is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
                return JSONResponse({"error": "missing or wrong auth token"}, status_code=401)
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/replicas"):
            return JSONResponse({"replicas": self.fresh(), "admitted": self.admitted, "pid": os.getpid()})
        if request.method != "POST" or not path.endswith("/session"):
            return JSONResponse({"error": "POST /session or GET /replicas"}, status_code=404)
        try:
            body = await request.json()
        except ValueError:
            body = {}
        exclude = body.get("exclude", []) if isinstance(body, dict) else []
        excluded = {e for e in exclude if isinstance(e, str)} if isinstance(exclude, list) else set()
        chosen = self.pick(excluded)
        if chosen is None:
            return JSONResponse(self.unavailable(excluded), status_code=503, headers={"Retry-After": "1"})
        self.admitted += 1
        ticket = uuid.uuid4().hex
        return JSONResponse({"endpoint": chosen["endpoint"], "replica": chosen["replica"], "ticket": ticket})


def build_app(options: FleetOptions) -> Any:
    """The Serve application: the router (ingress) and the replicas."""
    replica_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": options.drain_timeout_s + 5,
    }
    if options.autoscale is not None:
        low, high = options.autoscale
        replica_options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": low,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
            "policy": {
                "policy_function": f"{__name__}:SessionsPolicy",
                "policy_kwargs": {"sessions_per_replica": options.sessions_per_replica},
            },
        }
    else:
        replica_options["num_replicas"] = options.replicas
    replica = serve.deployment(SplitReplica, name=REPLICA, **replica_options)
    router = serve.deployment(Router, name=ROUTER, num_replicas=1, ray_actor_options={"num_cpus": ROUTER_CPUS})
    # the replicas are bound into the router's arguments, so that one `serve.run` deploys both
    return router.bind(replica.bind(options.as_dict()), options.token, options.heartbeat_s)


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for a Serve config file (`import_path: slicer_hf.server.fleet:app_builder`, `args:` the
    `FleetOptions` fields; `autoscale` as a list or "MIN,MAX")."""
    return build_app(FleetOptions(**args))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def deploy(options: FleetOptions, address: str | None = None) -> str:
    """Start (or join) Ray, deploy the fleet, wait until a replica has registered; returns the router's
    `slicer+http://` URL for clients (the fleet runs until `undeploy(options)`).

    Args:
        address: a Ray cluster to join (default: `RAY_ADDRESS`'s, else a new local one: a cluster `ray start` left
            on this machine is joined only when named, as `"auto"`).
    """
    if address is None and "RAY_ADDRESS" not in os.environ:
        address = "local"  # ray.init() alone would join whatever cluster `ray start` left on this machine
    started_here = not ray.is_initialized() and address == "local"
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except ConnectionError as exc:  # `auto` with no cluster running, say
            raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
    client = _serve_client()  # a Serve already running on the cluster, started by this process or another
    if client is not None and options.app_name in serve.status().applications:  # serve.run would replace it
        raise ConfigError(
            f"a Serve application named {options.app_name!r} already runs on this cluster: give this fleet another "
            "app_name and route_prefix, or undeploy that one first"
        )
    running = _serve_http_options(client)
    if running is not None and (running.get("host"), running.get("port")) != (options.router_host, options.router_port):
        raise ConfigError(  # Serve keeps the ingress it started with: the router would never answer at this port
            f"Ray Serve already runs on this cluster with its HTTP ingress at {running.get('host')}:"
            f"{running.get('port')}, and one cluster has one: deploy with --host {running.get('host')} "
            f"--router-port {running.get('port')}, or shut that Serve down first"
        )
    _check_room(options, strict=started_here)
    http: dict[str, Any] = {"host": options.router_host, "port": options.router_port}
    if options.tls_cert:  # the router speaks HTTPS with the fleet's certificate (the files go with `undeploy`)
        folder = Path(tempfile.mkdtemp(prefix="slicer-fleet-tls-"))  # written once every check has passed
        _TLS_FOLDERS[options.app_name] = folder
        (folder / "cert.pem").write_text(options.tls_cert)
        (folder / "key.pem").write_text(options.tls_key)
        (folder / "key.pem").chmod(0o600)
        http |= {"ssl_certfile": str(folder / "cert.pem"), "ssl_keyfile": str(folder / "key.pem")}
    scheme = "slicer+https" if options.tls_cert else "slicer+http"
    host = options.advertise_host or _client_host(options.router_host)
    url = f"{scheme}://{host_port(host, options.router_port)}{options.route_prefix.rstrip('/')}"
    try:
        with _sigterm_unwinds():
            serve.start(http_options=http)
            serve.run(build_app(options), name=options.app_name, route_prefix=options.route_prefix, blocking=False)
            wait_for_replicas(url, 1, options.token, options.tls_cert)
    except BaseException as exc:  # leave nothing running (nor a copy of the key) behind a fleet that did not start
        failure = _replica_failure(options.app_name) if isinstance(exc, RuntimeError) else None
        with contextlib.suppress(Exception):
            undeploy(options)
        if isinstance(exc, RuntimeError):  # Serve names only the deployment; say what its replicas failed on
            raise ConfigError(f"the fleet did not deploy: {failure or exc}") from None
        raise
    return url


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """A SIGTERM while the fleet deploys unwinds like Ctrl-C, through `deploy`'s clean-up: Ray's own handler, which
    `ray.init` installs, ended the process midway and left the application and a copy of the TLS key behind. Only
    from the main thread, where signals are handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _check_room(options: FleetOptions, strict: bool) -> None:
    """A fleet whose replicas the cluster has no free CPUs (or GPUs) for: Serve would wait for them without a word.
    Refused on a Ray this process started (nothing will add nodes to it); on a cluster it joined, whose autoscaler
    may add nodes, said in a warning while Serve waits."""
    replicas = options.autoscale[0] if options.autoscale else options.replicas
    free = ray.available_resources()
    wants = {  # resource: (needed, free, what it is made of)
        "CPU": (
            replicas * options.replica_cpus + ROUTER_CPUS,
            float(free.get("CPU", 0.0)),
            f"{replicas} replicas x {options.replica_cpus:g} (replica_cpus), and {ROUTER_CPUS:g} for the router",
        ),
        "GPU": (_gpus_for(replicas, options.replica_gpus), float(free.get("GPU", 0.0)), f"{replicas} replicas x "
                f"{options.replica_gpus:g} (replica_gpus)"),
    }  # fmt: skip
    short = [f"{want:g} {name}s ({parts}), and the cluster has {have:g} free" for name, (want, have, parts) in
             wants.items() if want > have + 1e-9]  # fmt: skip
    if not short:
        return
    message = f"the fleet needs {'; '.join(short)}"
    if strict:
        raise ConfigError(
            f"{message}: give fewer --replicas or smaller --replica-cpus/--replica-gpus, or join a larger cluster"
        )
    logger.warning("%s: Serve waits until nodes with free resources join", message)


def _gpus_for(replicas: int, share: float) -> float:
    """GPUs `replicas` replicas of `share` GPU each take: shares below one pack whole per GPU (three of 0.6 need
    three GPUs, not 1.8)."""
    if 0 < share < 1:
        return math.ceil(replicas / math.floor(1 / share))
    return replicas * share


def undeploy(options: FleetOptions) -> None:
    """Remove the fleet `deploy` started: its application only (others on the cluster go on), Serve itself once
    no application is left, and the copies of its TLS files."""
    serve.delete(options.app_name)
    if not serve.status().applications:
        serve.shutdown()
    folder = _TLS_FOLDERS.get(options.app_name)
    proxy = _serve_http_options(_serve_client())
    if folder is not None and str(folder) not in str((proxy or {}).get("ssl_certfile", "")):  # the proxy's stay
        shutil.rmtree(folder, ignore_errors=True)
        del _TLS_FOLDERS[options.app_name]


def _serve_client() -> Any:
    """The client of the Serve controller running on this cluster (started by this process or another), or None."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # an internal API: where it moved, say none runs (Serve then starts or joins as before)
        return None


def _serve_http_options(client: Any) -> dict[str, Any] | None:
    """The HTTP options of the Serve instance behind `client` (None: no Serve, or this Ray does not say)."""
    try:
        return None if client is None else dict(client.get_serve_details().get("http_options") or {})
    except Exception:  # an internal API: where it moved, the check is skipped and waiting says the rest
        return None


def _replica_failure(app_name: str) -> str | None:
    """The last line of each failing deployment's message (a replica's exception), if Serve has one."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # Serve itself is gone: the caller's own error stands
        return None
    if app is None:
        return None
    lines = [d.message.strip().splitlines()[-1] for d in app.deployments.values() if d.message and d.message.strip()]
    return "; ".join(dict.fromkeys(lines)) or app.message or None


def wait_for_replicas(
    url: str, count: int, token: str | None = None, ca_pem: str | None = None, timeout_s: float = 300.0
) -> list[dict]:
    """Wait until `count` replicas report to the router at `url`; returns them.

    A router not up yet is waited for; one whose certificate does not verify (for the URL's host name, against
    `ca_pem`) or that refuses the token raises `TransportError` at once, waiting cannot mend either; so does a
    router that has fewer than `count` replicas after `timeout_s`.

    Args:
        ca_pem: PEM certificates to trust besides the system's for an HTTPS router: the private CA that signed its
            certificate, or the certificate itself.
    """
    import json
    import ssl
    import urllib.error
    import urllib.request

    router = fleet_router_url(url)
    context = ssl.create_default_context()
    if ca_pem:  # trusted besides the system's CAs; the fleet's own certificate as it is, not only a CA's
        context.load_verify_locations(cadata=ca_pem)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    last: object = "no answer yet"
    while True:
        try:
            request = urllib.request.Request(f"{router}/replicas", headers=headers)
            with urllib.request.urlopen(request, timeout=5, context=context) as r:
                replicas = json.loads(r.read())["replicas"]
            if len(replicas) >= count:
                return replicas
            last = f"{len(replicas)} registered"
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise TransportError(f"router {router} refused the token: HTTP {exc.code}", retryable=False) from None
            last = exc
        except OSError as exc:  # not listening yet, or Serve's proxy up before the app
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, ssl.SSLError) and getattr(reason, "reason", "") == "WRONG_VERSION_NUMBER":
                message = f"router {router} does not speak HTTPS (a Serve that was already running keeps its own "
                message += "HTTP options: start the fleet with Serve's, or on a cluster where Serve is not running)"
                raise TransportError(message, retryable=False) from None
            if isinstance(reason, ssl.SSLError) and not isinstance(reason, ssl.SSLEOFError):
                message = f"TLS with router {router} failed: {reason} (if the certificate names another host, "
                message += "give that name as advertise_host, --advertise-host)"
                raise TransportError(message, retryable=False) from None
            last = exc
        if time.monotonic() > deadline:
            message = f"fewer than {count} replicas registered with {url} within {timeout_s} s (last: {last})"
            raise TransportError(message, retryable=False)
        time.sleep(0.5)


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A `host:port` cluster address that nothing answers at is refused now: Ray would retry it for minutes."""
    host, _, port = (address or "").rpartition(":")
    if "://" in (address or "") or not host or not port.isdigit():  # `auto`, `local`, `ray://...`: Ray's to resolve
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"no Ray cluster answers at {address} ({exc}): is `ray start --head` running there?"
        ) from None


def _node_address(bind_host: str) -> str:
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host
