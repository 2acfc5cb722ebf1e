"""Build a `SplitServer` for a model name or folder: what `slicer-hf serve` and each fleet replica run."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel

from .. import compat
from ..codec.basis import load_bases
from ..data import resolve_model
from ..loading import load_layers, model_config, move_loaded
from .engine import SplitServer
from .state import ServerLimits


def load_server(
    model: str,
    min_split_layer: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    limits: ServerLimits | None = None,
    batching: bool = True,
    kv_store: bool = True,
    bases: Sequence[str | Path] = (),
    prepack: bool = True,
) -> SplitServer:
    """Load blocks `min_split_layer..L-1` of `model` (a causal LM, or an encoder's base model) and serve them.

    Args:
        model: Hub id, local folder, or an alias of `data.resolve_model` ('smollm2', 'minilm').
        dtype: weights dtype: float32, bfloat16, float16 or auto.
        device: where the layers and the KV store live: cpu, cuda, cuda:1.
        limits, batching, kv_store, prepack: as for `SplitServer` (prepack: where the device and dtype allow).
        bases: calibrated SLICER bases clients may name (files, or folders whose bases are all loaded), besides the
            ones shipped with the presets.
    """
    load_bases(bases)
    path = resolve_model(model)
    config = model_config(model, path)
    n = compat.num_layers(config)
    auto = AutoModel if compat.is_encoder(config) else None  # an encoder's server needs no head
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    # hidden states come in: a causal LM's input embeddings are not read (unless its head shares them)
    loaded = load_layers(
        path, range(min_split_layer, n), auto_class=auto, input_embeddings=auto is not None, dtype=torch_dtype
    )
    move_loaded(loaded, torch.device(device))
    return SplitServer(
        loaded,
        model_name=model,
        limits=limits,
        min_split_layer=min_split_layer,
        batching=batching,
        kv_store=kv_store,
        prepack=prepack,
    )


def settle_heap() -> None:
    """For a process that serves for its life, once its server is built: what exists by now (the model, the server,
    torch and transformers themselves) is left out of the cyclic garbage collector's passes (`gc.freeze`). A full
    pass walks every object the process holds, about 80 ms here, in whichever thread sets it off: the compute
    thread's rounds wait for it (a codec thread's allocations set it off mid-round)."""
    gc.collect()
    gc.freeze()
