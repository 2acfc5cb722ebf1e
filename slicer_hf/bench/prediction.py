"""Server-side prediction of the uplink, measured: what the current token's input embedding (the server would need the
token id, which reveals the text) and the previous row (which the server has already decoded) buy, at equal error.

In the calibrated basis of the config (rows over their RMS, less the mean, times `forward`), a linear predictor of
each row's coordinates is fitted by ridge regression on the calibration text (the first `--calib-tokens` tokens of
WikiText-2 validation); the residual would be coded in its place, each coordinate under a Laplace of the residual's
own scale. Reported, on the rest of validation and on test: ideal code lengths (the entropy coder lands within about
1% of them) and the error, with each predictor's bits compared with plain coding at the same error (interpolated in
log error over a sweep of steps). The previous row is taken exactly (an upper bound on what it buys), and in closed
loop: predicted from the previous row as the server decodes it (rounding at step 0.35), which is what a codec could
use. A token id costs ceil(log2 vocab) bits more per token on the wire.

    python -m slicer_hf.bench.prediction --out-json docs/benchmarks/prediction.json
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..codec.basis import lookup
from ..compat import decoder_layers
from ..config import SlicerConfig
from ..data import CALIBRATION_TEXT, load_text, resolve_model, token_windows
from ..tuning.calibrate import ridge as fit_ridge
from .common import at_least, markdown_table, suite_parser, write_json

STEPS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
COLUMNS = (
    ("text", "text", ""),
    ("predictor", "predictor", ""),
    ("R2", "r2", ".3f"),
    ("bits at step 0.35", "bits", ".0f"),
    ("error", "error", ".3f"),
    ("plain bits at that error", "plain_bits", ".0f"),
    ("saved %", "saved_pct", ".2f"),
    ("saved % with the token id", "saved_with_id_pct", ".2f"),
)


def split_rows(model: Any, windows: torch.Tensor, split_layer: int) -> torch.Tensor:
    """`[N, d]` float64: the split layer's input rows of every window (no grad)."""
    rows: list[torch.Tensor] = []
    hook = decoder_layers(model)[split_layer - 1].register_forward_hook(
        lambda m, a, out: rows.append((out[0] if isinstance(out, tuple) else out)[0].detach().double())
    )
    try:
        with torch.no_grad():
            for ids in windows:
                model(ids.reshape(1, -1), use_cache=False)
    finally:
        hook.remove()
    return torch.cat(rows)


def laplace_bits(residual: np.ndarray, scale: np.ndarray, step: float) -> tuple[float, float]:
    """(ideal bits per row, squared error per row) of rounding `residual` `[N, d]` to multiples of `step`, each
    coordinate under a quantized Laplace of scale `scale[i]`."""
    codes = np.round(residual / step)
    b = scale[None, :] / step

    def cdf(v: np.ndarray) -> np.ndarray:
        return np.where(v < 0, 0.5 * np.exp(np.minimum(v, 0) / b), 1 - 0.5 * np.exp(-np.maximum(v, 0) / b))

    p = np.maximum(cdf(codes + 0.5) - cdf(codes - 0.5), 1e-12)
    return float(-np.log2(p).sum(1).mean()), float(((codes * step - residual) ** 2).sum(1).mean())


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Weights `[k + 1, d]` (the last row the intercept) of y ~ x by ridge regression (`calibrate.ridge`)."""
    return fit_ridge(torch.from_numpy(x), torch.from_numpy(y), alpha).numpy()


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))]) @ w


def closed_loop(z: np.ndarray, w: np.ndarray, first: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """(residuals coded, previous rows as decoded), `[N, d]` each, when each row is predicted from the previous row
    as the server decodes it (rounding at `step`), row after row (a window's first row from zeros)."""
    residual, previous = np.empty_like(z), np.zeros_like(z)
    decoded = np.zeros(z.shape[1])
    for t in range(len(z)):
        previous[t] = 0.0 if first[t] else decoded
        guess = predict(w, previous[t][None])[0]
        residual[t] = z[t] - guess
        decoded = guess + np.round(residual[t] / step) * step
    return residual, previous


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = suite_parser(__doc__, "docs/benchmarks/prediction.json")
    parser.add_argument(
        "--calib-tokens",
        type=at_least(512),
        default=24576,
        help="WikiText-2 validation tokens to fit on (512-token windows)",
    )
    parser.add_argument(
        "--heldout-tokens",
        type=at_least(512),
        default=8192,
        help="held-out validation tokens to report on (512-token windows)",
    )
    parser.add_argument(
        "--test-tokens",
        type=at_least(512),
        default=16384,
        help="WikiText-2 test tokens to report on (512-token windows)",
    )
    parser.add_argument(
        "--alpha", type=at_least(0, float, above=True), default=1e-4, help="ridge penalty per calibration row"
    )
    args = parser.parse_args(argv)
    config = SlicerConfig.from_pretrained(args.config or "smollm2-135m-split24")
    if config.basis is None:
        raise SystemExit("the config has no calibrated basis (`slicer-hf calibrate`)")
    basis = lookup(config.basis).f64
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    embedding = model.get_input_embeddings().weight.detach().double()

    def texts() -> dict[str, torch.Tensor]:
        val = token_windows(tokenizer, load_text(CALIBRATION_TEXT), 512, args.calib_tokens + args.heldout_tokens)
        cut = args.calib_tokens // 512
        test = token_windows(tokenizer, load_text("wikitext-2-raw-v1:test"), 512, args.test_tokens)
        return {"calibration": val[:cut], "held-out validation": val[cut:], "test": test}

    data = {}
    for name, windows in texts().items():
        rows = split_rows(model, windows, config.split_layer)
        rms = (rows.pow(2) @ basis["norm_weight"] / basis["norm_weight"].sum()).sqrt()[:, None]
        z = ((rows / rms - basis["mean"]) @ basis["forward"]).numpy()
        first = np.zeros(len(z), bool)
        first[:: windows.shape[1]] = True  # a window's first row has no previous row: it predicts from zeros
        previous = np.vstack([np.zeros((1, z.shape[1])), z[:-1]])
        previous[first] = 0.0
        data[name] = {"z": z, "embedding": embedding[windows.reshape(-1)].numpy(), "previous": previous, "first": first}
    features = {
        "none": lambda part: np.zeros((len(part["z"]), 0)),
        "token embedding": lambda part: part["embedding"],
        "previous row (exact)": lambda part: part["previous"],
        "both": lambda part: np.hstack([part["embedding"], part["previous"]]),
        "previous row (decoded)": lambda part: part["previous"],
    }
    id_bits = math.ceil(math.log2(embedding.shape[0]))
    calib = data["calibration"]
    rows_out = []
    for predictor, feature in features.items():
        w = ridge(feature(calib), calib["z"], args.alpha)
        scale = np.abs(calib["z"] - predict(w, feature(calib))).mean(0)
        if predictor == "previous row (decoded)":  # refit on the rows as decoded, then the scales of what is coded
            w = ridge(closed_loop(calib["z"], w, calib["first"], 0.35)[1], calib["z"], args.alpha)
            scale = np.abs(closed_loop(calib["z"], w, calib["first"], 0.35)[0]).mean(0)
        for text in ("held-out validation", "test"):
            part = data[text]
            if predictor == "previous row (decoded)":
                residual = closed_loop(part["z"], w, part["first"], 0.35)[0]
            else:
                residual = part["z"] - predict(w, feature(part))
            plain_scale = np.abs(calib["z"] - calib["z"].mean(0)).mean(0)
            curve = [laplace_bits(part["z"] - calib["z"].mean(0), plain_scale, s) for s in STEPS]
            bits, error = laplace_bits(residual, scale, 0.35)
            plain = float(np.interp(np.log(error), np.log([e for _, e in curve]), [b for b, _ in curve]))
            extra = id_bits if predictor in ("token embedding", "both") else 0
            centered = part["z"] - part["z"].mean(0)
            rows_out.append(
                {
                    "text": text,
                    "predictor": predictor,
                    "r2": float(1 - (residual**2).sum() / (centered**2).sum()),
                    "bits": bits,
                    "error": error,
                    "plain_bits": plain,
                    "saved_pct": 100 * (1 - bits / plain),
                    "saved_with_id_pct": 100 * (1 - (bits + extra) / plain),
                }
            )
            print(markdown_table(rows_out[-1:], COLUMNS).splitlines()[-1], flush=True)
    print("\n" + markdown_table(rows_out, COLUMNS))
    write_json(
        {
            "config": config.to_dict(),
            "calib_tokens": args.calib_tokens,
            "token_id_bits": id_bits,
            "alpha": args.alpha,
            "rows": rows_out,
        },
        args.out_json,
    )


if __name__ == "__main__":
    main()
