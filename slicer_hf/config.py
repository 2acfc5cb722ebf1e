"""`SlicerConfig`: what a split deployment agrees on, saved as sorted, version-stamped JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .version import __version__

if TYPE_CHECKING:
    from .bitrate import BitrateController
    from .codec.base import Codec

logger = logging.getLogger(__name__)

CONFIG_NAME = "slicer_config.json"
PRESETS_DIR = Path(__file__).parent / "presets"  # shipped in the wheel; the repository's configs/ points here
DEFAULT_PRESET = "smollm2-135m-split24"  # the README's: the embedded SmolLM2 split at layer 24
CODECS = ("identity", "fp16", "bf16", "int8", "topk", "grouped", "slicer")
DOWNLINKS = ("hidden", "topk_logits", "logits")
DOWNLINK_DTYPES = ("auto", "float32", "float16", "bfloat16")
INDEX_CODINGS = ("auto", "bitmap", "rice")
ROTATIONS = ("none", "orthogonal", "calibrated")
ENTROPY_CODINGS = ("none", "zstd")
QUANTIZERS = ("blocks", "ecsq")


@dataclass
class SlicerConfig:
    """Settings shared by the edge and the server of a split deployment.

    Runtime-only settings (server addresses, timeouts, devices) are not part of it: they are arguments of
    `SlicerModelForCausalLM.from_pretrained` and of the server, and are never saved.
    """

    split_layer: int | None = field(
        default=None, metadata={"help": "Number of decoder layers run on the edge (k). None: 3/4 of the model."}
    )
    codec: str = field(default="slicer", metadata={"help": f"Uplink codec, one of {CODECS}."})
    sparsity: float = field(default=0.0, metadata={"help": "ATKF: share of each row's entries dropped, in [0, 1)."})
    asymmetry: float | str = field(
        default="auto",
        metadata={"help": "ATKF: share of positives among the kept entries, in [0, 1], or 'auto' (magnitude top-K)."},
    )
    num_blocks: int = field(default=1, metadata={"help": "MS: equal-cardinality magnitude blocks per row."})
    distortion: float = field(
        default=0.08,
        metadata={"help": "ABQ: relative L2 error budget of a row's kept entries (shared per entry), in (0, 1)."},
    )
    bit_candidates: tuple[int, ...] = field(
        default=(1, 2, 3, 4, 5, 6, 8), metadata={"help": "ABQ: magnitude bitwidths a block may use (0..16)."}
    )
    index_coding: str = field(
        default="auto", metadata={"help": f"How kept positions are coded, one of {INDEX_CODINGS}."}
    )
    outliers: int = field(
        default=2,
        metadata={"help": "slicer, grouped: largest-magnitude entries per row sent exactly before quantizing."},
    )
    rotation: str = field(
        default="orthogonal",
        metadata={
            "help": f"Fixed transform applied after outlier removal, one of {ROTATIONS}: 'calibrated' (ECSQ only) "
            "codes each row in the calibrated basis `basis` (`slicer-hf calibrate`)."
        },
    )
    basis: str | None = field(
        default=None,
        metadata={"help": "Digest of the calibrated basis of rotation='calibrated' (its file sits beside the config)."},
    )
    trellis: bool = field(
        default=False,
        metadata={
            "help": "With a calibrated basis: trellis-coded quantization (8 states, the encoder searching each row's "
            "best path) instead of rounding each coordinate; about 5% fewer bits at equal KL for about 1 ms more "
            "encoding per row. Applies to the compressed downlink too when it has a basis."
        },
    )
    predict_previous: bool = field(
        default=False,
        metadata={
            "help": "With a calibrated basis that predicts (`slicer-hf calibrate --predict-previous`): each row is "
            "coded less a prediction from the decoded row before it in its sequence, which the server holds too "
            "(closed loop); a step that does not follow the last one starts its sequence afresh."
        },
    )
    entropy_coding: str = field(
        default="zstd", metadata={"help": f"Entropy stage over the packed codes, one of {ENTROPY_CODINGS}."}
    )
    quantizer: str = field(
        default="blocks",
        metadata={
            "help": f"How the residual is quantized, one of {QUANTIZERS}: 'blocks' (ATKF + MS + ABQ, fixed-rate "
            "codes) or 'ecsq' (uniform steps of `step` x the row RMS, rANS-coded; needs sparsity 0)."
        },
    )
    step: float = field(
        default=0.3, metadata={"help": "ECSQ: quantization step relative to each row's RMS, in (0, 4]."}
    )
    bits: int = field(default=4, metadata={"help": "grouped: bits of each integer code, in [2, 16]."})
    group_size: int = field(
        default=32, metadata={"help": "grouped: entries sharing one absmax scale, in [1, 65536] (>= d: per token)."}
    )
    downlink: str = field(default="hidden", metadata={"help": f"What the server sends back, one of {DOWNLINKS}."})
    downlink_topk: int = field(default=64, metadata={"help": "Logits kept per token when downlink='topk_logits'."})
    downlink_dtype: str = field(
        default="auto",
        metadata={"help": f"dtype of hidden states / logits sent back, one of {DOWNLINK_DTYPES} ('auto': exact)."},
    )
    downlink_step: float | None = field(
        default=None,
        metadata={
            "help": "None: the final hidden states come back exactly (downlink 'hidden'); a step in (0, 4]: they "
            "come back through the SLICER ECSQ codec at that step (lossy), the edge applying the final norm and head."
        },
    )
    downlink_basis: str | None = field(
        default=None,
        metadata={"help": "Digest of a calibrated basis for the compressed downlink (None: the seeded rotation)."},
    )
    bitrate_ladder: tuple[tuple[float, float], ...] = field(
        default=(),
        metadata={
            "help": "Adaptive bitrate: (ECSQ step, profiled bits/token) rungs the edge may move `step` along between "
            "decode steps, finest first, the last one the quality floor (written by `slicer-hf search --adaptive`). "
            "Empty: the step stays fixed."
        },
    )
    target_token_latency_ms: float | None = field(
        default=None, metadata={"help": "Adaptive bitrate: the per-token latency the edge holds by moving the step."}
    )
    prefill_chunk_tokens: int = field(
        default=256, metadata={"help": "Prompt tokens per uplink message during prefill."}
    )
    model_id: str | None = field(default=None, metadata={"help": "The model this config was made for."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Decoder layers of that model."})
    hidden_size: int | None = field(default=None, metadata={"help": "Hidden size of that model."})

    def __post_init__(self) -> None:
        # Normalise what JSON and the CLI hand over (lists, "0.5"); anything malformed is left for validate() to name.
        for f in dataclasses.fields(self):  # a numpy scalar (np.float32(0.3)) as Python's number: JSON takes no other
            value = getattr(self, f.name)
            if isinstance(value, numbers.Number) and type(value) not in (int, float) and hasattr(value, "item"):
                setattr(self, f.name, value.item())
        if _ints(self.bit_candidates):
            self.bit_candidates = tuple(sorted(set(self.bit_candidates)))
        if self.bitrate_ladder is None:  # JSON null: no ladder, as the default
            self.bitrate_ladder = ()
        if _rungs(self.bitrate_ladder):
            self.bitrate_ladder = tuple((float(s), float(b)) for s, b in self.bitrate_ladder)
        if isinstance(self.asymmetry, str) and self.asymmetry != "auto":
            with contextlib.suppress(ValueError):
                self.asymmetry = float(self.asymmetry)
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the field, the rule and the value for the first violation."""
        _check(
            self.split_layer is None or (_int(self.split_layer) and self.split_layer >= 1),
            "split_layer",
            "must be an integer >= 1 or None",
            self.split_layer,
        )
        _check(self.codec in CODECS, "codec", f"must be one of {CODECS}", self.codec)
        _check(_real(self.sparsity) and 0.0 <= self.sparsity < 1.0, "sparsity", "must be in [0, 1)", self.sparsity)
        _check(
            self.asymmetry == "auto" or (_real(self.asymmetry) and 0.0 <= self.asymmetry <= 1.0),
            "asymmetry",
            "must be 'auto' or in [0, 1]",
            self.asymmetry,
        )
        _check(
            _int(self.num_blocks) and 1 <= self.num_blocks <= 64,
            "num_blocks",
            "must be an integer in [1, 64]",
            self.num_blocks,
        )
        _check(
            _real(self.distortion) and 0.0 < self.distortion < 1.0, "distortion", "must be in (0, 1)", self.distortion
        )
        _check(
            _ints(self.bit_candidates)
            and len(self.bit_candidates) > 0
            and all(0 <= b <= 16 for b in self.bit_candidates),
            "bit_candidates",
            "must be a non-empty set of integer bitwidths in [0, 16]",
            self.bit_candidates,
        )
        _check(self.index_coding in INDEX_CODINGS, "index_coding", f"must be one of {INDEX_CODINGS}", self.index_coding)
        _check(
            _int(self.outliers) and 0 <= self.outliers <= 64, "outliers", "must be an integer in [0, 64]", self.outliers
        )
        _check(self.rotation in ROTATIONS, "rotation", f"must be one of {ROTATIONS}", self.rotation)
        _check(
            self.entropy_coding in ENTROPY_CODINGS,
            "entropy_coding",
            f"must be one of {ENTROPY_CODINGS}",
            self.entropy_coding,
        )
        _check(self.quantizer in QUANTIZERS, "quantizer", f"must be one of {QUANTIZERS}", self.quantizer)
        for name in ("trellis", "predict_previous"):
            _check(type(getattr(self, name)) is bool, name, "must be true or false", getattr(self, name))
        if self.rotation == "calibrated" or self.basis is not None:
            _check(
                self.rotation == "calibrated" and self.quantizer == "ecsq" and _is_digest(self.basis),
                "rotation",
                "'calibrated' goes with quantizer='ecsq' and a `basis` digest (16 hex digits); to leave the "
                "calibrated basis, set basis=None, trellis=False and predict_previous=False with the new rotation",
                (self.rotation, self.quantizer, self.basis),
            )
        if self.trellis:
            _check(
                self.trellis is True and (self.rotation == "calibrated" or self.downlink_basis is not None),
                "trellis",
                "goes with a calibrated basis (rotation='calibrated', or a downlink_basis)",
                self.trellis,
            )
        if self.predict_previous:
            _check(
                self.predict_previous is True and self.rotation == "calibrated" and self.outliers == 0,
                "predict_previous",
                "goes with a calibrated basis (rotation='calibrated') and outliers=0",
                (self.predict_previous, self.rotation, self.outliers),
            )
        if self.downlink_basis is not None:
            _check(_is_digest(self.downlink_basis), "downlink_basis", "must be 16 hex digits", self.downlink_basis)
            _check(self.downlink_step is not None, "downlink_step", "must be set with a downlink_basis", None)
        _check(_real(self.step) and 0.0 < self.step <= 4.0, "step", "must be in (0, 4]", self.step)
        _check(type(self.bits) is int and 2 <= self.bits <= 16, "bits", "must be an integer in [2, 16]", self.bits)
        _check(
            type(self.group_size) is int and 1 <= self.group_size <= 1 << 16,
            "group_size",
            "must be an integer in [1, 65536]",
            self.group_size,
        )
        _check(
            self.codec != "slicer" or self.quantizer != "ecsq" or self.sparsity == 0.0,
            "sparsity",
            "must be 0 with quantizer='ecsq' (ECSQ codes every entry)",
            self.sparsity,
        )
        _check(self.downlink in DOWNLINKS, "downlink", f"must be one of {DOWNLINKS}", self.downlink)
        _check(
            type(self.downlink_topk) is int and 1 <= self.downlink_topk <= 1 << 16,
            "downlink_topk",
            "must be an integer in [1, 65536]",
            self.downlink_topk,
        )
        _check(
            self.downlink_dtype in DOWNLINK_DTYPES,
            "downlink_dtype",
            f"must be one of {DOWNLINK_DTYPES}",
            self.downlink_dtype,
        )
        if self.downlink_step is not None:
            _check(
                _real(self.downlink_step) and 0.0 < self.downlink_step <= 4.0,
                "downlink_step",
                "must be None or in (0, 4]",
                self.downlink_step,
            )
            _check(self.downlink == "hidden", "downlink", "must be 'hidden' with a downlink_step", self.downlink)
        if self.bitrate_ladder or self.target_token_latency_ms is not None:
            self._validate_bitrate()
        _check(
            _int(self.prefill_chunk_tokens) and self.prefill_chunk_tokens >= 1,
            "prefill_chunk_tokens",
            "must be an integer >= 1",
            self.prefill_chunk_tokens,
        )
        for name in ("num_hidden_layers", "hidden_size"):
            value = getattr(self, name)
            _check(value is None or (_int(value) and value >= 1), name, "must be an integer >= 1 or None", value)
        _check(
            self.model_id is None or isinstance(self.model_id, str),
            "model_id",
            "must be a string or None",
            self.model_id,
        )
        if self.split_layer is not None and self.num_hidden_layers is not None:
            _check(
                self.split_layer < self.num_hidden_layers,
                "split_layer",
                f"must be < num_hidden_layers ({self.num_hidden_layers})",
                self.split_layer,
            )

    def _validate_bitrate(self) -> None:
        ladder = self.bitrate_ladder
        _check(
            bool(ladder) and self.target_token_latency_ms is not None,
            "bitrate_ladder",
            "and target_token_latency_ms go together (adaptive bitrate needs both)",
            ladder,
        )
        _check(
            self.codec == "slicer" and self.quantizer == "ecsq",
            "bitrate_ladder",
            "needs codec='slicer' with quantizer='ecsq' (it moves the ECSQ step)",
            (self.codec, self.quantizer),
        )
        _check(_rungs(ladder), "bitrate_ladder", "must be a list of (step, bits) pairs of numbers", ladder)
        steps, bits = [s for s, _ in ladder], [b for _, b in ladder]
        _check(
            all(0.0 < s <= 4.0 for s in steps) and all(b > 0 for b in bits),
            "bitrate_ladder",
            "rungs must be (step in (0, 4], bits > 0)",
            ladder,
        )
        _check(
            all(a < b for a, b in zip(steps, steps[1:])) and all(a > b for a, b in zip(bits, bits[1:])),
            "bitrate_ladder",
            "must go from fine to coarse: steps rising, bits falling",
            ladder,
        )
        _check(
            _real(self.target_token_latency_ms) and self.target_token_latency_ms > 0,
            "target_token_latency_ms",
            "must be a number > 0",
            self.target_token_latency_ms,
        )

    def bitrate_controller(self) -> BitrateController | None:
        """The edge's adaptive-bitrate controller (None when the step is fixed), starting at the rung nearest `step`."""
        from .bitrate import BitrateController

        if not self.bitrate_ladder:
            return None
        start = min(range(len(self.bitrate_ladder)), key=lambda i: abs(self.bitrate_ladder[i][0] - self.step))
        return BitrateController(self.bitrate_ladder, float(self.target_token_latency_ms), start=start)

    def downlink_codec(self) -> Codec | None:
        """The codec of the hidden-state replies: None for exact replies, else SLICER ECSQ at `downlink_step` with
        this config's other SLICER knobs."""
        from .codec import build_codec

        if self.downlink_step is None:
            return None
        calibrated = self.downlink_basis is not None
        rotation = "orthogonal" if self.rotation == "calibrated" else self.rotation  # the uplink's basis is not for L
        return build_codec(
            self.replace(
                codec="slicer",
                quantizer="ecsq",
                sparsity=0.0,
                step=self.downlink_step,
                rotation="calibrated" if calibrated else rotation,
                basis=self.downlink_basis,
                trellis=self.trellis and calibrated,
                predict_previous=False,
            )
        )

    def codec_params(self) -> dict[str, Any]:
        """The parameters `build_codec` takes for `self.codec`."""
        if self.codec == "topk":
            return {"sparsity": self.sparsity}
        if self.codec == "grouped":
            return {"bits": self.bits, "group_size": self.group_size, "outliers": self.outliers}
        if self.codec != "slicer":
            return {}
        return (
            {
                "sparsity": self.sparsity,
                "asymmetry": self.asymmetry,
                "num_blocks": self.num_blocks,
                "distortion": self.distortion,
                "bit_candidates": self.bit_candidates,
                "index_coding": self.index_coding,
                "outliers": self.outliers,
                "rotation": self.rotation,
                "entropy_coding": self.entropy_coding,
                "quantizer": self.quantizer,
                "step": self.step,
            }
            | ({"basis": self.basis} if self.basis is not None else {})
            | self._basis_params()
        )

    def _basis_params(self) -> dict[str, Any]:
        """The trellis and prediction knobs where they apply (only then: other specs stay as older peers know
        them)."""
        calibrated = self.rotation == "calibrated"
        return ({"trellis": True} if self.trellis and calibrated else {}) | (
            {"predict_previous": True} if self.predict_previous and calibrated else {}
        )

    def split_layer_for(self, num_layers: int) -> int:
        """The split layer for a model of `num_layers`: this config's, else three quarters of the depth (the server
        runs the last quarter)."""
        if self.split_layer is not None:
            return self.split_layer
        return max(1, min(num_layers - 1, round(0.75 * num_layers)))

    def made_for(self, hidden_size: int | None, num_hidden_layers: int) -> bool:
        """Whether this config was made for a model of this shape (or names no shape)."""
        return (self.hidden_size, self.num_hidden_layers) in ((hidden_size, num_hidden_layers), (None, None))

    def model_id_for(self, fallback: str | None, hidden_size: int | None, num_hidden_layers: int) -> str | None:
        """The model a config made from this one for a model of this shape names: this config's `model_id` where it
        was made for that shape (`made_for`), else `fallback`."""
        return self.model_id if self.model_id and self.made_for(hidden_size, num_hidden_layers) else fallback

    def replace(self, **changes: Any) -> SlicerConfig:
        """A validated copy with some fields changed."""
        known = {f.name for f in dataclasses.fields(self)}
        if unknown := sorted(set(changes) - known):
            raise ConfigError(f"SlicerConfig has no field {', '.join(map(repr, unknown))}; its fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["bit_candidates"] = list(self.bit_candidates)
        data["bitrate_ladder"] = [list(rung) for rung in self.bitrate_ladder]
        data["slicer_hf_version"] = __version__
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlicerConfig:
        data = dict(data)
        newer = _newer_version(data.pop("slicer_hf_version", None))
        origin = f"saved by slicer_hf {newer}, this is {__version__}" if newer else "from a newer slicer_hf?"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown SlicerConfig keys (%s): %s", origin, ", ".join(unknown))
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ConfigError as exc:
            if newer:  # a value this version does not know yet, most likely
                raise ConfigError(f"{exc} (this config was {origin}: upgrade slicer_hf to read it)") from None
            raise

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write `slicer_config.json` into `save_directory` (created if needed) and return its path."""
        path = Path(save_directory)
        if path.is_file():
            raise ConfigError(f"save_directory must be a folder, got the file {path}")
        from .codec.basis import basis_file, lookup

        bases = {digest: lookup(digest) for digest in self.bases()}  # an unknown basis fails before anything is written
        path.mkdir(parents=True, exist_ok=True)
        target = path / CONFIG_NAME
        target.write_text(self.to_json_string(), encoding="utf-8")
        for digest, basis in bases.items():
            basis.save(path / basis_file(digest))
        return target

    def bases(self) -> list[str]:
        """Digests of the calibrated bases this config names (uplink, then downlink)."""
        return [d for d in (self.basis, self.downlink_basis) if d is not None]

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        subfolder: str = "",
        **overrides: Any,
    ) -> SlicerConfig:
        """Load from a folder, a `slicer_config.json` file, a preset shipped with slicer_hf (`available_presets()`),
        or a Hub repo id, in that order, then apply `overrides`.

        Args:
            name_or_path: local folder or file, a preset name such as `"smollm2-135m-split24"`, or a Hugging Face
                Hub repo id.
            revision, token, cache_dir, local_files_only, subfolder: as for `hf_hub_download`, when loading from
                the Hub (`subfolder` applies to a local folder too).
            overrides: fields to change after loading.
        """
        hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        hub = {key: value for key, value in {**hub, "subfolder": subfolder}.items() if value}  # those given
        given = path = Path(name_or_path).expanduser()
        if not path.exists() and str(name_or_path) in available_presets():
            path = PRESETS_DIR / str(name_or_path)
        if path.is_dir():
            path = path / subfolder / CONFIG_NAME
        if not path.is_file():
            if given.exists() or str(name_or_path).startswith((".", "/", "~")):
                raise ConfigError(f"no {CONFIG_NAME} found at {name_or_path}")
            if path.is_relative_to(PRESETS_DIR):  # a preset has no subfolders: not a Hub repo to ask either
                raise ConfigError(f"the preset {str(name_or_path)!r} has no subfolder {subfolder!r}")
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(str(name_or_path), CONFIG_NAME, **hub))
            except Exception as exc:  # the Hub client raises many types; the user needs one clear message
                raise ConfigError(
                    f"could not load {CONFIG_NAME} from {name_or_path!r} (not a folder, not a preset: "
                    f"{', '.join(available_presets())}; nor on the Hub: {exc})"
                ) from exc
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a UTF-16 file, say
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        config = cls.from_dict(data)
        config = config.replace(**overrides) if overrides else config
        _load_bases(config, path.parent, str(name_or_path), hub)
        return config

    def model_card(self, repo_id: str) -> str:
        """A short README for the Hub repo holding this config."""
        return (
            f"---\nlibrary_name: slicer_hf\ntags:\n- slicer_hf\n- split-inference\n---\n\n"
            f"# {repo_id}\n\nA [slicer_hf](https://pypi.org/project/slicer-hf/) split-inference config"
            f"{' for `' + self.model_id + '`' if self.model_id else ''}.\n\n"
            f"```python\nfrom slicer_hf import SlicerConfig, SlicerModelForCausalLM\n\n"
            f"config = SlicerConfig.from_pretrained({repo_id!r})\n"
            f"model = SlicerModelForCausalLM.from_pretrained({(self.model_id or 'MODEL_ID')!r}, slicer_config=config)\n"
            f"```\n\n```json\n{self.to_json_string()}```\n"
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload SlicerConfig",
        create_pr: bool = False,
    ) -> str:
        """Upload `slicer_config.json` (and its bases) to `repo_id`, with a model card where the repo has no README;
        returns the commit URL (the pull request's with `create_pr`).

        Args:
            repo_id: target Hub repository (created if it does not exist).
            private: visibility of a newly created repository.
            token: Hub token; defaults to the logged-in user's.
            commit_message: message of the upload commit.
            create_pr: open a pull request instead of committing to the main branch.
        """
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)  # before the repo is made: a config that cannot be saved leaves nothing behind
            return upload_with_card(
                Path(tmp), repo_id, self.model_card(repo_id), token, private, commit_message, create_pr
            )


def upload_with_card(
    folder: Path,
    repo_id: str,
    card: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload SlicerConfig",
    create_pr: bool = False,
) -> str:
    """Upload `folder` to `repo_id` (created if needed) in one commit, with `card` as its README.md unless the repo
    has one (a model repo's own card stays); returns the pull request's URL with `create_pr`, else the commit's."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if not api.file_exists(repo_id, "README.md"):
        (folder / "README.md").write_text(card, encoding="utf-8")
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, create_pr=create_pr)
    return str(info.pr_url if create_pr and info.pr_url else info.commit_url)


def at_least(value: float, digits: int = 4) -> str:
    """`value` to `digits` significant digits, rounded up: a limit (or a step) set to what is printed admits it."""
    text = f"{value:.{digits}g}"
    if value <= 0 or not math.isfinite(value):
        return text
    unit = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    while float(text) < value:  # one unit of the last digit up, until the printed value admits it
        text = f"{float(text) + unit:.{digits}g}"
    return text


def _int(value: Any) -> bool:
    return type(value) is int  # not a bool, not a float (JSON's 256.0 included)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _ints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_int(v) for v in value)


def _rungs(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(_real(x) for x in r) for r in value
    )


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"`{name}` {rule}, got {value!r}")


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def _load_bases(config: SlicerConfig, folder: Path, name_or_path: str, hub: dict[str, Any]) -> None:
    """Register the bases `config` names: from beside its file, else (a Hub config) downloaded from its repo."""
    from .codec.basis import Basis, basis_file

    for digest in config.bases():
        path = folder / basis_file(digest)
        if not path.is_file() and not Path(name_or_path).expanduser().exists():
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(name_or_path, basis_file(digest), **hub))
            except Exception as exc:  # as for the config: one clear message
                raise ConfigError(f"could not load {basis_file(digest)} from {name_or_path!r}: {exc}") from exc
        if not path.is_file():
            raise ConfigError(f"the config names the calibrated basis {digest}, but {path} is missing")
        if Basis.load(path).digest != digest:
            raise ConfigError(f"{path} does not hold the basis {digest} (its tensors hash differently)")


def _newer_version(saved_by: Any) -> str | None:
    """The version a config was saved by, where it is newer than this one."""
    from packaging.version import InvalidVersion, Version

    try:
        return str(saved_by) if Version(str(saved_by)) > Version(__version__) else None
    except InvalidVersion:
        return None


def available_presets() -> list[str]:
    """Names of the presets shipped with slicer_hf, each loadable with `SlicerConfig.from_pretrained(name)`."""
    return sorted(p.name for p in PRESETS_DIR.iterdir() if (p / CONFIG_NAME).is_file()) if PRESETS_DIR.is_dir() else []


def default_config_dir() -> Path:
    """The SmolLM2 preset shipped inside the package (so an installed wheel has it too)."""
    return PRESETS_DIR / DEFAULT_PRESET
