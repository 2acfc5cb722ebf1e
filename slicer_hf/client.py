"""A command-line client of a running server: load the edge, stream a reply, report what crossed the wire.
`slicer-hf generate` and `slicer-hf chat` use it, and the demo prints its wire report."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from transformers import AutoTokenizer, TextStreamer

from . import compat
from .config import SlicerConfig
from .errors import ConfigError
from .link import WireStats
from .loading import model_loading


def wire_report(stats: WireStats, hidden_size: int) -> str:
    """What crossed the wire: slicer_hf's messages, their headers included (not gRPC's and HTTP/2's framing around
    them: 5 bytes a message and more a frame), against fp16 hidden states."""
    fp16_bits = 16 * hidden_size

    def against_fp16(bits: float, rows: int) -> str:  # no row, no ratio
        if not rows:
            return ""
        factor = fp16_bits / bits
        than = f"{factor:.2f}x smaller" if factor >= 1 else f"{1 / factor:.2f}x larger"
        return f" ({than} than fp16 hidden states, {fp16_bits} bits)"

    return (
        "what crossed the wire (slicer_hf's messages, headers included; gRPC's and HTTP/2's framing not counted):\n"
        f"  uplink   {stats.uplink_bytes:>9,d} B in {stats.uplink_messages} messages, {stats.tokens} token "
        f"positions: {stats.uplink_bits_per_token:,.0f} bits/token"
        f"{against_fp16(stats.uplink_bits_per_token, stats.tokens)}\n"
        f"  downlink {stats.downlink_bytes:>9,d} B in {stats.downlink_messages} messages, {stats.replied} positions "
        f"back: {stats.downlink_bits_per_token:,.0f} bits/position"
        + (f"\n  failovers {stats.failovers} ({stats.retries} failed attempts)" if stats.retries else "")
        + (_bitrate_line(stats.bitrate_changes) if stats.bitrate_changes else "")
    )


def encode_messages(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, Any]:
    """A conversation as model inputs: through the tokenizer's chat template, or its turns' text one a line where it
    has none; a conversation of no tokens is a `ConfigError`."""
    if getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = dict(tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt"))
    if inputs["input_ids"].shape[-1] == 0:
        raise ConfigError("the prompt is empty: give the model something to continue")
    return inputs


def default_config(model: str) -> SlicerConfig:
    """The config of a client given none: a model folder's own `slicer_config.json` (as `from_pretrained` takes it);
    else the SmolLM2 preset for SmolLM2 (its alias, its Hub id, or the folder the alias converts to), which a server
    started with the same preset serves; else `SlicerConfig`'s defaults."""
    from .config import CONFIG_NAME, DEFAULT_PRESET
    from .data import DEFAULT_MODEL_ALIASES, MODEL_DIR_NAME, cache_dir

    if (Path(model).expanduser() / CONFIG_NAME).is_file():
        return SlicerConfig.from_pretrained(Path(model).expanduser())
    preset = SlicerConfig.from_pretrained(DEFAULT_PRESET)
    if model.lower() in DEFAULT_MODEL_ALIASES or model == preset.model_id:
        return preset
    if Path(model).expanduser().resolve() == (cache_dir() / MODEL_DIR_NAME).resolve():
        return preset
    return SlicerConfig()


def _bitrate_line(changes: list[dict[str, float]]) -> str:
    steps = " -> ".join(f"{c['step']:g} (token {c['token']:.0f})" for c in changes[-6:])
    return f"\n  adaptive bitrate: {len(changes)} step changes{' (the last 6)' if len(changes) > 6 else ''}: {steps}"


@dataclass
class Sampling:
    """Sampling flags of the client commands; greedy unless `do_sample`."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):  # a mistake, greedy or not
            raise ConfigError(
                "sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0, got "
                f"temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}"
            )
        plain = Sampling.__dataclass_fields__
        if not self.do_sample and any(getattr(self, k) != plain[k].default for k in ("temperature", "top_p", "top_k")):
            warnings.warn(
                "temperature, top_p and top_k apply when sampling (--do-sample): this reply is greedy", stacklevel=2
            )

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


class Client:
    """The edge of a split model talking to running servers (tried in order).

    Args:
        servers: a server URL (`grpc://host:port`, `grpcs://...`) or several, tried in order.
        model: the model the servers serve (Hub id, folder, or 'smollm2').
        config: a `SlicerConfig`, a preset name or folder (default: the SmolLM2 preset for 'smollm2', else defaults).
        token: the servers' auth token.
        root_certificates: PEM CA certificates for `grpcs://` servers with a private CA (None: the system's).
        timeout_s: how long one request waits for its reply (None: the transport's default, 60 s).
        split_layer: the config's split layer overridden (None: the config's).
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        model: str = "smollm2",
        config: str | SlicerConfig | None = None,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout_s: float | None = None,
        split_layer: int | None = None,
    ) -> None:
        from .data import resolve_model
        from .modeling import SlicerModelForCausalLM

        urls = [servers] if isinstance(servers, str) else list(servers)  # a string is one URL, not its letters
        path = resolve_model(model)
        config = default_config(model) if config is None else config
        self.config = config if isinstance(config, SlicerConfig) else SlicerConfig.from_pretrained(config)
        if split_layer is not None:
            self.config = self.config.replace(split_layer=split_layer)
        options = {"token": token, "root_certificates": root_certificates, "timeout_s": timeout_s}
        options = {key: value for key, value in options.items() if value is not None} or None
        with model_loading(model):  # no such folder or Hub repo, or a folder without its tokenizer or weights
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = SlicerModelForCausalLM.from_pretrained(
                path, slicer_config=self.config, transport=urls, transport_options=options
            )
        self._held: tuple[Any, Any] | None = None  # the last reply's whole sequence and its KV cache
        self._given_up = WireStats()  # what crossed the wire in sessions given up (`restart`)

    def encode(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return encode_messages(self.tokenizer, messages)

    def reply(
        self, messages: list[dict[str, str]], sampling: Sampling, out: TextIO | None = None
    ) -> tuple[str, float, int]:
        """Generate the next reply, streaming its text to `out`; returns (text, seconds, new tokens)."""
        import torch

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        from .errors import StaleCacheError

        inputs = self.encode(messages)
        to = out or sys.stdout
        streamer = _Printer(self.tokenizer, to)
        started = time.perf_counter()
        kwargs = {"streamer": streamer, "return_dict_in_generate": True, **sampling.generate_kwargs()}
        cache = self._reusable(inputs["input_ids"])
        try:
            try:
                result = self.model.generate(**inputs, **{compat.cache_kwarg(self.model): cache}, **kwargs)
            except StaleCacheError:  # raised before any token: the whole conversation again
                if cache is None:
                    raise
                kwargs["streamer"] = _Printer(self.tokenizer, to)  # the first one took the prompt in
                result = self.model.generate(**inputs, **kwargs)
        except BaseException:
            self._held = None
            raise
        self._held = (result.sequences, compat.output_cache(result))
        elapsed = time.perf_counter() - started
        new = result.sequences[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True), elapsed, int(new.numel())

    def _reusable(self, ids: Any) -> Any:
        """The last reply's KV cache, cut to the positions this prompt `ids` shares with that sequence (never its last
        position: it runs again, for the next token's logits), so that a conversation sends only its new turn; None
        where they share none. A cache serves one continuation."""
        if self._held is None or ids.shape[0] != 1 or self._held[0].shape[0] != 1:
            return None
        (held,), cache = self._held
        self._held = None
        n = min(cache.get_seq_length(), ids.shape[1] - 1, held.shape[0])
        differs = (held[:n] != ids[0, :n]).nonzero()
        shared = int(differs[0, 0]) if len(differs) else n
        # none shared, or a sliding window that dropped what going back needs: the whole conversation again
        return cache if shared and compat.crop_cache(cache, shared) else None

    def summary(self, elapsed_s: float, new_tokens: int) -> str:
        rate = new_tokens / elapsed_s if elapsed_s else 0.0
        head = (
            f"{new_tokens} tokens in {elapsed_s:.2f} s ({rate:.1f} tokens/s), split at layer "
            f"{self.model.slicer_config.split_layer} of {self.model.config.num_hidden_layers}, codec "
            f"{self.config.codec}"
        )
        stats = self._given_up + self.model.wire_stats()  # every session of this client's
        return head + "\n" + wire_report(stats, self.model.config.hidden_size)

    def restart(self) -> None:
        """Start afresh after a reply cut short (Ctrl-C, a timeout): its session, stopped mid-step, is given up; the
        next reply opens a new one and sends its whole conversation."""
        self._held = None
        self._given_up += self.model.wire_stats()
        self.model.close_session()

    def close(self) -> None:
        self.model.close_session()


class _Printer(TextStreamer):
    """Streams the reply's text to a file as it is generated."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", file=self.out, flush=True)
