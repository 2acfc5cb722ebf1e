"""The server engine on a CUDA device: exactness of the KV store, decode throughput, codec decode on the device.

    python benchmarks/gpu_server.py --json gpu_server.json                  # on the GPU machine
    python benchmarks/gpu_server.py --device cpu --rows 1,8 --quick         # a dry run anywhere

1. Exactness (float32 on the device): 12 sessions of a tiny Llama at split layers 1..3, prompts of 3..25 tokens,
   through one batching `SplitServer` with the KV store, each equal to plain `generate()` token for token. Any
   mismatch fails the run (exit status 1).
2. Decode throughput of SmolLM2's layers 24..29 (the embedded model) in bfloat16 and float16: rows prefilled to
   256 positions, then decode forwards of R rows (--rows), median time per forward and tokens/s.
3. `SlicerCodec.decode` of one token's packet onto the device against a CPU decode, median time per packet, for
   the preset's codec (calibrated ECSQ: its entropy decoding runs on the host, no Triton kernel applies) and for
   the default blocks codec (`build_codec("slicer")`: its unpacking and dequantization are the Triton kernels).

Expected on an H200: "exact: 12/12 sessions" and every throughput line printed; the run writes --json. The numbers
are recorded in docs/serving.md once a run on a lent device has produced them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slicer_hf import SlicerConfig, SlicerModelForCausalLM, build_codec
from slicer_hf.config import default_config_dir
from slicer_hf.data import resolve_model
from slicer_hf.loading import load_layers, move_loaded
from slicer_hf.server import SplitServer
from slicer_hf.transport import LocalTransport


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def exactness(device: torch.device) -> tuple[int, int]:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )  # fmt: skip
    ref = AutoModelForCausalLM.from_config(config).eval()
    server = SplitServer(move_loaded(copy.deepcopy(ref), device), batching=True, min_split_layer=1)
    assert server.store is not None, "the KV store refused the model"
    jobs, got = [], {}
    for i in range(12):
        ids = torch.randint(3, 120, (1, 3 + 2 * i), generator=torch.Generator().manual_seed(i))
        jobs.append((ids, 1 + i % 3, ref.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)))

    def client(i: int) -> None:
        ids, split, _ = jobs[i]
        model = SlicerModelForCausalLM.from_model(
            copy.deepcopy(ref), SlicerConfig(codec="identity", split_layer=split), transport=LocalTransport(server)
        )
        got[i] = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.shutdown()
    return sum(torch.equal(got[i], want) for i, (_, _, want) in enumerate(jobs)), len(jobs)


def throughput(device: torch.device, dtype: torch.dtype, rows: list[int], iters: int) -> list[dict]:
    lm = move_loaded(load_layers(resolve_model("smollm2"), range(24, 30), dtype=dtype), device)
    server = SplitServer(lm, min_split_layer=24)
    out = []
    for r in rows:
        batch = [server.store.new_row(24) for _ in range(r)]
        server.layers.store_forward(
            batch, torch.randn(r, 256, 576, device=device, dtype=dtype), torch.arange(256).expand(r, -1)
        )

        def step(batch=batch, r=r):
            positions = torch.tensor([[row.length] for row in batch])
            server.layers.store_forward(batch, torch.randn(r, 1, 576, device=device, dtype=dtype), positions)
            for row in batch:  # stay at 256 positions
                server.store.truncate(row, 256)

        ms = median_ms(step, device, iters)
        out.append({"dtype": str(dtype), "rows": r, "ms_per_forward": ms, "tokens_per_s": 1000 * r / ms})
        print(f"{str(dtype):15} rows={r:4d} {ms:8.3f} ms/forward {1000 * r / ms:10.0f} tokens/s", flush=True)
        for row in batch:
            server.store.release(row)
    server.shutdown()
    return out


def codec_decode(device: torch.device, iters: int) -> dict:
    x = torch.randn(1, 1, 576) * 3
    x[..., 7] = 300.0
    out = {}
    codecs = {"preset (ECSQ)": SlicerConfig.from_pretrained(default_config_dir()), "blocks (Triton)": "slicer"}
    for name, spec in codecs.items():
        codec = build_codec(spec)
        packet = codec.encode(x)
        cpu = median_ms(lambda codec=codec, packet=packet: codec.decode(packet), torch.device("cpu"), iters)
        dev = median_ms(lambda codec=codec, packet=packet: codec.decode(packet, device=device), device, iters)
        print(f"codec decode of one token, {name}: cpu {cpu:.3f} ms, {device} {dev:.3f} ms", flush=True)
        out[name] = {"cpu_ms": cpu, "device_ms": dev, "packet_bytes": len(packet)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default="1,8,32,128,512")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="float32 only (for a dry run on CPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    exact, total = exactness(device)
    print(f"exact: {exact}/{total} sessions", flush=True)
    rows = [int(r) for r in args.rows.split(",")]
    dtypes = [torch.float32] if args.quick else [torch.bfloat16, torch.float16]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "exact_sessions": exact,
        "sessions": total,
        "throughput": [line for dtype in dtypes for line in throughput(device, dtype, rows, args.iters)],
        "codec_decode": codec_decode(device, args.iters),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    sys.exit(0 if exact == total else 1)


if __name__ == "__main__":
    main()
