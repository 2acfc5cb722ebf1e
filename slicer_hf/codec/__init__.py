"""Codecs for hidden states: `build_codec(name_or_config, **params) -> Codec`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CodecError, ConfigError
from .base import LOCAL_PARAMS, REGISTRY, Codec, CodecStats
from .baselines import Bf16Codec, Fp16Codec, GroupedIntCodec, IdentityCodec, Int8Codec, TopKCodec
from .slicer import SlicerCodec

if TYPE_CHECKING:
    from ..config import SlicerConfig

__all__ = [
    "Codec",
    "CodecStats",
    "build_codec",
    "available_codecs",
    "codec_from_spec",
    "IdentityCodec",
    "GroupedIntCodec",
    "Fp16Codec",
    "Bf16Codec",
    "Int8Codec",
    "TopKCodec",
    "SlicerCodec",
]


def available_codecs() -> list[str]:
    return sorted(REGISTRY)


def build_codec(config_or_name: SlicerConfig | str, **params: Any) -> Codec:
    """Build a codec from a `SlicerConfig` (its `codec` and knobs) or a registered name plus parameters.

    Args:
        config_or_name: a `SlicerConfig`, or one of `available_codecs()`.
        params: codec parameters; with a config they override the config's.
    """
    from ..config import SlicerConfig

    if isinstance(config_or_name, SlicerConfig):
        name, params = config_or_name.codec, {**config_or_name.codec_params(), **params}
    else:
        name = str(config_or_name)
    if name not in REGISTRY:
        raise CodecError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
    try:
        return REGISTRY[name](**params)
    except TypeError as exc:
        raise CodecError(f"bad parameters for codec {name!r}: {exc}") from exc


def codec_from_spec(spec: dict[str, Any], **bounds: Any) -> Codec:
    """Rebuild a codec from `Codec.spec()` (what a client announces when it opens a session).

    The peer chooses the codec's knobs, never this side's own settings: a spec that names one (`max_elements`, a
    safety bound; `zstd_level`, encoding effort) is refused, and the receiver sets them through `bounds`.
    """
    spec = dict(spec)
    name, version = spec.pop("name", None), spec.pop("version", None)
    if forbidden := sorted(LOCAL_PARAMS & set(spec)):
        raise CodecError(
            f"a codec spec may not set {', '.join(forbidden)}: the receiver sets its own bounds and effort"
        )
    if not isinstance(name, str) or name not in REGISTRY:
        raise CodecError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
    try:  # the class itself: a knob named like one of build_codec's own arguments is just an unknown knob
        codec = REGISTRY[name](**spec, **bounds)
    except (ConfigError, TypeError) as exc:  # a peer's knobs out of range or unknown: its request is bad
        raise CodecError(f"bad parameters for codec {name!r}: {exc}") from exc
    if version != codec.version:
        raise CodecError(f"codec {name!r} version {version} is not supported (this side speaks {codec.version})")
    return codec
