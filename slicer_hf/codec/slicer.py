"""The SLICER codec: exact outliers, optional fixed rotation, asymmetric top-K filtering (ATKF), magnitude
splitting into equal-cardinality blocks (MS), adaptive per-block bitwidths under a distortion budget (ABQ),
the cheaper index coding per row, and an optional entropy stage.

Payload after the envelope::

    [flags u8][K varint][M u8][n_out u8][body]         body zstd-compressed when flags says so
    body, one LSB-first bitstream:
      outlier positions  N*n_out x ceil(log2 d) bits      outlier values  N*n_out x 16|32 bits
      kept positions     (absent when every candidate position is kept)
      block labels       N*K x ceil(log2 M) bits, in position order
      block bitwidths    N*M x 5 bits                     block lo, hi    N*M*2 x 16|32 bits
      signs              N*K bits                          magnitude codes N*K x bitwidth(block)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import zstandard

from ..errors import CodecError
from .base import Codec
from .bits import BitReader, BitWriter, Reader, write_varint
from .indices import read_positions, write_positions

F_ROTATION, F_ZSTD, F_WIDE_PARAMS, F_WIDE_OUTLIERS = 1, 2, 4, 8
FP16_MAX = float(torch.finfo(torch.float16).max)
ROTATION_BLOCK = 1024
ROTATION_SEED = 0x51C3


@functools.lru_cache(maxsize=16)
def rotation_blocks(d: int) -> tuple[tuple[int, torch.Tensor], ...]:
    """Block-diagonal seeded random orthogonal transform for width d: ((start, Q[b, b]), ...)."""
    n_blocks = math.ceil(d / ROTATION_BLOCK)
    bounds = np.linspace(0, d, n_blocks + 1).round().astype(int)
    blocks = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        size = int(stop - start)
        gen = torch.Generator().manual_seed(ROTATION_SEED + size)
        q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))[None, :]  # unique, deterministic orthogonal factor
        blocks.append((int(start), q.to(torch.float32)))
    return tuple(blocks)


def rotate(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    out = torch.empty_like(x)
    for start, q in rotation_blocks(x.shape[-1]):
        stop = start + q.shape[0]
        out[:, start:stop] = x[:, start:stop] @ (q.T if inverse else q)
    return out


def block_sizes(k: int, m: int) -> list[int]:
    return [k // m + (1 if j < k % m else 0) for j in range(m)]


def dequantize(lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Magnitudes from codes; 0-bit blocks decode to the middle of [lo, hi]. Shapes broadcast."""
    levels = (2.0 ** bits.float()) - 1.0
    step = torch.where(levels > 0, (hi - lo) / levels.clamp_min(1.0), torch.zeros_like(lo))
    mid = (lo + hi) / 2
    return torch.where(levels > 0, lo + codes.float() * step, mid)


def quantize(mag: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    levels = (2.0 ** bits.float()) - 1.0
    span = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round((mag - lo) / span * levels).clamp(min=torch.zeros_like(levels), max=levels)


class SlicerCodec(Codec):
    """SLICER: see the module docstring for the stages and the bitstream."""

    name = "slicer"
    codec_id = 6

    def __init__(
        self,
        sparsity: float = 0.0,
        asymmetry: float | str = "auto",
        num_blocks: int = 1,
        distortion: float = 0.08,
        bit_candidates: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8),
        index_coding: str = "auto",
        outliers: int = 2,
        rotation: str = "orthogonal",
        entropy_coding: str = "zstd",
        zstd_level: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from ..config import SlicerConfig  # one place validates the knobs

        cfg = SlicerConfig(
            codec="slicer",
            sparsity=sparsity,
            asymmetry=asymmetry,
            num_blocks=num_blocks,
            distortion=distortion,
            bit_candidates=tuple(bit_candidates),
            index_coding=index_coding,
            outliers=outliers,
            rotation=rotation,
            entropy_coding=entropy_coding,
        )
        self._params = cfg.codec_params()
        for key, value in self._params.items():
            setattr(self, key, value)
        self.zstd_level = zstd_level

    def params(self) -> dict[str, Any]:
        return {**self._params, "bit_candidates": list(self.bit_candidates)}

    # ---------------------------------------------------------------- encode
    def _encode_rows(self, rows: torch.Tensor) -> bytes:
        x = rows.float()  # [N, d]
        n, d = x.shape
        n_out = min(self.outliers, d)
        rotated = self.rotation == "orthogonal"
        w = BitWriter()

        residual = x
        out_pos = torch.zeros(n, 0, dtype=torch.long)
        if n_out:
            out_pos = torch.sort(torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :n_out]).values
            out_val = x.gather(1, out_pos)
            wide_out = bool(out_val.abs().max() > FP16_MAX)
            residual = x.scatter(1, out_pos, 0.0)
            w.write(out_pos.numpy(), max(1, math.ceil(math.log2(d))))
            w.write(_float_bits(out_val, wide_out), 32 if wide_out else 16)
        y = rotate(residual) if rotated else residual  # [N, d]

        avail = d if rotated else d - n_out
        k = min(avail, max(1, round((1.0 - self.sparsity) * avail))) if avail else 0
        order = self._select(y, out_pos if not rotated else None, k)  # [N, K] in magnitude order
        implicit = k == avail
        m = max(1, min(self.num_blocks, k))

        vals = y.gather(1, order)  # [N, K]
        mags, signs = vals.abs(), vals < 0
        sizes = block_sizes(k, m)
        block_of_rank = torch.repeat_interleave(torch.arange(m), torch.tensor(sizes, dtype=torch.long))
        lo, hi, bits = self._choose_bits(mags, sizes)  # each [N, M]
        wide = bool(hi.abs().max() > FP16_MAX) if hi.numel() else False
        lo, hi = _round_params(lo, wide), _round_params(hi, wide)
        codes = quantize(mags, lo[:, block_of_rank], hi[:, block_of_rank], bits[:, block_of_rank])

        pos, perm = torch.sort(order, dim=1)  # position order
        labels = block_of_rank[perm]
        if not implicit:
            write_positions(w, pos.numpy(), d, self.index_coding)
        if m > 1:
            w.write(labels.numpy(), math.ceil(math.log2(m)))
        w.write(bits.numpy(), 5)
        w.write(_float_bits(torch.stack([lo, hi], dim=2), wide), 32 if wide else 16)
        w.write(signs.gather(1, perm).numpy(), 1)
        w.write(codes.gather(1, perm).to(torch.int64).numpy(), bits.gather(1, labels).numpy())

        body = w.getvalue()
        flags = (F_ROTATION if rotated else 0) | (F_WIDE_PARAMS if wide else 0)
        if n_out and wide_out:
            flags |= F_WIDE_OUTLIERS
        if self.entropy_coding == "zstd":
            packed = zstandard.ZstdCompressor(
                level=self.zstd_level, write_content_size=False, write_checksum=False
            ).compress(body)
            if len(packed) < len(body):
                body, flags = packed, flags | F_ZSTD
        return bytes([flags]) + write_varint(k) + bytes([m, n_out]) + body

    def _select(self, y: torch.Tensor, excluded: torch.Tensor | None, k: int) -> torch.Tensor:
        """ATKF: K positions per row in magnitude order; exact K, ties to the lowest index."""
        group = torch.zeros_like(y, dtype=torch.long)
        if self.asymmetry != "auto":
            k_pos = round(float(self.asymmetry) * k)
            pos_rank = _rank(torch.where(y > 0, y, -math.inf))
            neg_rank = _rank(torch.where(y < 0, -y, -math.inf))
            n_p = torch.minimum(torch.tensor(k_pos), (y > 0).sum(1, keepdim=True))
            n_n = torch.minimum(k - n_p, (y < 0).sum(1, keepdim=True))
            chosen = ((y > 0) & (pos_rank < n_p)) | ((y < 0) & (neg_rank < n_n))
            group = torch.where(chosen, 0, 1)
        if excluded is not None and excluded.numel():
            group = group.scatter(1, excluded, 2)
        by_mag = torch.sort(y.abs(), dim=1, descending=True, stable=True).indices
        by_group = torch.sort(group.gather(1, by_mag), dim=1, stable=True).indices
        return by_mag.gather(1, by_group)[:, :k]

    def _choose_bits(self, mags: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        """ABQ: per block, the smallest candidate bitwidth whose error share stays under the budget."""
        n, k = mags.shape
        cands = torch.tensor(self.bit_candidates, dtype=torch.float32)
        budget = (self.distortion**2) * mags.pow(2).sum(1, keepdim=True) / max(k, 1)  # per entry, [N, 1]
        lo, hi, bits = [], [], []
        start = 0
        for size in sizes:
            blk = mags[:, start : start + size]  # [N, n_j]
            start += size
            b_lo, b_hi = blk.min(1).values, blk.max(1).values
            b_lo, b_hi = _round_params(b_lo, False), _round_params(b_hi, False)
            c = cands[None, None, :]
            codes = quantize(blk[:, :, None], b_lo[:, None, None], b_hi[:, None, None], c)
            err = (dequantize(b_lo[:, None, None], b_hi[:, None, None], c, codes) - blk[:, :, None]).pow(2).sum(1)
            ok = err <= budget * size  # [N, C]
            first_ok = torch.where(ok.any(1), ok.float().argmax(1), torch.tensor(len(cands) - 1))
            lo.append(b_lo), hi.append(b_hi), bits.append(cands[first_ok].to(torch.long))
        return torch.stack(lo, 1), torch.stack(hi, 1), torch.stack(bits, 1)

    # ---------------------------------------------------------------- decode
    def _decode_rows(self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        flags = reader.u8()
        if flags & ~(F_ROTATION | F_ZSTD | F_WIDE_PARAMS | F_WIDE_OUTLIERS):
            raise CodecError(f"unknown slicer flags {flags:#x}")
        k = reader.varint(limit=d)
        m, n_out = reader.u8(), reader.u8()
        rotated = bool(flags & F_ROTATION)
        avail = d if rotated else d - n_out
        if n_out > d or k > avail or not 1 <= m <= 64 or (k and m > k):
            raise CodecError(f"inconsistent slicer header: d={d}, K={k}, M={m}, outliers={n_out}")
        body = reader.take(reader.remaining())
        if flags & F_ZSTD:
            limit = n_rows * (d * 40 + 64 * 85) // 8 + 64  # the largest body these counts can need
            try:
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
            except zstandard.ZstdError as exc:
                raise CodecError(f"corrupt zstd body: {exc}") from exc
        if len(body) * 8 < n_rows * (k + m * 37):
            raise CodecError(f"slicer body of {len(body)} bytes is too short for {n_rows} rows of K={k}")
        r = BitReader(body)

        residual_pos = torch.zeros(n_rows, 0, dtype=torch.long)
        if n_out:
            residual_pos = torch.from_numpy(
                r.read(n_rows * n_out, max(1, math.ceil(math.log2(d)))).astype(np.int64)
            ).reshape(n_rows, n_out)
            if (residual_pos >= d).any():
                raise CodecError("outlier position out of range")
            out_val = _bits_float(
                r.read(n_rows * n_out, 32 if flags & F_WIDE_OUTLIERS else 16), bool(flags & F_WIDE_OUTLIERS)
            ).reshape(n_rows, n_out)
        if k == avail:
            pos = torch.arange(d).expand(n_rows, d)
            if not rotated and n_out:
                keep = torch.ones(n_rows, d, dtype=torch.bool).scatter(1, residual_pos, False)
                if (keep.sum(1) != k).any():
                    raise CodecError("duplicate outlier positions")
                pos = pos[keep].reshape(n_rows, k)
        else:
            pos = torch.from_numpy(read_positions(r, n_rows, k, d))
        labels = torch.zeros(n_rows, k, dtype=torch.long)
        if m > 1:
            labels = torch.from_numpy(r.read(n_rows * k, math.ceil(math.log2(m))).astype(np.int64)).reshape(n_rows, k)
            if (labels >= m).any():
                raise CodecError("block label out of range")
        bits = torch.from_numpy(r.read(n_rows * m, 5).astype(np.int64)).reshape(n_rows, m)
        if (bits > 16).any():
            raise CodecError("block bitwidth above 16")
        wide = bool(flags & F_WIDE_PARAMS)
        params = _bits_float(r.read(n_rows * m * 2, 32 if wide else 16), wide).reshape(n_rows, m, 2)
        signs = torch.from_numpy(r.read(n_rows * k, 1).astype(bool)).reshape(n_rows, k)
        widths = bits.gather(1, labels)
        codes = torch.from_numpy(r.read(n_rows * k, widths.numpy().ravel()).astype(np.int64)).reshape(n_rows, k)
        r.check_end()

        lo, hi = params[..., 0].gather(1, labels), params[..., 1].gather(1, labels)
        vals = dequantize(lo, hi, widths, codes)
        vals = torch.where(signs, -vals, vals)
        y = torch.zeros(n_rows, d).scatter(1, pos, vals)
        x = rotate(y, inverse=True) if rotated else y
        if n_out:
            x = x.scatter(1, residual_pos, out_val)
        return x.to(dtype)


def _rank(key: torch.Tensor) -> torch.Tensor:
    """Descending rank of each entry in its row (stable)."""
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(1, order, torch.arange(key.shape[1]).expand_as(order))


def _round_params(t: torch.Tensor, wide: bool) -> torch.Tensor:
    return t if wide else t.clamp(max=FP16_MAX).to(torch.float16).float()


def _float_bits(t: torch.Tensor, wide: bool) -> np.ndarray:
    if wide:
        return t.float().contiguous().numpy().view(np.uint32).ravel()
    return t.to(torch.float16).contiguous().numpy().view(np.uint16).ravel()


def _bits_float(codes: np.ndarray, wide: bool) -> torch.Tensor:
    arr = codes.astype(np.uint32).view(np.float32) if wide else codes.astype(np.uint16).view(np.float16)
    t = torch.from_numpy(arr.astype(np.float32))
    if not torch.isfinite(t).all():
        raise CodecError("non-finite codec parameter")
    return t
