"""The SLICER codec: exact outliers, optional fixed rotation, asymmetric top-K filtering (ATKF), magnitude
splitting into equal-cardinality blocks (MS), adaptive per-block bitwidths under a distortion budget (ABQ),
the cheaper index coding per row, and an optional entropy stage. Or, with `quantizer="ecsq"`, entropy-coded
scalar quantization (ECSQ) of the (rotated) residual in place of ATKF + MS + ABQ + indices + zstd.

Payload after the envelope (`quantizer="blocks"`)::

    [flags u8][K varint][M u8][n_out u8][body]         body zstd-compressed when flags says so
    body, one LSB-first bitstream:
      outlier positions  N*n_out x ceil(log2 d) bits      outlier values  N*n_out x 16|32 bits
      kept positions     (absent when every candidate position is kept)
      block labels       N*K x ceil(log2 M) bits, in position order
      block bitwidths    N*M x 5 bits                     block lo, hi    N*M*2 x 16|32 bits
      signs              N*K bits                          magnitude codes N*K x bitwidth(block)

ECSQ payload (flags holds F_ECSQ; F_ZSTD never)::

    [flags u8][n_out u8][step float16][head][ans]
    (a bare packet in a session, `bare`: [flags | F_AGREED][head][ans] when n_out and step are the agreed spec's)
    head, one LSB-first bitstream padded to a byte:
      outlier positions  N*n_out x ceil(log2 d) bits      outlier values  N*n_out x 16|32 bits
      row RMS            N x 16|32 bits (F_WIDE_PARAMS: float32), absent when no entry is left to code
    ans: one rANS stream (`constriction`, little-endian uint32 words, the last word's zero high bytes dropped) of
      the codes round(y / (step * rms)) of every coded entry of every row with rms > 0, row-major, clipped to
      [-B, B], B = min(ceil(1.002 sqrt(d') / step) + 1, 32767) (d' = d rotated, else d - n_out), under a quantized
      Gaussian of mean 0 and std 1/step on [-B-1, B] (-B-1 is never sent)

With a calibrated basis (F_CALIBRATED, `rotation="calibrated"`, see `basis.py`) every row's d coordinates
z = (residual / rms - mean) @ forward are coded instead (rms over the channels the basis counts), as round(z / step)
clipped to [-B, B] (B from the basis's `code_bound`, at most 32767), coordinate i under a quantized Laplace of mean 0
and scale scale[i] / step on [-B-1, B]; the decoder returns (codes * step @ inverse + mean) * rms. Which basis is
the session's agreement (the codec spec names its digest); the packet only says that one was used. A predicting
basis (`Basis.predicts`) codes z less its prediction from the given rows (`Codec.given_width`), and the decoder adds
the prediction back before the inverse. With `predict_previous=True` (`Codec.chains`) the given row of each row is the
decoded row before it in its sequence (`[..., T, d]`; the caller gives the one before each sequence's first, or
zeros): the encoder codes a packet's rows position by position, rebuilding each as the decoder will
(`_calibrated_rows`, the one formula both sides run), and the decoder rebuilds them in the same order. The wire
format is unchanged: which rows a packet continues from is the session's business (the protocol's CHAINED flag).

With `trellis=True` (F_TRELLIS, calibrated bases only) the coordinates are trellis-coded instead of rounded (see
`trellis.py`): code k stands for k x step or (k + 1/2) x step as the coordinate's union says, coordinate i's codes go
under its quantized Laplace of scale scale[i] / step, shifted by -1/2 in the second union, in the order `trellis.py`
gives (runs of 32 coordinates, each row-major).

Selection, quantization, packing and dequantization run through `ops` (one dispatch point: the pure-torch
reference, or Triton kernels on CUDA); the outlier and kept-position sections, zstd and the rANS coder
(`entropy.py`: the models, code bounds and sliced coding) stay on the host.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
import time
from collections import defaultdict
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zstandard

from ..errors import CodecError, ConfigError
from . import entropy, ops, trellis
from .base import MAX_OUTLIERS, Codec
from .basis import Basis, lookup
from .bits import BitReader, BitWriter, Reader, fields_float, float_fields, write_varint
from .indices import read_positions, write_positions

F_ROTATION, F_ZSTD, F_WIDE_PARAMS, F_WIDE_OUTLIERS, F_ECSQ, F_CALIBRATED, F_TRELLIS = 1, 2, 4, 8, 16, 32, 64
F_AGREED = 128  # bare ECSQ packets only: the outlier count and step are the agreed spec's, and left out
ROTATION_BLOCK = 1024
MAX_ROTATED_WIDTH = 1 << 16  # well above any model's hidden size
ROTATION_SEED = 0x51C3
# Where `_decode_rows` builds its rows: set by `SlicerCodec._decoding_on` (under decode and decode_batch) when the
# kernels run on the target device.
_DECODE_DEVICE: ContextVar[torch.device | None] = ContextVar("slicer_decode_device", default=None)
_REBUILD_LATER: ContextVar[_Later | None] = ContextVar("slicer_rebuild_later", default=None)  # within decode_batch


@functools.lru_cache(maxsize=16)
def rotation_blocks(d: int) -> tuple[tuple[int, torch.Tensor], ...]:
    """Block-diagonal seeded random orthogonal transform for width d: ((start, Q[b, b]), ...). Blocks of one size
    are one matrix (its seed is the size), and a width has blocks of at most two sizes."""
    n_blocks = math.ceil(d / ROTATION_BLOCK)
    bounds = np.linspace(0, d, n_blocks + 1).round().astype(int)
    return tuple((int(start), _rotation_block(int(stop - start))) for start, stop in zip(bounds[:-1], bounds[1:]))


@functools.lru_cache(maxsize=8)
def _rotation_block(size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(ROTATION_SEED + size)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(torch.float32)  # unique, deterministic orthogonal factor


@functools.lru_cache(maxsize=16)
def _rotation_on(d: int, device: torch.device) -> tuple[tuple[int, torch.Tensor], ...]:
    return tuple((start, q.to(device)) for start, q in rotation_blocks(d))


def rotate(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    if x.shape[-1] > MAX_ROTATED_WIDTH:  # a packet's claim alone must not buy minutes of matrix products
        raise CodecError(f"rows of {x.shape[-1]} entries are wider than a rotated codec takes ({MAX_ROTATED_WIDTH})")
    out = torch.empty_like(x)
    for start, q in _rotation_on(x.shape[-1], x.device):
        stop = start + q.shape[0]
        out[:, start:stop] = x[:, start:stop] @ (q.T if inverse else q)
    return out


class SlicerCodec(Codec):
    """SLICER: see the module docstring for the stages and the bitstream."""

    name = "slicer"
    codec_id = 6
    costly = True  # entropy coding, bit fields, the trellis: tens to hundreds of microseconds a row

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
        quantizer: str = "blocks",
        step: float = 0.3,
        basis: str | None = None,
        trellis: bool = False,
        predict_previous: bool = False,
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
            bit_candidates=tuple(bit_candidates) if isinstance(bit_candidates, (list, tuple)) else bit_candidates,
            index_coding=index_coding,
            outliers=outliers,
            rotation=rotation,
            entropy_coding=entropy_coding,
            quantizer=quantizer,
            step=step,
            basis=basis,
            trellis=trellis,
            predict_previous=predict_previous,
        )
        self._params = cfg.codec_params()
        for key, value in self._params.items():
            setattr(self, key, value)
        self.trellis = bool(self._params.get("trellis"))
        top = zstandard.MAX_COMPRESSION_LEVEL
        if type(zstd_level) is not int or not 1 <= zstd_level <= top:
            raise ConfigError(f"`zstd_level` must be an integer in [1, {top}], got {zstd_level!r}")
        self.zstd_level = zstd_level
        self._basis: Basis | None = lookup(basis) if basis else None
        self.chains = bool(self._params.get("predict_previous"))
        if self.chains and (self._basis is None or self._basis.given_width != self._basis.width):
            raise CodecError(
                f"predict_previous needs a basis that predicts rows from rows of its own width (basis {basis} "
                f"predicts from {None if self._basis is None else self._basis.given_width})"
            )
        if self.quantizer == "ecsq":
            entropy.constriction()  # fail at construction, not at the first packet

    def params(self) -> dict[str, Any]:
        return {**self._params, "bit_candidates": list(self.bit_candidates)}

    @property
    def given_width(self) -> int | None:
        """A predicting basis's given width (ECSQ packets code z less the prediction from the given rows); None when
        the basis predicts from the previous row instead (`chains`)."""
        if self._basis is None or self.quantizer != "ecsq" or self.chains:
            return None
        return self._basis.given_width

    def _agreed_header(self, d: int) -> bytes:
        """An ECSQ packet's [n_out u8][step f16] at the spec's outliers and step (adaptive bitrate may move
        `self.step`; the spec, and so the peer's codec, keeps the one it was built with)."""
        return bytes([min(self._params["outliers"], d)]) + np.float16(entropy.wire_step(self._params["step"])).tobytes()

    def bare(self, packet: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> bytes | None:
        """Without its envelope and, for an ECSQ packet at the agreed outliers and step, without those (flag
        F_AGREED): 4 bytes of a steady-state decode step's packet."""
        body = super().bare(packet, shape, dtype)
        if body and body[0] & F_ECSQ and body[1:4] == self._agreed_header(shape[-1]):
            return bytes([body[0] | F_AGREED]) + body[4:]
        return body

    def unbare(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> bytes:
        if body and body[0] & F_ECSQ and body[0] & F_AGREED:
            body = bytes([body[0] & ~F_AGREED]) + self._agreed_header(shape[-1]) + body[1:]
        return super().unbare(body, shape, dtype)

    # ---------------------------------------------------------------- encode
    def _codes_on(self, device: torch.device) -> bool:
        return ops.use_kernels(device)  # rows stay where the codec kernels run

    def _encode_rows(self, rows: torch.Tensor, given: torch.Tensor | None = None) -> bytes:
        if self.quantizer == "ecsq":
            return self._encode_ecsq(rows, given)
        x = rows.float()  # [N, d], on the rows' device
        n, d = x.shape
        n_out = min(self.outliers, d)
        rotated = self.rotation == "orthogonal"
        w = _CountingWriter()

        residual, out_pos, wide_out = _write_outliers(w, x, n_out)
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
    @contextlib.contextmanager
    def _decoding_on(self, device: torch.device | str | None) -> Iterator[None]:
        """With a `device` where the codec kernels run, unpacking and dequantization happen there (only the
        compressed body crosses to it); elsewhere rows are built on the host and moved."""
        target = torch.device(device) if device is not None else None
        on_device = target is not None and target.type != "cpu" and ops.use_kernels(target)
        token = _DECODE_DEVICE.set(target if on_device else None)
        try:
            yield
        finally:
            _DECODE_DEVICE.reset(token)

    @contextlib.contextmanager
    def _together(self, device: torch.device | str | None) -> Iterator[None]:
        """`decode_batch` rebuilds the rows of calibrated ECSQ packets for all packets together (two matrix products
        for every single-row decode step, rather than two per packet): each packet is read to its codes, and its
        rows are filled in once all are read."""
        later = _Later(torch.device(device) if device is not None else torch.device("cpu"))
        token = _REBUILD_LATER.set(later)
        try:
            yield
        finally:
            _REBUILD_LATER.reset(token)
        if later.rows:
            assert self._basis is not None
            for rows, rebuilt in zip(later.rows, _rebuild(later.codes, self._basis, self.chains)):
                rows.copy_(ops.cast(rebuilt, rows.dtype))

    def _decode_rows(
        self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype, given: torch.Tensor | None = None
    ) -> torch.Tensor:
        flags = reader.u8()
        if flags & F_ECSQ:
            return _decode_ecsq(reader, flags, n_rows, d, dtype, self._basis, given, self.chains)
        if flags & ~(F_ROTATION | F_ZSTD | F_WIDE_PARAMS | F_WIDE_OUTLIERS):
            raise CodecError(f"unknown slicer flags {flags:#x}")
        k = reader.varint(limit=d)
        m, n_out = reader.u8(), reader.u8()
        rotated = bool(flags & F_ROTATION)
        avail = d if rotated else d - n_out
        bad_out = n_out > min(d, MAX_OUTLIERS)
        if bad_out or k > avail or not (1 <= m <= min(k, 64) if k else m == 0) or rotated and d > MAX_ROTATED_WIDTH:
            raise CodecError(f"inconsistent slicer header: d={d}, K={k}, M={m}, outliers={n_out}, rotated={rotated}")
        if n_rows == 0 and k:
            raise CodecError(f"a packet of no rows carries entries (K={k})")
        body = reader.take(reader.remaining())
        if flags & F_ZSTD:  # the largest body these counts can need: outliers, positions, labels, signs, codes, blocks
            row_bits = n_out * (max(1, math.ceil(math.log2(d))) + 32) + (5 + d + 16 * k if k < avail else 0)
            row_bits += k * (math.ceil(math.log2(max(m, 1))) + 17) + m * (5 + 64)
            limit = n_rows * row_bits // 8 + 64
            try:
                body = _unzstd(body, limit)
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

        residual_pos, out_val = _read_outliers(r, n_rows, n_out, d, bool(flags & F_WIDE_OUTLIERS))
        if k == 0:
            r.check_end()
            x = torch.zeros(n_rows, d, device=device)
            return ops.cast(x.scatter(1, residual_pos.to(device), out_val.to(device)) if n_out else x, dtype)
        if k == avail:
            pos = torch.arange(d).expand(n_rows, d)
            if not rotated and n_out:
                keep = torch.ones(n_rows, d, dtype=torch.bool).scatter(1, residual_pos, False)
                if (keep.sum(1) != k).any():
                    raise CodecError("duplicate outlier positions")
                pos = pos[keep].reshape(n_rows, k)
        else:
            pos = torch.from_numpy(read_positions(r, n_rows, k, d))
        label_bits = math.ceil(math.log2(m)) if m > 1 else 0
        labels_at = r.pos  # one field of `label_bits` a kept entry, unpacked a chunk of rows at a time below
        r.pos += n_rows * k * label_bits
        bits = torch.from_numpy(r.read(n_rows * m, 5).astype(np.int64)).reshape(n_rows, m)
        if (bits > 16).any():
            raise CodecError("block bitwidth above 16")
        wide = bool(flags & F_WIDE_PARAMS)
        params = _bits_float(r.read(n_rows * m * 2, 32 if wide else 16), wide).reshape(n_rows, m, 2).to(device)
        # then one sign bit a kept entry, then the codes: a row's take the bits of its blocks times their sizes (the
        # labels must make blocks of those sizes: checked a chunk at a time)
        sizes = torch.tensor(ops.block_sizes(k, m))
        row_bits = (bits * sizes).sum(1)
        signs_at = r.pos
        codes_at = signs_at + n_rows * k
        code_starts = (codes_at + torch.cumsum(row_bits, 0) - row_bits).tolist()
        end = codes_at + int(row_bits.sum())
        if not 0 <= r.size - end < 8:  # refused before its fields are unpacked
            raise CodecError(f"slicer body of {len(body)} bytes: its fields take {end} bits")
        r.pos = end
        r.check_end()

        bits, sizes = bits.to(device), sizes.to(device)
        x = torch.empty(n_rows, d, device=device)
        rows = max(1, ops.CHUNK_FIELDS // k)  # a chunk of rows at a time: the working set stays bounded (each kept
        for a in range(0, n_rows, rows):  # entry's fields take tens of bytes of int64 on the way to one float)
            part, n = slice(a, a + rows), min(rows, n_rows - a)
            labels = torch.zeros(n, k, dtype=torch.long, device=device)
            if m > 1:
                labels = ops.unpack_bits(
                    data, torch.full((n * k,), label_bits, device=device), labels_at + a * k * label_bits
                )
                labels = labels.reshape(n, k)
                if (labels >= m).any():
                    raise CodecError("block label out of range")
                counts = torch.zeros(n, m, dtype=torch.long, device=device).scatter_add_(
                    1, labels, torch.ones_like(labels)
                )
                if not torch.equal(counts, sizes.expand(n, m)):
                    raise CodecError("block labels do not make blocks of equal cardinality")
            signs = ops.unpack_bits(data, torch.ones(n * k, dtype=torch.long, device=device), signs_at + a * k)
            codes = ops.unpack_bits(data, bits[part].gather(1, labels).reshape(-1), code_starts[a])
            x[part] = ops.dequantize_rows(
                pos[part].to(device),
                labels,
                signs.bool().reshape(n, k),
                codes.reshape(n, k),
                params[part, :, 0],
                params[part, :, 1],
                bits[part],
                d,
            )
        x = rotate(x, inverse=True) if rotated else x  # all rows in one product: as they round without chunks
        if n_out:
            x = x.scatter(1, residual_pos.to(device), out_val.to(device))
        return ops.cast(x, dtype)

    # ---------------------------------------------------------------- ECSQ
    def _encode_ecsq(self, rows: torch.Tensor, given: torch.Tensor | None = None) -> bytes:
        """Exact outliers, rotation (or a calibrated basis, less its prediction from `given`), then every entry as
        round(y / (step * rms)), one rANS stream for all rows."""
        x = rows.float()  # [N, d], on the rows' device
        n, d = x.shape
        n_out = min(self.outliers, d)
        basis = self._basis
        if basis is not None and basis.width != d:
            raise CodecError(f"the calibrated basis is for rows of width {basis.width}, got {d}")
        rotated = self.rotation == "orthogonal"
        step = entropy.wire_step(self.step)
        w = BitWriter()
        residual, out_pos, wide_out = _write_outliers(w, x, n_out)
        y = rotate(residual) if rotated else residual  # [N, d]
        avail = d if rotated or basis is not None else d - n_out
        flags = F_ECSQ | (F_ROTATION if rotated else 0) | (F_WIDE_OUTLIERS if wide_out else 0)
        flags |= F_CALIBRATED if basis is not None else 0
        flags |= F_TRELLIS if basis is not None and self.trellis else 0
        ans = b""
        if avail and n:
            rms = basis.row_rms(y) if basis is not None else (y.double().pow(2).sum(1) / avail).sqrt()  # [N]
            if basis is not None:  # a row whose counted channels hold nothing, yet is not zero, is scaled by all its
                held = y.double().pow(2).mean(1).sqrt()  # channels (the decoder rebuilds from the RMS sent, whatever
                rms = torch.where((rms == 0) & (held > 0), held, rms)  # it is): it had gone as a silent row, zeros
            wide = ops.needs_float32(rms)
            rms = rms.float() if wide else rms.to(torch.float16)  # as the wire holds it
            w.write(float_fields(rms.cpu(), wide), 32 if wide else 16)
            flags |= F_WIDE_PARAMS if wide else 0
            rms = rms.double()[:, None]  # [N, 1]
            if basis is not None:  # coded on the host, where the basis and the trellis live
                rms, given = rms.cpu(), None if given is None else given.cpu()
                bound = entropy.calibrated_bound(basis, step)
                z = (y.double().cpu() / rms.clamp_min(1e-300) - basis.f64["mean"]) @ basis.f64["forward"]
                if self.chains:
                    codes = self._chained_codes(z, rms, given, step, bound)
                else:
                    z = z - basis.predict(given) if given is not None else z
                    codes = self._calibrated_codes(z, rms, step, bound)
            else:
                bound = entropy.gaussian_bound(avail, step)
                codes = torch.where(rms > 0, y.double() / (step * rms).clamp_min(1e-300), 0.0)
                peak = float(codes.abs().max()) if codes.numel() else 0.0
                if peak > bound:  # past the largest code: only a step too fine for the codes gets here
                    raise CodecError(
                        f"ECSQ step {step:g} is too fine: a code of {peak:,.0f} steps passes the largest "
                        f"({bound:,}); use a step of at least {entropy.step_hint(peak * step / bound)}"
                    )
                codes = codes.round().clamp(-bound, bound)
            coded = _ecsq_coded(rms[:, 0], None if rotated or basis is not None else out_pos, d)  # [N, d] bool
            symbols = codes[coded].to(torch.int32).cpu().numpy()
            if symbols.size:
                if flags & F_TRELLIS:  # whole rows: codes [n, d], sent run by run with their unions' means
                    rows_codes = symbols.reshape(-1, d)
                    scales = np.broadcast_to(entropy.scales_in_steps(basis, step), rows_codes.shape)
                    means = trellis.UNION_MEAN * trellis.unions(rows_codes)
                    symbols = trellis.to_wire(rows_codes)
                    models = (entropy.laplace_family(bound), trellis.to_wire(means), trellis.to_wire(scales))
                else:
                    models = entropy.models(bound, step, basis, symbols.size)
                coder = entropy.constriction().stream.stack.AnsCoder()
                entropy.encode(coder, symbols, *models)
                ans = coder.get_compressed().astype("<u4").tobytes()
                ans = ans[: len(ans) - min(3, len(ans) - len(ans.rstrip(b"\0")))]  # ANS never ends in a zero word
        return bytes([flags, n_out]) + np.float16(step).tobytes() + w.getvalue() + ans

    def _calibrated_codes(self, z: torch.Tensor, rms: torch.Tensor, step: float, bound: int) -> torch.Tensor:
        """Codes `[m, d]` (float64) of coordinates `z` `[m, d]` of rows of RMS `rms` `[m, 1]`: trellis-coded or
        rounded, within `bound`."""
        peak = float(torch.where(rms > 0, z, 0.0).abs().max()) if z.numel() else 0.0
        if (
            bound >= entropy.MAX_CODE and peak / step > bound
        ):  # a predicting basis bounds no coordinate: codes would clip
            raise CodecError(
                f"ECSQ step {step:g} is too fine for this basis: a code of {peak / step:,.0f} steps passes the largest "
                f"({entropy.MAX_CODE:,}); use a step of at least {entropy.step_hint(peak / bound)}"
            )
        if self.trellis:
            scale = entropy.scales_in_steps(self._basis, step)
            return torch.from_numpy(trellis.quantize(z.numpy() / step, scale, bound)).double()
        return torch.where(rms > 0, z / step, 0.0).round().clamp(-bound, bound)

    def _chained_codes(
        self, z: torch.Tensor, rms: torch.Tensor, given: torch.Tensor, step: float, bound: int
    ) -> torch.Tensor:
        """Codes of coordinates `z` `[S * T, d]` of S sequences of T rows, each row coded less the prediction from
        the row before it as the decoder rebuilds it (`given` `[S, d]`: the one before each sequence's first)."""
        s, d = len(given), z.shape[1]
        z, rms = z.reshape(s, -1, d), rms.reshape(s, -1)
        codes = torch.empty_like(z)
        previous = given
        for t in range(z.shape[1]):
            guess = self._basis.predict(previous)
            codes[:, t] = self._calibrated_codes(z[:, t] - guess, rms[:, t, None], step, bound)
            held = torch.where(rms[:, t, None] > 0, codes[:, t], 0.0).numpy().astype(np.int64)  # as the decoder
            previous = _calibrated_rows(_points(held, self.trellis), rms[:, t], step, self._basis, guess)
        return codes.reshape(-1, d)


def _points(codes: np.ndarray, trellised: bool) -> torch.Tensor:
    """`[m, d]` float32: the points codes `[m, d]` stand for, in steps (the second union's lie half a step off)."""
    points = codes.astype(np.float32)
    if trellised:
        points += 0.5 * trellis.unions(codes)
    return torch.from_numpy(points)


def _calibrated_rows(
    y: torch.Tensor, rms: torch.Tensor, step: float | torch.Tensor, basis: Basis, guess: torch.Tensor | float
) -> torch.Tensor:
    """Decoded rows `[m, d]` float32 from codes `y` `[m, d]` (float32, the second union's half step added), row RMS
    `rms` `[m]`, the step (or `[m, 1]` float64 steps) and the prediction `guess` of the coordinates: the one formula
    encoder and decoder share, so that a chained codec's two sides hold the very same rows."""
    u = (y.double() * step + guess) @ basis.f64["inverse"] + basis.f64["mean"]
    return (u * rms.double()[:, None]).float()


def _unzstd(frame: bytes, limit: int) -> bytes:
    """One zstd frame, inflated to at most `limit` bytes; bytes after the frame are refused (a frame that does not
    name its size is inflated as a stream, which ignores them)."""
    out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=limit)
    ends = zstandard.ZstdDecompressor().decompressobj()
    ends.decompress(frame)  # no larger than `out`: the same frame
    if ends.unused_data:
        raise CodecError(f"{len(ends.unused_data)} bytes after the zstd frame")
    return out


def _decode_ecsq(
    reader: Reader,
    flags: int,
    n_rows: int,
    d: int,
    dtype: torch.dtype,
    basis: Basis | None = None,
    given: torch.Tensor | None = None,
    chained: bool = False,
) -> torch.Tensor:
    if flags & ~(F_ECSQ | F_ROTATION | F_WIDE_PARAMS | F_WIDE_OUTLIERS | F_CALIBRATED | F_TRELLIS):
        raise CodecError(f"unknown slicer ECSQ flags {flags:#x}")
    calibrated = bool(flags & F_CALIBRATED)
    if flags & F_TRELLIS and not calibrated:
        raise CodecError("a trellis-coded slicer ECSQ packet must be coded in a calibrated basis")
    if calibrated and (basis is None or basis.width != d or flags & F_ROTATION):
        held = "none" if basis is None else f"one for width {basis.width}"
        raise CodecError(f"packet coded in a calibrated basis for width {d}; this decoder holds {held}")
    n_out = reader.u8()
    (step,) = struct.unpack("<e", reader.take(2))
    if n_out > min(d, MAX_OUTLIERS) or not 0.0 < step <= 4.0:  # NaN fails too
        raise CodecError(f"inconsistent slicer ECSQ header: d={d}, outliers={n_out}, step={step}")
    rotated, wide = bool(flags & F_ROTATION), bool(flags & F_WIDE_PARAMS)
    if rotated and d > MAX_ROTATED_WIDTH:
        raise CodecError(f"a rotated slicer ECSQ packet of width {d} (at most {MAX_ROTATED_WIDTH})")
    avail = d if rotated or calibrated else d - n_out
    wide_out = bool(flags & F_WIDE_OUTLIERS)
    head_bits = n_rows * (n_out * (max(1, math.ceil(math.log2(d))) + (32 if wide_out else 16)))
    head_bits += n_rows * (32 if wide else 16) if avail else 0
    if reader.remaining() * 8 < head_bits:
        raise CodecError(f"slicer ECSQ payload of {reader.remaining()} bytes is too short for {n_rows} rows")
    r = BitReader(reader.take(math.ceil(head_bits / 8)))
    out_pos, out_val = _read_outliers(r, n_rows, n_out, d, wide_out)
    device = _DECODE_DEVICE.get() or torch.device("cpu")
    rms = fields_float(r.read(n_rows, 32 if wide else 16), wide) if avail else np.zeros(n_rows, np.float32)  # [N]
    if (rms < 0).any():
        raise CodecError("negative row RMS")
    n_sym = int(np.count_nonzero(rms)) * avail
    rms = torch.from_numpy(rms)
    ans = reader.take(reader.remaining())
    if not n_sym:
        if ans:
            raise CodecError(f"{len(ans)} unexpected bytes after the slicer ECSQ head")
        x = torch.zeros(n_rows, d, device=device)
    else:  # the stream is checked against the codes it must hold before the rows are built
        basis = basis if calibrated else None
        bound = entropy.calibrated_bound(basis, step) if basis is not None else entropy.gaussian_bound(avail, step)
        symbols = entropy.decode(ans, n_sym, bound, step, basis, bool(flags & F_TRELLIS))
        points = _points(symbols.reshape(-1, d), True).ravel() if flags & F_TRELLIS else torch.from_numpy(symbols)
        if n_sym == n_rows * d:  # every entry carries a code (the common case: no silent row, no exact outlier)
            y = points.float().reshape(n_rows, d)
        else:
            coded = _ecsq_coded(rms, None if rotated or calibrated else out_pos, d)  # [N, d] bool
            if int(coded.sum()) != n_sym:
                raise CodecError("duplicate outlier positions")
            y = torch.zeros(n_rows, d)
            y[coded] = points.float()
        if basis is not None:
            codes = _Codes(y, rms, step, given, out_pos if n_out else None, out_val)
            later = _REBUILD_LATER.get()
            if later is None:
                return ops.cast(_rebuild([codes], basis, chained)[0], dtype, device)
            x = torch.empty(n_rows, d, dtype=dtype, device=later.device)  # filled once every packet is read
            later.codes.append(codes)
            later.rows.append(x)
            return x
        y = y.to(device) * (step * rms.to(device))[:, None]
        x = rotate(y, inverse=True) if rotated else y
    if n_out:
        x = x.scatter(1, out_pos.to(device), out_val.to(device))
    return ops.cast(x, dtype)


@dataclass
class _Later:
    """Within `decode_batch`: the calibrated packets read to their codes, and the rows (on the device the batch
    decodes to) to fill from them."""

    device: torch.device
    codes: list[_Codes] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)


@dataclass(eq=False)
class _Codes:
    """A calibrated ECSQ packet read to its codes: what its rows are rebuilt from."""

    y: torch.Tensor  # [N, d] float32: the points the codes stand for, in steps
    rms: torch.Tensor  # [N]
    step: float
    given: torch.Tensor | None  # [N, d_in] rows a predicting basis predicts from; [S, d] a chained packet's first
    out_pos: torch.Tensor | None = None  # [N, n_out] exact outliers, if any
    out_val: torch.Tensor | None = None


def _rebuild(packets: list[_Codes], basis: Basis, chained: bool) -> list[torch.Tensor]:
    """The rows `[N, d]` float32 of calibrated packets, rebuilt together: their rows in one product each (chained
    packets with as many rows per sequence together), the same numbers as one packet at a time."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(packets):
        groups[len(p.y) // len(p.given) if chained else 0].append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(packets)
    for members in groups.values():
        group = [packets[i] for i in members]
        y, rms = torch.cat([p.y for p in group]), torch.cat([p.rms for p in group])
        step = torch.cat([torch.full((len(p.y), 1), p.step, dtype=torch.float64) for p in group])
        if chained:
            x = _chained_rows(y, rms, step, basis, torch.cat([p.given for p in group]))
        else:
            guess = torch.cat(
                [
                    basis.predict(p.given)
                    if p.given is not None
                    else torch.zeros(len(p.y), y.shape[1], dtype=torch.float64)
                    for p in group
                ]
            )
            x = _calibrated_rows(y, rms, step, basis, guess)
        for i, rows in zip(members, x.split([len(p.y) for p in group])):
            p = packets[i]
            out[i] = rows if p.out_pos is None else rows.scatter(1, p.out_pos, p.out_val)
    return out


def _chained_rows(
    y: torch.Tensor, rms: torch.Tensor, step: torch.Tensor, basis: Basis, given: torch.Tensor
) -> torch.Tensor:
    """Decoded rows `[S * T, d]` of S sequences of T rows, each predicted from the row before it (`given` `[S, d]`:
    the one before each sequence's first; `step` `[S * T, 1]`)."""
    s, d = len(given), y.shape[1]
    y, rms, step = y.reshape(s, -1, d), rms.reshape(s, -1), step.reshape(s, -1, 1)
    rows, previous = [], given
    for t in range(y.shape[1]):
        if t:
            time.sleep(0)  # a long sequence's rows are many small steps: let another thread have the GIL between them
        previous = _calibrated_rows(y[:, t], rms[:, t], step[:, t], basis, basis.predict(previous))
        rows.append(previous)
    return torch.stack(rows, 1).reshape(-1, d)


def _ecsq_coded(rms: torch.Tensor, out_pos: torch.Tensor | None, d: int) -> torch.Tensor:
    """`[N, d]` bool: the entries that carry a code (rows with rms > 0, exact-outlier positions excluded)."""
    coded = (rms > 0)[:, None].expand(rms.shape[0], d)
    if out_pos is not None and out_pos.numel():
        coded = coded.clone().scatter(1, out_pos.to(coded.device), False)
    return coded


def _write_outliers(w: BitWriter, x: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Exact outliers of rows `x` `[N, d]` into `w` (positions, then float16|32 values).

    Returns the residual (outliers zeroed), the `[N, n_out]` positions (None without outliers) and whether the values
    need float32.
    """
    if not n_out:
        return x, None, False
    out_pos = ops.top_positions(x, n_out)  # [N, n_out], ascending
    out_val = x.gather(1, out_pos)
    wide_out = bool(out_val.numel()) and ops.needs_float32(out_val.abs().amax(1))
    w.write(out_pos.cpu().numpy(), max(1, math.ceil(math.log2(x.shape[1]))))
    w.write(float_fields(out_val.cpu(), wide_out), 32 if wide_out else 16)
    return x.scatter(1, out_pos, 0.0), out_pos, wide_out


def _read_outliers(
    r: BitReader, n_rows: int, n_out: int, d: int, wide: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `_write_outliers` wrote: positions `[N, n_out]` (int64, on the host) and values (None without outliers)."""
    if not n_out:
        return torch.zeros(n_rows, 0, dtype=torch.long), None
    pos = torch.from_numpy(r.read(n_rows * n_out, max(1, math.ceil(math.log2(d)))).astype(np.int64))
    if (pos >= d).any():
        raise CodecError("outlier position out of range")
    val = _bits_float(r.read(n_rows * n_out, 32 if wide else 16), wide)
    return pos.reshape(n_rows, n_out), val.reshape(n_rows, n_out)


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


def _float_codes(t: torch.Tensor, wide: bool) -> torch.Tensor:
    """float32 (wide) or float16 bit patterns of `t`, flattened, as int64 fields."""
    if wide:
        return t.float().contiguous().view(torch.int32).reshape(-1).to(torch.int64) & 0xFFFFFFFF
    return t.to(torch.float16).contiguous().view(torch.int16).reshape(-1).to(torch.int64) & 0xFFFF


def _bits_float(codes: np.ndarray, wide: bool) -> torch.Tensor:
    return torch.from_numpy(fields_float(codes, wide))
