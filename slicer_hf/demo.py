"""The README's main job: a real split generation between a server process and this process, on the embedded
SmolLM2 model, printing the text and what crossed the wire."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .config import CONFIG_NAME, DEFAULT_PRESET, SlicerConfig
from .errors import ConfigError
from .launch import start_server, stop_server


def run_demo(
    model: str = "smollm2",
    prompt: str = "What is the capital of France?",
    max_new_tokens: int = 32,
    config: str | None = None,
    split_layer: int | None = None,
) -> dict:
    from . import compat
    from .client import default_config
    from .data import resolve_model
    from .loading import model_config as model_config_of

    path = resolve_model(model)
    model_config = model_config_of(model, path)
    if compat.encoder_kind(model_config):
        raise ConfigError(f"{model} is an encoder; the demo splits a causal LM (docs/encoders.md splits encoders)")
    own = not config and (Path(model).expanduser() / CONFIG_NAME).is_file()  # the model folder's own config
    cfg = SlicerConfig.from_pretrained(config) if config else default_config(model)  # as generate and chat choose
    label = config or (f"{model}/{CONFIG_NAME}" if own else "defaults" if cfg == SlicerConfig() else DEFAULT_PRESET)
    cfg = cfg.replace(split_layer=split_layer) if split_layer is not None else cfg
    layers = compat.num_layers(model_config)
    cfg = cfg.replace(split_layer=cfg.split_layer_for(layers))
    if not 1 <= cfg.split_layer < layers:  # said now, not by a server that starts and exits
        raise ConfigError(f"split layer {cfg.split_layer}: {model} has {layers} layers, so it must be 1..{layers - 1}")
    with tempfile.TemporaryDirectory(prefix="slicer-demo-") as folder:
        bases = []  # the config's bases go to the server too (a calibrated config's, from a folder or a Hub repo alike)
        if cfg.basis or cfg.downlink_basis:
            cfg.save_pretrained(folder)
            bases = ["--basis", folder]
        return _run(path, model, label, cfg, bases, prompt, max_new_tokens)


def _run(
    path: str, model: str, label: str, cfg: SlicerConfig, bases: list[str], prompt: str, max_new_tokens: int
) -> dict:
    import torch
    from transformers import AutoTokenizer

    from .client import encode_messages, wire_report
    from .loading import model_loading
    from .modeling import SlicerModelForCausalLM

    print(
        f"model: {model} ({path})\nconfig: {label}: split_layer={cfg.split_layer}, "
        f"codec={cfg.codec}, downlink={cfg.downlink}",
        flush=True,
    )
    # Server and edge share this machine's cores: one torch thread each avoids oversubscription.
    torch.set_num_threads(1)
    server, url = start_server(
        path, ["--min-split-layer", str(cfg.split_layer), "--log-level", "warning", "--threads", "1", *bases]
    )
    try:
        print(f"server process {server.pid} listening on {url}", flush=True)
        with model_loading(model):
            tokenizer = AutoTokenizer.from_pretrained(path)
            edge = SlicerModelForCausalLM.from_pretrained(path, slicer_config=cfg, transport=url)
        inputs = encode_messages(tokenizer, [{"role": "user", "content": prompt}])
        started = time.perf_counter()
        out = edge.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - started
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        stats = edge.wire_stats()
        new = out.shape[1] - inputs["input_ids"].shape[1]
        print(f"\nprompt: {prompt}\nreply:  {text.strip()}\n")
        print(
            f"generated {new} tokens in {elapsed:.2f} s ({new / elapsed:.1f} tokens/s), split at layer "
            f"{cfg.split_layer} of {edge.config.num_hidden_layers}"
        )
        print(wire_report(stats, edge.config.hidden_size))
        edge.close_session()
        return {"text": text, "wire": stats.as_dict(), "elapsed_s": elapsed}
    finally:
        stop_server(server)


if __name__ == "__main__":
    run_demo()
