"""Rate and distortion of a codec at a split, measured on the real model: bits per token against KL, top-1
agreement and perplexity change to the unsplit model.

A forward hook on decoder layer k-1 replaces its output with what the server would decode: every token row goes
through its own single-token packet `[1, 1, d]`, as decoding sends it (envelope included in the bits); a chained
codec (`predict_previous`) codes each row against the decoded row before it in its window, as a session does. With
k = L (the number of layers) the hook sits on the last layer, whose output is what a hidden-state downlink carries.
A codec that predicts from the split's rows (a downlink basis) is measured by `slicer-hf eval`, which sends both.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..codec import Codec, build_codec
from ..compat import decoder_layers
from ..errors import CodecError, ConfigError


class RoundTrip:
    """Forward-hook body: each token row through its own single-token packet; keeps the counts."""

    def __init__(self, codec: Codec) -> None:
        if codec.given_width is not None:
            raise ConfigError(
                "this codec predicts each row from the split's rows (a downlink basis): measure it with `slicer-hf "
                "eval`, which sends both"
            )
        self.codec = codec
        self.bits: list[int] = []
        self.rel_l2: list[float] = []
        self.sq_err = self.sq_norm = 0.0
        self.encode_s: list[float] = []  # per token, the first (warm-up) call left out
        self.decode_s: list[float] = []
        self._warm = False

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # [B, T, d]
        rows = hidden.detach().reshape(-1, 1, 1, hidden.shape[-1])  # [B*T, 1, 1, d]: one packet per token
        decoded = torch.empty_like(rows)
        if not self._warm and len(rows):  # a first call pays for lazy imports and caches: not a token's cost
            self.codec.decode(self.codec.encode(rows[0]))
            self._warm = True
        for i, row in enumerate(rows):
            # a chained codec continues from the row before in its sequence (none before a window's first)
            given = decoded[i - 1, 0].float() if self.codec.chains and i % hidden.shape[1] else None
            start = time.perf_counter()
            packet = self.codec.encode(row, given=given)
            mid = time.perf_counter()
            decoded[i] = self.codec.decode(packet, given=given).to(row.dtype)
            self.decode_s.append(time.perf_counter() - mid)
            self.encode_s.append(mid - start)
            self.bits.append(8 * len(packet))
        err = (decoded - rows).flatten(1).double()  # [B*T, d]
        norm = rows.flatten(1).double()
        self.rel_l2 += (err.norm(dim=1) / norm.norm(dim=1).clamp_min(1e-30)).tolist()
        self.sq_err += float(err.pow(2).sum())
        self.sq_norm += float(norm.pow(2).sum())
        decoded = decoded.reshape(hidden.shape)
        return (decoded, *output[1:]) if isinstance(output, tuple) else decoded


def forward_logprobs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)  # [1, T, V]


def quality_sums(logprobs: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Sums over one window: KL(ref || split) per position, top-1 agreement, next-token NLL."""
    kl = (ref.exp() * (ref - logprobs)).sum(-1)  # [1, T]
    agree = (logprobs.argmax(-1) == ref.argmax(-1)).float()
    nll = -logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [1, T-1]
    return {"kl": float(kl.sum()), "agree": float(agree.sum()), "nll": float(nll.sum()), "nll_n": nll.numel()}


def _perplexity(sums: Sequence[dict[str, float]]) -> float:
    mean_nll = sum(q["nll"] for q in sums) / sum(q["nll_n"] for q in sums)
    if not mean_nll < 700:  # exp() overflows a double past 709
        raise ConfigError(f"the model's perplexity on this text is out of range (mean NLL {mean_nll:.4g} nats)")
    return math.exp(mean_nll)


def check_finite(model: Any, ids: torch.Tensor, split_layers: Sequence[int]) -> None:
    """Refuse a model whose rows at `split_layers` or whose log-probabilities on `ids` `[1, T]` are not finite (one
    that overflows its dtype), or whose perplexity is (checked on one window, before measurements that take
    minutes)."""
    with torch.no_grad():
        out = model(ids, use_cache=False, output_hidden_states=True)
    dtype = str(out.logits.dtype).removeprefix("torch.")
    for k in split_layers:
        if not torch.isfinite(out.hidden_states[k]).all():
            raise ConfigError(
                f"the model's hidden states after layer {k} are not finite in {dtype} (it overflows): profile it in "
                "float32 or bfloat16 (--dtype)"
            )
    logprobs = F.log_softmax(out.logits.float(), dim=-1)
    if not torch.isfinite(logprobs).all():
        raise ConfigError(
            f"the model's log-probabilities are not finite in {dtype} (it overflows): profile it in "
            "float32 or bfloat16 (--dtype)"
        )
    _perplexity([quality_sums(logprobs, logprobs, ids)])


def measure(
    model: Any,
    windows: torch.Tensor,
    split_layers: Sequence[int],
    settings: Sequence[dict[str, Any]],
    skip_refused: Collection[str] = (),
) -> tuple[float, list[dict[str, Any]]]:
    """Each codec setting at each split layer against the unsplit model.

    Args:
        model: a plain transformers causal LM (every layer local), in eval mode.
        windows: token windows `[W, T]` to score.
        split_layers: k in [1, L]; k = L measures the hidden-state downlink (the last layer's output).
        settings: `{"codec": name, **params}` each.
        skip_refused: codecs whose setting is left out at a split where it refuses the rows (fp16 where they
            overflow it, say), with a warning, instead of ending the measurement.

    Returns:
        (unsplit perplexity, one dict per (k, setting): bits, KL, agreement, perplexity change, codec times).
    """
    layers = decoder_layers(model)
    bad = [k for k in split_layers if not 1 <= k <= len(layers)]
    if bad:
        raise ConfigError(f"split layers must be in [1, {len(layers)}], got {bad}")
    d = model.config.hidden_size
    refs = [forward_logprobs(model, ids[None]) for ids in windows]
    base_ppl = _perplexity([quality_sums(r, r, ids[None]) for r, ids in zip(refs, windows)])
    n = windows.numel()
    results = []
    for k in split_layers:
        for setting in settings:
            codec = build_codec(setting["codec"], **{key: v for key, v in setting.items() if key != "codec"})
            trip = RoundTrip(codec)
            handle = layers[k - 1].register_forward_hook(trip)
            t0 = time.perf_counter()
            try:
                sums = [quality_sums(forward_logprobs(model, ids[None]), r, ids[None]) for r, ids in zip(refs, windows)]
            except CodecError as exc:
                if setting["codec"] not in skip_refused:
                    raise
                warnings.warn(f"codec {codec.name} left out at split {k}: {exc}", stacklevel=2)
                continue
            finally:
                handle.remove()
            ppl = _perplexity(sums)
            bits = sum(trip.bits) / n
            results.append(
                {
                    "split_layer": k,
                    "setting": dict(setting),
                    "spec": codec.spec(),
                    "bits_per_token": bits,
                    "bits_per_element": bits / d,
                    "compression_vs_fp16": 16 * d / bits,
                    "rel_l2": sum(trip.rel_l2) / n,
                    "rel_l2_global": math.sqrt(trip.sq_err / trip.sq_norm),
                    "kl_nats": sum(q["kl"] for q in sums) / n,
                    "top1_agreement": sum(q["agree"] for q in sums) / n,
                    "perplexity": ppl,
                    "perplexity_change_pct": 100.0 * (ppl / base_ppl - 1.0),
                    "encode_us_per_token": 1e6 * statistics.median(trip.encode_s),  # a noisy machine: medians
                    "decode_us_per_token": 1e6 * statistics.median(trip.decode_s),
                    "wall_s": time.perf_counter() - t0,
                }
            )
    return base_ppl, results


__all__ = ["RoundTrip", "forward_logprobs", "measure", "quality_sums"]
