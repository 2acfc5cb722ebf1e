"""The one module that touches transformers internals: decoder-layer discovery, the cache keyword and API,
and the GGUF-quantizer quirk. A new transformers release should mean edits here and nowhere else.

Tested against transformers 5.x, where decoder layers return a plain tensor and take the KV cache as
`cache=` (`past_key_values=` before 5.40's rename).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from .errors import ConfigError

CACHE_KWARGS = ("cache", "past_key_values")


# Families that cannot split, with the reason, from the architecture sweep (slicer_hf.bench.architectures):
# `SlicerModelForCausalLM` refuses them at load time rather than failing mid-generation.
_NEEDS_TOKEN_IDS = "its layers read the token ids (the server only ever sees hidden states)"
UNSUPPORTED: dict[str, str] = {
    "cpmant": "its forward takes token ids only, no inputs_embeds (the server only ever sees hidden states)",
    "deepseek_v4": "the residual stream between layers has parallel streams [B, T, n, d]; the codec carries [B, T, d]",
    "gemma4_text": f"per-layer token embeddings: {_NEEDS_TOKEN_IDS}",
    "gemma4_unified_text": f"per-layer token embeddings: {_NEEDS_TOKEN_IDS}",
    "hrm_text": "its high- and low-level modules run their layers in cycles: no one stack of decoder layers to cut",
    "hy_v4": "the residual stream between layers has parallel streams [B, T, n, d]; the codec carries [B, T, d]",
    "minimax": "keeps a cache class of its own (lightning-attention state) that the split caches cannot hold",
    "recurrent_gemma": "RG-LRU recurrent state outside the cache: split logits drift from the unsplit model's",
    "rwkv": "recurrent state passed between blocks as arguments, not in a cache",
}


# encoder models that transformers also maps to a causal-LM head (`is_decoder=True`): not decoder-only LMs
ENCODER_FAMILIES = frozenset(
    {
        "bert",
        "bert-generation",
        "big_bird",
        "camembert",
        "data2vec-text",
        "electra",
        "ernie",
        "megatron-bert",
        "rembert",
        "roberta",
        "roberta-prelayernorm",
        "roc_bert",
        "roformer",
        "xlm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "xmod",
    }
)


def check_supported(config: Any) -> None:
    """Refuse, at load time, a model that cannot split: a family listed in `UNSUPPORTED`, an encoder-decoder or
    encoder family, or a composite (multimodal) model, whose text model is the one to split."""
    from transformers import PretrainedConfig

    model_type = str(getattr(config, "model_type", ""))
    if model_type in UNSUPPORTED:
        raise NotImplementedError(f"{model_type}: {UNSUPPORTED[model_type]}")
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{model_type}: encoder-decoder models do not split (decoder-only LMs do)")
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError(
            f"{model_type}: cross-attention layers (add_cross_attention=True) attend to an encoder's states, which a "
            "split model's server never gets"
        )
    if model_type in ENCODER_FAMILIES:
        where = (
            "split its forward with SlicerModel (docs/encoders.md)"
            if model_type in ENCODER_SPLIT_FAMILIES
            else f"nor does its forward split yet (SlicerModel splits {', '.join(sorted(ENCODER_SPLIT_FAMILIES))})"
        )
        raise NotImplementedError(
            f"{model_type}: an encoder family (bidirectional layers), not a decoder-only LM: SlicerModelForCausalLM "
            "does not split it; " + where
        )
    for name in ("text_config", "decoder"):
        if isinstance(getattr(config, name, None), PretrainedConfig):
            raise NotImplementedError(f"{model_type}: a composite model (with a {name}); split its text model")
    if length_dependent := LENGTH_DEPENDENT_ROPE & rope_types(config):
        raise NotImplementedError(
            f"{model_type}: rope_type {sorted(length_dependent)[0]!r} sets its rotary frequencies from the longest "
            "position of each forward, and a server runs prompts in chunks and batches sessions of other lengths "
            "together: its outputs would not be those of generate()"
        )
    num_layers(config)  # a config that counts no layers has none to split


LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def rope_types(config: Any) -> set[str]:
    """The rotary embedding types a config names (one set of parameters, or one per attention type)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return set()
    sets = (
        [params] if "rope_type" in params or "type" in params else [p for p in params.values() if isinstance(p, dict)]
    )
    hunyuan = str(getattr(config, "model_type", "")).startswith("hunyuan")
    return {_rope_type(p, hunyuan) for p in sets}


def _rope_type(params: dict[str, Any], hunyuan: bool) -> str:
    """A rotary's type as its model builds it: Hunyuan's checkpoints label a fixed NTK-alpha rotary "dynamic", which
    its transformers model builds as the static `ntk_alpha` (frequencies that do not depend on the length); any other
    family builds "dynamic" as named."""
    kind = str(params.get("rope_type", params.get("type")))
    return "ntk_alpha" if hunyuan and kind == "dynamic" and params.get("alpha") else kind


def num_layers(config: Any) -> int:
    """Block count of a config: decoder or encoder layers (GPT-2's `n_layer` maps onto `num_hidden_layers`), or the
    stages of a CNN (`depths`)."""
    n = getattr(config, "num_hidden_layers", None)
    if n is None and getattr(config, "depths", None) is None:
        family = getattr(config, "model_type", type(config).__name__)
        raise NotImplementedError(f"{family}: its config counts no layers")
    return int(n) if n is not None else len(config.depths)


def check_window(config: Any, window: int) -> None:
    """Refuse windows of more tokens than the model has positions for (GPT-2's `n_positions` maps onto
    `max_position_embeddings`): learned positions would index past their table, rotary ones run past the context the
    model was trained for."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and window > positions:
        raise ConfigError(f"a window of {window} tokens exceeds the model's {positions} positions: give a smaller one")


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of blocks (decoder or encoder layers, CNN or Swin stages), found generically: the
    shallowest `ModuleList` of the block count."""
    n = num_layers(model.config)
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0
    ]
    if not candidates:
        raise NotImplementedError(f"{type(model).__name__}: no ModuleList of {n} decoder layers found")
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def layers_path(model: PreTrainedModel) -> str:
    """Dotted name of the decoder-layer list inside the model (e.g. `model.layers`, `transformer.h`)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def cache_kwarg(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes the KV cache."""
    params = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_KWARGS if name in params), CACHE_KWARGS[0])


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    return next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)


def output_cache(output: Any) -> Any:
    """The KV cache a model's output or a `generate()` result carries, under either name (the old one, where the
    new exists, logs a deprecation warning)."""
    names = {field.name for field in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    return getattr(output, next((name for name in CACHE_KWARGS if name in names), CACHE_KWARGS[-1]), None)


def new_cache(model: PreTrainedModel) -> DynamicCache:
    return DynamicCache(config=model.config)


def cache_length(cache: Any) -> int:
    """Positions a cache holds: the most any of its layers holds (transformers counts layer 0's, which a server's
    cache leaves empty below its split)."""
    if cache is None:
        return 0
    return max((_held(layer) for layer in getattr(cache, "layers", ())), default=0)


def _held(layer: Any) -> int:
    """Positions one cache layer holds (a `DummyLayer`, which an MLP or a KV-sharing layer gets, holds none)."""
    return int(layer.get_seq_length()) if hasattr(layer, "get_seq_length") else 0


def cache_layer_bytes(cache: Any) -> list[int]:
    """Per layer of a transformers cache, the bytes of the tensors it holds: keys and values, a recurrent layer's
    state, whatever its class keeps."""
    return [_tensor_bytes(vars(layer), set()) for layer in getattr(cache, "layers", ())]


def _tensor_bytes(value: Any, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def sliding_windows(model: PreTrainedModel) -> list[int | None]:
    """Per decoder layer, the sliding window its attention keeps (None: full attention), as transformers' own
    cache for the config lays its layers out."""
    return [getattr(layer, "sliding_window", None) or None for layer in new_cache(model).layers]


def recurrent_only(model: PreTrainedModel) -> bool:
    """Whether every layer of the model's cache is recurrent (Mamba, FalconMamba). transformers' mixers of these
    families run a forward of several positions afresh from a cache, not on from it (the logits of a prompt run in two
    forwards differ from one's by up to 1.0 on a tiny FalconMamba): a server runs such a step whole. They also hand
    the 2D mask straight to the mixers, which mask the padding of the positions they run: a forward continuing a
    cache takes those columns only (a hybrid's own forward cuts them for its recurrent layers, gives its attention
    the whole mask, and carries a forward on from its cache exactly)."""
    recurrent = _recurrent_layer_types()
    layers = new_cache(model).layers
    return bool(recurrent) and all(isinstance(x, recurrent) and not isinstance(x, DynamicLayer) for x in layers)


def _recurrent_layer_types() -> tuple[type, ...]:
    """transformers' class of recurrent cache layers (Mamba's, linear attention's), or none in a release without."""
    from transformers import cache_utils

    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    return (recurrent,) if recurrent is not None else ()


def crop_cache(cache: DynamicCache, length: int) -> bool:
    """Drop cached positions beyond `length`, layer by layer (5.x takes the negative count to remove; a server's
    layers below its split hold none); False, with nothing dropped, where the cache cannot go back that far: a
    sliding-window layer that has filled its window keeps no earlier positions to attend to from `length` on, and a
    recurrent layer (Mamba, linear attention) holds one state of all its positions."""
    recurrent = _recurrent_layer_types()
    over = [(layer, _held(layer) - length) for layer in cache.layers]
    over = [(layer, extra) for layer, extra in over if extra > 0]
    for layer, _ in over:
        window = getattr(layer, "sliding_window", None)
        one_way = isinstance(layer, recurrent) or window and _held(layer) >= window
        if one_way and not getattr(layer, "record_past", False):
            return False
    for layer, extra in over:
        layer.crop(-extra)
    return True


def stand_in_embeds(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Zeros in the shape of the model's input embeddings for `hidden`'s positions: what a server's forward takes
    in while the layers below the split pass the injected hidden states on (OPT-350m embeds narrower than its
    layers, then projects)."""
    width = getattr(model.get_input_embeddings(), "embedding_dim", hidden.shape[-1])
    return hidden.new_zeros(*hidden.shape[:-1], width)


POSITION_TABLES = ("wpe", "positions_embed", "embed_positions")  # GPT-2 and its kin, GPT-1, OPT and its kin


def position_table(model: PreTrainedModel) -> int | None:
    """The positions a decoder's learned absolute position table holds (GPT-2's `wpe`, OPT's `embed_positions`, less
    its offset), past which its forward fails indexing; None where positions are computed (rotary, ALiBi,
    sinusoidal)."""
    for name, module in base_model(model).named_modules():
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in POSITION_TABLES:
            return int(module.num_embeddings) - int(getattr(module, "offset", 0))
    return None


def packs_sequences(position_ids: torch.Tensor | None) -> bool:
    """Whether `position_ids` `[B, T]` restart within a row: transformers then keeps the packed sequences apart
    (given no attention mask and no cache)."""
    from transformers.masking_utils import find_packed_sequence_indices

    return position_ids is not None and find_packed_sequence_indices(position_ids) is not None


def check_split_cache(cache: Any) -> None:
    """Refuse a cache whose layers change what they store (quantized K/V): the side that does not run a layer keeps
    a dummy for it there, and the edge's quantized K/V would differ from the server's exact K/V."""
    from transformers import cache_utils

    quantized = getattr(cache_utils, "BaseQuantizedLayer", ())  # (): a transformers without them matches nothing
    for layer in getattr(cache, "layers", None) or []:
        if isinstance(layer, quantized):
            raise NotImplementedError(
                f"a quantized KV cache ({type(layer).__name__}) is not supported by split generation: the server "
                "keeps its layers' K/V exact; use the default dynamic cache"
            )


@functools.cache
def forget_on_row_changes(attribute: str) -> None:
    """Make every transformers cache drop its `attribute` when its rows are reordered, repeated or selected (what
    beam search and custom decoding loops call), from now on. A split cache's tag says which rows the server holds,
    in which order: the server's rows stay as they were, so such a cache must not continue there."""
    from transformers.cache_utils import Cache

    for name in ("reorder_cache", "batch_repeat_interleave", "batch_select_indices"):
        original = getattr(Cache, name, None)
        if original is None:
            continue

        def forgetting(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            self.__dict__.pop(attribute, None)
            return _original(self, *args, **kwargs)

        setattr(Cache, name, functools.wraps(original)(forgetting))


def phantom_cache_update(cache: Any, layer_idx: int, hidden_states: torch.Tensor) -> None:
    """Record T positions for a layer this side does not run, with a `[B, 1, T, 1]` dummy K/V.

    Masks and positions are sized from the cache of the first (or first sliding) layer; keeping every layer's
    length right lets either side skip any prefix or suffix of the stack. The dummy costs B*T*2 scalars.
    """
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and not isinstance(layers[layer_idx], DynamicLayer):
        return  # recurrent state (or none): only the side that runs the layer keeps it
    b, t = hidden_states.shape[:2]
    dummy = hidden_states.new_zeros(b, 1, t, 1)
    cache.update(dummy, dummy, layer_idx)


@functools.cache
def layer_output_arity(layer_class: type) -> int:
    """How a decoder-layer class returns: 0 for a plain tensor (most of transformers 5), else the length of the tuple
    whose first item is the hidden states (older families such as BLOOM return `(hidden, attn_weights)`).

    Read from the forward's source, so a layer that never runs on one side of a split still answers in the form
    its model's forward unpacks."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(layer_class.forward)))
    except (OSError, TypeError, SyntaxError):
        return 0
    tuples: dict[str, int] = {}
    arity = 0

    def length(value: ast.expr) -> int:  # `(h, a)`, `[h]`, `[h] + rest`: at least the literal part
        if isinstance(value, (ast.Tuple, ast.List)):
            return len(value.elts)
        if isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add):
            return length(value.left)
        return 0

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and length(node.value):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    tuples[target.id] = max(tuples.get(target.id, 0), length(node.value))
        elif (
            isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and isinstance(node.value, ast.Tuple)
        ):
            tuples[node.target.id] = tuples.get(node.target.id, 0) + len(node.value.elts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None:
            if isinstance(node.value, (ast.Tuple, ast.List)):
                arity = max(arity, len(node.value.elts))
            elif isinstance(node.value, ast.Name) and node.value.id in tuples:
                arity = max(arity, tuples[node.value.id])
    return arity


def layer_output(arity: int, hidden: torch.Tensor) -> Any:
    """What a layer of that arity returns when it only passes `hidden` on."""
    return (hidden, *([None] * (arity - 1))) if arity else hidden


def layer_hidden(output: Any) -> torch.Tensor:
    """The hidden states in a layer's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def layer_signature(forward: Any) -> inspect.Signature:
    return inspect.signature(forward)


def layer_call(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """(hidden states, KV cache) of a decoder-layer call, wherever the family passes them (GPT-2 passes the
    cache positionally)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    first = next(iter(signature.parameters))
    hidden = bound.get(first, args[0] if args else None)
    if hidden is None:
        raise NotImplementedError(f"decoder layer called without hidden states: {sorted(bound)}")
    extra = bound.get("kwargs", {})
    cache = next(
        (c for c in (bound.get(n, extra.get(n)) for n in (*CACHE_KWARGS, "layer_past")) if c is not None), None
    )
    return hidden, cache


def kv_bytes_per_position(
    config: Any, split_layer: int, dtype: torch.dtype, placeholders: bool = True, layers: nn.ModuleList | None = None
) -> int:
    """Upper bound on the cache bytes one sequence position costs a server running layers `split_layer..L-1`:
    keys and values of every layer it runs (sliding-window layers counted in full), plus, in a transformers cache,
    the `[B, 1, T, 1]` placeholders of the layers below the split (see `phantom_cache_update`). With the model's
    decoder `layers`, a layer's own key and value projections count where they are wider than the config says
    (mimo_v2_flash doubles its sliding layers' heads in code, not in its config)."""
    # the most heads and the largest head size any layer may use (some families size sliding layers differently)
    heads = max(
        _config_int(config, "num_key_value_heads") or _config_int(config, "num_attention_heads") or 1,
        _config_int(config, "swa_num_key_value_heads"),
    )
    head_dim = max(
        _config_int(config, "head_dim"),
        _config_int(config, "global_head_dim"),
        _config_int(config, "swa_head_dim"),
        _config_int(config, "v_head_dim") + _config_int(config, "qk_head_dim"),
        int(config.hidden_size) // max(_config_int(config, "num_attention_heads"), 1),
    )
    size = torch.empty(0, dtype=dtype).element_size()
    n = num_layers(config)
    widths = [max(2 * heads * head_dim, _projected_kv_width(layers[i]) if layers is not None else 0)
              for i in range(split_layer, n)]  # fmt: skip
    return sum(widths) * size + (split_layer * 2 * size if placeholders else 0)


def _projected_kv_width(layer: nn.Module) -> int:
    """Features a layer's key and value projections write per position (0 where it has not one of each)."""
    found = {  # an nn.Linear, or one whose weights a server packed
        name.rpartition(".")[2]: module.out_features
        for name, module in layer.named_modules()
        if name.endswith(("k_proj", "v_proj")) and isinstance(getattr(module, "out_features", None), int)
    }
    return found["k_proj"] + found["v_proj"] if len(found) == 2 and {"k_proj", "v_proj"} == set(found) else 0


def _config_int(config: Any, name: str) -> int:
    """An integer config attribute, or 0 where the family has none (or defines it per layer only)."""
    try:
        value = getattr(config, name, None)
    except Exception:  # per-layer attributes raise when read globally
        return 0
    return int(value) if isinstance(value, int) else 0


def causal_lm_loss(model: PreTrainedModel, logits: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The loss the model's own forward computes from `logits` and `labels` (shifted inside), with the forward's other
    keyword arguments (`num_items_in_batch`, `shift_labels`...) as it passes them on."""
    if model.config.model_type in UNSHIFTED_LOSS:  # its forward scores each position against its own label
        return torch.nn.functional.cross_entropy(logits.reshape(-1, model.config.vocab_size), labels.reshape(-1))
    return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size, **kwargs)


UNSHIFTED_LOSS = frozenset({"trocr"})  # causal LMs whose forward computes its loss without shifting the labels


def causal_lm_model_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, less the split classes this package registers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if not t.startswith(_REGISTERED_PREFIX))


def config_class(model_type: str) -> type:
    """The config class of a model type (`KeyError` for one transformers does not know)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


_REGISTERED_PREFIX = "slicer-"


def register_split_class(cls: type, base: type, causal_lm: bool = False) -> None:
    """Make a split class known to transformers' pipelines, whose check of the model class compares class names with
    the task's auto mapping: a name-only entry in every mapping that names `base` or a class it derives from (a
    user's subclass of a model), and, for a `causal_lm`, in the causal-LM mapping whatever its base (remote code).
    The Auto classes themselves are not touched."""
    from transformers.models.auto import modeling_auto

    names = {klass.__name__ for klass in base.__mro__}
    for name, mapping in vars(modeling_auto).items():
        if not (name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES") and isinstance(mapping, dict)):
            continue
        named = any(names & ({v} if isinstance(v, str) else set(v)) for v in mapping.values())
        if named or (causal_lm and name == "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
            mapping.setdefault(f"{_REGISTERED_PREFIX}{cls.__name__}", cls.__name__)


def base_model(model: PreTrainedModel) -> nn.Module:
    """The model without its LM head (runs embeddings, layers and final norm): `model.base_model`, or, where a
    family's `base_model_prefix` names no submodule, the module that holds the decoder layers."""
    base = model.base_model
    if base is not model:
        return base
    parent = layers_path(model).rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def unshared_input_embeddings(model: PreTrainedModel) -> nn.Module | None:
    """The input embeddings of a causal LM whose head does not share their weights (None where it does, or the
    model has no head): a server given hidden states never reads them."""
    head = model.get_output_embeddings()
    if head is None or getattr(model.config, "tie_word_embeddings", False):  # (a vision model has no embeddings
        return None  # transformers can name: it raises there)
    embeddings = model.get_input_embeddings()
    if embeddings is None or any(p is q for p in head.parameters() for q in embeddings.parameters()):
        return None
    return embeddings


def output_embedding_name(model: PreTrainedModel) -> str:
    """Parameter name of the LM head weight (tied to the input embeddings in many models)."""
    head = model.get_output_embeddings()
    return next(f"{name}.weight" for name, module in model.named_modules() if module is head)


def checkpoint_names(model: PreTrainedModel) -> Callable[[str], str] | None:
    """The model's name for each checkpoint tensor name, as transformers renames them while loading (ViT, DeiT and
    Swin checkpoints name their attention `attention.self.query`, the model `attention.q_proj`; a base-model prefix
    is added or dropped where the model wants it). None where loading also merges or splits tensors (stacked MoE
    experts, say): only transformers' own load does that."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except (ImportError, TypeError, AttributeError):  # a transformers without these (or with another signature)
        return None
    if not all(isinstance(t, WeightRenaming) for t in transforms):
        return None
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    return lambda name: rename_source_key(name, list(transforms), [], prefix, own)[0]


def clear_gguf_quantizer(model: PreTrainedModel) -> None:
    """GGUF-loaded models hold a dequantizing quantizer that makes `save_pretrained` refuse; the weights are float."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def take_rows(args: tuple[Any, ...], kwargs: dict[str, Any], rows: int, batch: int) -> tuple[tuple, dict]:
    """A decoder-layer call's arguments for its first `rows` batch rows: every tensor whose first dimension is the
    batch (hidden states, position embeddings, position ids, masks) is cut; everything else passes as is."""

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
            return value[:rows]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    return tuple(cut(a) for a in args), {name: cut(v) for name, v in kwargs.items()}


STORE_ATTENTION = "slicer_store"


def route_attention(model: PreTrainedModel, attention: Any) -> bool:
    """Send the model's attention through `attention` (registered with transformers as `STORE_ATTENTION`, with
    SDPA's mask), which answers like SDPA outside a KV-store forward. Only for models that run SDPA attention:
    returns False, and changes nothing, for any other."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation not in ("sdpa", STORE_ATTENTION):
        return False
    AttentionInterface.register(STORE_ATTENTION, attention)
    AttentionMaskInterface.register(STORE_ATTENTION, sdpa_mask)
    model.config._attn_implementation = STORE_ATTENTION
    return True


def routes_attention(model: PreTrainedModel) -> bool:
    """Whether the model's attention still goes through `STORE_ATTENTION` (`set_attn_implementation` sets another)."""
    return model.config._attn_implementation == STORE_ATTENTION


def sdpa_attention(*args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def forward_mask_placeholder(device: torch.device) -> torch.Tensor:
    """A 4D attention mask, which the model's forward passes to its layers as is instead of building masks (the
    KV store's attention builds its own)."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


def is_mask_placeholder(mask: torch.Tensor | None) -> bool:
    """Whether a layer passed on `forward_mask_placeholder` as it came (not a mask a layer built of its own)."""
    return mask is None or (mask.dtype == torch.bool and mask.numel() == 1)


# ---------------------------------------------------------------------------------------------------- encoders
# Encoder and vision families that split (`SlicerModel`), each tested for exactness on a tiny config. Their blocks
# are the layers of `num_hidden_layers` (text encoders, ViT, DeiT) or the stages of `depths` (Swin, ResNet,
# ConvNeXt); nothing runs between two blocks, so any block boundary is a split point.
ENCODER_SPLIT_FAMILIES: dict[str, str] = {
    # "text": token rows and an attention mask; "patches": patch-token rows; "grid": patch-token rows whose blocks
    # take the patch grid as an argument; "map": CNN feature maps [B, C, H, W]
    "bert": "text",
    "roberta": "text",
    "xlm-roberta": "text",
    "distilbert": "text",
    "electra": "text",
    "vit": "patches",
    "deit": "patches",
    "swin": "grid",
    "resnet": "map",
    "convnext": "map",
    "convnextv2": "map",
}


def encoder_kind(config: Any) -> str | None:
    """How an encoder family's hidden states look at a block boundary (see `ENCODER_SPLIT_FAMILIES`); None for a
    model that is not one of them."""
    return ENCODER_SPLIT_FAMILIES.get(str(getattr(config, "model_type", "")))


def is_encoder(config: Any) -> bool:
    """Whether `config` is one of the encoder or vision families that split (`ENCODER_SPLIT_FAMILIES`)."""
    return encoder_kind(config) is not None


def check_encoder_supported(config: Any) -> None:
    """Refuse, at load time, an encoder or vision model whose family is not known to split exactly."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in ENCODER_SPLIT_FAMILIES:
        families = ", ".join(sorted(ENCODER_SPLIT_FAMILIES))
        causal_lm = model_type in causal_lm_model_types() and model_type not in ENCODER_FAMILIES
        hint = " (a causal LM: use SlicerModelForCausalLM)" if causal_lm else ""
        raise NotImplementedError(f"{model_type!r} is not an encoder family that splits{hint}; these do: {families}")
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError(
            f"this {model_type} has cross-attention (add_cross_attention=True): its blocks read encoder_hidden_states, "
            "which the server is never sent, so it does not split"
        )


def split_width(config: Any, split_layer: int) -> int:
    """Features per row entering block `split_layer`: the hidden size, or a stage's channels (Swin doubles them at
    every stage; ResNet and ConvNeXt list them in `hidden_sizes`)."""
    if getattr(config, "model_type", "") == "swin":
        return int(config.embed_dim) * 2**split_layer
    sizes = getattr(config, "hidden_sizes", None)
    if sizes and getattr(config, "depths", None):
        return int(sizes[split_layer - 1])  # stage k takes what stage k-1 made (splits start at 1)
    return int(config.hidden_size)


def final_width(config: Any) -> int:
    """Features per row leaving the last block."""
    sizes = getattr(config, "hidden_sizes", None)
    return int(sizes[-1]) if sizes and getattr(config, "depths", None) else int(config.hidden_size)


def reply_positions(config: Any, split_layer: int, positions: int, grid: tuple[int, int] | None) -> int:
    """At most how many positions leave the last block for `positions` entering block `split_layer` (a feature map's
    `grid`): a CNN's later stages halve the map (ResNet rounds up, ConvNeXt down), Swin's patch merging halves the
    grid after every stage but the last (rounding up); other encoders keep every position."""
    if grid is None or not getattr(config, "depths", None):
        return positions
    halvings = len(config.depths) - split_layer - (1 if encoder_kind(config) == "grid" else 0)
    scale = 2 ** max(halvings, 0)
    return -(-grid[0] // scale) * -(-grid[1] // scale)


PATCH_SIDE_SCALE = 4  # a ViT request's image may be up to this many times the configured one's side


def max_encoder_tokens(model: nn.Module) -> int | None:
    """The most tokens a request's row may hold: a text encoder's own embeddings' (their position table, less
    RoBERTa's offset past the padding index), which the server's stand-in forward runs; a ViT's of an image
    `PATCH_SIDE_SCALE` times the configured side (interpolated position embeddings), and its class and distillation
    tokens (attention over every patch costs the server their square: a 233-byte request of 4,096 patches a row had
    held it 12 s); None for Swin and CNNs, whose cost grows with their positions."""
    kind = encoder_kind(model.config)
    if kind == "patches":
        (h, w), (ph, pw) = _pair(model.config.image_size), _pair(model.config.patch_size)
        return (PATCH_SIDE_SCALE * h // ph) * (PATCH_SIDE_SCALE * w // pw) + 2
    if kind != "text":
        return None
    embeddings = getattr(model.base_model, "embeddings", None)
    padding = getattr(embeddings, "padding_idx", None)  # RoBERTa's positions start past it
    return int(model.config.max_position_embeddings) - (padding + 1 if isinstance(padding, int) else 0)


def layer_grid(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """The (height, width) patch grid a block takes as an argument (Swin's `input_dimensions`), if it takes one."""
    if "input_dimensions" not in signature.parameters:
        return None
    grid = signature.bind_partial(*args, **kwargs).arguments.get("input_dimensions")
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def is_backbone(model: nn.Module) -> bool:
    """Whether `model` is one of transformers' backbones (`ResNetBackbone`, ...), which return several stages' maps
    (`out_features`), read inside their forward (so never through `output_hidden_states`)."""
    return any(cls.__name__ == "BackboneMixin" for cls in type(model).__mro__)


def map_memory_format(config: Any) -> torch.memory_format:
    """The memory layout of a CNN's feature map between its stages, which the map sent over the wire is given back
    (a reduction over it, as a pooler's mean, sums in layout order: bit-exactness needs the layout). ConvNeXt's
    stages end on a channels-last view (its blocks run channels-last); ResNet's are contiguous."""
    return (
        torch.channels_last
        if getattr(config, "model_type", "") in ("convnext", "convnextv2")
        else torch.contiguous_format
    )


@contextlib.contextmanager
def kept_window_sizes(model: nn.Module) -> Iterator[None]:
    """Undo, after a forward, what transformers' Swin layers change on themselves: an input whose patch grid is no
    larger than the window shrinks the layer's window and drops its shift for good, and a model that serves many
    clients must not let one image change another's output."""
    layers = [m for m in model.modules() if hasattr(m, "set_shift_and_window_size")]
    held = [(layer, layer.window_size, layer.shift_size) for layer in layers]
    try:
        yield
    finally:
        for layer, window, shift in held:
            layer.window_size, layer.shift_size = window, shift


@contextlib.contextmanager
def outside_blocks_in_eval(model: nn.Module) -> Iterator[None]:
    """The modules outside the blocks (an embedder, a pooler) in eval mode through a server's forward of stand-in
    inputs: in train mode, a shared in-process model's embedder had updated its BatchNorm statistics with the stand-in
    zeros, and its dropout had drawn random numbers the edge's forward then lacked."""
    if not model.training:
        yield
        return
    blocks = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    switched = [m for m in model.modules() if m.training and id(m) not in blocks]
    for module in switched:
        module.training = False
    try:
        yield
    finally:
        for module in switched:
            module.training = True


def encoder_inputs(
    model: PreTrainedModel, batch: int, tokens: int, split_layer: int, grid: tuple[int, int] | None, mask: Any
) -> dict[str, Any]:
    """Stand-in inputs for the server's forward of an encoder: the blocks below the split pass the injected hidden
    states on, so only sizes matter. Text: zero embeddings `[B, T, d]` and the attention mask. Vision: a zero image
    whose patch grid at the split is `grid` where a block reads it (Swin halves it per stage), at the configured
    size for ViT-style position embeddings, and a small one for CNNs; one image, whatever the batch."""
    config = model.config
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    kind = encoder_kind(config)
    extra: dict[str, Any] = {}
    if kind == "text":
        width = model.get_input_embeddings().embedding_dim  # ELECTRA embeds narrower, then projects
        embeds = torch.zeros(batch, tokens, width, device=device, dtype=dtype)
        return {"inputs_embeds": embeds, "attention_mask": None if mask is None else mask.to(device)}
    if kind == "grid":
        if grid is None:
            raise ValueError("a Swin split needs the patch grid of the split")
        patch = _pair(config.patch_size)
        size = (grid[0] * patch[0] * 2**split_layer, grid[1] * patch[1] * 2**split_layer)
        # absolute position embeddings are sized for the configured image: stretched to this one
        extra = {"interpolate_pos_encoding": True} if getattr(config, "use_absolute_embeddings", False) else {}
    elif kind == "patches":  # position embeddings sized for the configured image
        size = _pair(config.image_size)
    else:
        size = (32, 32)
    # one image: its embeddings are dropped at the split (the rows sent go on from there), whatever the batch
    return {"pixel_values": torch.zeros(1, int(config.num_channels), *size, device=device, dtype=dtype), **extra}


def _pair(size: Any) -> tuple[int, int]:
    """(height, width) of a config's image or patch size: one number for both, or a pair, as transformers takes."""
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
