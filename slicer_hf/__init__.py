"""slicer_hf: SLICER split inference for Hugging Face causal LMs."""

from .codec import Codec, build_codec
from .config import SlicerConfig
from .errors import CodecError, ConfigError, ProtocolError, SlicerError, TransportError
from .link import WireStats
from .modeling import SlicerGenerationMixin, SlicerModelForCausalLM
from .version import __version__

__all__ = [
    "Codec",
    "CodecError",
    "ConfigError",
    "ProtocolError",
    "SlicerConfig",
    "SlicerError",
    "SlicerGenerationMixin",
    "SlicerModelForCausalLM",
    "TransportError",
    "WireStats",
    "__version__",
    "build_codec",
]
