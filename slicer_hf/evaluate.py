"""Quality of a split on real text: perplexity, KL to the unsplit model, top-1 agreement, bits per token up and down.

Perplexity uses non-overlapping windows (512 tokens by default), each scored on its own. The split logits come
from `model(ids, split_layer=k)`, i.e. through the codec's bytes and the server path. Bits per token are those of
single-token packets, as decoding sends them: the codec packet (its envelope included), and the whole message a
session sends for it in steady state (a NEXT step with a bare packet: the server rebuilds the envelope and the agreed
step, and takes start and batch from the session).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from . import compat, protocol
from .config import SlicerConfig
from .data import load_text, load_tokenizer, resolve_model, token_windows
from .errors import ConfigError
from .loading import model_config, model_loading
from .modeling import SlicerModelForCausalLM, unsplit


@torch.inference_mode()
def evaluate(
    model: str = "smollm2",
    text: str = "wikitext-2-raw-v1:test",
    split_layer: int | None = None,
    codec: str | None = None,
    config: str | SlicerConfig | None = None,
    window: int = 512,
    max_tokens: int | None = None,
    json_out: str | None = None,
    progress: bool = True,
    codec_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score a split configuration against the unsplit model.

    Args:
        model: Hub id, local folder, or "smollm2".
        text: a text file, or "wikitext-2-raw-v1[:split]".
        split_layer: the split (default: the config's).
        codec: a codec name (overrides the config's codec).
        config: a `SlicerConfig` or a folder/repo holding one.
        window: tokens per scored window.
        max_tokens: score at most this many tokens (whole windows).
        json_out: where to write the result as JSON.
        codec_params: codec knobs that override the config's.
    """
    path = resolve_model(model)
    cfg = (
        config
        if isinstance(config, SlicerConfig)
        else SlicerConfig.from_pretrained(config)
        if config
        else SlicerConfig()
    )
    changes: dict[str, Any] = dict(codec_params or {})
    if codec:
        changes["codec"] = codec
    if split_layer is not None:
        changes["split_layer"] = split_layer
    cfg = cfg.replace(**changes) if changes else cfg
    if cfg.downlink == "topk_logits":
        raise ConfigError(
            "eval scores whole next-token distributions, and downlink 'topk_logits' sends back only the top k (the "
            "rest is -inf): score the same uplink with downlink 'logits' and size the top-k replies apart"
        )
    compat.check_window(model_config(model, path), window)
    tokenizer = load_tokenizer(path, "to read the text")
    windows = token_windows(tokenizer, load_text(text), window=window, max_tokens=max_tokens)  # before any weight
    with model_loading(model):
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    split = SlicerModelForCausalLM.from_model(base, cfg)
    link = split._link_for(split.slicer_config.split_layer)
    link_codec, downlink_codec = link.codec, link.downlink_codec
    server = split.split_server  # the in-process server: replies are sized as its session makes them
    assert server is not None

    nll_ref = nll_split = kl = agree = 0.0
    n_scored = 0
    packet_bits: list[int] = []
    step_bits: list[int] = []
    reply_bits: list[int] = []
    started = time.perf_counter()
    hidden_at_split: list[torch.Tensor] = []
    capture = _capture_split_input(split, split.slicer_config.split_layer, hidden_at_split)
    final_rows: list[torch.Tensor] = []
    capture_final = _capture_server_output(split, final_rows)
    k = split.slicer_config.split_layer
    for ids in tqdm(windows, desc=f"eval {cfg.codec} @ {k}", disable=not progress, unit="window"):
        ids = ids.unsqueeze(0)
        with unsplit(split):
            ref = split(ids).logits[0, :-1].float()
        logits = split(ids).logits[0].float()  # a logit downlink's replies, one row per position
        out = logits[:-1]
        target = ids[0, 1:]
        ref_lp, out_lp = F.log_softmax(ref, -1), F.log_softmax(out, -1)
        nll_ref += -ref_lp.gather(1, target[:, None]).sum().item()
        nll_split += -out_lp.gather(1, target[:, None]).sum().item()
        kl += (ref_lp.exp() * (ref_lp - out_lp)).sum().item()
        agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
        n_scored += target.numel()
        given: list[torch.Tensor | None] = []  # what a predicting downlink codes each reply against
        sent = torch.cat(hidden_at_split)  # this window's rows at the split
        hidden_at_split.clear()
        previous = None  # a chained codec's last decoded row (None: the window starts afresh, as a session does)
        for row in sent:  # single-token packets, as decoding sends them
            packet = link_codec.encode(row.reshape(1, 1, -1), given=previous)
            packet_bits.append(8 * len(packet))
            decoded = None
            if link_codec.chains or downlink_codec.given_width is not None:
                decoded = link_codec.decode(packet, given=previous)
            previous = decoded[:, -1] if link_codec.chains else None
            given.append(decoded if downlink_codec.given_width is not None else None)
            bare = link_codec.bare(packet, (1, 1, row.shape[-1]), row.dtype)  # as a session sends it
            ones = torch.ones(1, 1, dtype=torch.bool)
            step = protocol.Step(1, 1000, 1000, 1, 1, 0, bare, ones, bare=True, next=True)
            step_bits.append(8 * len(protocol.encode_step(step)))
        replies = torch.cat(final_rows)  # the server's forwards of this window (prefill runs in chunks)
        final_rows.clear()
        if cfg.downlink != "hidden":
            replies = logits
        session = server.sessions[link.session]
        for row, given_row in zip(replies, given, strict=True):  # the replies to single-token steps, as the server
            payload, kind = server.encode_output(session, row.reshape(1, 1, -1), given=given_row)  # makes them
            reply_bits.append(8 * len(protocol.encode_reply(1000, kind, payload)))
    capture.remove()
    capture_final.remove()
    split.close_session()
    d = split.config.hidden_size
    result = {
        "model": model,
        "text": text,
        "split_layer": split.slicer_config.split_layer,  # the config's, or the default the model chose
        "num_layers": split.config.num_hidden_layers,
        "config": split.slicer_config.to_dict(),
        "window": window,
        "tokens_scored": n_scored,
        "windows": len(windows),
        "ppl_ref": math.exp(nll_ref / n_scored),
        "ppl": math.exp(nll_split / n_scored),
        "kl_mean": kl / n_scored,
        "top1_agreement": agree / n_scored,
        "bits_per_token": sum(packet_bits) / len(packet_bits),
        "bits_per_token_with_step_header": sum(step_bits) / len(step_bits),
        "downlink_bits_per_token": sum(reply_bits) / len(reply_bits),
        "fp16_bits_per_token": 16 * d,
        "elapsed_s": time.perf_counter() - started,
    }
    result["ppl_change_pct"] = 100 * (result["ppl"] / result["ppl_ref"] - 1)
    result["compression_vs_fp16"] = result["fp16_bits_per_token"] / result["bits_per_token"]
    both = result["bits_per_token_with_step_header"] + result["downlink_bits_per_token"]
    result["both_ways_vs_fp16"] = 2 * result["fp16_bits_per_token"] / both
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _capture_split_input(model: Any, k: int, sink: list[torch.Tensor]) -> Any:
    """Record the hidden states entering layer k on the edge (what the codec encodes)."""
    from .compat import decoder_layers

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        from .hooks import _ACTIVE

        plan = _ACTIVE.get()
        if plan is not None and plan.role == "edge":
            hidden = args[0] if args else kwargs["hidden_states"]
            sink.append(hidden[0].detach().clone())

    return decoder_layers(model)[k].register_forward_pre_hook(hook, with_kwargs=True)


def _capture_server_output(model: Any, sink: list[torch.Tensor]) -> Any:
    """Record the last layer's output on the server side (what a hidden-state reply carries)."""
    from .compat import decoder_layers, layer_hidden

    def hook(module: Any, args: Any, output: Any) -> None:
        from .hooks import _ACTIVE

        plan = _ACTIVE.get()
        if plan is not None and plan.role == "server":
            sink.append(layer_hidden(output)[0].detach().clone())

    return decoder_layers(model)[-1].register_forward_hook(hook)


def format_result(r: dict[str, Any]) -> str:
    return (
        f"{r['config']['codec']} @ layer {r['split_layer']}/{r['num_layers']}: ppl {r['ppl']:.3f} (ref "
        f"{r['ppl_ref']:.3f}, {r['ppl_change_pct']:+.2f}%), KL {r['kl_mean']:.4f} nats, top-1 agreement "
        f"{100 * r['top1_agreement']:.2f}%, {r['bits_per_token']:.0f} bits/token "
        f"({r['compression_vs_fp16']:.2f}x vs fp16; {r['bits_per_token_with_step_header']:.0f} as a NEXT step "
        f"sends it) up, {r['downlink_bits_per_token']:.0f} down ({r['both_ways_vs_fp16']:.2f}x vs fp16 both ways), "
        f"{r['tokens_scored']} tokens"
    )


__all__ = ["evaluate", "format_result"]
