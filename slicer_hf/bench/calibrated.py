"""Calibrated bases against the seeded rotation: uplink and both-ways bits per token at equal quality, SmolLM2.

1. Calibrate (`slicer-hf calibrate`): uplink basis at the split, downlink basis at the last layer, on the first
   `--calib-tokens` tokens of WikiText-2 validation.
2. Choose on the rest of validation (held out from the calibration), with a `--margin` (0.75: validation text is
   easier than test text for this model, the preset's KL is 0.0068 there and 0.0089 on test): the uplink alone, the
   coarsest step whose KL and perplexity change stay within margin x `--max-kl` and `--max-ppl` (exact downlink);
   both directions, the (uplink, downlink) steps with the fewest bits both ways whose total KL and perplexity change
   stay within the same budgets (perplexity change alone is too noisy to choose by: 0.4 / 0.16 trellis-coded was
   +0.60% on validation and +1.22% on test at KL 0.0144).
3. Report on WikiText-2 test: the preset as shipped (`--config`; when §11 was measured, ECSQ in a seeded rotation;
   today calibrated, trellis-coded and chained), the calibrated uplink, and both directions calibrated, with every
   message as decoding sends it (`slicer-hf eval`). The calibrated settings code each row on its own (no chaining:
   `predict_previous` off), unless the uplink basis predicts each row from the one before it (`calibrate
   --predict-previous`, as §13 and today's `-both` preset): then they chain.

With `--trellis` the calibrated settings are trellis-coded (`SlicerConfig.trellis`), over steps of their own (a
trellis step is its union's: a trellis-coded row at step s costs about what a rounded row at 0.9 s costs, with less
error), and the test rows are the rotation preset and the two trellis-coded choices.

    python -m slicer_hf.bench.calibrated --out-json docs/benchmarks/calibrated.json --write-preset DIR
    python -m slicer_hf.bench.calibrated --trellis --calibrated slicer_hf/presets/smollm2-135m-split24-both \
        --out-json docs/benchmarks/calibrated_trellis.json
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..codec.basis import lookup
from ..config import SlicerConfig
from ..data import CALIBRATION_TEXT, load_text, resolve_model
from ..evaluate import evaluate
from .common import at_least, markdown_table, suite_parser, write_json

UP_STEPS = (0.3, 0.35, 0.4, 0.45)
PAIRS = tuple((up, down) for up in (0.3, 0.35) for down in (0.1, 0.15, 0.2))
TRELLIS_UP_STEPS = (0.36, 0.4, 0.44, 0.48)
TRELLIS_PAIRS = tuple((up, down) for up in (0.32, 0.36) for down in (0.11, 0.12, 0.13))
COLUMNS = (
    ("setting", "name", ""),
    ("uplink step", "step", ".2f"),
    ("downlink", "downlink", ""),
    ("bits up", "bits_per_token", ".0f"),
    ("x fp16 up", "compression_vs_fp16", ".2f"),
    ("bits down", "downlink_bits_per_token", ".0f"),
    ("x fp16 both ways", "both_ways_vs_fp16", ".2f"),
    ("KL", "kl_mean", ".4f"),
    ("ppl change %", "ppl_change_pct", "+.2f"),
    ("top-1", "top1_agreement", ".4f"),
)


def heldout_text(model: str, source: str, skip_tokens: int) -> str:
    """`source`'s text after its first `skip_tokens` tokens (those the calibration saw)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    text = load_text(source)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    return text[offsets[skip_tokens][0] :]


def row(name: str, config: SlicerConfig, result: dict[str, Any]) -> dict[str, Any]:
    down = "exact" if config.downlink_step is None else f"{config.downlink_step:g}"
    down += " calibrated" if config.downlink_basis else (" rotation" if config.downlink_step else "")
    keys = [key for _, key, _ in COLUMNS if key in result]
    return {"name": name, "step": config.step, "downlink": down, **{k: result[k] for k in keys}, "config": config}


def sweep(model: str, text: str, configs: Sequence[tuple[str, SlicerConfig]], tokens: int) -> list[dict[str, Any]]:
    rows = []
    for name, config in configs:
        result = evaluate(model, text, config=config, max_tokens=tokens, progress=False)
        rows.append(row(name, config, result))
        print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    return rows


def choose(rows: list[dict[str, Any]], max_kl: float | None, max_ppl: float) -> dict[str, Any]:
    ok = [r for r in rows if (max_kl is None or r["kl_mean"] <= max_kl) and r["ppl_change_pct"] <= max_ppl]
    if not ok:
        raise SystemExit(f"no setting meets KL <= {max_kl} and ppl change <= {max_ppl}%: {rows}")
    return min(ok, key=lambda r: r["bits_per_token"] + r["downlink_bits_per_token"])


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser(__doc__, "docs/benchmarks/calibrated.json")
    parser.add_argument("--calibrated", default=None, help="a config folder from `slicer-hf calibrate` (skip step 1)")
    parser.add_argument(
        "--calib-tokens", type=at_least(1), default=24576, help="WikiText-2 validation tokens to calibrate on"
    )
    parser.add_argument(
        "--choose-tokens", type=at_least(1), default=8192, help="held-out validation tokens to choose steps on"
    )
    parser.add_argument("--test-tokens", type=at_least(1), default=16384, help="WikiText-2 test tokens to report on")
    parser.add_argument(
        "--max-kl", type=at_least(0, float, above=True), default=0.01, help="KL budget per token (nats)"
    )
    parser.add_argument(
        "--max-ppl", type=at_least(0, float, above=True), default=1.0, help="perplexity change budget (%%)"
    )
    parser.add_argument(
        "--margin", type=at_least(0, float, above=True), default=0.75, help="share of the budgets a choice may use"
    )
    parser.add_argument("--write-preset", default=None, help="folder for the chosen config and its bases")
    parser.add_argument("--trellis", action="store_true", help="trellis-code the calibrated settings")
    args = parser.parse_args(argv)
    window = inspect.signature(evaluate).parameters["window"].default  # what `sweep` scores with
    if args.choose_tokens < window or args.test_tokens < window:
        parser.error(f"--choose-tokens and --test-tokens score whole windows of {window} tokens: at least {window}")
    with tempfile.TemporaryDirectory(prefix="slicer-calibrated-") as work:
        run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    """The three steps of the module's docstring, with `work` for the calibration and the held-out text."""
    up_steps, pair_steps = (TRELLIS_UP_STEPS, TRELLIS_PAIRS) if args.trellis else (UP_STEPS, PAIRS)
    preset = SlicerConfig.from_pretrained(args.config or "smollm2-135m-split24")
    plain_rows = {"predict_previous": False}  # each row coded on its own
    if args.calibrated is None:
        from ..tuning.calibrate import calibrate

        start = preset.replace(outliers=0, **plain_rows)
        fitted = calibrate(args.model, start, downlink=True, tokens=args.calib_tokens)
        args.calibrated = str(work / "calibrated")
        fitted.save_pretrained(args.calibrated)
        print(f"calibrated: uplink basis {fitted.basis}, downlink basis {fitted.downlink_basis}", flush=True)
    calibrated = SlicerConfig.from_pretrained(args.calibrated)
    chained = calibrated.basis is not None and lookup(calibrated.basis).predicts  # from `calibrate --predict-previous`
    calibrated = calibrated.replace(trellis=args.trellis, predict_previous=chained)
    (work / "heldout.txt").write_text(heldout_text(args.model, CALIBRATION_TEXT, args.calib_tokens))
    heldout = str(work / "heldout.txt")

    print("\n== choose the uplink step on held-out validation (exact downlink)\n" + markdown_table([], COLUMNS))
    exact = calibrated.replace(downlink_step=None, downlink_basis=None)
    up_rows = sweep(args.model, heldout, [(f"up {s}", exact.replace(step=s)) for s in up_steps], args.choose_tokens)
    up = choose(up_rows, args.margin * args.max_kl, args.margin * args.max_ppl)["config"]
    print("\n== choose both steps on held-out validation (both ways)\n" + markdown_table([], COLUMNS))
    pairs = [(f"up {u} down {d}", calibrated.replace(step=u, downlink_step=d)) for u, d in pair_steps]
    down_rows = sweep(args.model, heldout, pairs, args.choose_tokens)
    chosen = choose(down_rows, args.margin * args.max_kl, args.margin * args.max_ppl)["config"]

    print("\n== WikiText-2 test\n" + markdown_table([], COLUMNS))
    rotation_down = preset.replace(downlink_step=chosen.downlink_step)
    final = [
        ("preset", preset),
        ("preset, its downlink at the chosen step", rotation_down),
        ("calibrated uplink", up),
        ("calibrated both ways", chosen),
    ]
    if args.trellis:  # the untrellised rows are calibrated.json's
        final = [("uplink preset", preset), ("trellis uplink", up), ("trellis both ways", chosen)]
    test_rows = sweep(args.model, "wikitext-2-raw-v1:test", final, args.test_tokens)
    if args.write_preset:
        chosen.save_pretrained(args.write_preset)
        print(f"chosen config written to {args.write_preset}")

    def plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**r, "config": r["config"].to_dict()} for r in rows]

    write_json(
        {
            "calibration": {"text": CALIBRATION_TEXT, "tokens": args.calib_tokens},
            "choose": {"text": "validation after the calibration tokens", "tokens": args.choose_tokens},
            "budget": {"max_kl": args.max_kl, "max_ppl_change_pct": args.max_ppl, "margin": args.margin},
            "trellis": args.trellis,
            "uplink_sweep": plain(up_rows),
            "downlink_sweep": plain(down_rows),
            "test": plain(test_rows),
        },
        args.out_json,
    )


if __name__ == "__main__":
    main()
