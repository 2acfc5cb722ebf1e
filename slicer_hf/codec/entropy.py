"""The entropy stage of the ECSQ quantizer (see `slicer.py` for the packet): codes under a quantized Gaussian or
a calibrated basis's per-coordinate Laplace, in one rANS stream (`constriction`), with the bounds that let a decoder
refuse a stream that cannot hold the codes it claims before it decodes them."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import numpy as np

from ..config import at_least
from ..errors import CodecError
from . import trellis
from .basis import Basis

MAX_CODE = (1 << 15) - 1  # |code| bound: steps below ~sqrt(d)/32767 clip the largest values

# constriction holds the GIL through a call, and a thread waiting for it (the server's compute thread, between two
# torch ops) waits for the call to end: large streams are coded in slices, the GIL let go between them
SLICE = 1 << 11  # symbols a call: about 0.1 ms


def encode(coder: Any, symbols: np.ndarray, model: Any, *params: np.ndarray) -> None:
    """`coder.encode_reverse(symbols, model, *params)` (per-symbol `params`, or none), a slice at a time: the last
    slice first, so the stream is the same."""
    for lo in reversed(range(0, len(symbols), SLICE)):
        if lo + SLICE < len(symbols):
            time.sleep(0)  # let another thread have the GIL
        part = slice(lo, lo + SLICE)
        coder.encode_reverse(symbols[part], model, *(p[part] for p in params))


def decode_symbols(coder: Any, count: int, model: Any, *params: np.ndarray) -> np.ndarray:
    """`count` symbols decoded with `model` (and its per-symbol `params`, or none), a slice at a time (see
    `encode`)."""
    if count <= SLICE:  # one call (a decode step's run of a trellis, say): no slicing to pay for
        return coder.decode(model, *params) if params else coder.decode(model, count)
    parts = []
    for lo in range(0, count, SLICE):
        if lo:
            time.sleep(0)
        if params:
            parts.append(coder.decode(model, *(p[lo : lo + SLICE] for p in params)))
        else:
            parts.append(coder.decode(model, min(SLICE, count - lo)))
    return np.concatenate(parts)


def decode(
    ans: bytes, n_sym: int, bound: int, step: float, basis: Basis | None = None, trellised: bool = False
) -> np.ndarray:
    """`n_sym` codes from the rANS section, row-major; a stream too short for them, or not used up exactly, is a
    `CodecError`."""
    if ans.endswith(b"\0"):
        raise CodecError("the slicer ECSQ stream ends in a zero byte (the encoder drops those)")
    # a code costs at least -log2 of the largest probability a code can have (code 0, or +B holding the upper tail),
    # so a claim of many codes needs a long enough stream (-B-1, free on an empty coder, is never a valid code)
    if basis is None:
        p_max = max(math.erf(step / (2 * math.sqrt(2))), 0.5 * math.erfc((bound - 0.5) * step / math.sqrt(2)))
        min_bits = n_sym * -math.log2(min(1.0, p_max + 2.0**-12))
    else:
        min_bits = n_sym // basis.width * min_row_bits(basis, step)
    if 8 * len(ans) + 64 < 0.9 * min_bits:
        raise CodecError(f"slicer ECSQ stream of {len(ans)} bytes is too short for {n_sym} codes")
    words = np.frombuffer(ans + b"\0" * (-len(ans) % 4), dtype="<u4").astype(np.uint32)
    try:
        coder = constriction().stream.stack.AnsCoder(words)
        if trellised:
            assert basis is not None
            family = laplace_family(bound)
            symbols = trellis.decode(
                lambda means, scales: decode_symbols(coder, len(means), family, means, scales),
                n_sym // basis.width,
                scales_in_steps(basis, step),
            ).ravel()
        else:
            symbols = decode_symbols(coder, n_sym, *models(bound, step, basis, n_sym))
        exact = coder.is_empty()
    except CodecError:
        raise
    except Exception as exc:  # constriction raises ValueError and friends on corrupt streams
        raise CodecError(f"corrupt slicer ECSQ stream: {type(exc).__name__}: {exc}") from exc
    symbols = np.asarray(symbols, dtype=np.int32)
    # an exhausted coder keeps decoding the model's lowest symbol, which no valid stream holds
    if not exact or symbols.size != n_sym or (symbols.size and symbols.min() < -bound):
        raise CodecError(f"slicer ECSQ stream does not hold exactly {n_sym} codes")
    return symbols


def models(bound: int, step: float, basis: Basis | None, n_sym: int) -> tuple[Any, ...]:
    """The entropy model of `n_sym` codes (row-major, whole rows with a basis): a quantized Gaussian of std 1/step
    for them all, or each coordinate's quantized Laplace of scale scale[i] / step.

    Codes lie in [-bound, bound]; the models' support starts one lower because rANS codes its lowest symbol onto an
    empty coder for free, which would let a few bytes claim any number of codes.
    """
    if basis is None:
        return (gaussian_model(bound, step),)
    scales = np.tile(scales_in_steps(basis, step), n_sym // basis.width)
    return laplace_family(bound), np.zeros_like(scales), scales


@functools.lru_cache(maxsize=64)
def gaussian_model(bound: int, step: float) -> Any:
    """Quantized Gaussian, mean 0, std 1/step: a row's values over its rms, in code units."""
    return constriction().stream.model.QuantizedGaussian(-bound - 1, bound, 0.0, 1.0 / step)


@functools.lru_cache(maxsize=64)
def laplace_family(bound: int) -> Any:
    return constriction().stream.model.QuantizedLaplace(-bound - 1, bound)


def constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:
        raise CodecError("quantizer='ecsq' needs the `constriction` package (pip install constriction)") from exc
    return constriction


def wire_step(step: float) -> float:
    """The step as the wire holds it (float16), never rounded to zero."""
    return max(float(np.float16(step)), float(np.finfo(np.float16).smallest_subnormal))


def step_hint(need: float) -> str:
    """The step to print for one of at least `need`: at least `need` once the wire's float16 holds it (the printed
    value, rounded up, could round below it there, and be refused again)."""
    text = at_least(need, 2)
    while wire_step(float(text)) < need:
        text = at_least(float(np.nextafter(np.float16(float(text)), np.float16(np.inf))), 2)
    return text


def gaussian_bound(avail: int, step: float) -> int:
    """|code| bound: |y| <= sqrt(d') * rms, so codes stay within it (the RMS's float16 rounding included)."""
    return min(math.ceil(1.002 * math.sqrt(avail) / step) + 1, MAX_CODE)


def calibrated_bound(basis: Basis, step: float) -> int:
    """|code| bound of a calibrated basis at this step: its largest coordinate bound, in steps."""
    bound = 1.002 * basis.code_bound / step + 1
    return MAX_CODE if bound >= MAX_CODE else math.ceil(bound)


@functools.lru_cache(maxsize=64)
def scales_in_steps(basis: Basis, step: float) -> np.ndarray:
    """Each coordinate's Laplace scale in steps `[d]` float64 (read-only: shared by every packet at this step)."""
    scales = basis.f64["scale"].numpy() / step
    scales.flags.writeable = False
    return scales


@functools.lru_cache(maxsize=64)
def min_row_bits(basis: Basis, step: float) -> float:
    """The fewest bits a row of codes can take: each coordinate's Laplace puts at most P(0) = 1 - exp(-step / (2
    scale)) on one code."""
    p_zero = -np.expm1(-step / (2.0 * basis.f64["scale"].numpy()))
    return float(-np.log2(np.minimum(1.0, np.maximum(p_zero, 0.5) + 2.0**-12)).sum())
