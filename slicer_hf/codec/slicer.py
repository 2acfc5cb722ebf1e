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

Selection, quantization, packing and dequantization run through `ops` (one dispatch point: the pure-torch
reference, or Triton kernels on CUDA); the outlier and kept-position sections and zstd stay on the host.
"""

from __future__ import annotations

import functools
import math
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
import zstandard

from ..errors import CodecError
from . import ops
from .base import Codec
from .bits import BitReader, BitWriter, Reader, write_varint
from .indices import read_positions, write_positions
from .ops import FP16_MAX

F_ROTATION, F_ZSTD, F_WIDE_PARAMS, F_WIDE_OUTLIERS = 1, 2, 4, 8
ROTATION_BLOCK = 1024
ROTATION_SEED = 0x51C3
# Where `_decode_rows` builds its rows: set by `SlicerCodec.decode` when the kernels run on the target device.
_DECODE_DEVICE: ContextVar[torch.device | None] = ContextVar("slicer_decode_device", default=None)


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


@functools.lru_cache(maxsize=16)
def _rotation_on(d: int, device: torch.device) -> tuple[tuple[int, torch.Tensor], ...]:
    return tuple((start, q.to(device)) for start, q in rotation_blocks(d))


def rotate(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    out = torch.empty_like(x)
    for start, q in _rotation_on(x.shape[-1], x.device):
        stop = start + q.shape[0]
        out[:, start:stop] = x[:, start:stop] @ (q.T if inverse else q)
    return out


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
    def _codes_on(self, device: torch.device) -> bool:
        return ops.use_kernels(device)  # rows stay where the codec kernels run

    def _encode_rows(self, rows: torch.Tensor) -> bytes:
        x = rows.float()  # [N, d], on the rows' device
        n, d = x.shape
        n_out = min(self.outliers, d)
        rotated = self.rotation == "orthogonal"
        w = _CountingWriter()

        residual, out_pos, wide_out = x, None, False
        if n_out:
            out_pos = ops.top_positions(x, n_out)  # [N, n_out], ascending
            out_val = x.gather(1, out_pos)
            wide_out = bool(out_val.numel() and out_val.abs().max() > FP16_MAX)
            residual = x.scatter(1, out_pos, 0.0)
            w.write(out_pos.cpu().numpy(), max(1, math.ceil(math.log2(d))))
            w.write(_float_bits(out_val.cpu(), wide_out), 32 if wide_out else 16)
        y = rotate(residual) if rotated else residual  # [N, d]

        avail = d if rotated else d - n_out
        k = min(avail, max(1, round((1.0 - self.sparsity) * avail))) if avail and n else 0
        if k == 0:  # no rows, or every entry is an exact outlier: nothing left to filter (M = 0)
            flags = F_WIDE_OUTLIERS if n_out and wide_out else 0
            return bytes([flags]) + write_varint(0) + bytes([0, n_out]) + w.getvalue()
        m = max(1, min(self.num_blocks, k))
        k_pos = None if self.asymmetry == "auto" else round(float(self.asymmetry) * k)
        q = ops.quantize_rows(y, k, m, k_pos, None if rotated else out_pos, self.bit_candidates, self.distortion)
        if k != avail:
            write_positions(w, q.positions.cpu().numpy(), d, self.index_coding)
        # labels, bitwidths, lo/hi, signs and codes are packed where the rows live, after the host-written bits
        codes, widths = _tail_fields(q, m)
        body = _join_bits(w.getvalue(), w.nbits, ops.pack_bits(codes, widths, w.nbits % 8))

        flags = (F_ROTATION if rotated else 0) | (F_WIDE_PARAMS if q.wide else 0)
        if n_out and wide_out:
            flags |= F_WIDE_OUTLIERS
        if self.entropy_coding == "zstd":
            packed = zstandard.ZstdCompressor(
                level=self.zstd_level, write_content_size=False, write_checksum=False
            ).compress(body)
            if len(packed) < len(body):
                body, flags = packed, flags | F_ZSTD
        return bytes([flags]) + write_varint(k) + bytes([m, n_out]) + body

    # ---------------------------------------------------------------- decode
    def decode(self, data: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        """Decode bytes from `encode`; any malformed input raises `CodecError`.

        With a `device` where the codec kernels run, unpacking and dequantization happen there (only the
        compressed body crosses to it); elsewhere rows are built on the host and moved, as in `Codec.decode`.
        """
        target = torch.device(device) if device is not None else None
        on_device = target is not None and target.type != "cpu" and ops.use_kernels(target)
        token = _DECODE_DEVICE.set(target if on_device else None)
        try:
            return super().decode(data, device)
        finally:
            _DECODE_DEVICE.reset(token)

    def _decode_rows(self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        flags = reader.u8()
        if flags & ~(F_ROTATION | F_ZSTD | F_WIDE_PARAMS | F_WIDE_OUTLIERS):
            raise CodecError(f"unknown slicer flags {flags:#x}")
        k = reader.varint(limit=d)
        m, n_out = reader.u8(), reader.u8()
        rotated = bool(flags & F_ROTATION)
        avail = d if rotated else d - n_out
        if n_out > d or k > avail or not (1 <= m <= min(k, 64) if k else m == 0):
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
        device = _DECODE_DEVICE.get() or torch.device("cpu")
        r = BitReader(body)  # host sections; the per-entry sections are unpacked from `data` on `device`
        data = (
            torch.frombuffer(bytearray(body), dtype=torch.uint8).to(device)
            if body
            else torch.zeros(0, dtype=torch.uint8, device=device)
        )

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
        if k == 0:
            r.check_end()
            x = torch.zeros(n_rows, d, device=device)
            return (x.scatter(1, residual_pos.to(device), out_val.to(device)) if n_out else x).to(dtype)
        if k == avail:
            pos = torch.arange(d).expand(n_rows, d)
            if not rotated and n_out:
                keep = torch.ones(n_rows, d, dtype=torch.bool).scatter(1, residual_pos, False)
                if (keep.sum(1) != k).any():
                    raise CodecError("duplicate outlier positions")
                pos = pos[keep].reshape(n_rows, k)
        else:
            pos = torch.from_numpy(read_positions(r, n_rows, k, d))
        labels = torch.zeros(n_rows, k, dtype=torch.long, device=device)
        if m > 1:
            labels = _read_fields(r, data, torch.full((n_rows * k,), math.ceil(math.log2(m)), device=device))
            labels = labels.reshape(n_rows, k)
            if (labels >= m).any():
                raise CodecError("block label out of range")
        bits = torch.from_numpy(r.read(n_rows * m, 5).astype(np.int64)).reshape(n_rows, m)
        if (bits > 16).any():
            raise CodecError("block bitwidth above 16")
        wide = bool(flags & F_WIDE_PARAMS)
        params = _bits_float(r.read(n_rows * m * 2, 32 if wide else 16), wide).reshape(n_rows, m, 2).to(device)
        bits = bits.to(device)
        widths = torch.cat(
            [torch.ones(n_rows * k, dtype=torch.long, device=device), bits.gather(1, labels).reshape(-1)]
        )
        signs, codes = _read_fields(r, data, widths).split(n_rows * k)  # one sign bit per entry, then the codes
        r.check_end()

        y = ops.dequantize_rows(
            pos.to(device),
            labels,
            signs.bool().reshape(n_rows, k),
            codes.reshape(n_rows, k),
            params[..., 0],
            params[..., 1],
            bits,
            d,
        )
        x = rotate(y, inverse=True) if rotated else y
        if n_out:
            x = x.scatter(1, residual_pos.to(device), out_val.to(device))
        return x.to(dtype)


class _CountingWriter(BitWriter):
    """A `BitWriter` that counts the bits written, so that fields packed elsewhere can follow them."""

    def __init__(self) -> None:
        super().__init__()
        self.nbits = 0

    def write(self, codes: np.ndarray, width: int | np.ndarray) -> None:
        super().write(codes, width)
        size = np.asarray(codes).size
        self.nbits += int(np.sum(width)) if np.ndim(width) else size * int(width)


def _tail_fields(q: ops.QuantizedRows, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels, bitwidths, lo/hi, signs and codes as one run of (code, width) fields, in bitstream order."""
    fields = [(q.bits.reshape(-1), 5), (_float_codes(torch.stack([q.lo, q.hi], dim=2), q.wide), 32 if q.wide else 16)]
    if m > 1:
        fields.insert(0, (q.labels.reshape(-1), math.ceil(math.log2(m))))
    fields.append((q.signs.reshape(-1).to(torch.int64), 1))
    codes = torch.cat([c for c, _ in fields] + [q.codes.reshape(-1)])
    widths = torch.cat([torch.full_like(c, w) for c, w in fields] + [q.bits.gather(1, q.labels).reshape(-1)])
    return codes, widths


def _join_bits(head: bytes, head_bits: int, tail: torch.Tensor) -> bytes:
    """`head` (its first `head_bits` bits) followed by `tail`, packed from bit `head_bits % 8` of its first byte."""
    out = bytearray(head[: head_bits // 8])
    tail_bytes = bytearray(tail.cpu().numpy().tobytes())
    if head_bits % 8:
        tail_bytes[0] |= head[head_bits // 8]
    return bytes(out + tail_bytes)


def _read_fields(r: BitReader, data: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Fields of `widths` bits from the reader's position, unpacked where `data` lives; advances the reader."""
    codes = ops.unpack_bits(data, widths, r.pos)
    r.pos += int(widths.sum())
    return codes


def _float_codes(t: torch.Tensor, wide: bool) -> torch.Tensor:
    """float32 (wide) or float16 bit patterns of `t`, flattened, as int64 fields."""
    if wide:
        return t.float().contiguous().view(torch.int32).reshape(-1).to(torch.int64) & 0xFFFFFFFF
    return t.to(torch.float16).contiguous().view(torch.int16).reshape(-1).to(torch.int64) & 0xFFFF


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
