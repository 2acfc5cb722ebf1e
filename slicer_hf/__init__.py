"""slicer_hf: SLICER split inference for Hugging Face models: causal LMs, text encoders, vision models."""

from .codec import Codec, build_codec
from .config import SlicerConfig
from .encoders import (
    SlicerModel,
    SlicerModelForImageClassification,
    SlicerModelForSequenceClassification,
    SlicerModelForTokenClassification,
)
from .errors import (
    CodecError,
    ConfigError,
    MissingDataError,
    ProtocolError,
    SlicerError,
    StaleCacheError,
    TransportError,
)
from .link import WireStats
from .modeling import ConcurrentUseError, SlicerGenerationMixin, SlicerModelForCausalLM, unsplit
from .tuning import Constraints, InfeasibleError, LinkSpec, Profile, search
from .version import __version__

__all__ = [
    "Codec",
    "CodecError",
    "ConcurrentUseError",
    "ConfigError",
    "Constraints",
    "InfeasibleError",
    "LinkSpec",
    "MissingDataError",
    "Profile",
    "ProtocolError",
    "SlicerConfig",
    "SlicerError",
    "SlicerGenerationMixin",
    "SlicerModel",
    "SlicerModelForCausalLM",
    "SlicerModelForImageClassification",
    "SlicerModelForSequenceClassification",
    "SlicerModelForTokenClassification",
    "StaleCacheError",
    "TransportError",
    "WireStats",
    "__version__",
    "build_codec",
    "search",
    "unsplit",
]
