"""Plain codecs to compare SLICER against: identity (lossless), fp16, bf16, int8 per token, top-K only."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import CodecError
from .base import Codec, from_raw_bytes, raw_bytes
from .bits import BitReader, BitWriter, Reader, write_varint
from .indices import read_positions, write_positions

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
        return from_raw_bytes(data, self.wire_dtype, count).reshape(n_rows, d).to(dtype)


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
        codes = torch.from_numpy(reader.array(np.int8, n_rows * d)).reshape(n_rows, d)
        return (codes.float() * scale).to(dtype)


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
        wide = bool(vals.numel() and vals.abs().max() > FP16_MAX)
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
        return out.to(dtype)
