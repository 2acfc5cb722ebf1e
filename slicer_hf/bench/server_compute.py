"""Server compute per token: split at k versus the whole model served by the server ("the server does it all").

A real `slicer-hf serve` process; one client replays real uplink packets of a greedy generation (prefill, then
decode steps); the server's process CPU time per decode token comes from its own counters. Variants:

- split k, downlink `hidden`: the server runs layers k..L-1 only (the edge applies the final norm and head);
- split k, downlink `topk_logits`: the server also runs the final norm and LM head;
- whole model: split 1 with downlink `logits` and the lossless codec, i.e. the server runs 29 of 30 layers, the
  norm and the head: the nearest a split server gets to serving everything (embedding lookup aside).

    python -m slicer_hf.bench.server_compute --out-json docs/benchmarks/server_compute.json
"""

from __future__ import annotations

import statistics
from typing import Any

from transformers import AutoConfig

from .. import protocol
from ..codec import build_codec
from ..config import SlicerConfig
from ..data import resolve_model
from ..launch import start_server
from ..link import open_request
from ..transport.grpc import STATS_METHOD, GrpcTransport
from .common import at_least, codec_record, exit_on_sigterm, markdown_table, suite_config, suite_parser, write_json
from .concurrency import record_packets, run_client


def measure_variant(
    path: str, model: str, config: SlicerConfig, prompt_tokens: int, decode_steps: int, repeats: int
) -> dict[str, Any]:
    packets = record_packets(path, config, prompt_tokens, decode_steps)[config.split_layer]
    request = open_request(config, AutoConfig.from_pretrained(path), model, config.split_layer, build_codec(config))
    proc, url = start_server(
        path,
        ["--min-split-layer", str(config.split_layer), "--threads", "1", "--no-batching", "--log-level", "warning"],
    )
    try:
        stats = lambda: protocol.decode_json(GrpcTransport([url], timeout_s=30).unary(STATS_METHOD))  # noqa: E731
        run_client(url, request, packets, prompt_tokens, [])  # warm-up
        per_token = []
        for _ in range(repeats):
            # prefill alone, then prefill + decode: the difference is the decode steps' cost
            a = stats()
            run_client(url, request, packets[:1], prompt_tokens, [])
            b = stats()
            run_client(url, request, packets, prompt_tokens, [])
            c = stats()
            decode_cpu = (c["process_cpu_s"] - b["process_cpu_s"]) - (b["process_cpu_s"] - a["process_cpu_s"])
            per_token.append(1000 * decode_cpu / decode_steps)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    per_token.sort()
    return {
        "server_cpu_ms_per_decode_token": statistics.median(per_token),
        "samples_ms": per_token,
        "uplink_bits_per_decode_token": 8 * sum(map(len, packets[1:])) / max(len(packets) - 1, 1),
    }


def run(
    model: str = "smollm2",
    config_dir: str | None = None,
    prompt_tokens: int = 64,
    decode_steps: int = 64,
    repeats: int = 3,
    out_json: str | None = None,
) -> dict[str, Any]:
    path = resolve_model(model)
    preset = suite_config(config_dir, path)
    n = AutoConfig.from_pretrained(path).num_hidden_layers
    variants = [
        (f"split {preset.split_layer}, {preset.codec}, downlink hidden", preset.replace(downlink="hidden")),
        (f"split {preset.split_layer}, {preset.codec}, downlink topk_logits", preset.replace(downlink="topk_logits")),
        (
            f"whole model: split 1 of {n}, lossless, downlink logits",
            preset.replace(split_layer=1, codec="identity", downlink="logits"),
        ),
    ]
    rows = []
    for name, cfg in variants:
        row = {
            "variant": name,
            "split_layer": cfg.split_layer,
            "downlink": cfg.downlink,
            **measure_variant(path, model, cfg, prompt_tokens, decode_steps, repeats),
        }
        rows.append(row)
        print(f"{name}: {row['server_cpu_ms_per_decode_token']:.2f} ms CPU per decode token", flush=True)
    whole = rows[-1]["server_cpu_ms_per_decode_token"]
    for row in rows:
        row["saving_vs_whole"] = whole / row["server_cpu_ms_per_decode_token"]
    result = {
        "model": model,
        "num_layers": n,
        "prompt_tokens": prompt_tokens,
        "decode_steps": decode_steps,
        "uplink_codec": codec_record(preset),  # the split rows' (the whole-model row's is lossless)
        "rows": rows,
    }
    write_json(result, out_json)
    print(
        markdown_table(
            rows,
            [
                ("variant", "variant", ""),
                ("uplink bits / decode token", "uplink_bits_per_decode_token", ",.0f"),
                ("server CPU ms / decode token", "server_cpu_ms_per_decode_token", ".2f"),
                ("less server compute than whole model", "saving_vs_whole", ".2f"),
            ],
        )
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser(__doc__, "docs/benchmarks/server_compute.json")
    parser.add_argument("--prompt-tokens", type=at_least(1), default=64, help="tokens of the prompt")
    parser.add_argument("--decode-steps", type=at_least(1), default=64, help="decode steps replayed")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="replays per variant (medians)")
    args = parser.parse_args(argv)
    exit_on_sigterm()  # the servers this suite starts go with it
    run(args.model, args.config, args.prompt_tokens, args.decode_steps, args.repeats, args.out_json)


if __name__ == "__main__":
    main()
