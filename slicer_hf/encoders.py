"""`SlicerModel` and its task classes: encoder and vision models whose `forward()` runs split.

Text encoders (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA, MiniLM-style BERTs), vision transformers (ViT, DeiT,
Swin) and CNN backbones (ResNet, ConvNeXt, ConvNeXt V2), with their heads: the edge runs the embeddings and blocks
`0..k-1`, the codec carries one row per token, patch or feature-map position, the server runs blocks `k..L-1`
and answers with the last block's output, and the edge runs whatever follows (final norm, pooler, head). The
same hooks as the causal LMs (`hooks.py`), no per-family forward.

A CNN's feature map `[B, C, H, W]` travels as H*W rows of C channels (row-major over the grid, the grid in the
step header), so the codec's per-row statistics are per spatial position.

```python
model = SlicerModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2",
                                    slicer_config=SlicerConfig(split_layer=4), transport="grpc://host:50051")
hidden = model(**tok(sentences, padding=True, return_tensors="pt")).last_hidden_state
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)

from . import compat
from .config import SlicerConfig
from .errors import ConfigError
from .hooks import SplitPlan, split_plan
from .loading import check_model_folder, expand_home, load_layers
from .modeling import SplitModelMixin, _config_kwargs, _resolve_config, make_split
from .transport import LocalTransport, Transport

# forward options that change how the server's blocks run too (Swin's), which a STEP does not carry
SERVER_SIDE_OPTIONS = ("always_partition", "output_hidden_states_before_downsampling")


class SlicerEncoderMixin(SplitModelMixin):
    """Split `forward()` for an encoder or vision model. Mixed in by `SlicerModel` and its task classes."""

    def _slicer_forward(self, *args: Any, split_layer: int | None = None, **kwargs: Any) -> Any:
        with self._exclusive():
            return self._split_forward(split_layer, args, kwargs)

    def _split_forward(self, split_layer: int | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        k = self._resolve_split(split_layer)
        self._refuse_autocast()
        self._warn_without_gradients()
        base_forward = super().forward  # the model's own forward (this mixin sits before its class)
        given = self._arguments(base_forward, args, kwargs, k)
        if held := [name for name in SERVER_SIDE_OPTIONS if given.get(name)]:
            raise NotImplementedError(
                f"{', '.join(held)} change how every stage runs, and the server's stages are not sent them: leave "
                "them out of a split forward (`with slicer_hf.unsplit(model):` runs them all locally)"
            )
        cache = given.get("cache", given.get("past_key_values"))
        if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
            raise NotImplementedError(  # a decoder-configured BERT's: the server keeps no cache of an encoder's blocks
                "a split encoder's server keeps no cache: pass the whole sequence each call, with use_cache=False "
                "(generate(..., use_cache=False) does)"
            )
        mask = given.get("attention_mask")
        ids, embeds = given.get("input_ids"), given.get("inputs_embeds")
        choices = ids is not None and ids.ndim == 3 or embeds is not None and embeds.ndim == 4  # multiple choice:
        if mask is not None and mask.ndim == 3 and choices:  # a mask [batch, choices, length], flattened as its
            mask = mask.reshape(-1, mask.shape[-1])  # forward flattens it
        if mask is not None and compat.encoder_kind(self.config) != "text":
            raise NotImplementedError("a split vision model takes no attention_mask (the server is sent none)")
        if mask is not None and mask.ndim != 2:
            raise NotImplementedError("split forward takes a 2D attention_mask [batch, length]")
        if mask is None and compat.packs_sequences(given.get("position_ids")):
            raise NotImplementedError(
                "position_ids that restart within a row, with no attention_mask, pack several sequences that "
                "transformers keeps apart; the server is sent no position ids: pass each sequence as its own (padded) "
                "row, or an attention_mask"
            )
        link = self._link_for(k)
        out_width = compat.final_width(self.config)

        def exchange(hidden: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
            b = hidden.shape[0]
            if b == 0:
                raise ValueError("a split forward takes a batch of at least one input")
            reply: tuple[int | None, ...] | None = None  # the reply's shape, where not that of `hidden`
            layout = compat.map_memory_format(self.config)  # the family's, or the caller's channels-last model's
            if hidden.ndim == 4:  # a feature map [B, C, H, W] -> rows [B, H*W, C]
                if hidden.is_contiguous(memory_format=torch.channels_last) and not hidden.is_contiguous():
                    layout = torch.channels_last
                _, c, h, w = hidden.shape
                hidden, grid = hidden.permute(0, 2, 3, 1).reshape(b, h * w, c), (h, w)
                reply = (b, None, None, out_width)  # channels-last map [B, H', W', C']
            elif grid is not None:  # Swin: the patch grid shrinks stage by stage
                reply = (b, None, out_width)
            limits = link.step_limits()  # a large batch goes in parts: the step and its reply must fit
            positions = compat.reply_positions(self.config, k, hidden.shape[1], grid)  # a map shrinks on the way
            fitting = limits.rows(*hidden.shape[1:], b, extra_bits=0 if mask is None else 1)
            rows = limits.replies(positions * link.reply_bytes(out_width), fitting)
            finals = []
            for a in range(0, b, rows):
                part = slice(a, min(a + rows, b))
                shape = None if reply is None else (part.stop - a, *reply[1:])
                _, final = link.step(hidden[part], 0, mask if mask is None else mask[part], None, 0, grid, shape)
                finals.append(final)
            final = torch.cat(finals)
            if final.ndim == 4:
                final = final.permute(0, 3, 1, 2).contiguous(memory_format=layout)
            return final.to(hidden.device, hidden.dtype)

        with split_plan(SplitPlan("edge", k, exchange=exchange)), compat.kept_window_sizes(self):
            return base_forward(*args, **kwargs)


if TYPE_CHECKING:

    class SplitEncoder(SlicerEncoderMixin, PreTrainedModel):
        """What the encoder factories return, as type checkers see it: the model's own class with the split mixed
        in (the class itself is made at load time, one per model class)."""


class _SplitAutoFactory:
    """Loads with a transformers Auto class, then makes the model split; never instantiated."""

    auto_class: ClassVar[Any]

    def __init__(self) -> None:
        raise TypeError(
            f"{type(self).__name__} is a factory, like {self.auto_class.__name__}: use "
            f"{type(self).__name__}.from_pretrained(model_id, slicer_config=...) or .from_model(model, ...)"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        slicer_config: SlicerConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
        transport: str | Sequence[str] | Transport = "local",
        transport_options: dict[str, Any] | None = None,
        **hf_kwargs: Any,
    ) -> SplitEncoder:
        """Load an encoder or vision model with transformers and make its `forward()` split.

        Args:
            pretrained_model_name_or_path: Hub id or local folder.
            slicer_config: a `SlicerConfig`, a dict of its fields, a folder, preset or repo holding one, or None
                (the model's own `slicer_config.json`, in its folder or Hub repo, if it has one; else defaults).
            transport: `"local"` (the server part in this process) or `"grpc://host:port"` (a list is tried in
                order). With a remote server only blocks `0..split_layer-1` are read (see `loading.py`).
            transport_options: for a gRPC transport: `token`, `timeout_s`, `root_certificates`; for a fleet's
                router (`slicer+http(s)://`), those and `router_timeout_s`, `admission_wait_s`.
            hf_kwargs: passed to the Auto class's `from_pretrained` (dtype, revision, ...).

        Raises:
            NotImplementedError: a family outside `compat.ENCODER_SPLIT_FAMILIES`.
            ConfigError: a split layer outside `[1, L-1]`, or a downlink other than hidden states.
        """
        check_model_folder(pretrained_model_name_or_path)
        pretrained_model_name_or_path = expand_home(pretrained_model_name_or_path)
        config = _resolve_config(slicer_config, pretrained_model_name_or_path, hf_kwargs)
        model_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **_config_kwargs(hf_kwargs))
        _check(model_config, config)  # before any weight is read
        if transport == "local" or isinstance(transport, LocalTransport):
            model = cls.auto_class.from_pretrained(pretrained_model_name_or_path, **hf_kwargs)
        else:  # the server runs the rest: read only the blocks this edge runs
            k = config.split_layer_for(compat.num_layers(model_config))
            model = load_layers(pretrained_model_name_or_path, range(k), auto_class=cls.auto_class, **hf_kwargs)
        if config.model_id is None:
            config = config.replace(model_id=str(pretrained_model_name_or_path))
        return cls.from_model(model, config, transport=transport, transport_options=transport_options)

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        slicer_config: SlicerConfig | None = None,
        transport: str | Sequence[str] | Transport = "local",
        transport_options: dict[str, Any] | None = None,
    ) -> SplitEncoder:
        """Make an already loaded encoder or vision model split (in place; the same object is returned)."""
        if compat.is_backbone(model):
            raise NotImplementedError(
                f"{type(model).__name__} returns the maps of several stages (out_features), and an edge never sees "
                "the stages its server runs: split the base model (SlicerModel) instead"
            )
        _check(model.config, slicer_config or SlicerConfig())
        return cast("SplitEncoder", make_split(model, slicer_config, SlicerEncoderMixin, transport, transport_options))


def _check(model_config: Any, config: SlicerConfig) -> None:
    compat.check_encoder_supported(model_config)
    n = compat.num_layers(model_config)
    k = config.split_layer
    if k is not None and not 1 <= k < n:
        raise ConfigError(f"`split_layer` must be an integer in [1, {n - 1}] for this {n}-block model, got {k!r}")
    if config.downlink != "hidden":
        raise ConfigError(
            f"`downlink` must be 'hidden' for an encoder (its server sends hidden states), got {config.downlink!r}"
        )


class SlicerModel(_SplitAutoFactory):
    """Split base model (feature extraction), used like `AutoModel`: `model(**inputs).last_hidden_state`."""

    auto_class = AutoModel


class SlicerModelForSequenceClassification(_SplitAutoFactory):
    """Split text classifier, used like `AutoModelForSequenceClassification` (the head runs on the edge)."""

    auto_class = AutoModelForSequenceClassification


class SlicerModelForTokenClassification(_SplitAutoFactory):
    """Split token classifier, used like `AutoModelForTokenClassification` (the head runs on the edge)."""

    auto_class = AutoModelForTokenClassification


class SlicerModelForImageClassification(_SplitAutoFactory):
    """Split image classifier (ViT, DeiT, Swin, ResNet, ConvNeXt), used like `AutoModelForImageClassification`."""

    auto_class = AutoModelForImageClassification


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers' mean pooling makes them: the mean over unmasked tokens,
    L2-normalized. `[B, T, d]` -> `[B, d]`."""
    if attention_mask is None:
        pooled = last_hidden_state.mean(1)
    else:
        weights = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)
        pooled = (last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
