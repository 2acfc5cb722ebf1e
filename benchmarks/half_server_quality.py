"""What a half-precision server costs in quality: the edge in float32, the server's layers in bfloat16 or float16.

    python benchmarks/half_server_quality.py                       # SmolLM2 split at 24, 8192 WikiText-2 tokens
    python benchmarks/half_server_quality.py --dtype float16 --tokens 4096 --json half.json

The split model runs through a real `SplitServer` (`load_server(..., dtype=...)`, in-process) with the lossless
codec and a logits downlink, so only the server's dtype differs from plain float32 transformers: perplexity of both
on the raw test split (windows of --window tokens) and how often their top-1 tokens agree. On CPUs with AVX-512
BF16, `slicer-hf serve --dtype bfloat16` roughly halves the server's matmul time (docs/benchmarks.md, section 7).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slicer_hf import SlicerConfig, SlicerModelForCausalLM
from slicer_hf.data import load_text, resolve_model
from slicer_hf.server.build import load_server
from slicer_hf.transport import LocalTransport


def logits_by_window(model: torch.nn.Module, ids: torch.Tensor, window: int, **kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(ids[:, s : s + window], **kwargs).logits.float()[0] for s in range(0, ids.shape[1], window)]


def perplexity(logits: list[torch.Tensor], ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    for i, lg in enumerate(logits):
        target = ids[0, i * window : i * window + len(lg)]
        nll += torch.nn.functional.cross_entropy(lg[:-1], target[1:], reduction="sum").item()
        count += len(lg) - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--split-layer", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--text", default="wikitext-2-raw-v1:test", help="a local file, or WikiText-2 (data.load_text)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    path = resolve_model(args.model)
    ids = AutoTokenizer.from_pretrained(path)(load_text(args.text), return_tensors="pt").input_ids[:, : args.tokens]
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = logits_by_window(plain, ids, args.window)
    del plain

    server = load_server(args.model, min_split_layer=args.split_layer, dtype=args.dtype)
    config = SlicerConfig(codec="identity", downlink="logits", split_layer=args.split_layer)
    split = SlicerModelForCausalLM.from_pretrained(
        path, slicer_config=config, transport=LocalTransport(server), dtype=torch.float32
    ).eval()
    got = logits_by_window(split, ids, args.window, split_layer=args.split_layer)
    server.shutdown()

    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(want, got)) / ids.shape[1]
    result = {
        "model": args.model,
        "split_layer": args.split_layer,
        "server_dtype": args.dtype,
        "tokens": ids.shape[1],
        "window": args.window,
        "ppl_float32": perplexity(want, ids, args.window),
        "ppl_split": perplexity(got, ids, args.window),
        "top1_agreement": agree,
    }
    change = 100 * (result["ppl_split"] / result["ppl_float32"] - 1)
    print(
        f"{args.model} split at {args.split_layer}, server in {args.dtype}, {result['tokens']} tokens: "
        f"ppl {result['ppl_float32']:.3f} (float32) -> {result['ppl_split']:.3f} ({change:+.2f}%), "
        f"top-1 agreement {100 * agree:.2f}%"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
