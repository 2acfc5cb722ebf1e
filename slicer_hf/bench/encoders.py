"""Split sentence embeddings (all-MiniLM-L6-v2): uplink bits per token against embedding quality, on WikiText-2.

Sentences come from WikiText-2 (validation to choose, test to report). Every sentence runs through the real split
path (`SlicerModel`, in-process server) at each split layer and codec setting, in batches of sentences of equal
token length (no padding, so every row on the wire is a real token). Reported per split layer and setting:

- uplink bits per token: whole STEP messages (header and codec packet) over the sentences' tokens;
- cosine between the split and the unsplit mean-pooled, normalized embeddings (mean and 1st percentile);
- retrieval agreement: each sentence queries all the others, corpus and queries embedded through the split;
  top-1 agreement with the unsplit model's nearest neighbour, and the overlap of the top-10 lists.

`--write-preset DIR` saves the setting with the fewest bits whose mean cosine on validation sentences is at least
`--min-cosine` (0.99), checked again on test sentences.

    python -m slicer_hf.bench.encoders --out-json docs/benchmarks/encoders.json --write-preset configs/minilm-l6
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ..config import SlicerConfig
from ..data import (
    MINILM_HUB_ID,
    WIKITEXT,
    WIKITEXT_TOKENIZED,
    detokenized,
    load_text,
    local_wikitext,
    minilm_path,
    resolve_model,
)
from ..encoders import SlicerModel, mean_pool
from ..errors import ConfigError
from ..modeling import unsplit
from .common import codec_sweep, markdown_table, suite_arguments, write_json

RETRIEVAL_K = 10  # neighbours each sentence's retrieval is compared over

SETTINGS: dict[str, dict[str, Any]] = {
    "fp16": {"codec": "fp16"},
    "int8": {"codec": "int8"},
    **{
        f"slicer step {s}": {
            "codec": "slicer",
            "quantizer": "ecsq",
            "step": s,
            "rotation": "orthogonal",
            "outliers": 2,
            "entropy_coding": "zstd",
        }
        for s in (0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.2)
    },
}


def wikitext_text(split: str) -> tuple[str, str]:
    """(source, text) of a WikiText-2 split: the raw release; where only the tokenized one is here (this project
    ships the tokenized validation split, which calibrates), that one read as plain text, not a download."""
    if local_wikitext(WIKITEXT, split) is None and local_wikitext(WIKITEXT_TOKENIZED, split) is not None:
        return f"{WIKITEXT_TOKENIZED}:{split} (detokenized)", detokenized(load_text(f"{WIKITEXT_TOKENIZED}:{split}"))
    return f"{WIKITEXT}:{split}", load_text(f"{WIKITEXT}:{split}")


def wikitext_sentences(text: str, count: int, min_words: int = 8, max_words: int = 60) -> list[str]:
    """The first `count` distinct sentences of a WikiText-2 text, headings left out."""
    out: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line):
            if min_words <= len(sentence.split()) <= max_words and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
                if len(out) == count:
                    return out
    return out


def length_groups(tokenizer: Any, sentences: list[str], max_batch: int = 32) -> list[tuple[list[int], dict]]:
    """(sentence indices, tokenized batch) for batches of sentences of one token length (no padding)."""
    by_length: dict[int, list[int]] = {}
    ids = tokenizer(sentences, truncation=True, max_length=128)["input_ids"]
    for i, seq in enumerate(ids):
        by_length.setdefault(len(seq), []).append(i)
    groups = []
    for length in sorted(by_length):
        members = by_length[length]
        for a in range(0, len(members), max_batch):
            chunk = members[a : a + max_batch]
            batch = {"input_ids": torch.tensor([ids[i] for i in chunk])}
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            groups.append((chunk, batch))
    return groups


@torch.inference_mode()
def embed(model: Any, groups: list[tuple[list[int], dict]], count: int, **kwargs: Any) -> torch.Tensor:
    out = torch.zeros(count, model.config.hidden_size)
    for indices, batch in groups:
        hidden = model(**batch, **kwargs).last_hidden_state
        out[indices] = mean_pool(hidden, batch["attention_mask"])
    return out


def retrieval(reference: torch.Tensor, split: torch.Tensor, k: int = RETRIEVAL_K) -> tuple[float, float]:
    """(top-1 agreement, top-k overlap) of each sentence's nearest neighbours among the others."""

    def top(e: torch.Tensor) -> torch.Tensor:
        scores = e @ e.T
        scores.fill_diagonal_(-float("inf"))
        return scores.topk(k, dim=1).indices

    ref, got = top(reference), top(split)
    top1 = (ref[:, 0] == got[:, 0]).float().mean().item()
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ref, got)) / (k * len(ref))
    return top1, overlap


def measure(
    model: Any, groups: list, reference: torch.Tensor, splits: list[int], settings: dict[str, dict]
) -> list[dict[str, Any]]:
    rows = []
    for name, k in codec_sweep(model, settings, splits):
        started = time.perf_counter()
        got = embed(model, groups, len(reference), split_layer=k)
        stats = model.wire_stats()
        cosine = (got * reference).sum(-1)
        top1, top10 = retrieval(reference, got)
        rows.append(
            {
                "setting": name,
                "split_layer": k,
                "uplink_bits_per_token": stats.uplink_bits_per_token,
                "payload_bits_per_token": 8 * stats.uplink_payload_bytes / max(stats.tokens, 1),
                "vs_fp16": 16 * model.config.hidden_size / stats.uplink_bits_per_token,
                "cosine_mean": cosine.mean().item(),
                "cosine_p1": cosine.quantile(0.01).item(),
                "top1_agreement": top1,
                "top10_overlap": top10,
                "seconds": time.perf_counter() - started,
            }
        )
        print(
            f"  {name:>18} split {k}: {stats.uplink_bits_per_token:7.0f} bits/token, cos {cosine.mean():.5f} "
            f"(p1 {rows[-1]['cosine_p1']:.5f}), top1 {top1:.3f}, top10 {top10:.3f}",
            flush=True,
        )
    return rows


def choose(rows: list[dict[str, Any]], min_cosine: float) -> dict[str, Any] | None:
    """The row with the fewest bits whose mean cosine is at least `min_cosine`; among those within 1% of its bits,
    the deepest split (the least server compute: the codec's bits hardly depend on the split)."""
    ok = [r for r in rows if r["cosine_mean"] >= min_cosine]
    if not ok:
        return None
    fewest = min(r["uplink_bits_per_token"] for r in ok)
    near = [r for r in ok if r["uplink_bits_per_token"] <= 1.01 * fewest]
    return max(near, key=lambda r: (r["split_layer"], -r["uplink_bits_per_token"]))


def choose_preset(results: dict[str, Any], model_config: Any, write_preset: str | None, model: str) -> None:
    """Pick on validation rows, report the same setting on test rows, and write the preset folder (for `model`:
    the bundled MiniLM's preset names its Hub id, which every copy of it matches)."""
    chosen = choose(results["validation"]["rows"], results["min_cosine"])
    if chosen is None:
        print(f"\nno setting keeps a mean cosine of {results['min_cosine']} on validation sentences")
        return
    key = (chosen["setting"], chosen["split_layer"])
    test = next(r for r in results["test"]["rows"] if (r["setting"], r["split_layer"]) == key)
    results["chosen"] = {"validation": chosen, "test": test}
    print(f"\nchosen on validation: {chosen['setting']} at split {chosen['split_layer']}")
    if write_preset:
        preset = SlicerConfig(
            split_layer=chosen["split_layer"],
            model_id=MINILM_HUB_ID if resolve_model(model) == minilm_path() else model,  # ("minilm" resolves there)
            num_hidden_layers=model_config.num_hidden_layers,
            hidden_size=model_config.hidden_size,
            **SETTINGS[chosen["setting"]],
        )
        preset.save_pretrained(write_preset)
        print(f"preset written to {write_preset}")


def run(
    model: str = "minilm",
    sentences: int = 1000,
    splits: list[int] | None = None,
    min_cosine: float = 0.99,
    out_json: str | None = None,
    write_preset: str | None = None,
) -> dict[str, Any]:
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    split_model = SlicerModel.from_model(AutoModel.from_pretrained(path).eval(), SlicerConfig(split_layer=1))
    layers = split_model.config.num_hidden_layers
    if splits and not all(1 <= k < layers for k in splits):
        raise ConfigError(f"split layers must be in [1, {layers - 1}] for this {layers}-layer model, got {splits}")
    splits = splits or list(range(1, layers))
    results: dict[str, Any] = {"model": path, "sentences": sentences, "min_cosine": min_cosine}
    for split in ("validation", "test"):
        source, text = wikitext_text(split)
        texts = wikitext_sentences(text, sentences)
        groups = length_groups(tokenizer, texts)
        tokens = sum(len(ix) * batch["input_ids"].shape[1] for ix, batch in groups)
        with unsplit(split_model):
            reference = embed(split_model, groups, len(texts))
        print(f"{split} ({source}): {len(texts)} sentences, {tokens} tokens, {len(groups)} batches", flush=True)
        rows = measure(split_model, groups, reference, splits, SETTINGS)
        results[split] = {"source": source, "tokens": tokens, "rows": rows}
    choose_preset(results, split_model.config, write_preset, model)
    columns = [
        ("setting", "setting", ""),
        ("split", "split_layer", "d"),
        ("bits/token", "uplink_bits_per_token", ".0f"),
        ("x fewer than fp16", "vs_fp16", ".2f"),
        ("cosine mean", "cosine_mean", ".5f"),
        ("cosine p1", "cosine_p1", ".5f"),
        ("top-1 agree", "top1_agreement", ".3f"),
        ("top-10 overlap", "top10_overlap", ".3f"),
    ]
    print("\ntest sentences:\n" + markdown_table(results["test"]["rows"], columns))
    write_json(results, out_json)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = suite_arguments(__doc__)
    parser.add_argument("--model", default="minilm", help="Hub id, local folder, or 'minilm' (bundled)")
    parser.add_argument(
        "--sentences", type=int, default=1000, help="WikiText-2 sentences per split (test and validation)"
    )
    parser.add_argument("--splits", default=None, help="comma-separated split layers (default: all)")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="quality a --write-preset choice must keep")
    parser.add_argument("--out-json", default="docs/benchmarks/encoders.json", help="where the JSON goes")
    parser.add_argument("--write-preset", default=None, help="folder for the chosen SlicerConfig")
    parser.add_argument("--choose-only", action="store_true", help="choose again from --out-json's rows, no run")
    args = parser.parse_args(argv)
    if args.sentences <= RETRIEVAL_K:
        parser.error(f"--sentences must be over {RETRIEVAL_K}: each is ranked against its {RETRIEVAL_K} nearest")
    if args.choose_only:
        results = json.loads(Path(args.out_json).read_text())
        results.pop("environment", None)
        config = AutoConfig.from_pretrained(resolve_model(args.model))
        choose_preset(results, config, args.write_preset, args.model)
        write_json(results, args.out_json)
        return
    try:
        splits = [int(s) for s in args.splits.split(",")] if args.splits else None
    except ValueError:
        parser.error(f"--splits takes comma-separated split layers, e.g. 2,4, got {args.splits!r}")
    run(args.model, args.sentences, splits, args.min_cosine, args.out_json, args.write_preset)


if __name__ == "__main__":
    main()
