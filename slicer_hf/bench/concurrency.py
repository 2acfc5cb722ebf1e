"""Server throughput and CPU time per token with 1..N concurrent clients, batched vs one by one.

A real `slicer-hf serve` process runs the suffix of the model. The clients are load generators: the edge part
runs once to produce real uplink packets (a prompt, then one packet per decode step), and every client replays
them over its own gRPC session, as fast as the server answers. The server's own counters give its CPU time.

    python -m slicer_hf.bench.concurrency --clients 1 8 32 --out-json docs/benchmarks/concurrency.json
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from .. import protocol
from ..codec import build_codec
from ..config import SlicerConfig
from ..data import resolve_model
from ..demo import default_config_dir
from ..launch import start_server
from ..link import open_request
from ..modeling import SlicerModelForCausalLM
from ..transport.grpc import STATS_METHOD, GrpcTransport
from .common import suite_parser


def record_packets(model_path: str, config: SlicerConfig, prompt_tokens: int, decode_steps: int) -> list[bytes]:
    """Uplink payloads of one real greedy generation: the prefill packet, then one packet per decode step."""
    model = SlicerModelForCausalLM.from_pretrained(model_path, slicer_config=config)
    packets: list[bytes] = []
    encode = model._link_for(config.split_layer).codec.encode

    def spy(x: torch.Tensor) -> bytes:
        data = encode(x)
        packets.append(data)
        return data

    model._slicer_link.codec.encode = spy
    ids = torch.randint(100, 5000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=decode_steps + 1, do_sample=False, min_new_tokens=decode_steps + 1)
    return packets


def run_client(
    url: str, request: dict[str, Any], packets: list[bytes], prompt_tokens: int, latencies: list[float]
) -> None:
    transport = GrpcTransport([url], timeout_s=600)
    reply = transport.request(protocol.encode_json(protocol.OPEN, request))
    protocol.raise_if_error(reply)
    session = protocol.decode_json(reply)["session"]
    start = 0
    for seq, payload in enumerate(packets):
        tokens = prompt_tokens if seq == 0 else 1
        step = protocol.Step(
            session, seq, start, 1, tokens, tokens - 1, payload, torch.ones(1, tokens, dtype=torch.bool)
        )
        t0 = time.perf_counter()
        protocol.decode_reply(transport.request(protocol.encode_step(step)))
        if seq:
            latencies.append(time.perf_counter() - t0)
        start += tokens
    transport.request(protocol.encode_json(protocol.CLOSE, {"session": session}))
    transport.close()


def measure(
    url: str, clients: int, request: dict[str, Any], packets: list[bytes], prompt_tokens: int
) -> dict[str, Any]:
    stats = lambda: protocol.decode_json(GrpcTransport([url], timeout_s=30).unary(STATS_METHOD))  # noqa: E731
    before = stats()
    latencies: list[float] = []
    threads = [
        threading.Thread(target=run_client, args=(url, request, packets, prompt_tokens, latencies))
        for _ in range(clients)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = stats()
    tokens = after["tokens"] - before["tokens"]
    decode_tokens = clients * (len(packets) - 1)
    return {
        "clients": clients,
        "tokens": tokens,
        "decode_tokens": decode_tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "decode_tokens_per_s": decode_tokens / wall,
        "server_cpu_ms_per_token": 1000 * (after["process_cpu_s"] - before["process_cpu_s"]) / tokens,
        "server_compute_ms_per_token": 1000 * (after["compute_s"] - before["compute_s"]) / tokens,
        "median_step_latency_ms": 1000 * statistics.median(latencies),
        "batches": after["batches"] - before["batches"],
        "batched_rows": after["batched_rows"] - before["batched_rows"],
    }


def run(
    model: str = "smollm2",
    config_dir: str | None = None,
    clients: list[int] | None = None,
    prompt_tokens: int = 32,
    decode_steps: int = 32,
    out_json: str | None = None,
) -> dict[str, Any]:
    path = resolve_model(model)
    config = SlicerConfig.from_pretrained(config_dir or default_config_dir())
    packets = record_packets(path, config, prompt_tokens, decode_steps)
    request = open_request(config, AutoConfig.from_pretrained(path), model, config.split_layer, build_codec(config))
    rows = []
    for batching in (False, True):
        flag = "--batching" if batching else "--no-batching"
        proc, url = start_server(
            path,
            [
                flag,
                "--min-split-layer",
                str(config.split_layer),
                "--log-level",
                "warning",
                "--max-sessions",
                str(max(clients or [32]) + 4),
                "--threads",
                "1",  # one compute thread; the clients and gRPC get the other core
            ],
        )
        try:
            measure(url, 2, request, packets, prompt_tokens)  # warm-up: threads, allocator, first batches
            for n in clients or [1, 8, 32]:
                row = {"batching": batching, **measure(url, n, request, packets, prompt_tokens)}
                rows.append(row)
                print(_fmt(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {
        "model": model,
        "split_layer": config.split_layer,
        "codec": config.codec,
        "prompt_tokens": prompt_tokens,
        "decode_steps": decode_steps,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + markdown_table(rows))
    return result


def _fmt(row: dict[str, Any]) -> str:
    return (
        f"batching={row['batching']!s:5} clients={row['clients']:3d} tokens/s={row['tokens_per_s']:8.1f} "
        f"decode tokens/s={row['decode_tokens_per_s']:7.1f} cpu ms/token={row['server_cpu_ms_per_token']:6.2f} "
        f"median step latency={row['median_step_latency_ms']:7.1f} ms batches={row['batches']}"
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | batching | server tokens/s | decode tokens/s | server CPU ms/token | "
        "median decode step latency (ms) | mean rows per batch |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_batch = r["batched_rows"] / r["batches"] if r["batches"] else 1.0
        lines.append(
            f"| {r['clients']} | {'batched' if r['batching'] else 'one by one'} | {r['tokens_per_s']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['server_cpu_ms_per_token']:.2f} | "
            f"{r['median_step_latency_ms']:.1f} | {per_batch:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser(__doc__, "docs/benchmarks/concurrency.json")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args(argv)
    run(args.model, args.config, args.clients, args.prompt_tokens, args.decode_steps, args.out_json)


if __name__ == "__main__":
    main()
