"""Rate-distortion table of the uplink codecs on the real model: bits per token against output quality.

For each split layer k and codec setting, a forward hook on decoder layer k-1 replaces its output by what the
server would decode: every token row is encoded as its own single-token packet `[1, 1, d]` (headers included in
the bits) and decoded back. The rest of the model runs unchanged and is compared with the unsplit model.

    python -m slicer_hf.bench.rate_distortion --text wikitext-2-v1:validation --split-layers 24 8 \\
        --n-tokens 2048 --out-json docs/benchmarks/rate_distortion.json \\
        --markdown docs/rate_distortion.md --plot docs/benchmarks/rate_distortion.png
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..compat import decoder_layers
from ..data import CALIBRATION_TEXT, GGUF_NAME, load_text, load_tokenizer, resolve_model, token_windows
from ..tuning.distortion import measure
from .common import at_least, suite_arguments

FP16_BITS_PER_ELEMENT = 16
SLICER_BASE: dict[str, Any] = {
    "sparsity": 0.0,
    "num_blocks": 1,
    "distortion": 0.08,
    "outliers": 2,
    "rotation": "orthogonal",
    "entropy_coding": "zstd",
}


def default_grid() -> list[dict[str, Any]]:
    """Baselines plus a sweep of SLICER knobs, each as `{"codec": name, **params}` (SLICER knobs all explicit)."""
    grid: list[dict[str, Any]] = [
        {"codec": "identity"},
        {"codec": "fp16"},
        {"codec": "bf16"},
        {"codec": "int8"},
        {"codec": "topk", "sparsity": 0.5},
        {"codec": "topk", "sparsity": 0.75},
        {"codec": "grouped", "bits": 8, "group_size": 4096, "outliers": 2},  # int8 per token, 2 outliers exact
        {"codec": "grouped", "bits": 6, "group_size": 32, "outliers": 2},  # grouped int6
        {"codec": "grouped", "bits": 4, "group_size": 32, "outliers": 2},  # grouped int4
        {"codec": "grouped", "bits": 8, "group_size": 64},  # blockwise 8-bit
        {"codec": "grouped", "bits": 4, "group_size": 64},  # blockwise 4-bit
    ]
    changes: list[dict[str, Any]] = [{"distortion": d} for d in (0.03, 0.05, 0.08, 0.12, 0.14, 0.16, 0.2)]
    changes += [{"rotation": "none", "distortion": d} for d in (0.05, 0.08, 0.12)]
    changes += [{"entropy_coding": "none", "distortion": 0.12}]  # zstd on one-token packets
    changes += [{"outliers": n} for n in (0, 4)]
    changes += [{"num_blocks": m, "distortion": d} for m, d in ((2, 0.12), (2, 0.18), (4, 0.08), (4, 0.15))]
    changes += [
        {"sparsity": 0.5, "num_blocks": m, "rotation": r} for m, r in ((1, "orthogonal"), (1, "none"), (4, "none"))
    ]
    return grid + [{"codec": "slicer", **SLICER_BASE, **c} for c in changes]


def label(setting: dict[str, Any]) -> str:
    """Short name of a setting: the codec; for SLICER its distortion and the knobs that differ from `SLICER_BASE`."""
    params = {k: v for k, v in setting.items() if k != "codec"}
    if setting["codec"] == "slicer":  # the distortion always, other knobs where they differ from SLICER_BASE
        params = {k: v for k, v in params.items() if k == "distortion" or SLICER_BASE.get(k) != v}
    return setting["codec"] + ("(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


def parse_setting(text: str) -> dict[str, Any]:
    """Parse a CLI codec setting, `name` or `name:key=value,key=value` (values parsed as JSON when they can be).

    Args:
        text: e.g. "int8" or "slicer:distortion=0.05,rotation=none".
    """
    name, _, rest = text.partition(":")
    setting: dict[str, Any] = {"codec": name, **(SLICER_BASE if name == "slicer" else {})}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            setting[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            setting[key.strip()] = value.strip()
    return setting


def run(
    model_path: str | None,
    text: str,
    split_layers: list[int],
    codecs: list[dict[str, Any]] | None,
    n_tokens: int,
    out_json: str | Path | None,
    window: int = 512,
) -> dict[str, Any]:
    """Measure each codec setting at each split layer against the unsplit model; optionally write the JSON.

    Args:
        model_path: model folder or Hub id; None or "smollm2" for the converted default model.
        text: text source for `load_text` (use "wikitext-2-v1:validation" to choose defaults).
        split_layers: split layers k (the edge runs decoder layers 0..k-1).
        codecs: settings `{"codec": name, **params}`; None for `default_grid()`.
        n_tokens: tokens scored, cut into non-overlapping windows of `window` tokens.
        out_json: where to write the result (None: do not write).
        window: tokens per window.

    Returns:
        `{"meta": {...}, "results": [one dict per (split layer, setting)]}`.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    started = time.perf_counter()
    path = resolve_model(model_path)
    tokenizer = load_tokenizer(path, "to read the text")
    windows = token_windows(tokenizer, load_text(text), window=window, max_tokens=n_tokens)  # [W, window]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = decoder_layers(model)
    d = model.config.hidden_size

    base_ppl, results = measure(model, windows, split_layers, codecs if codecs is not None else default_grid())
    for r in results:
        r["label"] = label(r.pop("setting"))
        print(_row(r), file=sys.stderr, flush=True)

    import transformers

    result = {
        "meta": {
            "model": model_path or f"smollm2 ({GGUF_NAME}, dequantized to float32)",
            "text": text,
            "n_tokens": windows.numel(),
            "window": window,
            "n_windows": windows.shape[0],
            "hidden_size": d,
            "num_hidden_layers": len(layers),
            "fp16_bits_per_token": FP16_BITS_PER_ELEMENT * d,
            "packets": "one per token, shape [1, 1, d], envelope included",
            "base_perplexity": base_ppl,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "elapsed_s": time.perf_counter() - started,
        },
        "results": results,
    }
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['split_layer']} | {r['label']} | {r['bits_per_token']:.0f} | {r['compression_vs_fp16']:.2f} | "
        f"{r['rel_l2']:.4f} | {r['kl_nats']:.4f} | {100 * r['top1_agreement']:.2f} | "
        f"{r['perplexity_change_pct']:+.2f} | {r['encode_us_per_token']:.0f} / {r['decode_us_per_token']:.0f} |"
    )


def markdown_table(result: dict[str, Any]) -> str:
    """The results as a markdown table, one block per split layer, cheapest setting first.

    Args:
        result: what `run` returns.
    """
    head = (
        "| k | setting | bits/token | x vs fp16 | rel. L2 | KL (nats) | top-1 agree % | ppl change % | "
        "enc / dec us |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for k in dict.fromkeys(r["split_layer"] for r in result["results"]):
        rows = sorted((r for r in result["results"] if r["split_layer"] == k), key=lambda r: r["bits_per_token"])
        lines += [_row(r) for r in rows]
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    """A self-contained markdown page: how it was made, the picks under the usual budgets, the full table.

    Args:
        result: what `run` returns (with `meta["command"]` set by `main`).
    """
    meta = result["meta"]
    lines = [
        "# Rate-distortion of the uplink codecs",
        "",
        f"Model: {meta['model']}. Text: `{meta['text']}`, the first {meta['n_tokens']} tokens "
        f"({meta['n_windows']} non-overlapping windows of {meta['window']}); unsplit perplexity on them "
        f"{meta['base_perplexity']:.3f}. Every token row is sent as its own packet `[1, 1, {meta['hidden_size']}]`, "
        f"envelope included; fp16 is {meta['fp16_bits_per_token']} bits per token. torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['threads']} threads, {meta['elapsed_s'] / 60:.1f} min.",
        "",
        "```",
        meta.get("command", "python -m slicer_hf.bench.rate_distortion"),
        "```",
        "",
        "## Cheapest SLICER setting per budget",
        "",
        "| k | budget | setting | bits/token | x vs fp16 | KL (nats) | ppl change % |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in dict.fromkeys(r["split_layer"] for r in result["results"]):
        for name, kwargs in [("ppl <= +1%", {"max_ppl_pct": 1.0}), ("KL <= 0.01", {"max_kl": 0.01})]:
            r = cheapest(result, k, **kwargs)
            if r is not None:
                lines.append(
                    f"| {k} | {name} | {r['label']} | {r['bits_per_token']:.0f} | {r['compression_vs_fp16']:.2f} | "
                    f"{r['kl_nats']:.4f} | {r['perplexity_change_pct']:+.2f} |"
                )
    lines += ["", "## All settings", "", markdown_table(result)]
    return "\n".join(lines)


def cheapest(result: dict[str, Any], k: int, max_ppl_pct: float | None = None, max_kl: float | None = None) -> Any:
    """The SLICER setting with the fewest bits per token at split layer k within the given budgets (or None).

    Args:
        result: what `run` returns.
        k: split layer.
        max_ppl_pct: largest allowed perplexity increase in percent.
        max_kl: largest allowed mean KL divergence in nats per token.
    """
    ok = [
        r
        for r in result["results"]
        if r["split_layer"] == k
        and r["spec"]["name"] == "slicer"
        and (max_ppl_pct is None or r["perplexity_change_pct"] <= max_ppl_pct)
        and (max_kl is None or r["kl_nats"] <= max_kl)
    ]
    return min(ok, key=lambda r: r["bits_per_token"], default=None)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Bits per token (log x) against KL to the unsplit model, one panel per split layer.

    Args:
        result: what `run` returns.
        path: image file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ks = list(dict.fromkeys(r["split_layer"] for r in result["results"]))
    fig, axes = plt.subplots(1, len(ks), figsize=(6.5 * len(ks), 5), squeeze=False)
    for ax, k in zip(axes[0], ks):
        rows = [r for r in result["results"] if r["split_layer"] == k and r["kl_nats"] > 0]
        for r in rows:
            slicer = r["spec"]["name"] == "slicer"
            marker = ("o" if r["spec"].get("rotation") == "orthogonal" else "s") if slicer else "^"
            color = "tab:blue" if slicer else "tab:red"
            ax.scatter(r["bits_per_token"], r["kl_nats"], marker=marker, color=color, s=28)
            ax.annotate(_short(r["label"]), (r["bits_per_token"], r["kl_nats"]), fontsize=5.5)
        ax.axhline(0.01, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="uplink bits per token (single-token packets)")
        ax.set(ylabel="KL(unsplit || split), nats per token", title=f"split layer {k}")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%d"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", lw=0.3)
    meta = result["meta"]
    fig.suptitle(
        f"{str(meta['model']).split(' (')[0]}, {meta['text']}, {meta['n_tokens']} tokens\n"
        "blue: slicer (o rotated, s not), red: baselines; dashed: 0.01 nats",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _short(name: str) -> str:
    for long, short in [("slicer", "S"), ("distortion=", "d="), ("rotation=none", "norot"), ("num_blocks=", "M=")]:
        name = name.replace(long, short)
    for long, short in [("entropy_coding=none", "nozstd"), ("sparsity=", "s="), ("outliers=", "out="), (" ", "")]:
        name = name.replace(long, short)
    return name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = suite_arguments(__doc__)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the converted SmolLM2-135M)")
    parser.add_argument("--text", default=CALIBRATION_TEXT, help="text source (file or wikitext split)")
    parser.add_argument("--split-layers", type=at_least(1), nargs="+", default=[24, 8], help="split layers to measure")
    parser.add_argument("--codec", action="append", help="setting like 'slicer:distortion=0.05' (repeat; default grid)")
    parser.add_argument("--n-tokens", type=at_least(1), default=2048, help="tokens of text to score")
    parser.add_argument("--window", type=at_least(2), default=512, help="tokens per scored window")
    parser.add_argument("--out-json", default="docs/benchmarks/rate_distortion.json", help="where the JSON goes")
    parser.add_argument("--markdown", default=None, help="also write the table to this markdown file")
    parser.add_argument("--plot", default=None, help="also write the bits-vs-KL plot to this image file")
    parser.add_argument("--from-json", default=None, help="only redraw --markdown/--plot from this earlier result")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    else:
        codecs = [parse_setting(c) for c in args.codec] if args.codec else None
        result = run(args.model, args.text, args.split_layers, codecs, args.n_tokens, None, window=args.window)
        argv = sys.argv[1:] if argv is None else argv
        result["meta"]["command"] = "python -m slicer_hf.bench.rate_distortion " + shlex.join(argv)
        if args.out_json:
            Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_report(result), encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
