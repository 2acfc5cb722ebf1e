"""Varints, bounds-checked byte reading, and vectorized LSB-first bit packing for the codec bitstreams."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CodecError


def write_varint(value: int) -> bytes:
    if value < 0:
        raise CodecError(f"varint must be non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class Reader:
    """Reads a byte string front to back; every overrun is a `CodecError`."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"truncated input: need {n} bytes at offset {self.pos}, have {self.remaining()}")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self, limit: int = 1 << 40) -> int:
        """An unsigned LEB128 integer of at most `limit`; one longer than such a value needs (zero-valued
        continuation bytes, say) is refused as soon as it is, not read to its end."""
        value, shift, start = 0, 0, self.pos
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if value > limit or shift > limit.bit_length():
                raise CodecError(f"varint at offset {start} exceeds the limit {limit}")
            if not byte & 0x80:
                return value
            shift += 7

    def array(self, dtype: np.dtype | str, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(dt.itemsize * count), dtype=dt).copy()

    def finish(self) -> None:
        if self.remaining():
            raise CodecError(f"{self.remaining()} unexpected trailing bytes")


class BitWriter:
    """Collects sections of fixed-width fields and packs them into one LSB-first bitstream."""

    def __init__(self) -> None:
        self._codes: list[np.ndarray] = []
        self._widths: list[np.ndarray] = []

    def write(self, codes: np.ndarray, width: int | np.ndarray) -> None:
        codes = np.asarray(codes, dtype=np.uint64).ravel()
        widths = np.broadcast_to(np.asarray(width, dtype=np.int64).ravel() if np.ndim(width) else width, codes.shape)
        self._codes.append(codes)
        self._widths.append(widths)

    def write_unary(self, values: np.ndarray) -> None:
        """Each value v as v zeros closed by a one."""
        values = np.asarray(values, dtype=np.int64).ravel()
        bits = np.zeros(int(values.sum()) + values.size, dtype=np.uint64)
        bits[np.cumsum(values + 1) - 1] = 1
        self.write(bits, 1)

    def getvalue(self) -> bytes:
        if not self._codes:
            return b""
        codes = np.concatenate(self._codes)
        widths = np.concatenate(self._widths)
        if widths.sum() == 0:
            return b""
        max_w = int(widths.max())
        shifts = np.arange(max_w, dtype=np.uint64)
        bits = ((codes[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
        keep = np.arange(max_w)[None, :] < widths[:, None]
        return np.packbits(bits[keep], bitorder="little").tobytes()


_WHOLE_BYTES = {8: np.dtype("<u1"), 16: np.dtype("<u2"), 32: np.dtype("<u4"), 64: np.dtype("<u8")}
_CHUNK_FIELDS = 1 << 14  # fields `BitReader.read` unpacks at a time (at 64 bits a field: a few MB of work arrays)


class BitReader:
    """Reads fields back from a `BitWriter` stream; every overrun is a `CodecError`."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = 8 * len(data)  # bits
        self.pos = 0

    def _bits(self, start: int, count: int) -> np.ndarray:
        """Bits `start..start + count - 1` of the stream, one per entry (only the bytes that hold them are unpacked:
        a long body costs what is read of it, not eight bytes a bit up front)."""
        first, end = start // 8, min(len(self.data), (start + count + 7) // 8)
        chunk = np.frombuffer(self.data, dtype=np.uint8, count=end - first, offset=first)
        return np.unpackbits(chunk, bitorder="little")[start - 8 * first : start - 8 * first + count]

    def read(self, count: int, width: int | np.ndarray) -> np.ndarray:
        count = int(count)
        scalar = np.ndim(width) == 0
        widths = None if scalar else np.broadcast_to(np.asarray(width, dtype=np.int64), (count,))
        total = count * int(width) if widths is None else int(widths.sum())
        if self.pos + total > self.size:
            raise CodecError(f"bitstream truncated: need {total} bits at bit {self.pos}, have {self.size - self.pos}")
        if scalar and int(width) in _WHOLE_BYTES and self.pos % 8 == 0:  # whole bytes: read as integers
            out = np.frombuffer(self.data, dtype=_WHOLE_BYTES[int(width)], count=count, offset=self.pos // 8)
            self.pos += total
            return out.astype(np.uint64)
        if widths is None:
            widths = np.full(count, int(width), dtype=np.int64)
        out = np.zeros(count, dtype=np.uint64)
        starts = np.cumsum(widths) - widths  # of each field, from the read's first bit
        for a in range(0, count, _CHUNK_FIELDS):  # a bounded working set: a field's bits are unpacked one a byte
            width_a, start_a = widths[a : a + _CHUNK_FIELDS], starts[a : a + _CHUNK_FIELDS]
            span = int(width_a.sum())
            if span == 0:
                continue
            shifts = np.arange(int(width_a.max()))
            idx = np.minimum(start_a[:, None] - start_a[0] + shifts[None, :], span - 1)
            bits = self._bits(self.pos + int(start_a[0]), span)[idx]
            vals = np.where(shifts[None, :] < width_a[:, None], bits, 0).astype(np.uint64)
            out[a : a + len(width_a)] = (vals << shifts[None, :].astype(np.uint64)).sum(axis=1, dtype=np.uint64)
        self.pos += total
        return out

    def peek(self, count: int) -> np.ndarray:
        """The next `count` bits (at most those left), one per entry, without moving the reader."""
        return self._bits(self.pos, min(count, self.size - self.pos))

    def check_end(self) -> None:
        if self.size - self.pos >= 8:
            raise CodecError(f"{(self.size - self.pos) // 8} unexpected trailing bytes")


def float_fields(t: Any, wide: bool) -> np.ndarray:
    """A float tensor as unsigned bit patterns for a `BitWriter`: float16 (16 bits), or float32 when `wide`."""
    if wide:
        return t.float().contiguous().numpy().view(np.uint32).ravel()
    return t.half().contiguous().numpy().view(np.uint16).ravel()


def fields_float(codes: np.ndarray, wide: bool) -> np.ndarray:
    """Inverse of `float_fields`, as float32; non-finite values (corrupt input) are a `CodecError`."""
    out = (codes.astype(np.uint32).view(np.float32) if wide else codes.astype(np.uint16).view(np.float16)).astype(
        np.float32
    )
    if not np.isfinite(out).all():
        raise CodecError("non-finite codec parameter")
    return out
