"""The SLICER codec's hot path behind one dispatch point: pure-torch references (the specification) and Triton kernels.

Ops (each has one fixed signature; the torch body below is the reference, `slicer_hf._triton_kernels` the kernels):

- `top_positions(x, n)`: the n largest-magnitude positions of each row, ascending (the exact outliers).
- `quantize_rows(y, ...)`: ATKF selection, MS block labels, ABQ block statistics and bitwidths, magnitude codes.
- `pack_bits(codes, widths, bit_offset)` / `unpack_bits(data, widths, bit_offset)`: the LSB-first bitstream of
  `bits.BitWriter` / `bits.BitReader`, for variable-width fields.
- `dequantize_rows(...)`: decode's dequantize, sign and scatter into zero rows.

Dispatch (`use_kernels`, the only place that decides): `SLICER_HF_FORCE_REFERENCE=1` forces the reference; CUDA
tensors use the kernels when Triton imports; CPU tensors use them only when `SLICER_HF_KERNELS=interpret` and the
Triton interpreter is on (`TRITON_INTERPRET=1` before `triton` is first imported: a test-only route); everything
else uses the reference. Every op also takes `backend="reference" | "kernels"` to force one side.

Kernels produce the same selection, codes, bytes and decoded values as the reference. The one place they can
differ is a bitwidth choice whose block error lies within float32 rounding of the budget: both sides sum squared
errors in float32, and torch fixes no summation order (the CPU and CUDA references differ there the same way).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import torch

from ..errors import CodecError

ENV_FORCE_REFERENCE = "SLICER_HF_FORCE_REFERENCE"
ENV_KERNELS = "SLICER_HF_KERNELS"
BACKENDS = ("reference", "kernels")
FP16_MAX = float(torch.finfo(torch.float16).max)
FP16_TINY = float(torch.finfo(torch.float16).tiny)  # the smallest normal float16
MAX_KERNEL_D = 16384  # wider rows than this stay on the reference (a row must fit one program's registers)
FIELD_BYTES = 5  # bytes a bitstream field of <= 32 bits can touch
CHUNK_FIELDS = 1 << 18  # fields (or kept entries) the reference decode works on at once
REFERENCE_CHUNK_VALUES = 1 << 16  # values of the rows the reference quantizer works on at once


# ------------------------------------------------------------------------------------------------- dispatch
@functools.lru_cache(maxsize=1)
def _kernel_module() -> ModuleType | None:
    try:
        return importlib.import_module("slicer_hf._triton_kernels")
    except ImportError:  # no triton, or an install without the kernels
        return None
    except Exception as exc:  # a broken triton install must not take the codec down with it
        warnings.warn(f"Triton kernels unavailable, the codec uses its torch reference: {exc!r}", stacklevel=2)
        return None


def kernels_importable() -> bool:
    """Whether Triton and `slicer_hf._triton_kernels` import."""
    return _kernel_module() is not None


def use_kernels(device: torch.device | str, backend: str | None = None) -> bool:
    """The dispatch rule: True where the Triton kernels run for tensors on `device`.

    Args:
        device: where the op's tensors live.
        backend: None applies the rule; "reference" or "kernels" forces a side (forcing the kernels where they
            cannot run is a `CodecError`, not a silent fallback).
    """
    device = torch.device(device)
    if backend is not None:
        if backend not in BACKENDS:
            raise CodecError(f"`backend` must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "kernels":
            _require_kernels(device)
        return backend == "kernels"
    if os.environ.get(ENV_FORCE_REFERENCE) == "1":
        return False
    if device.type == "cuda":
        return kernels_importable()
    if device.type == "cpu" and os.environ.get(ENV_KERNELS) == "interpret":
        return kernels_importable() and _kernel_module().interpreter_active()
    return False


def _require_kernels(device: torch.device) -> None:
    module = _kernel_module()
    if module is None:
        raise CodecError("the Triton kernels need `triton` (pip install 'slicer-hf[triton]')")
    if device.type == "cpu" and not module.interpreter_active():
        raise CodecError(
            "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1, set before triton is imported"
        )
    if device.type not in ("cpu", "cuda"):
        raise CodecError(f"no Triton kernels for {device.type} tensors")


_T = TypeVar("_T")


class KernelError(RuntimeError):
    """A Triton kernel failed on input the codec had checked (its device or memory failed, or the kernel has a bug):
    the machine's fault, never the packet's, so a decode does not call the packet malformed."""


def _launch(kernel: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    try:
        return kernel(*args, **kwargs)
    except Exception as exc:
        raise KernelError(f"the Triton kernel {kernel.__name__} failed: {type(exc).__name__}: {exc}") from exc


def _kernels(t: torch.Tensor, backend: str | None, d: int | None = None) -> ModuleType | None:
    """The kernel module when `t`'s op should run there, else None (the reference). The kernels rank float32 keys:
    float64 rows, whose magnitudes float32 could tie, go to the reference unless the kernels are asked for."""
    if backend is None and (d is not None and d > MAX_KERNEL_D or t.dtype == torch.float64):
        return None
    return _kernel_module() if use_kernels(t.device, backend) else None


# ------------------------------------------------------------------------------------------------- encode
@dataclass(frozen=True)
class QuantizedRows:
    """ATKF + MS + ABQ result for `[N, d]` rows; per-entry tensors are in position order.

    Codes of 0-bit blocks are unspecified: they never reach the wire.
    """

    positions: torch.Tensor  # [N, K] int64, ascending kept positions
    labels: torch.Tensor  # [N, K] int64, block of each kept entry
    signs: torch.Tensor  # [N, K] bool, True where negative
    codes: torch.Tensor  # [N, K] int64, magnitude codes
    lo: torch.Tensor  # [N, M] float32, block offset
    hi: torch.Tensor  # [N, M] float32, block top
    bits: torch.Tensor  # [N, M] int64, block bitwidth
    wide: bool  # lo/hi need float32 on the wire


def block_sizes(k: int, m: int) -> list[int]:
    """MS: `m` equal-cardinality block sizes for `k` entries, the first `k % m` one larger."""
    return [k // m + (1 if j < k % m else 0) for j in range(m)]


def top_positions(x: torch.Tensor, n: int, backend: str | None = None) -> torch.Tensor:
    """The `n` largest-magnitude positions of each row of `x` `[N, d]`, ascending; ties to the lowest index (every
    position where `n` >= d)."""
    n = min(n, x.shape[1])
    kernels = _kernels(x, backend, x.shape[1]) if x.shape[0] and n else None
    if kernels is not None:
        return _launch(kernels.select_rows, x, n, 1)[0]
    return torch.sort(torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :n]).values


def quantize_rows(
    y: torch.Tensor,
    k: int,
    m: int,
    k_pos: int | None,
    excluded: torch.Tensor | None,
    candidates: tuple[int, ...],
    distortion: float,
    backend: str | None = None,
) -> QuantizedRows:
    """ATKF, MS and ABQ for float32 rows `y` `[N, d]`.

    Args:
        y: rows to code, float32.
        k: entries kept per row (exact K).
        m: magnitude blocks per row (1 <= m <= k).
        k_pos: positives kept per row (asymmetric filtering), or None for plain magnitude top-K.
        excluded: `[N, E]` positions that rank after every other entry (exact outliers), or None.
        candidates: allowed bitwidths, ascending.
        distortion: ABQ budget, the RMS error allowed per kept entry relative to the kept entries' RMS.
        backend: force "reference" or "kernels"; None dispatches.
    """
    if y.dtype in (torch.float16, torch.bfloat16):  # the kernels work in float32: so does the reference
        y = y.float()
    kernels = _kernels(y, backend, y.shape[1]) if y.shape[0] and k else None
    if kernels is None:
        return _quantize_rows_reference(y, k, m, k_pos, excluded, candidates, distortion)
    positions, labels, vals = _launch(kernels.select_rows, y, k, m, k_pos, excluded, with_values=True)
    if needs_float32(vals.abs().amax(1)):  # the kept entries need float32 block parameters: the reference's job
        return _quantize_rows_reference(y, k, m, k_pos, excluded, candidates, distortion)
    codes, signs, lo, hi, bits = _launch(kernels.quantize_selected, vals, labels, m, candidates, distortion)
    return QuantizedRows(positions, labels, signs, codes, lo, hi, bits, wide=False)


def _quantize_rows_reference(
    y: torch.Tensor,
    k: int,
    m: int,
    k_pos: int | None,
    excluded: torch.Tensor | None,
    candidates: tuple[int, ...],
    distortion: float,
    wide: bool | None = None,
) -> QuantizedRows:
    """`quantize_rows` in torch, a chunk of rows at a time: its working set (the candidates' codes and errors of
    every kept entry, the ranks of every entry) is hundreds of bytes a value, so a packet of many rows is bounded by
    `REFERENCE_CHUNK_VALUES`, not by its size. `wide`: float32 block parameters (None: as the rows need)."""
    rows = max(1, REFERENCE_CHUNK_VALUES // max(y.shape[1], 1))
    if y.shape[0] <= rows:
        return _quantize_chunk(y, k, m, k_pos, excluded, candidates, distortion, wide)

    def chunks(wide: bool | None) -> list[QuantizedRows]:
        return [
            _quantize_chunk(
                y[i : i + rows], k, m, k_pos, None if excluded is None else excluded[i : i + rows], candidates,
                distortion, wide,
            )
            for i in range(0, y.shape[0], rows)
        ]  # fmt: skip

    parts = chunks(wide)
    if len({part.wide for part in parts}) > 1:  # one packet has one width of block parameters: float32 for all
        parts = chunks(True)
    fields = [torch.cat([getattr(part, f.name) for part in parts]) for f in dataclasses.fields(QuantizedRows)[:-1]]
    return QuantizedRows(*fields, wide=parts[0].wide)


def _quantize_chunk(
    y: torch.Tensor,
    k: int,
    m: int,
    k_pos: int | None,
    excluded: torch.Tensor | None,
    candidates: tuple[int, ...],
    distortion: float,
    wide: bool | None,
) -> QuantizedRows:
    order = rank_order(y, k, k_pos, excluded)  # [N, K] in rank order
    vals = y.gather(1, order)
    mags, signs = vals.abs(), vals < 0
    sizes = block_sizes(k, m)
    block_of_rank = torch.repeat_interleave(
        torch.arange(m, device=y.device), torch.tensor(sizes, dtype=torch.long, device=y.device)
    )
    if wide is None:  # decided before any float16 rounding
        wide = needs_float32(mags.amax(1)) if mags.numel() else False
    lo, hi, bits = choose_bits(mags, sizes, candidates, distortion, wide)  # each [N, M]
    codes = quantize(mags, lo[:, block_of_rank], hi[:, block_of_rank], bits[:, block_of_rank])
    positions, perm = torch.sort(order, dim=1)  # position order
    return QuantizedRows(
        positions,
        block_of_rank[perm],
        signs.gather(1, perm),
        codes.gather(1, perm).to(torch.int64),
        lo,
        hi,
        bits,
        wide,
    )


def rank_order(y: torch.Tensor, k: int, k_pos: int | None, excluded: torch.Tensor | None) -> torch.Tensor:
    """ATKF: `[N, K]` positions in rank order (chosen-by-sign first, then magnitude); ties to the lowest index."""
    group = torch.zeros_like(y, dtype=torch.long)
    if k_pos is not None:
        pos_rank = _rank(torch.where(y > 0, y, -math.inf))
        neg_rank = _rank(torch.where(y < 0, -y, -math.inf))
        n_p = torch.minimum(torch.tensor(k_pos, device=y.device), (y > 0).sum(1, keepdim=True))
        n_n = torch.minimum(k - n_p, (y < 0).sum(1, keepdim=True))
        chosen = ((y > 0) & (pos_rank < n_p)) | ((y < 0) & (neg_rank < n_n))
        group = torch.where(chosen, 0, 1)
    if excluded is not None and excluded.numel():
        group = group.scatter(1, excluded, 2)
    by_mag = torch.sort(y.abs(), dim=1, descending=True, stable=True).indices
    by_group = torch.sort(group.gather(1, by_mag), dim=1, stable=True).indices
    return by_mag.gather(1, by_group)[:, :k]


def choose_bits(
    mags: torch.Tensor, sizes: list[int], candidates: tuple[int, ...], distortion: float, wide: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ABQ: per block of rank-ordered `mags` `[N, K]`, the smallest candidate whose error stays under budget.

    Returns `lo`, `hi` (as the wire holds them: float16-rounded unless `wide`) and `bits` (int64), each `[N, M]`.
    """
    n, k = mags.shape
    cands = torch.tensor(candidates, dtype=torch.float32, device=mags.device)
    # errors and budget in units of each row's peak: squares of tiny rows (below 1e-19) would underflow to 0
    unit = mags.amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) if k else mags.new_ones(n, 1)
    budget = (distortion**2) * (mags / unit).pow(2).sum(1, keepdim=True) / max(k, 1)  # per entry, [N, 1]
    lo, hi, bits = [], [], []
    start = 0
    for size in sizes:
        blk = mags[:, start : start + size]  # [N, n_j]
        start += size
        b_lo, b_hi = blk.min(1).values, blk.max(1).values
        b_lo, b_hi = round_params(b_lo, wide), round_params(b_hi, wide)
        c = cands[None, None, :]
        codes = quantize(blk[:, :, None], b_lo[:, None, None], b_hi[:, None, None], c)
        err = (dequantize(b_lo[:, None, None], b_hi[:, None, None], c, codes) - blk[:, :, None]) / unit[:, :, None]
        err = err.pow(2).sum(1)
        ok = err <= budget * size  # [N, C]
        last = torch.tensor(len(cands) - 1, device=mags.device)
        first_ok = torch.where(ok.any(1), ok.float().argmax(1), last)
        lo.append(b_lo), hi.append(b_hi), bits.append(cands[first_ok].to(torch.long))
    return torch.stack(lo, 1), torch.stack(hi, 1), torch.stack(bits, 1)


def quantize(mag: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 2^bits - 1] (as float) for magnitudes on a block's [lo, hi] grid. Shapes broadcast."""
    levels = (2.0 ** bits.float()) - 1.0
    span = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round((mag - lo) / span * levels).clamp(min=torch.zeros_like(levels), max=levels)


def dequantize(lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Magnitudes from codes; 0-bit blocks decode to the middle of [lo, hi]. Shapes broadcast."""
    levels = (2.0 ** bits.float()) - 1.0
    step = torch.where(levels > 0, (hi - lo) / levels.clamp_min(1.0), torch.zeros_like(lo))
    mid = (lo + hi) / 2
    return torch.where(levels > 0, lo + codes.float() * step, mid)


def needs_float32(row_peaks: torch.Tensor) -> bool:
    """Whether a packet's parameters must go as float32, from each row's largest magnitude: beyond float16's range,
    or below its normal range (float16 would flush or coarsen every value such a row holds)."""
    return bool(((row_peaks > FP16_MAX) | ((row_peaks > 0) & (row_peaks < FP16_TINY))).any())


def cast(x: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """Decoded values `x` in the tensor's `dtype`: into float16, held within its range (a reconstruction may overshoot
    a value near its largest by a fraction of a step, which would become infinite); what decoded to infinity or NaN
    stays so, for the decoder to refuse."""
    if dtype == torch.float16 and x.dtype != torch.float16:
        x = x.float()  # (in float32: bfloat16 holds no 65504)
        x = torch.where(x.isfinite(), x.clamp(-FP16_MAX, FP16_MAX), x)
    return x.to(device, dtype)


def round_params(t: torch.Tensor, wide: bool) -> torch.Tensor:
    """Block parameters as the wire holds them: float16 values (clamped to its range) unless `wide`."""
    return t if wide else t.clamp(max=FP16_MAX).to(torch.float16).float()


def _rank(key: torch.Tensor) -> torch.Tensor:
    """Descending rank of each entry in its row (stable)."""
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(key.shape[1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


# ------------------------------------------------------------------------------------------------- bitstream
def pack_bits(
    codes: torch.Tensor, widths: torch.Tensor, bit_offset: int = 0, backend: str | None = None
) -> torch.Tensor:
    """Pack `codes[i]` in `widths[i]` bits (0..32), LSB first, after `bit_offset` zero bits (0..7).

    Returns uint8 `[ceil((bit_offset + sum(widths)) / 8)]`, zero-padded: what `BitWriter` makes of the same fields.
    """
    codes, widths = codes.reshape(-1), widths.reshape(-1).to(torch.int64)
    if not 0 <= bit_offset < 8:
        raise CodecError(f"`bit_offset` must be in [0, 8), got {bit_offset}")
    kernels = _kernels(codes, backend) if codes.numel() else None
    if kernels is not None:
        return _launch(kernels.pack_bits, codes, widths, bit_offset)
    starts = bit_offset + torch.cumsum(widths, 0) - widths
    total = bit_offset + int(widths.sum())
    # a field of <= 32 bits moved by < 8 touches at most 5 bytes; fields share no bits, so adding their bytes is OR
    byte_shifts = torch.arange(0, 8 * FIELD_BYTES, 8, device=codes.device)
    stream = torch.zeros(math.ceil(total / 8) + FIELD_BYTES, dtype=torch.int64, device=codes.device)
    for lo in range(0, len(codes), CHUNK_FIELDS):  # a chunk at a time: each field's bytes take 80 bytes of int64
        part, at = slice(lo, lo + CHUNK_FIELDS), starts[lo : lo + CHUNK_FIELDS]
        shifted = (codes[part].to(torch.int64) & ((1 << widths[part]) - 1)) << (at & 7)
        index = ((at >> 3)[:, None] + torch.arange(FIELD_BYTES, device=codes.device)).reshape(-1)
        stream.index_add_(0, index, ((shifted[:, None] >> byte_shifts) & 0xFF).reshape(-1))
    return stream[: math.ceil(total / 8)].to(torch.uint8)


def unpack_bits(
    data: torch.Tensor, widths: torch.Tensor, bit_offset: int = 0, backend: str | None = None
) -> torch.Tensor:
    """Read back `pack_bits`: int64 codes of `widths[i]` bits (0..32) each, starting at bit `bit_offset` of `data`.

    Raises:
        CodecError: the fields run past the end of `data`.
    """
    widths = widths.reshape(-1).to(torch.int64)
    total = int(widths.sum())
    if bit_offset < 0 or bit_offset + total > data.numel() * 8:
        raise CodecError(
            f"bitstream truncated: need {total} bits at bit {bit_offset}, have {data.numel() * 8 - bit_offset}"
        )
    data, bit_offset = data[bit_offset >> 3 : (bit_offset + total + 7) >> 3], bit_offset & 7  # only the fields' bytes
    kernels = _kernels(data, backend) if widths.numel() and total else None
    if kernels is not None:
        return _launch(kernels.unpack_bits, data, widths, bit_offset)
    starts = bit_offset + torch.cumsum(widths, 0) - widths
    # each field's 8 bytes from its first one, read as one little-endian integer: a field of <= 32 bits moved by < 8
    # lies within them (one gather of 8 bytes a field, where the bytes one by one cost five gathers and a sum)
    windows = torch.cat([data, data.new_zeros(8)]).unfold(0, 8, 1)
    out = torch.empty_like(widths)
    for a in range(0, len(widths), CHUNK_FIELDS):  # a bounded working set: a chunk of fields at a time
        at, width = starts[a : a + CHUNK_FIELDS], widths[a : a + CHUNK_FIELDS]
        gathered = windows[at >> 3]
        joined = (gathered if sys.byteorder == "little" else gathered.flip(-1)).view(torch.int64).reshape(-1)
        out[a : a + CHUNK_FIELDS] = (joined >> (at & 7)) & ((1 << width) - 1)
    return out


# ------------------------------------------------------------------------------------------------- decode
def dequantize_rows(
    positions: torch.Tensor,
    labels: torch.Tensor,
    signs: torch.Tensor,
    codes: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: torch.Tensor,
    d: int,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode's hot path: kept entries `[N, K]` back to float32 rows `[N, d]` (zeros where nothing was kept).

    Args:
        positions, labels, signs, codes: per kept entry, as in `QuantizedRows`.
        lo, hi, bits: per block `[N, M]`.
        d: row width.
        backend: force "reference" or "kernels"; None dispatches.
    """
    n_rows = positions.shape[0]
    kernels = _kernels(codes, backend) if codes.numel() else None
    if kernels is not None:
        return _launch(kernels.dequantize_rows, positions, labels, signs, codes, lo, hi, bits, d)
    out = torch.zeros(n_rows, d, device=codes.device)
    rows = max(1, CHUNK_FIELDS // max(1, positions.shape[1]))
    for a in range(0, n_rows, rows):  # a chunk of rows at a time: the working set stays bounded
        part = slice(a, a + rows)
        block = labels[part]
        lo_, hi_, bits_ = (t[part].gather(1, block) for t in (lo, hi, bits))
        vals = dequantize(lo_, hi_, bits_, codes[part])
        out[part].scatter_(1, positions[part], torch.where(signs[part], -vals, vals))
    return out
