"""Codec cost on the edge and the server: encode/decode time per token against the edge's own per-token compute.

Single-token packets (decoding) and 256-token packets (prefill), on real hidden states of the model at the split.

    python -m slicer_hf.bench.codec_speed --out-json docs/benchmarks/codec_speed.json
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from ..codec import build_codec
from ..data import CALIBRATION_TEXT, load_text, resolve_model
from ..hooks import SplitPlan, attach_hooks, split_plan
from .common import markdown_table, median_time, suite_config, suite_parser, write_json

CODECS: list[tuple[str, dict[str, Any]]] = [("fp16", {}), ("int8", {}), ("topk", {"sparsity": 0.75})]


@torch.inference_mode()
def run(model: str = "smollm2", config_dir: str | None = None, out_json: str | None = None) -> dict[str, Any]:
    path = resolve_model(model)
    cfg = suite_config(config_dir, path)
    k = cfg.split_layer
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    attach_hooks(lm)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)(load_text(CALIBRATION_TEXT)[:20000], return_tensors="pt")["input_ids"][
        :, :257
    ]
    captured: dict[str, torch.Tensor] = {}

    def grab(hidden: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        captured["h"] = hidden.clone()
        return hidden

    # The edge's own compute for one decode token: layers 0..k-1 with a 256-token cache, no transport, then the final
    # norm and LM head on the row that comes back (what the edge runs with the default hidden downlink).
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    with split_plan(SplitPlan("edge", k, exchange=grab)):
        lm(ids[:, :256], cache=cache, use_cache=True)
        prefill = captured["h"][0]  # [256, d]

        def edge_step() -> None:
            lm(ids[:, 256:257], cache=cache, use_cache=True)
            cache.crop(-1)

        edge_ms = 1000 * median_time(edge_step, repeats=15)
    rows = []
    codecs = [*CODECS, ("slicer", cfg.codec_params() if cfg.codec == "slicer" else {})]
    for name, params in codecs:
        codec = build_codec(name, **params)
        one = prefill[-1].reshape(1, 1, -1)
        many = prefill.reshape(1, 256, -1)
        # a decode step of a chained codec codes its row against the decoded row before it, as generation does
        given = codec.decode(codec.encode(prefill[-2].reshape(1, 1, -1)))[:, -1] if codec.chains else None
        one_packet, many_packet = codec.encode(one, given=given), codec.encode(many)
        # what a decode step sends on average: each row of the prefill as a one-token packet (chained: coded against
        # the row before it as decoded, which the prefill packet's rows are)
        decoded = codec.decode(many_packet)[0] if codec.chains else None  # [256, d]
        steps = [
            codec.encode(prefill[i].reshape(1, 1, -1), given=None if decoded is None else decoded[i - 1 : i])
            for i in range(1, len(prefill))
        ]
        enc1 = 1000 * median_time(lambda: codec.encode(one, given=given), repeats=31)  # noqa: B023
        dec1 = 1000 * median_time(lambda: codec.decode(one_packet, given=given), repeats=31)  # noqa: B023
        enc256 = 1000 * median_time(lambda: codec.encode(many), repeats=5) / 256  # noqa: B023
        dec256 = 1000 * median_time(lambda: codec.decode(many_packet), repeats=5) / 256  # noqa: B023
        rows.append(
            {
                "codec": name,
                "bits_per_token": 8 * sum(map(len, steps)) / len(steps),
                "encode_ms": enc1,
                "decode_ms": dec1,
                "encode_ms_prefill": enc256,
                "decode_ms_prefill": dec256,
                "encode_vs_edge": enc1 / edge_ms,
            }
        )
    result = {"model": model, "split_layer": k, "edge_ms_per_token": edge_ms, "rows": rows}
    write_json(result, out_json)
    print(f"edge compute per decode token (layers 0..{k - 1}, 256-token context, norm and head): {edge_ms:.2f} ms\n")
    print(
        markdown_table(
            rows,
            [
                ("codec", "codec", ""),
                ("bits/token (mean of 255 one-token packets)", "bits_per_token", ".0f"),
                ("encode ms/token", "encode_ms", ".3f"),
                ("decode ms/token", "decode_ms", ".3f"),
                ("encode ms/token (prefill 256)", "encode_ms_prefill", ".3f"),
                ("decode ms/token (prefill 256)", "decode_ms_prefill", ".3f"),
                ("encode vs edge compute", "encode_vs_edge", ".1%"),
            ],
        )
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser(__doc__, "docs/benchmarks/codec_speed.json")
    args = parser.parse_args(argv)
    run(args.model, args.config, args.out_json)


if __name__ == "__main__":
    main()
