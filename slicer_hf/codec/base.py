"""The `Codec` interface, the codec registry, and the self-describing envelope every packet starts with.

Envelope: ``[codec_id u8][version u8][dtype u8][ndim u8][dims varint...][codec payload]``.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import CodecError
from .bits import Reader, write_varint
from .ops import KernelError

# what a decode raises as the machine's fault, never the packet's (torch before 2.5 has CUDA's error only)
OUT_OF_MEMORY: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
MACHINE_ERRORS: tuple[type[Exception], ...] = (KernelError, OUT_OF_MEMORY)

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
DTYPES_BY_CODE = {v: k for k, v in DTYPE_CODES.items()}
MAX_NDIM = 8
MAX_OUTLIERS = 64  # exact outliers per row, the most a config asks for (`SlicerConfig.outliers`): decoders hold to it
DEFAULT_MAX_ELEMENTS = 1 << 26
LOSSY_MAX_ABS = 2.0**50  # squares of a row's entries still sum within float32 (no real hidden state comes close)
NON_FINITE = "the packet decodes to NaN or infinite values"  # a packet no encoder makes: encode refuses them
# set by the side that runs the codec, never by its peer: a decoder's safety bound, an encoder's effort (a client
# naming zstd level 22 for the server's replies had bought 3x the server's encode CPU); neither changes the bytes
LOCAL_PARAMS = frozenset({"max_elements", "zstd_level"})

REGISTRY: dict[str, type[Codec]] = {}


@dataclass(frozen=True)
class CodecStats:
    """What one encode cost: bytes on the wire (envelope included), per token and per element."""

    nbytes: int
    tokens: int
    elements: int

    @property
    def bits_per_token(self) -> float:
        return 8.0 * self.nbytes / max(self.tokens, 1)

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(self.elements, 1)


class Codec(ABC):
    """Turns a hidden-state tensor `[..., d]` into bytes and back. Rows (the last dim) are coded independently.

    Subclasses implement `_encode_rows` / `_decode_rows` on a `[N, d]` view; the envelope, input validation and
    the promise that malformed bytes raise `CodecError` (and nothing else) live here.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    version: ClassVar[int] = 1
    lossless: ClassVar[bool] = False
    costly: ClassVar[bool] = False  # whether coding a row costs far more than reading its bytes (a server codes large
    # packets and replies of such a codec beside its compute thread)

    def __init__(self, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        self.max_elements = max_elements

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def params(self) -> dict[str, Any]:
        """Constructor parameters that change the bytes (the codec spec peers must agree on)."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, **self.params()}

    @property
    def given_width(self) -> int | None:
        """Width of the given rows this codec codes against, None for none. Given rows are rows both sides hold,
        one per coded row (a compressed downlink's: the decoded uplink rows at the same positions); `encode` and
        `decode` then both take them (`given=`), and a packet decodes right only against the rows it was coded
        against."""
        return None

    chains: bool = False  # each row coded against the decoded row before it in its sequence (see `encode`)

    def encode(self, x: torch.Tensor, given: torch.Tensor | None = None) -> bytes:
        """Encode a float tensor `[..., d]`; raises `CodecError` for non-float, empty-row or non-finite input.

        `given`: for a codec with a `given_width`, the rows `[..., d_in]` the packet is coded against; for one that
        `chains` (sequences `[..., T, d]`, each row predicted from the decoded row before it), the decoded row
        `[..., d]` before each sequence's first, or None for sequences that start here."""
        if not isinstance(x, torch.Tensor) or x.dtype not in DTYPE_CODES:
            raise CodecError(
                f"codec {self.name!r} takes a float tensor (float16/bfloat16/float32/float64), got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.ndim < 1 or x.ndim > MAX_NDIM or x.shape[-1] == 0:
            raise CodecError(
                f"codec {self.name!r} takes a tensor [..., d] with 1..{MAX_NDIM} dims and d >= 1, "
                f"got shape {tuple(x.shape)}"
            )
        if x.numel() > self.max_elements:
            raise CodecError(f"tensor of {x.numel()} elements exceeds max_elements={self.max_elements}")
        if not torch.isfinite(x).all():
            raise CodecError(f"codec {self.name!r} cannot encode NaN or Inf values")
        if not self.lossless and x.numel() and (largest := x.detach().abs().max().item()) > LOSSY_MAX_ABS:
            raise CodecError(
                f"values up to {largest:.4g} are beyond what codec {self.name!r} codes in float32 arithmetic "
                f"(|x| <= {LOSSY_MAX_ABS:.4g}); only 'identity' carries them"
            )
        given_rows = self._given_rows(given, tuple(x.shape))
        header = self.envelope(tuple(x.shape), x.dtype)
        rows = x.detach().reshape(-1, x.shape[-1])
        if rows.device.type != "cpu" and not self._codes_on(rows.device):
            rows = rows.cpu()
        return header + (self._encode_rows(rows) if given_rows is None else self._encode_rows(rows, given=given_rows))

    def _given_rows(self, given: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        """`given` as `[N, width]` rows for a tensor of this shape (see `encode`), checked."""
        if self.chains:
            if len(shape) < 2:
                raise CodecError(f"codec {self.name!r} codes sequences [..., T, d], got shape {shape}")
            want = (*shape[:-2], shape[-1])
            if given is None:
                return torch.zeros(math.prod(want[:-1]), shape[-1])
        else:
            width = self.given_width
            if width is None:
                if given is not None:
                    raise CodecError(f"codec {self.name!r} codes against no given rows")
                return None
            want = (*shape[:-1], width)
            if given is None:
                raise CodecError(f"codec {self.name!r} codes against given rows {want} both sides hold: pass given=")
        if not isinstance(given, torch.Tensor) or not given.is_floating_point() or tuple(given.shape) != want:
            raise CodecError(f"given rows must be a float tensor of shape {want}, got {getattr(given, 'shape', given)}")
        if not torch.isfinite(given).all():
            raise CodecError("given rows hold NaN or Inf")
        return given.detach().reshape(-1, want[-1])

    def envelope(self, shape: tuple[int, ...], dtype: torch.dtype) -> bytes:
        """The envelope a packet of a tensor of this shape and dtype starts with."""
        return bytes([self.codec_id, self.version, DTYPE_CODES[dtype], len(shape)]) + b"".join(
            write_varint(int(n)) for n in shape
        )

    def bare(self, packet: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> bytes | None:
        """`packet` as a session sends it to a peer that holds this codec's spec and knows the tensor's shape and
        dtype: without what those say (at least the envelope); None when the packet is not of that shape and dtype.
        `unbare` gives the packet back byte for byte."""
        envelope = self.envelope(shape, dtype)
        return packet[len(envelope) :] if packet.startswith(envelope) else None

    def unbare(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> bytes:
        """The packet `bare` made `body` from."""
        return self.envelope(shape, dtype) + body

    def decode(
        self,
        data: bytes,
        device: torch.device | str | None = None,
        expect_shape: tuple[int | None, ...] | None = None,
        expect_dtypes: frozenset[torch.dtype] | None = None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode bytes from `encode`; any malformed input raises `CodecError`, and so do values that are not all
        finite (a failure of the machine's, `MACHINE_ERRORS`, is raised as itself).

        Args:
            data: a packet.
            device: where the tensor should end up.
            expect_shape: the shape the receiver expects (None for a dimension it cannot know); a packet that claims
                another is refused from its envelope, before any row is decoded or allocated.
            expect_dtypes: the dtypes the receiver accepts, checked the same way.
            given: the rows the packet was coded against (`given_width`), one per row of the packet's tensor.
        """
        out = self._read(data, device, expect_shape, expect_dtypes, given)
        if not torch.isfinite(out).all():
            raise CodecError(NON_FINITE)
        return out

    def _read(
        self,
        data: bytes,
        device: torch.device | str | None,
        expect_shape: tuple[int | None, ...] | None,
        expect_dtypes: frozenset[torch.dtype] | None,
        given: torch.Tensor | None,
    ) -> torch.Tensor:
        """`decode` less its check that the values are finite (which `decode_batch` makes once all are rebuilt)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError(f"decode takes bytes, got {type(data).__name__}")
        try:
            with self._decoding_on(device):
                out = self._decode(Reader(bytes(data)), expect_shape, expect_dtypes, given)
        except (CodecError, *MACHINE_ERRORS):  # the packet's fault, or the machine's
            raise
        except Exception as exc:  # any other failure on hostile bytes is still malformed input
            raise CodecError(f"malformed {self.name!r} packet: {type(exc).__name__}: {exc}") from exc
        return out.to(device) if device is not None else out

    @contextlib.contextmanager
    def _decoding_on(self, device: torch.device | str | None) -> Iterator[None]:
        """The scope of decoding one packet for `device`: a codec whose kernels run there decodes on it (by default,
        rows are built on the host and moved)."""
        yield

    def decode_batch(
        self,
        packets: Sequence[bytes],
        device: torch.device | str | None = None,
        expect_shapes: Sequence[tuple[int | None, ...] | None] | None = None,
        expect_dtypes: frozenset[torch.dtype] | None = None,
        givens: Sequence[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor | Exception]:
        """Decode several packets at once: for each, the tensor `decode` gives, or the `CodecError` it raises (one
        bad packet fails alone), or the machine's error (`MACHINE_ERRORS`) where decoding it failed for want of
        memory, say. A codec may share work between the packets (`SlicerCodec` rebuilds calibrated rows in one
        product); the results are those of one `decode` each.

        Args:
            packets: the packets.
            device, expect_dtypes: as for `decode`.
            expect_shapes, givens: per packet, as `decode`'s `expect_shape` and `given` (None: none for any).
        """
        n = len(packets)
        shapes, givens = expect_shapes or [None] * n, givens or [None] * n
        out: list[torch.Tensor | Exception] = []
        with self._together(device):
            for data, shape, given in zip(packets, shapes, givens):
                try:
                    out.append(self._read(data, device, shape, expect_dtypes, given))
                except (CodecError, *MACHINE_ERRORS) as exc:
                    out.append(exc)
        decoded = [x for x in out if isinstance(x, torch.Tensor)]
        if len(decoded) > 1 and bool(torch.isfinite(torch.cat([x.reshape(-1) for x in decoded])).all()):
            return out  # the common case, in one check; else each packet's own
        finite = iter(torch.stack([torch.isfinite(x).all() for x in decoded]).tolist() if decoded else [])
        return [x if isinstance(x, Exception) or next(finite) else CodecError(NON_FINITE) for x in out]

    @contextlib.contextmanager
    def _together(self, device: torch.device | str | None) -> Iterator[None]:
        """The scope of one `decode_batch`, for a codec that shares work between its packets (by default none)."""
        yield

    def measure(self, x: torch.Tensor) -> CodecStats:
        """Bytes one encode of `x` puts on the wire (`len(encode(x))`), per token (row) and element."""
        return CodecStats(len(self.encode(x)), x.numel() // max(x.shape[-1], 1), x.numel())

    def _decode(
        self,
        reader: Reader,
        expect_shape: tuple[int | None, ...] | None = None,
        expect_dtypes: frozenset[torch.dtype] | None = None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        codec_id, version, dtype_code, ndim = reader.take(4)
        if codec_id != self.codec_id:
            raise CodecError(f"packet is for codec id {codec_id}, this decoder is {self.name!r} ({self.codec_id})")
        if version != self.version:
            raise CodecError(f"{self.name!r} packet version {version}, this decoder reads version {self.version}")
        if dtype_code not in DTYPES_BY_CODE:
            raise CodecError(f"unknown dtype code {dtype_code}")
        if not 1 <= ndim <= MAX_NDIM:
            raise CodecError(f"ndim must be in [1, {MAX_NDIM}], got {ndim}")
        shape = [reader.varint(limit=self.max_elements) for _ in range(ndim)]
        if math.prod(shape) > self.max_elements:
            raise CodecError(f"shape {shape} exceeds max_elements={self.max_elements}")
        if shape[-1] == 0:
            raise CodecError(f"last dim must be >= 1, got shape {shape}")
        dtype = DTYPES_BY_CODE[dtype_code]
        if expect_shape is not None and (
            len(shape) != len(expect_shape) or any(e is not None and e != n for e, n in zip(expect_shape, shape))
        ):
            raise CodecError(f"packet claims shape {tuple(shape)}, expected {tuple(expect_shape)}")
        if expect_dtypes is not None and dtype not in expect_dtypes:
            raise CodecError(f"packet claims dtype {dtype}, expected one of {sorted(map(str, expect_dtypes))}")
        n_rows = math.prod(shape[:-1])
        given_rows = self._given_rows(given, tuple(shape))
        if given_rows is None:
            rows = self._decode_rows(reader, n_rows, shape[-1], dtype)
        else:
            rows = self._decode_rows(reader, n_rows, shape[-1], dtype, given=given_rows)
        reader.finish()
        return rows.reshape(shape)

    def _codes_on(self, device: torch.device) -> bool:
        """Whether `_encode_rows` takes rows on this (non-CPU) device; otherwise they are copied to the host."""
        return False

    @abstractmethod
    def _encode_rows(self, rows: torch.Tensor) -> bytes:
        """Payload for `rows` `[N, d]` (any supported float dtype; on the CPU unless `_codes_on` says otherwise)."""

    @abstractmethod
    def _decode_rows(self, reader: Reader, n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        """Read the payload and return `[n_rows, d]` in `dtype`."""


def raw_bytes(x: torch.Tensor) -> bytes:
    """The tensor's memory as bytes (bfloat16 included, which numpy cannot hold)."""
    x = x.contiguous()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return x.numpy().tobytes()


def from_raw_bytes(data: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    view = torch.int16 if dtype == torch.bfloat16 else dtype
    out = torch.frombuffer(bytearray(data), dtype=view, count=count) if count else torch.empty(0, dtype=view)
    return out.view(dtype) if dtype == torch.bfloat16 else out
