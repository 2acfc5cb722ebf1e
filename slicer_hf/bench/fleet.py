"""The fleet on Ray Serve: 1 against 2 replicas on one machine, what a Ray handle call costs against a stream
message, and a sizing table from the measured capacity of one replica.

A local Ray cluster; the embedded SmolLM2 with its preset; every replica runs with one torch thread. Measured per
fleet (split layer, replicas):

- admission: a client asks the router (`POST /session`), opens its session on the replica it was sent to, closes
  it. Median time of one admission, and admissions per second with 8 clients admitting at once;
- decode: `--clients` sessions admitted through the router replay the uplink packets of a real generation
  (prefill, then `--decode-steps` decode steps), all decoding at once; decode tokens per second over the fleet;
- round trips: a Ray handle call to a replica (`info`) against one message on an open gRPC stream to it (a CLOSE of
  no session, answered without compute), medians.

    python -m slicer_hf.bench.fleet --out-json docs/benchmarks/fleet.json
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from typing import Any

from transformers import AutoConfig

from .. import protocol
from ..codec import build_codec
from ..config import SlicerConfig, default_config_dir
from ..data import resolve_model
from ..link import open_request
from ..transport.fleet import FleetTransport
from ..transport.grpc import GrpcTransport
from .common import at_least, exit_on_sigterm, markdown_table, suite_arguments, write_json
from .concurrency import Client, record_packets


def admit_once(url: str, request: dict[str, Any]) -> float:
    """Router admission + OPEN + CLOSE; returns the seconds from the router request to the OPENED reply."""
    started = time.perf_counter()
    endpoint = FleetTransport(url).admit()["endpoint"]
    replica = GrpcTransport([endpoint], timeout_s=60)
    try:
        reply = replica.request(protocol.encode_json(protocol.OPEN, request))
        elapsed = time.perf_counter() - started
        protocol.raise_if_error(reply)
        replica.request(protocol.encode_json(protocol.CLOSE, {"session": protocol.decode_json(reply)["session"]}))
        return elapsed
    finally:
        replica.close()


def admissions(url: str, request: dict[str, Any], count: int, parallel: int) -> dict[str, float]:
    times = [admit_once(url, request) for _ in range(count)]  # one at a time: the latency of one admission
    started, done = time.perf_counter(), []

    def worker() -> None:
        for _ in range(count // parallel):
            done.append(admit_once(url, request))

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "admit_ms_p50": 1000 * statistics.median(times),
        "admissions_per_s": len(done) / (time.perf_counter() - started),
    }


def decode_throughput(
    url: str, request: dict[str, Any], packets: list[bytes], prompt_tokens: int, clients: int
) -> dict:
    endpoints = [FleetTransport(url).admit()["endpoint"] for _ in range(clients)]
    load = [Client(e, request, packets, prompt_tokens) for e in endpoints]
    marks: dict[str, float] = {}
    barrier = threading.Barrier(clients, action=lambda: marks.setdefault("start", time.perf_counter()))
    threads = [threading.Thread(target=c.run, args=(barrier,)) for c in load]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - marks["start"]
    steps = clients * (len(packets) - 1)
    latencies = sorted(x for c in load for x in c.latencies)
    return {
        "clients": clients,
        "replicas_used": len(set(endpoints)),
        "decode_tokens_per_s": steps / elapsed,
        "step_ms_p50": 1000 * latencies[len(latencies) // 2],
        "step_ms_p99": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def round_trips(url: str, app_name: str, samples: int = 200) -> dict[str, float]:
    from ray import serve

    from ..server.fleet import REPLICA

    handle = serve.get_deployment_handle(REPLICA, app_name=app_name)
    handle.info.remote().result()
    ray_times = []
    for _ in range(samples // 4):
        started = time.perf_counter()
        handle.info.remote().result()
        ray_times.append(time.perf_counter() - started)
    stream = GrpcTransport([FleetTransport(url).admit()["endpoint"]], timeout_s=30)
    message = protocol.encode_json(protocol.CLOSE, {"session": -1})
    stream.request(message)
    grpc_times = []
    for _ in range(samples):
        started = time.perf_counter()
        stream.request(message)
        grpc_times.append(time.perf_counter() - started)
    stream.close()
    return {
        "ray_handle_ms_p50": 1000 * statistics.median(ray_times),
        "grpc_stream_ms_p50": 1000 * statistics.median(grpc_times),
    }


def run(
    model: str = "smollm2",
    splits: tuple[int, ...] = (20, 24),
    replica_counts: tuple[int, ...] = (1, 2),
    clients: int = 16,
    prompt_tokens: int = 32,
    decode_steps: int = 32,
    out_json: str | None = None,
) -> dict[str, Any]:
    import ray
    from ray import serve

    from ..server.fleet import FleetOptions, deploy, wait_for_replicas

    path = resolve_model(model)
    preset = SlicerConfig.from_pretrained(default_config_dir())
    packets = record_packets(path, preset, prompt_tokens, decode_steps, splits)
    model_config = AutoConfig.from_pretrained(path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for k in splits:
            request = open_request(preset.replace(split_layer=k), model_config, model, k, build_codec(preset))
            for n in replica_counts:
                options = FleetOptions(
                    model=path, min_split_layer=k, replicas=n, replica_cpus=0.5, threads=1, router_port=8123,
                    limits={"max_sessions": max(4 * clients, 128)},  # the admission burst (64) is never refused
                )  # fmt: skip
                url = deploy(options)
                wait_for_replicas(url, n)
                row: dict[str, Any] = {"split_layer": k, "replicas": n}
                row |= admissions(url, request, count=32, parallel=8)
                row |= decode_throughput(url, request, packets[k], prompt_tokens, clients)
                if n == replica_counts[-1] and k == splits[-1]:
                    row |= round_trips(url, options.app_name)
                rows.append(row)
                print(row, flush=True)
                serve.delete(options.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
    fewest = min(replica_counts)  # one replica's rate: the fleet's fewest replicas, shared out among them
    per_replica = {
        k: next(r["decode_tokens_per_s"] / fewest for r in rows if r["split_layer"] == k and r["replicas"] == fewest)
        for k in splits
    }
    sizing = [
        {
            "split_layer": k,
            "tokens_per_s_per_client": rate,
            "replica_tokens_per_s": per_replica[k],
            "replicas_for_10000_clients": math.ceil(10_000 * rate / per_replica[k]),
        }
        for k in splits
        for rate in (1, 5, 20)
    ]
    result = {"model": model, "clients": clients, "rows": rows, "sizing": sizing}
    print(
        markdown_table(
            rows,
            [
                ("split", "split_layer", "d"),
                ("replicas", "replicas", "d"),
                ("admit ms p50", "admit_ms_p50", ".1f"),
                ("admissions/s", "admissions_per_s", ".1f"),
                ("decode tok/s", "decode_tokens_per_s", ".1f"),
                ("step ms p50", "step_ms_p50", ".1f"),
                ("step ms p99", "step_ms_p99", ".1f"),
            ],
        )
    )
    print(
        markdown_table(
            sizing,
            [
                ("split", "split_layer", "d"),
                ("tok/s per client", "tokens_per_s_per_client", "d"),
                ("replica tok/s", "replica_tokens_per_s", ".0f"),
                ("replicas for 10,000 clients", "replicas_for_10000_clients", "d"),
            ],
        )
    )
    write_json(result, out_json)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = suite_arguments(__doc__)
    parser.add_argument("--model", default="smollm2", help="Hub id, local folder, or 'smollm2' (embedded)")
    parser.add_argument("--splits", default="20,24", help="comma-separated split layers, one fleet each")
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts, one fleet each")
    parser.add_argument("--clients", type=at_least(1), default=16, help="clients decoding at once")
    parser.add_argument("--decode-steps", type=at_least(1), default=32, help="decode steps of each client")
    parser.add_argument("--out-json", default="docs/benchmarks/fleet.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    exit_on_sigterm()  # the servers this suite starts go with it
    run(
        args.model,
        tuple(int(s) for s in args.splits.split(",")),
        tuple(int(s) for s in args.replicas.split(",")),
        args.clients,
        decode_steps=args.decode_steps,
        out_json=args.out_json,
    )


if __name__ == "__main__":
    main()
