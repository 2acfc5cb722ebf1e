"""The server engine under load, beside its compute floor measured in the same run.

A real `slicer-hf serve` process (one torch thread) runs the suffix of the model. The clients are threads here
that replay real uplink packets, recorded from one greedy generation at each split layer (the prefill packet, then
one per decode step), over their own gRPC sessions as fast as the server answers. Every client opens and prefills,
waits at a barrier, then decodes: the server's process CPU time over the decode phase, divided by its tokens, is the
CPU per decode token (the prefill phase gives the CPU per prefill token). Scenarios: one split layer, and mixed
split layers (clients take the splits in turn); batched and one by one; 1, 8, 32 and 128 clients.

The floor: every `Linear` of the layers the server runs, timed here on its own shape with one torch thread at the
rows that run it in a decode forward of the mean size the scheduler achieved (with mixed splits a layer runs only
the rows of sessions split at or below it; a fractional mean is timed at the whole counts either side and
interpolated), summed, per token of that forward, with the faster of two kernels for it: torch's `linear`, and
oneDNN on the weight packed for it (what the server runs with `--prepack`, its default). It is what the matmuls
alone cost on this machine at that batch size, each weight hot in cache. The streamed floor runs the same matmuls
one after another, as a forward meets them: weights larger than the cache then come from memory, which is what a
forward at that batch can reach at best.

    slicer-hf bench concurrency --clients 1 8 32 128 --out-json docs/benchmarks/concurrency.json
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import threading
import time
from typing import Any

import torch
from transformers import AutoConfig

from .. import compat, protocol
from ..codec import build_codec
from ..config import SlicerConfig
from ..data import resolve_model
from ..launch import start_server
from ..link import open_request
from ..modeling import SlicerModelForCausalLM
from ..server.prepack import PackedLinear, packable
from ..transport.grpc import STATS_METHOD, GrpcTransport
from .common import (
    at_least,
    codec_record,
    exit_on_sigterm,
    markdown_table,
    median_time,
    suite_config,
    suite_parser,
    write_json,
)


def mixed_splits(split_layer: int, num_layers: int) -> tuple[int, ...]:
    """The mixed-split scenario: the config's split, four layers shallower and three deeper (20, 24, 27 for
    SmolLM2's split 24), within the model."""
    return tuple(sorted({max(1, split_layer - 4), split_layer, min(num_layers - 1, split_layer + 3)}))


def record_packets(
    model_path: str, config: SlicerConfig, prompt_tokens: int, decode_steps: int, splits: tuple[int, ...] = ()
) -> dict[int, list[bytes]]:
    """Uplink payloads of one real greedy generation per split layer: the prefill packet, then one per decode
    step (default: the config's split layer). A chained codec's packets replay as sequences that start afresh: the
    decoded rows differ from the generation's, the server's work does not."""
    model = SlicerModelForCausalLM.from_pretrained(model_path, slicer_config=config)
    ids = torch.randint(100, 5000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    out = {}
    for k in splits or (config.split_layer,):
        codec = model._link_for(k).codec
        packets: list[bytes] = []
        encode = codec.encode
        codec.encode = lambda x, given=None, _encode=encode, _packets=packets: (
            _packets.append(_encode(x, given=given)) or _packets[-1]
        )
        new = decode_steps + 1
        model.generate(ids, split_layer=k, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        out[k] = packets
    return out


class Client:
    """One load-generating client: a gRPC session replaying recorded packets."""

    def __init__(self, url: str, request: dict[str, Any], packets: list[bytes], prompt_tokens: int) -> None:
        self.transport = GrpcTransport([url], timeout_s=600)
        self.request, self.packets, self.prompt_tokens = request, packets, prompt_tokens
        self.latencies: list[float] = []

    def run(self, barrier: threading.Barrier | None = None) -> None:
        reply = self.transport.request(protocol.encode_json(protocol.OPEN, self.request))
        protocol.raise_if_error(reply)
        session = protocol.decode_json(reply)["session"]
        start = 0
        for seq, payload in enumerate(self.packets):
            if seq == 1 and barrier is not None:
                barrier.wait()
            tokens = self.prompt_tokens if seq == 0 else 1
            step = protocol.Step(
                session, seq, start, 1, tokens, tokens - 1, payload, torch.ones(1, tokens, dtype=torch.bool)
            )
            t0 = time.perf_counter()
            protocol.decode_reply(self.transport.request(protocol.encode_step(step)))
            if seq:
                self.latencies.append(time.perf_counter() - t0)
            start += tokens
        self.transport.request(protocol.encode_json(protocol.CLOSE, {"session": session}))
        self.transport.close()


def run_client(
    url: str, request: dict[str, Any], packets: list[bytes], prompt_tokens: int, latencies: list[float]
) -> None:
    """One client's whole generation (prefill, then decode), its decode step latencies appended to `latencies`."""
    client = Client(url, request, packets, prompt_tokens)
    client.run()
    latencies.extend(client.latencies)


def server_stats(url: str) -> dict[str, Any]:
    transport = GrpcTransport([url], timeout_s=30)
    try:
        return protocol.decode_json(transport.unary(STATS_METHOD))
    finally:
        transport.close()


def measure(url: str, requests: list[dict[str, Any]], packets: list[list[bytes]], prompt_tokens: int) -> dict[str, Any]:
    """Run one client per request, all prefilling first, then all decoding; the two phases' server counters."""
    clients = [Client(url, r, p, prompt_tokens) for r, p in zip(requests, packets)]
    marks: dict[str, Any] = {"before": server_stats(url)}

    def decode_starts() -> None:
        marks["mid"], marks["t_mid"] = server_stats(url), time.perf_counter()

    barrier = threading.Barrier(len(clients), action=decode_starts)
    threads = [threading.Thread(target=c.run, args=(barrier,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - marks["t_mid"]
    before, mid, after = marks["before"], marks["mid"], server_stats(url)
    prefill_tokens = len(clients) * prompt_tokens
    decode_tokens = sum(len(c.latencies) for c in clients)
    latencies = sorted(x for c in clients for x in c.latencies)
    batches, rows = after["batches"] - mid["batches"], after["batched_rows"] - mid["batched_rows"]

    def per_token(counter: str) -> float:  # ms of a server counter (seconds) per decode token
        return 1000 * (after[counter] - mid[counter]) / decode_tokens

    return {
        "clients": len(clients),
        "decode_tokens": decode_tokens,
        "decode_wall_s": wall,
        "decode_tokens_per_s": decode_tokens / wall,
        "server_cpu_ms_per_decode_token": per_token("process_cpu_s"),
        "server_cpu_ms_per_prefill_token": 1000 * (mid["process_cpu_s"] - before["process_cpu_s"]) / prefill_tokens,
        "compute_ms_per_decode_token": per_token("decode_compute_s"),  # wall time, preemption included
        "codec_ms_per_decode_token": per_token("packet_decode_s"),
        # where the server's CPU went (thread CPU time): forwards and replies, packet decoding, the rest of the
        # compute thread (queues, batching), and every other thread (gRPC, its event loop, control requests)
        "compute_cpu_ms_per_decode_token": per_token("decode_compute_cpu_s"),
        "codec_cpu_ms_per_decode_token": per_token("packet_decode_cpu_s"),
        "scheduling_cpu_ms_per_decode_token": per_token("scheduler_cpu_s")
        - per_token("decode_compute_cpu_s")
        - per_token("packet_decode_cpu_s"),
        "network_cpu_ms_per_decode_token": per_token("process_cpu_s") - per_token("scheduler_cpu_s"),
        "p50_step_ms": 1000 * latencies[len(latencies) // 2],
        "p99_step_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "rows_per_forward": rows / batches if batches else 1.0,
        "refused": sum(after["errors"].values()) - sum(before["errors"].values()),
    }


def layer_weights(model: torch.nn.Module, first_layer: int) -> dict[int, list[torch.Tensor]]:
    """The weights of every `Linear` in each decoder layer from `first_layer` on."""
    layers = compat.decoder_layers(model)
    return {
        j: [m.weight for m in layers[j].modules() if isinstance(m, torch.nn.Linear)]
        for j in range(first_layer, len(layers))
    }


def rows_by_layer(splits: list[int], rows: float, num_layers: int) -> dict[int, float]:
    """The rows each served layer runs in a forward of `rows` rows whose sessions split at `splits` (one entry per
    client, in the proportions the forward holds them): layer j runs the rows of sessions split at or below it."""
    return {j: rows * sum(k <= j for k in splits) / len(splits) for j in range(min(splits), num_layers)}


def floors_ms_per_token(
    weights: dict[int, list[torch.Tensor]], rows: dict[int, float], streamed: bool = False
) -> dict[str, float]:
    """Matmul time per token of a forward whose layer j runs `rows[j]` rows on its `weights[j]` (inputs in the weights'
    dtype), one torch thread, measured now with two kernels: torch's `linear`, and oneDNN on weights packed for
    it (what `slicer-hf serve --prepack` runs). Each weight is timed on its own, hot in cache, or all in turn as
    a forward meets them (`streamed`: weights too large for the cache come from memory). A mean row count
    between two whole ones is timed at both and interpolated (below one row, from none). Per token: the
    forward's time over the rows of its deepest layer (every session runs it). Returns "linear", torch's kernel
    alone, and "floor", the faster kernel for each weight (streamed: for them all)."""
    plan = [(w, rows[j]) for j in sorted(weights) for w in weights[j] if rows.get(j, 0) > 0]
    tokens = max(rows.values())
    first = plan[0][0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kernels = [lambda w: functools.partial(torch.nn.functional.linear, weight=w)]  # torch's first
        if packable(first.device, first.dtype):
            kernels.append(PackedLinear)
        products = [[make(w) for w, _ in plan] for make in kernels]

        def timed(whole: list[int]) -> list[list[float]]:  # per kernel, per weight (streamed: the whole plan)
            inputs = [torch.randn(b, w.shape[1], dtype=w.dtype) if b else None for (w, _), b in zip(plan, whole)]
            if streamed:
                run = [[(f, x) for f, x in zip(k, inputs) if x is not None] for k in products]
                return [[median_time(lambda k=k: [f(x) for f, x in k], 9, 2) if k else 0.0] for k in run]
            return [
                [median_time(lambda f=f, x=x: f(x), 15, 3) if x is not None else 0.0 for f, x in zip(k, inputs)]
                for k in products
            ]

        # a layer that runs r < 1 rows a forward runs one row in a share r of the forwards (one-by-one service)
        low = [int(r) for _, r in plan]
        high = [math.ceil(r) for _, r in plan]
        shares = [r - b for (_, r), b in zip(plan, low)]
        at_low = timed(low)
        at_high = timed(high) if high != low else at_low
        if streamed:  # the whole plan at once: between its two timings by the mean share of the weights between two
            shares = [statistics.fmean([s for s, lo, hi in zip(shares, low, high) if hi > lo] or [0.0])]
        times = [[a + s * (b - a) for a, b, s in zip(lo, hi, shares)] for lo, hi in zip(at_low, at_high)]
    finally:
        torch.set_num_threads(threads)
    linear, floor = sum(times[0]), sum(map(min, zip(*times)))  # torch's alone; the faster kernel for each weight
    return {"linear": 1000 * linear / tokens, "floor": 1000 * floor / tokens}


def matmul_gflops(rows: int, weight: torch.Tensor, packed: bool = False) -> float:
    """Throughput of a [rows x d] @ [d x f] matmul on `weight` [f x d], in its dtype, with one torch thread (`packed`:
    by oneDNN, the weight packed for it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        product = PackedLinear(weight) if packed else functools.partial(torch.nn.functional.linear, weight=weight)
        return 2 * a.shape[0] * weight.numel() / median_time(lambda: product(a), repeats=25, warmup=5) / 1e9
    finally:
        torch.set_num_threads(threads)


def run(
    model: str = "smollm2",
    config_dir: str | None = None,
    clients: list[int] | None = None,
    prompt_tokens: int = 32,
    decode_steps: int = 32,
    out_json: str | None = None,
    dtype: str = "float32",
    prepack: bool = True,
) -> dict[str, Any]:
    """Measure one server process per scenario and service (batched, one by one) at each client count; the floor
    is measured afterwards in this process, with the server's weights in the server's `dtype`."""
    path = resolve_model(model)
    config = suite_config(config_dir, path)
    hf_config = AutoConfig.from_pretrained(path)
    scenarios = {
        "one split": (config.split_layer,),
        "mixed splits": mixed_splits(config.split_layer, compat.num_layers(hf_config)),
    }
    splits = sorted({k for ks in scenarios.values() for k in ks})
    recorded = record_packets(path, config, prompt_tokens, decode_steps, tuple(splits))
    request = {k: open_request(config, hf_config, model, k, build_codec(config)) for k in splits}
    counts = clients or [1, 8, 32, 128]
    rows = []
    for scenario, ks in scenarios.items():
        for batching in (False, True):
            proc, url = start_server(
                path,
                [
                    "--batching" if batching else "--no-batching",
                    "--min-split-layer",
                    str(min(ks)),
                    "--log-level",
                    "warning",
                    "--max-sessions",
                    str(max(counts) + 4),
                    "--threads",
                    "1",  # one compute thread; the clients and gRPC get the other core
                    "--dtype",
                    dtype,
                    "--prepack" if prepack else "--no-prepack",
                ],
            )
            try:
                warm = [ks[i % len(ks)] for i in range(4)]
                measure(url, [request[k] for k in warm], [recorded[k] for k in warm], prompt_tokens)
                for n in counts:
                    mine = [ks[i % len(ks)] for i in range(n)]
                    row = measure(url, [request[k] for k in mine], [recorded[k] for k in mine], prompt_tokens)
                    row.update(scenario=scenario, splits=list(ks), batching=batching)
                    rows.append(row)
                    print(_fmt(row), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    lm = SlicerModelForCausalLM.from_pretrained(path, slicer_config=config, dtype=getattr(torch, dtype))  # the floor
    weights = layer_weights(lm, min(splits))
    widest = max((w for ws in weights.values() for w in ws), key=torch.Tensor.numel)
    for row in rows:
        ks = [row["splits"][i % len(row["splits"])] for i in range(row["clients"])]
        at = rows_by_layer(ks, row["rows_per_forward"], compat.num_layers(hf_config))
        hot, streamed = floors_ms_per_token(weights, at), floors_ms_per_token(weights, at, streamed=True)
        row["floor_ms_per_token"] = hot["floor"]
        row["streamed_floor_ms_per_token"] = streamed["floor"]
        row["linear_floor_ms_per_token"] = hot["linear"]  # torch's kernel alone
        row["cpu_over_floor"] = row["server_cpu_ms_per_decode_token"] / row["floor_ms_per_token"]
    for row in rows:
        alone = next(
            r for r in rows if r["scenario"] == row["scenario"] and r["clients"] == row["clients"] and not r["batching"]
        )
        row["speedup_vs_one_by_one"] = row["decode_tokens_per_s"] / alone["decode_tokens_per_s"]
    result = {
        "model": model,
        "codec": config.codec,
        "prompt_tokens": prompt_tokens,
        "decode_steps": decode_steps,
        "server_threads": 1,
        "server_dtype": dtype,
        "server_prepack": prepack,
        "uplink_codec": codec_record(config),
        # the largest weight the server runs, in the server's dtype: what the floor's products are made of
        "matmul_weight": {"shape": list(widest.shape), "dtype": str(widest.dtype).removeprefix("torch.")},
        "matmul_gflops_1_thread": {b: matmul_gflops(b, widest) for b in (1, 8, 32, 128)},
        "matmul_gflops_1_thread_prepacked": {
            b: matmul_gflops(b, widest, packed=True) for b in (1, 8, 32, 128) if packable(widest.device, widest.dtype)
        },
        "rows": rows,
    }
    write_json(result, out_json)
    print("\n" + table(rows))
    return result


COLUMNS = [
    ("scenario", "scenario", ""),
    ("clients", "clients", "d"),
    ("service", "service", ""),
    ("decode tokens/s", "decode_tokens_per_s", ".0f"),
    ("x one by one", "speedup_vs_one_by_one", ".2f"),
    ("CPU ms / decode token", "server_cpu_ms_per_decode_token", ".3f"),
    ("floor ms / token", "floor_ms_per_token", ".3f"),
    ("CPU / floor", "cpu_over_floor", ".2f"),
    ("streamed floor ms / token", "streamed_floor_ms_per_token", ".3f"),
    ("compute CPU ms / decode token", "compute_cpu_ms_per_decode_token", ".3f"),
    ("codec decode CPU ms / decode token", "codec_cpu_ms_per_decode_token", ".3f"),
    ("scheduling CPU ms / decode token", "scheduling_cpu_ms_per_decode_token", ".3f"),
    ("gRPC CPU ms / decode token", "network_cpu_ms_per_decode_token", ".3f"),
    ("CPU ms / prefill token", "server_cpu_ms_per_prefill_token", ".3f"),
    ("p50 step ms", "p50_step_ms", ".1f"),
    ("p99 step ms", "p99_step_ms", ".1f"),
    ("rows / forward", "rows_per_forward", ".1f"),
    ("refused", "refused", "d"),
]


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table([{**r, "service": "batched" if r["batching"] else "one by one"} for r in rows], COLUMNS)


def _fmt(row: dict[str, Any]) -> str:
    return (
        f"{row['scenario']:12} batching={row['batching']!s:5} clients={row['clients']:3d} "
        f"decode tokens/s={row['decode_tokens_per_s']:7.1f} "
        f"cpu ms/decode token={row['server_cpu_ms_per_decode_token']:6.3f} "
        f"p50={row['p50_step_ms']:6.1f} ms p99={row['p99_step_ms']:6.1f} ms rows/forward={row['rows_per_forward']:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser(__doc__, "docs/benchmarks/concurrency.json")
    parser.add_argument(
        "--clients", type=at_least(1), nargs="+", default=[1, 8, 32, 128], help="client counts to run, each in turn"
    )
    parser.add_argument("--prompt-tokens", type=at_least(1), default=32, help="prompt length of each client")
    parser.add_argument("--decode-steps", type=at_least(1), default=32, help="decode steps of each client")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the server's weights (the floor is measured in the same dtype)",
    )
    parser.add_argument(
        "--prepack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve with the Linear weights packed for oneDNN (slicer-hf serve --prepack)",
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()  # the servers this suite starts go with it
    run(
        args.model,
        args.config,
        args.clients,
        args.prompt_tokens,
        args.decode_steps,
        args.out_json,
        args.dtype,
        args.prepack,
    )


if __name__ == "__main__":
    main()
