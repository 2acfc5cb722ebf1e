"""Calibrated bases for SLICER ECSQ (`rotation="calibrated"`): a fixed linear transform of each row, fitted once on
calibration text, in whose coordinates a uniform step costs the fewest bits for the least KL.

A basis holds, for a width d:

- `norm_weight` `[d]`: 1 for the channels a row's RMS is taken over, 0 for the few massive-activation channels
  left out of it (they would swamp it);
- `forward` `[d, d]`: the row, over its RMS and less `mean`, times `forward` gives the coordinates that are coded;
- `inverse` `[d, d]`: the way back (`forward`'s inverse);
- `mean` `[d]`: the calibration rows' mean (over their RMS);
- `scale` `[d]`: each coordinate's mean absolute value, the scale of the Laplace model its codes are entropy-coded
  under;

and, for a *predicting* basis (the compressed downlink's: the server answers rows the edge has just sent it),
a linear predictor of the coordinates from rows both sides hold, the "given" rows of width d_in (the decoded uplink
rows at the same positions):

- `given_norm` `[d_in]`: the channels of a given row its RMS is taken over (as `norm_weight`);
- `given_weight` `[d_in, d]`, `given_bias` `[d]`: the prediction, (given / its RMS) @ `given_weight` + `given_bias`.

Only the coordinates less their prediction are then coded, and `scale` is the scale of that residual.

`slicer_hf.tuning.calibrate.fit_basis` builds one from split-layer states and the gradients of the model's sampled
log-likelihood at them: a metric in which squared error is twice the expected KL (the Fisher information of the
server's output), then principal axes of the rows in that metric, so each coordinate is uncorrelated with the others
and one step gives every coordinate the same share of KL.

Edge and server must hold the same basis: a codec spec names it by `digest` (16 hex digits of SHA-256 over its
tensors), and `lookup` finds it among the bases registered in this process (`register`, `Basis.load`) and the ones
that ship with the presets. The file is safetensors (`slicer_basis_<digest>.safetensors`, beside the config that
names it) with its provenance in the metadata.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CodecError

BASIS_PREFIX = "slicer_basis_"
TENSORS = ("forward", "inverse", "mean", "scale", "norm_weight")
PREDICTOR = ("given_weight", "given_bias", "given_norm")  # a predicting basis's, all three or none
_LOCK = threading.Lock()
_SCAN_LOCK = threading.Lock()  # held while the presets' bases load


@dataclass(frozen=True, eq=False)
class Basis:
    """A calibrated transform for rows of width d (see the module docstring)."""

    forward: torch.Tensor  # [d, d] float32
    inverse: torch.Tensor  # [d, d] float32
    mean: torch.Tensor  # [d] float32
    scale: torch.Tensor  # [d] float32, > 0
    norm_weight: torch.Tensor  # [d] float32, 0 or 1, not all 0
    metadata: dict[str, str] = field(default_factory=dict)
    given_weight: torch.Tensor | None = None  # [d_in, d] float32: a predicting basis's (see the module docstring)
    given_bias: torch.Tensor | None = None  # [d] float32
    given_norm: torch.Tensor | None = None  # [d_in] float32, 0 or 1, not all 0

    def __post_init__(self) -> None:
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        shapes = {"forward": (d, d), "inverse": (d, d), "mean": (d,), "scale": (d,), "norm_weight": (d,)}
        present = [getattr(self, name) is not None for name in PREDICTOR]
        if any(present) and not all(present):
            raise CodecError(f"a predicting basis needs all of {', '.join(PREDICTOR)}")
        if all(present):
            w = self.given_weight
            d_in = w.shape[0] if isinstance(w, torch.Tensor) and w.ndim == 2 else -1
            shapes |= {"given_weight": (d_in, d), "given_bias": (d,), "given_norm": (d_in,)}
        for name, shape in shapes.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or d < 1:
                raise CodecError(f"basis `{name}` must be a tensor of shape {shape}, got {getattr(t, 'shape', t)}")
            if not torch.isfinite(t).all():
                raise CodecError(f"basis `{name}` holds NaN or Inf")
            object.__setattr__(self, name, t.detach().to("cpu", torch.float32).contiguous())
        if not (self.scale > 0).all():
            raise CodecError("basis `scale` must be positive")
        for name in ("norm_weight", "given_norm") if self.predicts else ("norm_weight",):
            weight = getattr(self, name)
            if not ((weight == 0) | (weight == 1)).all() or not weight.any():
                raise CodecError(f"basis `{name}` must hold 0s and 1s, not all 0")

    @property
    def tensors(self) -> tuple[str, ...]:
        """The names of the tensors this basis holds (a predicting basis's predictor too)."""
        return TENSORS + PREDICTOR if self.predicts else TENSORS

    @property
    def predicts(self) -> bool:
        """Whether the coordinates are coded less a prediction from given rows (see the module docstring)."""
        return self.given_weight is not None

    @property
    def given_width(self) -> int | None:
        """Width of the given rows a predicting basis predicts from (None: it predicts nothing)."""
        return None if self.given_weight is None else int(self.given_weight.shape[0])

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])

    @functools.cached_property
    def digest(self) -> str:
        """What a codec spec names this basis by: 16 hex digits of SHA-256 over the width and the tensors."""
        h = hashlib.sha256(self.width.to_bytes(4, "little"))
        for name in self.tensors:
            h.update(getattr(self, name).numpy().tobytes())
        return h.hexdigest()[:16]

    @functools.cached_property
    def f64(self) -> dict[str, torch.Tensor]:
        """The tensors in float64, as coding uses them: converted once, not at every packet."""
        return {name: getattr(self, name).double() for name in self.tensors}

    def row_rms(self, rows: torch.Tensor) -> torch.Tensor:
        """`[N]` float64: each row's RMS over the channels `norm_weight` counts."""
        return weighted_rms(rows, self.f64["norm_weight"].to(rows.device))

    def predict(self, given: torch.Tensor) -> torch.Tensor:
        """`[N, d]` float64, on the CPU: a predicting basis's prediction of the coordinates of the rows whose
        given rows are `given` `[N, d_in]` (a given row of zeros predicts the bias)."""
        f = self.f64
        return given_features(given.detach().cpu(), f["given_norm"]) @ f["given_weight"] + f["given_bias"]

    @functools.cached_property
    def code_bound(self) -> float:
        """Bound on |coordinate| for any row when every channel counts in the RMS (row/RMS then has norm sqrt(d)):
        the largest column norm of `forward` x (sqrt(d) + |mean|); infinite when some channels do not count, or
        when what is coded is a residual (a predicting basis)."""
        if not self.norm_weight.all() or self.predicts:
            return math.inf
        return float(self.f64["forward"].norm(dim=0).max()) * (self.width**0.5 + float(self.f64["mean"].norm()))

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            path = path / basis_file(self.digest)
        tensors = {n: getattr(self, n) for n in self.tensors}
        save_file(tensors, str(path), metadata={**self.metadata, "digest": self.digest})
        path.chmod(0o644)  # as any other file of a config folder (safetensors writes 0600)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Basis:
        """Read a basis file and register it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                missing = sorted(set(TENSORS) - names)
                if missing:
                    raise CodecError(f"{path} is not a SLICER basis: no {', '.join(missing)}")
                held = [n for n in TENSORS + PREDICTOR if n in names]
                basis = cls(**{n: f.get_tensor(n) for n in held}, metadata=dict(f.metadata() or {}))
        except (OSError, SafetensorError) as exc:
            raise CodecError(f"cannot read a SLICER basis from {path}: {exc}") from exc
        return register(basis)


def given_features(given: torch.Tensor, given_norm: torch.Tensor) -> torch.Tensor:
    """`[N, d_in]` float64: given rows over their RMS (the channels `given_norm` counts), what a predicting basis's
    weights multiply; a row of zeros stays zeros."""
    return given.double() / weighted_rms(given, given_norm).clamp_min(1e-300)[:, None]


def weighted_rms(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`[N]` float64: each row's RMS over the channels `weight` (0 or 1 each) counts."""
    weight = weight.double()
    return (rows.double().pow(2) @ weight / weight.sum()).sqrt()


@dataclass
class _Registry:
    """The bases this process holds, by digest, and whether the presets' bases were looked for."""

    bases: dict[str, Basis] = field(default_factory=dict)
    presets_scanned: bool = False


_REGISTRY = _Registry()


def load_bases(paths: Iterable[str | Path]) -> list[Basis]:
    """Load and register bases: files, or folders (every `slicer_basis_*.safetensors` in them)."""
    loaded = []
    for path in map(Path, paths):
        files = sorted(path.glob(f"{BASIS_PREFIX}*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise CodecError(f"no {BASIS_PREFIX}*.safetensors in {path}")
        loaded += [Basis.load(f) for f in files]
    return loaded


def basis_file(digest: str) -> str:
    """The file name of the basis with this digest."""
    return f"{BASIS_PREFIX}{digest}.safetensors"


def register(basis: Basis) -> Basis:
    """Make `basis` known to `lookup` in this process; returns it. The digest covers the tensors only, so a basis
    fitted again to the same tensors replaces the one before: its metadata (the latest provenance) is what a saved
    config writes."""
    with _LOCK:
        _REGISTRY.bases[basis.digest] = basis
    return basis


def lookup(digest: str) -> Basis:
    """The registered basis with this digest (the presets' bases are found without registering them)."""
    with _LOCK:
        found = _REGISTRY.bases.get(digest)
    if found is None:
        _register_presets()
        with _LOCK:
            found = _REGISTRY.bases.get(digest)
    if found is None:
        raise CodecError(
            f"unknown SLICER basis {digest!r}: load its {basis_file(digest)} on this side too (from the config's "
            "folder, or `slicer-hf serve --basis FILE`)"
        )
    return found


def _register_presets() -> None:
    """Once per registry: a peer naming unknown digests over and over must not make this side reread the files.
    Lookups that arrive while the files load wait for them (concurrent OPENs must all find the presets' bases)."""
    from ..config import PRESETS_DIR

    with _SCAN_LOCK:
        if _REGISTRY.presets_scanned:
            return
        try:
            for path in sorted(PRESETS_DIR.glob(f"*/{BASIS_PREFIX}*.safetensors")) if PRESETS_DIR.is_dir() else []:
                Basis.load(path)
        finally:
            _REGISTRY.presets_scanned = True
