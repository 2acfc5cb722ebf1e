"""Plain codecs to compare SLICER against: identity (lossless), fp16, bf16, int8 per token, top-K only, and
group-wise integer quantization with optional exact outliers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import CodecError
from .base import MAX_OUTLIERS, Codec, from_raw_bytes, raw_bytes
from .bits import BitReader, BitWriter, Reader, fields_float, float_fields, write_varint
from .indices import read_positions, write_positions
from .ops import cast, needs_float32

FP16_MAX = float(torch.finfo(torch.float16).max)


class IdentityCodec(Codec):
    """The tensor's own bytes: lossless for every float dtype."""

    name = "identity"
    codec_id = 1
    lossless = True

    def _encode_rows(self, rows: torch.Tensor) -> bytes:
        return raw_bytes(rows)

    def _decode_rows(self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        count = n_rows * d
        return from_raw_bytes(reader.take(count * dtype.itemsize), dtype, count).reshape(n_rows, d)


class _CastCodec(Codec):
    wire_dtype: torch.dtype

    def _encode_rows(self, rows: torch.Tensor) -> bytes:
        if self.wire_dtype == torch.float16 and rows.numel() and rows.abs().max() > FP16_MAX:
            raise CodecError(
                f"values up to {rows.abs().max().item():.4g} overflow float16 (max {FP16_MAX:g}); "
                "use the 'bf16' or 'slicer' codec"
            )
        return raw_bytes(rows.to(self.wire_dtype))

    def _decode_rows(self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        count = n_rows * d
        data = reader.take(count * self.wire_dtype.itemsize)
        return cast(from_raw_bytes(data, self.wire_dtype, count).reshape(n_rows, d), dtype)


class Fp16Codec(_CastCodec):
    """Cast to float16 (refuses values beyond its range instead of sending Inf)."""

    name = "fp16"
    codec_id = 2
    wire_dtype = torch.float16


class Bf16Codec(_CastCodec):
    """Cast to bfloat16: float32's range, 8 bits of mantissa."""

    name = "bf16"
    codec_id = 3
    wire_dtype = torch.bfloat16


class Int8Codec(Codec):
    """Per-token absmax int8: a float32 scale and d int8 codes per row."""

    name = "int8"
    codec_id = 4

    def _encode_rows(self, rows: torch.Tensor) -> bytes:
        x = rows.float()
        scale = x.abs().amax(dim=1, keepdim=True) / 127.0
        codes = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp(-127, 127).to(torch.int8)
        return raw_bytes(scale) + codes.numpy().tobytes()

    def _decode_rows(self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        scale = torch.from_numpy(reader.array(np.float32, n_rows)).reshape(n_rows, 1)
        if not torch.isfinite(scale).all():
            raise CodecError("non-finite int8 scale")
        codes = torch.from_numpy(reader.array(np.int8, n_rows * d)).reshape(n_rows, d)
        return cast(codes.float() * scale, dtype)


class TopKCodec(Codec):
    """Keep the K = round((1 - sparsity) * d) largest-magnitude entries per row in float16, zero the rest."""

    name = "topk"
    codec_id = 5

    def __init__(self, sparsity: float = 0.75, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= sparsity < 1.0:
            raise CodecError(f"`sparsity` must be in [0, 1), got {sparsity!r}")
        self.sparsity = float(sparsity)

    def params(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity}

    def _encode_rows(self, rows: torch.Tensor) -> bytes:
        n, d = rows.shape
        k = max(1, round((1.0 - self.sparsity) * d))
        x = rows.float()
        order = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :k]
        pos = torch.sort(order, dim=1).values
        vals = x.gather(1, pos)
        wide = bool(vals.numel()) and needs_float32(vals.abs().amax(1))
        w = BitWriter()
        write_positions(w, pos.numpy(), d)
        return (
            bytes([int(wide)])
            + write_varint(k)
            + raw_bytes(vals.to(torch.float32 if wide else torch.float16))
            + w.getvalue()
        )

    def _decode_rows(self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        wide = reader.u8()
        if wide > 1:
            raise CodecError(f"unknown topk flags {wide}")
        k = reader.varint(limit=d)
        val_dtype = torch.float32 if wide else torch.float16
        vals = from_raw_bytes(reader.take(n_rows * k * val_dtype.itemsize), val_dtype, n_rows * k)
        bits = BitReader(reader.take(reader.remaining()))
        pos = torch.from_numpy(read_positions(bits, n_rows, k, d))
        bits.check_end()
        out = torch.zeros(n_rows, d, dtype=torch.float32)
        out.scatter_(1, pos, vals.reshape(n_rows, k).float())
        return cast(out, dtype)


class GroupedIntCodec(Codec):
    """Group-wise absmax integer quantization (blockwise int8/int4, grouped int6...), optionally with the
    largest-magnitude entries of each row sent exactly first.

    Per row: `outliers` positions and float16 values, then per group of `group_size` entries a float16 scale and
    `bits`-bit signed codes (offset binary). Float32 scales and outlier values when float16 cannot hold them.
    """

    name = "grouped"
    codec_id = 7

    def __init__(self, bits: int = 4, group_size: int = 32, outliers: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 2 <= bits <= 16:
            raise CodecError(f"`bits` must be in [2, 16], got {bits!r}")
        if not 1 <= group_size <= 1 << 16:
            raise CodecError(f"`group_size` must be in [1, 65536], got {group_size!r}")
        if not 0 <= outliers <= MAX_OUTLIERS:
            raise CodecError(f"`outliers` must be in [0, {MAX_OUTLIERS}], got {outliers!r}")
        self.bits, self.group_size, self.outliers = int(bits), int(group_size), int(outliers)

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "outliers": self.outliers}

    def _encode_rows(self, rows: torch.Tensor) -> bytes:
        x = rows.float()
        n, d = x.shape
        n_out = min(self.outliers, d)
        w = BitWriter()
        peaks = x.abs().amax(1) if x.numel() else x.new_zeros(0)
        if n_out:
            pos = torch.sort(torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :n_out]).values
            outliers, x = x.gather(1, pos), x.scatter(1, pos, 0.0)
        groups = _groups(x, min(self.group_size, d))  # [N, G, g]; a group no wider than the row
        qmax = (1 << (self.bits - 1)) - 1
        scale = groups.abs().amax(dim=2) / qmax  # [N, G]
        # float32 where the values or the scales pass float16's range (at 16 bits a scale is 1/32,767 of its group's
        # largest value, subnormal long before the values are: 35x the error on rows of size 0.1)
        wide = bool(x.numel()) and (needs_float32(peaks) or needs_float32(scale.flatten()))
        if n_out:
            w.write(pos.numpy(), _position_bits(d))
            w.write(float_fields(outliers, wide), 32 if wide else 16)
        scale = scale if wide else scale.half().float()
        codes = torch.round(groups / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp(-qmax, qmax)
        w.write(float_fields(scale, wide), 32 if wide else 16)
        w.write((codes.reshape(n, codes.shape[1] * codes.shape[2])[:, :d] + qmax).to(torch.int64).numpy(), self.bits)
        return bytes([int(wide), self.bits, n_out]) + write_varint(self.group_size) + w.getvalue()

    def _decode_rows(self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        wide, bits, n_out = reader.take(3)
        group_size = reader.varint(limit=1 << 16)
        if wide > 1 or not 2 <= bits <= 16 or n_out > min(d, MAX_OUTLIERS) or group_size == 0:
            raise CodecError(f"inconsistent grouped header: wide={wide} bits={bits} outliers={n_out} g={group_size}")
        group_size = min(group_size, d)
        n_groups = -(-d // group_size)
        need = n_rows * (n_out * (_position_bits(d) + 16) + n_groups * 16 + d * bits)
        if reader.remaining() * 8 < need:
            raise CodecError(f"grouped body of {reader.remaining()} bytes is too short for {n_rows} rows")
        r = BitReader(reader.take(reader.remaining()))
        width = 32 if wide else 16
        if n_out:
            pos = torch.from_numpy(r.read(n_rows * n_out, _position_bits(d)).astype(np.int64)).reshape(n_rows, n_out)
            if (pos >= d).any():
                raise CodecError("outlier position out of range")
            values = torch.from_numpy(fields_float(r.read(n_rows * n_out, width), bool(wide))).reshape(n_rows, n_out)
        scale = torch.from_numpy(fields_float(r.read(n_rows * n_groups, width), bool(wide))).reshape(n_rows, n_groups)
        qmax = (1 << (bits - 1)) - 1
        codes = torch.from_numpy(r.read(n_rows * d, bits).astype(np.int64)).reshape(n_rows, d) - qmax
        r.check_end()
        if (codes.abs() > qmax).any():
            raise CodecError("grouped code out of range")
        padded = torch.zeros(n_rows, n_groups * group_size)
        padded[:, :d] = codes.float()
        x = (padded.reshape(n_rows, n_groups, group_size) * scale[..., None]).reshape(n_rows, n_groups * group_size)[
            :, :d
        ]  # [N, d]
        if n_out:
            x = x.scatter(1, pos, values)
        return cast(x, dtype)


def _position_bits(d: int) -> int:
    return max(1, (d - 1).bit_length())


def _groups(x: torch.Tensor, size: int) -> torch.Tensor:
    n, d = x.shape
    padded = torch.nn.functional.pad(x, (0, -d % size))
    return padded.reshape(n, padded.shape[1] // size, size)
