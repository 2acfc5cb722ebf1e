"""Load only the decoder layers one side runs, from safetensors checkpoints.

A remote-split edge needs layers `0..k-1` (plus embeddings, final norm and head); a server with
`--min-split-layer K` needs layers `K..L-1`. The model is built on the meta device, and only the tensors it needs
are read from the checkpoint's safetensors shards; the rest never leave the disk (from the Hub, shards that hold
only the other side's layers are never downloaded). Checkpoints that are not plain safetensors (GGUF, pickles,
quantized) load whole, and the unused layers are released afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from . import compat
from .errors import ConfigError, SlicerError

logger = logging.getLogger(__name__)
# accelerate's empty init patches `nn.Module.register_parameter` process-wide while it is active: parameters that
# another thread registers meanwhile (a load_state_dict(assign=True), say) land on the meta device, and two threads
# inside it at once can leave the patch in place for good. Loads through this module take turns.
_EMPTY_INIT_LOCK = threading.Lock()
PARTIAL_OK_KWARGS = {
    "dtype",
    "torch_dtype",
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "attn_implementation",
    "device_map",  # one device only (see `_one_device`)
    "low_cpu_mem_usage",  # what a partial load is anyway
}
_SPREADING_MAPS = {"auto", "balanced", "balanced_low_0", "sequential"}


def missing_folder(model: str | os.PathLike[str]) -> bool:
    """Whether `model` is a path (absolute, or starting with '.' or '~'), not a Hub id, and no folder is there."""
    name = os.fspath(model)
    folder = Path(name).expanduser()
    return (folder.is_absolute() or name.startswith((".", "~"))) and not folder.exists()


def model_error(model: str, exc: Exception) -> ConfigError:
    """A model that cannot be loaded, said plainly (transformers reads a missing folder as a malformed Hub id)."""
    if missing_folder(model):
        return ConfigError(f"model {model!r}: no such folder")
    return ConfigError(f"cannot load model {model!r}: {exc}")


@contextlib.contextmanager
def model_loading(model: str) -> Iterator[None]:
    """Within: a model that cannot be loaded (no such folder, no weights or tokenizer in it, no Hub repo reachable)
    raises a one-line `ConfigError` naming it, not transformers' traceback."""
    try:
        yield
    except SlicerError:
        raise
    except (OSError, ValueError) as exc:
        raise model_error(model, exc) from None


def model_config(model: str, path: str | os.PathLike[str]) -> Any:
    """The transformers config of `model` (at `path`, as `data.resolve_model` found it), or a one-line
    `ConfigError`: no such folder, no Hub repo reachable, or a folder that holds no model."""
    with model_loading(model):
        return AutoConfig.from_pretrained(expand_home(path))


def expand_home(model: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """`model` with a leading `~` expanded (transformers takes `~/folder` for a malformed Hub id)."""
    return os.path.expanduser(model) if os.fspath(model).startswith("~") else model


def check_model_folder(model: str | os.PathLike[str]) -> None:
    """A `ConfigError` for a model path with no folder there (transformers takes it for a malformed Hub id, after
    asking the Hub)."""
    if missing_folder(model):
        raise ConfigError(f"model {os.fspath(model)!r}: no such folder")


def load_layers(
    name_or_path: str | os.PathLike[str],
    layers: Iterable[int],
    auto_class: Any = None,
    input_embeddings: bool = True,
    **hf_kwargs: Any,
) -> PreTrainedModel:
    """A model with real weights for `layers` only (the other blocks stay on the meta device).

    Args:
        name_or_path: Hub id or local folder.
        layers: indices of the blocks to load.
        auto_class: the transformers Auto class to build it with (default: `AutoModelForCausalLM`; `AutoModel`
            for an encoder's server).
        input_embeddings: whether to load the input embeddings; a server, given hidden states, reads them only
            where the LM head shares their weights (and then they are loaded whatever this says).
        hf_kwargs: `from_pretrained` arguments; anything beyond `PARTIAL_OK_KWARGS` (or a `device_map` that spreads
            the model over devices) makes this fall back to a whole load followed by releasing the unused layers.
    """
    with _EMPTY_INIT_LOCK:
        model = _load_layers(
            expand_home(name_or_path), set(layers), auto_class or AutoModelForCausalLM, input_embeddings, hf_kwargs
        )
    if not input_embeddings and (unused := compat.unshared_input_embeddings(model)) is not None:
        unused.to("meta")  # a whole load read them (a partial one left them there)
    return model


def _load_layers(
    name_or_path: str | os.PathLike[str],
    keep: set[int],
    auto_class: Any,
    input_embeddings: bool,
    hf_kwargs: dict[str, Any],
) -> PreTrainedModel:
    device = _one_device(hf_kwargs.get("device_map"))
    partial = set(hf_kwargs) <= PARTIAL_OK_KWARGS and device is not False
    source = _checkpoint_source(name_or_path, hf_kwargs) if partial else None
    if source is None:
        return _load_whole(name_or_path, keep, auto_class, hf_kwargs)
    folder, fetch = source
    dtype = hf_kwargs.get("dtype", hf_kwargs.get("torch_dtype", "auto"))
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None):  # quantized weights need transformers' quantizer
        return _load_whole(name_or_path, keep, auto_class, hf_kwargs)
    if dtype == "auto":  # the config's, else the checkpoint's own (found below, once its files are known)
        dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    build = {"attn_implementation": hf_kwargs["attn_implementation"]} if "attn_implementation" in hf_kwargs else {}
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype or torch.float32, **build)
    prefix = compat.layers_path(model) + "."
    unused = None if input_embeddings else compat.unshared_input_embeddings(model)
    skipped = {f"{name}." for name, module in model.named_modules() if module is unused}

    def kept(name: str) -> bool:
        if any(name.startswith(s) for s in skipped):
            return False
        return not (name.startswith(prefix) and int(name[len(prefix) :].split(".", 1)[0]) not in keep)

    wanted = {name for name, _ in model.named_parameters() if kept(name)}
    # persistent buffers (BatchNorm's running statistics): read where the checkpoint has them, as transformers does
    buffers = {name for name in model.state_dict() if kept(name)} - wanted
    rename = compat.checkpoint_names(model)  # checkpoint name -> model name
    if rename is None:  # tensors merged or split while loading (stacked MoE experts): transformers' own load
        return _load_whole(name_or_path, keep, auto_class, hf_kwargs)
    shards = _shards(folder, wanted | buffers, rename)
    try:
        if fetch is not None:  # a Hub snapshot: download only the shards that hold this side's tensors
            fetch(shards)
    except Exception as exc:  # offline without them in the cache, say: transformers' load says what is missing
        logger.debug("could not fetch %s of %s: %s", shards, name_or_path, exc)
        return _load_whole(name_or_path, keep, auto_class, hf_kwargs)
    files = [folder / shard for shard in shards]
    if not all(file.is_file() for file in files):  # not safetensors after all (pickles, say): transformers' load
        return _load_whole(name_or_path, keep, auto_class, hf_kwargs)
    where = {}  # model name -> (file, checkpoint name) of each wanted tensor, found before any tensor is read
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            named = {rename(key): key for key in f.keys()}  # noqa: SIM118 - not a mapping
            where |= {name: (file, key) for name, key in named.items() if name in wanted or name in buffers}
    missing = wanted - set(where)
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        missing -= {n for n in missing if n.endswith(compat.output_embedding_name(model))}
    if missing:
        logger.info("checkpoint keys do not match the model (%s...): loading whole", sorted(missing)[:3])
        return _load_whole(name_or_path, keep, auto_class, hf_kwargs)
    if dtype is None:  # as transformers: the dtype of the checkpoint's first floating-point tensor
        dtype = _stored_dtype(files)
        with init_empty_weights(include_buffers=False):  # built again: buffers (rotary's) keep their own dtypes
            model = auto_class.from_config(config, dtype=dtype, **build)
    own = model.state_dict(keep_vars=True)  # each tensor takes its model's dtype: buffers keep their own
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            mine = {name: key for name, (held, key) in where.items() if held == file}
            state |= {name: f.get_tensor(key).to(own[name].dtype) for name, key in mine.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config.name_or_path = str(name_or_path)
    if device is not None:
        move_loaded(model, device)
    return model.eval()


def _load_whole(
    name_or_path: str | os.PathLike[str], keep: set[int], auto_class: Any, hf_kwargs: dict[str, Any]
) -> PreTrainedModel:
    """transformers' own load of the whole model, less the layers outside `keep`."""
    model = auto_class.from_pretrained(name_or_path, **hf_kwargs)
    release_layers(model, [i for i in range(compat.num_layers(model.config)) if i not in keep])
    return model


def _one_device(device_map: Any) -> torch.device | None | bool:
    """The one device a `device_map` puts the whole model on (None: no map), or False for a map that spreads it."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        places = set(device_map.values())
        return _one_device(places.pop()) if len(places) == 1 else False
    if isinstance(device_map, str) and device_map in _SPREADING_MAPS:
        return False
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):  # transformers' load says what is wrong with it
        return False


def _stored_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the first floating-point tensor of the checkpoint `files` (float32 where none is)."""
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - not a mapping
                stored = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if stored is not None:
                    return stored
    return torch.float32


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _shards(folder: Path, wanted: set[str], rename: Callable[[str], str]) -> list[str]:
    """The safetensors files transformers reads that hold any of the `wanted` tensors (model names; `rename` maps
    a checkpoint's names to them): `model.safetensors` where there is one (as transformers, even beside an index),
    else the shards the index names for them (another file in the folder, an export or a variant, is never read)."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or not index.is_file():
        return ["model.safetensors"]
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    return sorted({shard for key, shard in weight_map.items() if rename(key) in wanted})


def released(module: torch.nn.Module) -> bool:
    """Whether `module` holds weights on the meta device that nothing brings back (accelerate's offload hooks load
    theirs at every forward: those are held, elsewhere)."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,))):
            continue
        if any(p.device.type == "meta" for p in sub.parameters(recurse=False)):
            return True
    return False


def release_layers(model: PreTrainedModel, indices: Iterable[int]) -> None:
    """Free the weights of decoder layers this side never runs (they move to the meta device)."""
    layers = compat.decoder_layers(model)
    for i in indices:
        layers[i].to("meta")


def _checkpoint_source(
    name_or_path: str | os.PathLike[str], hf_kwargs: dict[str, Any]
) -> tuple[Path, Callable[[list[str]], None] | None] | None:
    """The folder holding the model's config, and for a Hub id how to download the weight files it needs (its
    metadata comes first, and `model.safetensors` if it has one, so that only the shards this side reads are
    fetched); None where neither works."""
    path = Path(name_or_path)
    if path.is_dir():
        return path, None
    try:
        from huggingface_hub import snapshot_download

        hub = {key: hf_kwargs.get(key) for key in ("revision", "token", "cache_dir")}
        hub["local_files_only"] = hf_kwargs.get("local_files_only", False)

        def fetch(files: list[str]) -> None:
            snapshot_download(str(name_or_path), allow_patterns=files, **hub)

        # with the metadata, the one weight file an unsharded repo has: transformers reads it even beside an index
        metadata = ["*.json", "*.txt", "*.model", "model.safetensors"]
        return Path(snapshot_download(str(name_or_path), allow_patterns=metadata, **hub)), fetch
    except Exception as exc:  # offline, gated, not a repo: the whole-load path reports it properly
        logger.debug("no snapshot of %s: %s", name_or_path, exc)
        return None


def move_loaded(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """Move the loaded weights and buffers of `model` to `device`; those left on the meta device stay there
    (`Module.to` cannot copy them). Tied weights stay tied."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or tensor.device.type == "meta" or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    data = tensor.data.to(device)
                    moved[id(tensor)] = (
                        torch.nn.Parameter(data, requires_grad=False) if store is module._parameters else data
                    )
                store[name] = moved[id(tensor)]
    return model
