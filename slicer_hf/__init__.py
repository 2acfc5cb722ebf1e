"""slicer_hf: SLICER split inference for Hugging Face causal LMs."""

from .codec import Codec, build_codec
from .config import SlicerConfig
from .errors import CodecError, ConfigError, ProtocolError, SlicerError, TransportError
from .version import __version__

__all__ = [
    "Codec",
    "CodecError",
    "ConfigError",
    "ProtocolError",
    "SlicerConfig",
    "SlicerError",
    "TransportError",
    "__version__",
    "build_codec",
]
