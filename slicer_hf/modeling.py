"""`SlicerModelForCausalLM`: any transformers causal LM whose `generate()` and `forward()` run split.

`from_pretrained` loads the model with transformers as usual, then swaps its class for a subclass that mixes in
`SlicerGenerationMixin` (the model object, weights, generation config and accelerate hooks stay as they are)
and hooks its decoder layers (see `hooks.py`). Layers `0..k-1` run here; the hidden states at the split go
through the codec's bytes to the server part, whose answer lets transformers' own `generate()` carry on.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import logging
import numbers
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Cache, PreTrainedModel

from . import compat, loading, protocol
from .codec import build_codec
from .codec.basis import lookup
from .config import CONFIG_NAME, SlicerConfig
from .errors import ConfigError, SlicerError, StaleCacheError
from .hooks import SplitPlan, attach_hooks, detach_hooks, split_plan
from .link import SuffixLink, WireStats, open_request, wire_dtype
from .loading import check_model_folder, expand_home, load_layers, release_layers
from .server.engine import SplitServer
from .server.state import ServerLimits
from .transport import LocalTransport, Transport, make_transport

logger = logging.getLogger(__name__)

# the split layer of the generate() call running, and its model: another split model run inside it (a logits
# processor's, a stopping criterion's) takes its own
_GENERATE_SPLIT: contextvars.ContextVar[tuple[Any, int] | None] = contextvars.ContextVar(
    "slicer_generate_split", default=None
)
UNSUPPORTED_GENERATION = {  # generate() arguments, the values that leave split generation as it is, and what else
    "num_beams": ((None, 1), "beam search"),
    "penalty_alpha": ((None,), "contrastive search"),
    "assistant_model": ((None,), "assisted (speculative) decoding"),
    "prompt_lookup_num_tokens": ((None,), "prompt-lookup decoding"),
    "use_mtp": ((None, False), "multi-token prediction (assisted decoding by the model's own MTP layers)"),
    "assistant_early_exit": ((None,), "self-speculative decoding (it cuts the model's layers)"),
    "guidance_scale": ((None, 1), "classifier-free guidance (a second, unconditional sequence on the model)"),
    "dola_layers": ((None,), "DoLa decoding (it reads early layers' hidden states)"),
}


PUSH_KWARGS = {"commit_message", "commit_description", "private", "revision", "create_pr", "tags"}  # push_to_hub's


class ConcurrentUseError(SlicerError, RuntimeError):
    """Two threads ran one split model at once: a model holds one server session, so calls must take turns."""


class SplitModelMixin:
    """What every split model has: one server session (opened on first use), wire accounting, the split layer.

    One model holds one server session: calls from several threads at once are refused with
    `ConcurrentUseError` (load one model per thread, or take turns).
    """

    slicer_config: SlicerConfig
    _slicer_link: SuffixLink | None
    _slicer_transport: Transport
    _slicer_local: bool
    _slicer_busy: threading.RLock

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A copy with its own in-process server (and no session yet); a model with a remote server holds a
        connection and a session, which no copy can share: load another one."""
        if not self._slicer_local:
            raise TypeError(
                f"a {type(self).__name__} with a remote server holds its connection and session and cannot be "
                "copied: load another with from_pretrained (or copy the model before making it split)"
            )
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        held = ("_slicer_link", "_slicer_transport", "_slicer_busy")  # this model's own
        twin.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k not in held})
        twin._slicer_link, twin._slicer_busy = None, threading.RLock()
        twin._slicer_transport = _in_process(twin)
        return twin

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """`Module.to`; on an edge that released its server's layers, the weights it holds move and the released
        ones stay on the meta device (`Module.to` cannot move those)."""
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if getattr(self, "_slicer_local", True) or device is None:
            return super().to(*args, **kwargs)
        loading.move_loaded(cast(PreTrainedModel, self), device)
        rest = {"dtype": dtype, "memory_format": memory_format}
        return super().to(**{k: v for k, v in rest.items() if v is not None}) if any(rest.values()) else self

    def cuda(self, device: int | torch.device | None = None) -> Any:
        if getattr(self, "_slicer_local", True):
            return super().cuda(device)
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self) -> Any:
        return super().cpu() if getattr(self, "_slicer_local", True) else self.to("cpu")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._slicer_busy.acquire(blocking=False):
            raise ConcurrentUseError(
                f"{type(self).__name__} is already running generate()/forward() in another thread; one split model "
                "holds one server session, so load one model per thread or take turns"
            )
        try:
            yield
        finally:
            self._slicer_busy.release()

    def _refuse_autocast(self) -> None:
        """The server's layers run on its own thread (or machine), where the caller's autocast does not reach: its
        outputs would differ from the plain model's under autocast, silently."""
        device = self.device.type
        try:
            on = torch.is_autocast_enabled(device)
        except TypeError:  # torch before 2.4 asks per device by name
            on = torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()
        if on:
            raise NotImplementedError(
                "a split model does not run under torch.autocast: the server's layers run outside it (on their own "
                "thread or machine), so the outputs would not be the model's; cast the model instead "
                "(model.to(torch.bfloat16))"
            )

    def _warn_without_gradients(self) -> None:
        """A forward with gradients on trains almost nothing: the hidden states cross the split as bytes."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            level, frame = 2, sys._getframe(1)  # name the caller's line: past this package's frames and torch's
            while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(("slicer_hf", "torch")):
                level, frame = level + 1, frame.f_back
            warnings.warn(
                "gradients do not cross the split: backward() reaches only what runs on the edge after the server's "
                "reply (the final norm and head), none of the layers on either side. Train the model with "
                "unsplit(model); run a split model under torch.no_grad() (or inference_mode) to silence this",
                UserWarning,
                stacklevel=level,
            )

    # ---------------------------------------------------------------- public API
    def wire_stats(self) -> WireStats:
        """Uplink/downlink bytes, messages and tokens of this session (since it opened, or the last
        `reset_wire_stats()`; `close_session()` ends the count with the session, and so does a call at another split
        layer or dtype, which opens another): a snapshot, which later calls leave as it is."""
        return copy.deepcopy(self._slicer_link.stats) if self._slicer_link else WireStats()  # a snapshot

    def reset_wire_stats(self) -> None:
        with self._exclusive():
            if self._slicer_link:
                self._slicer_link.stats = WireStats()

    def close_session(self) -> None:
        """Close the server session (its KV cache is freed); the next call opens a new one. Refused
        (`ConcurrentUseError`) while another thread runs this model."""
        with self._exclusive():
            if self._slicer_link is not None:
                self._slicer_link.close()
                self._slicer_link = None
            if (finalizer := getattr(self, "_slicer_finalizer", None)) is not None:
                finalizer.detach()  # the link is closed: nothing left for it to do, and it would keep the link alive

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """Save as the plain transformers model (`config.json` names the original class, so plain transformers
        loads the folder back) plus `slicer_config.json` with the split settings, which
        `SlicerModelForCausalLM.from_pretrained(folder)` picks up. Needs every layer: a local model.

        Args:
            save_directory, args, kwargs: as for `PreTrainedModel.save_pretrained`.
        """
        if not self._slicer_local:
            raise ConfigError(
                "this edge holds only layers "
                f"0..{self.slicer_config.split_layer - 1} (the server runs the rest): save from a model loaded "
                'with transport="local"'
            )
        if kwargs.pop("push_to_hub", False):  # transformers would upload before slicer_config.json is written
            repo_id = kwargs.pop("repo_id", None) or Path(save_directory).name
            hub = {key: kwargs.pop(key) for key in PUSH_KWARGS & kwargs.keys()}
            self.save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                self.push_to_hub(repo_id, token=kwargs.get("token"), **hub)
            return
        base = type(self)._slicer_base
        with unsplit(self):
            base.save_pretrained(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.slicer_config.save_pretrained(save_directory)

    @property
    def split_server(self) -> SplitServer | None:
        """The in-process server, with the default `transport="local"`."""
        return self._slicer_transport.server if isinstance(self._slicer_transport, LocalTransport) else None

    def _resolve_split(self, split_layer: int | None) -> int:
        k = self.slicer_config.split_layer if split_layer is None else split_layer
        n = compat.num_layers(self.config)
        if isinstance(k, numbers.Integral) and not isinstance(k, bool):  # numpy's integers too
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < n:
            raise ConfigError(f"`split_layer` must be an integer in [1, {n - 1}] for this {n}-layer model, got {k!r}")
        if not self._slicer_local and k != self.slicer_config.split_layer:
            raise ConfigError(
                f"`split_layer` is fixed at {self.slicer_config.split_layer} with a remote server "
                f"(the edge holds only those layers), got {k}"
            )
        return k

    def _arguments(self, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any], k: int) -> dict[str, Any]:
        """The arguments of a call to the model's own `forward`, by name however they were passed (by position, or
        through **kwargs). Refuses every layer's hidden states, attentions or router logits (and the auxiliary loss
        of a mixture of experts), asked for in the call or the config: the edge has only its own layers'. Router
        logits a config asks for by default are left out where no loss is computed (generate() never reads them)."""
        given = _by_name(forward, args, kwargs)
        if given.get("encoder_hidden_states") is not None or given.get("encoder_attention_mask") is not None:
            raise NotImplementedError(
                "cross-attention to encoder_hidden_states is not supported by split generation: the server's layers "
                "would run without them"
            )
        for name in ("output_hidden_states", "output_attentions", "output_router_logits"):
            if given.get(name) or (given.get(name) is None and getattr(self.config, name, False)):
                by_config = given.get(name) is None and (name in kwargs or name not in given)
                if name == "output_router_logits" and by_config and given.get("labels") is None:
                    kwargs[name] = given[name] = False  # a config's default: nothing here asks for them
                    continue
                raise NotImplementedError(
                    f"{name} is not available from a split model: the edge runs only blocks 0..{k - 1} and the "
                    "server the rest; `with slicer_hf.unsplit(model):` runs them all locally"
                )
        return given

    def _link_for(self, k: int) -> SuffixLink:
        if wire_dtype(self.dtype) is None:
            raise ConfigError(
                f"a split model runs in float32, float16 or bfloat16 (what its hidden states travel in); this one is "
                f"{self.dtype}: move it to one (model.to(torch.float32))"
            )
        if self._slicer_local and _outgrown(self._slicer_transport.server, self):  # the model changed since the
            self.close_session()  # in-process server started (its dtype, vocabulary, attention): a new one
            self._slicer_transport.server.shutdown()
            self._slicer_transport = _in_process(self)
        link = self._slicer_link
        same_dtype = link is not None and link.open_request.get("dtype") == wire_dtype(self.dtype)
        if link is not None and link.open_request["split_layer"] == k and same_dtype:
            return link
        self.close_session()
        cfg = self.slicer_config
        codec = build_codec(cfg)
        if codec.given_width is not None:
            raise ConfigError(
                f"the uplink basis {cfg.basis} predicts each row from the one before it: keep predict_previous=True "
                "(or calibrate a basis without --predict-previous)"
            )
        fitted_at = lookup(cfg.basis).metadata.get("split_layer") if cfg.basis else None
        if fitted_at not in (None, str(k)):
            warnings.warn(
                f"the uplink basis {cfg.basis} was fitted at split {fitted_at} and now codes split {k}: its bits go "
                f"where layer {fitted_at}'s output is sensitive (`slicer-hf calibrate` fits one for this split)",
                stacklevel=3,
            )
        down = lookup(cfg.downlink_basis) if cfg.downlink_basis else None
        predicts_from = down.metadata.get("given_split_layer", str(cfg.split_layer)) if down else None
        if down is not None and down.given_width and predicts_from != str(k):
            warnings.warn(
                f"the downlink basis {cfg.downlink_basis} predicts the reply from the hidden states at split "
                f"{predicts_from}, and this call splits at {k}: its predictions miss and the replies take more bits "
                "(`slicer-hf calibrate` fits one for this split)",
                stacklevel=3,
            )
        name = cfg.model_id or self.config.name_or_path
        request = open_request(cfg, self.config, name, k, codec, self.dtype)
        vocab = getattr(self.config, "vocab_size", 0) or 0
        self._slicer_link = SuffixLink(
            self._slicer_transport, request, codec, vocab_size=vocab, bitrate=cfg.bitrate_controller()
        )
        if not self._slicer_local:  # a remote session is closed when the model goes (a local one dies with it)
            self._slicer_finalizer = weakref.finalize(self, self._slicer_link.close)
        return self._slicer_link


class SlicerGenerationMixin(SplitModelMixin):
    """Split `generate()` / `forward()` for a transformers causal LM. Mixed in by `SlicerModelForCausalLM`."""

    def generate(self, *args: Any, split_layer: int | None = None, **kwargs: Any) -> Any:
        """`transformers` `generate()`, with decoder layers `0..split_layer-1` here and the rest on the server.

        Args:
            split_layer: layers run on the edge; defaults to `slicer_config.split_layer`.
            args, kwargs: every ordinary `generate()` argument (sampling, logits processors, stopping criteria,
                streamers, batches with left padding). Beam search, assisted and self-speculative decoding,
                multi-token prediction, contrastive search, classifier-free guidance, DoLa and continuous batching
                raise `NotImplementedError`.
        """
        k = self._resolve_split(split_layer)
        given = _by_name(super().generate, args, kwargs)  # a generation_config may come by position
        # as transformers merges them: an argument, else the given config's value, else (where that is unset) the
        # model's own generation_config's
        configs = (given.get("generation_config"), self.generation_config)
        for name, (plain, what) in UNSUPPORTED_GENERATION.items():
            value = (
                given[name]
                if name in given
                else next((v for v in (getattr(c, name, None) for c in configs) if v is not None), None)
            )
            if value not in plain:
                shown = repr(value) if isinstance(value, (int, float, str, list, tuple)) else type(value).__name__
                raise NotImplementedError(f"{what} ({name}={shown}) is not supported by split generation")
        if given.get("cache_implementation") == "paged":  # transformers' continuous batching: a generate of its own
            raise NotImplementedError(
                "continuous batching (cache_implementation='paged') is not supported by split generation; the "
                "server batches the sessions of many clients itself"
            )
        token = _GENERATE_SPLIT.set((self, k))
        try:
            with self._exclusive():
                if self._slicer_link is not None:  # the pause since the last call is no token's latency
                    self._slicer_link.new_generation()
                return super().generate(*args, **kwargs)
        finally:
            _GENERATE_SPLIT.reset(token)

    # ---------------------------------------------------------------- the split forward
    def _slicer_forward(self, *args: Any, split_layer: int | None = None, **kwargs: Any) -> Any:
        with self._exclusive():
            return self._split_forward(split_layer, args, kwargs)

    def _split_forward(self, split_layer: int | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        running = _GENERATE_SPLIT.get()
        if split_layer is None and running is not None and running[0] is self:
            split_layer = running[1]
        k = self._resolve_split(split_layer)
        self._refuse_autocast()
        self._warn_without_gradients()
        base_forward = super().forward  # the model's own forward (this mixin sits before its class)
        given = self._arguments(base_forward, args, kwargs, k)
        input_ids = given.get("input_ids")
        ref = input_ids if input_ids is not None else given.get("inputs_embeds")
        if ref is None:
            raise ValueError("a forward needs input_ids or inputs_embeds")
        link = self._link_for(k)
        b, t = ref.shape[:2]
        cache = compat.cache_from_kwargs(given)
        compat.check_split_cache(cache)
        start = compat.cache_length(cache)
        if start > 0 and not link.continues(getattr(cache, "_slicer_mark", None), start):
            raise StaleCacheError(
                f"this KV cache holds {start} positions the server no longer holds as they were (another "
                "generate() or branch ran on this model since, it ran at another split_layer, the cache's rows were "
                "reordered or selected, its session closed, or the cache was not made by this split model): continue "
                "it on no other sequence, or start again from the whole prompt"
            )
        mask = given.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.ndim != 2):  # a dict of masks, one per layer type
            raise NotImplementedError(
                "split forward takes a 2D attention_mask [batch, length]; a static cache (generate's "
                "cache_implementation='static', 'sliding_window', 'hybrid_chunked' and the like) makes 4D masks: use "
                "the default dynamic cache"
            )
        positions = given.get("position_ids")
        if positions is not None and torch.equal(positions.cpu(), (start + torch.arange(t)).expand_as(positions)):
            positions = None  # the server derives the plain ones
        elif positions is not None:
            positions = positions.expand(b, t)
        use_cache = given.get("use_cache")
        uncached = cache is None and not (getattr(self.config, "use_cache", False) if use_cache is None else use_cache)
        if mask is None and uncached and compat.packs_sequences(positions):
            raise NotImplementedError(
                "position_ids that restart within a row, with no attention_mask and no cache, pack several sequences "
                "that transformers keeps apart; the server's layers run with a cache and would attend across them: "
                "pass each sequence as its own (padded) row"
            )
        to_keep = given.get("logits_to_keep", 0)
        keep = t if isinstance(to_keep, torch.Tensor) or not to_keep else min(int(to_keep), t)
        replies: dict[str, torch.Tensor] = {}

        whole_mask = mask is not None and mask.shape[1] == start + t  # the cached positions' columns too

        def exchange(hidden: torch.Tensor, grid: Any = None) -> torch.Tensor:  # [B, T, d] at the split -> final
            outputs = []
            limits = link.step_limits()
            whole = t > 1 and limits.whole  # the server must run these positions in one forward
            extra_bits = (32 if positions is not None else 0) + (1 if mask is not None else 0)  # an id, a mask bit
            history_bytes = b * (start + t) // 8 + 1 if whole_mask else 0  # the most a step's `history` takes
            wanted = t if whole else self.slicer_config.prefill_chunk_tokens
            chunk = limits.positions(b, hidden.shape[-1], wanted, extra_bits, history_bytes)
            answered = limits.replies(b * link.reply_bytes(hidden.shape[-1]), t)  # outputs one reply may hold
            if whole and (chunk < t or answered < keep):
                raise NotImplementedError(
                    f"{self.config.model_type}'s transformers cache cannot carry a forward of several positions on "
                    f"exactly (Mamba's mixers run one afresh from it): these {t} positions go to the server in one "
                    f"step and reply, which take {min(chunk, answered)} at most (raise its --max-step-tokens, "
                    "--max-step-elements or --max-message-bytes, or send fewer positions)"
                )
            a = 0
            while a < t:
                z = min(a + chunk, t, max(t - keep, a) + answered)
                need_from = min(max(t - keep, a), z) - a
                kind, out = link.step(
                    hidden[:, a:z],
                    start + a,
                    None if mask is None else mask[:, -t:][:, a:z],
                    None if positions is None else positions[:, a:z],
                    need_from,
                    decoding=t == 1 and start > 0,  # a prompt cut into one-position steps is not decoding
                    history=mask[:, : start + a] if whole_mask else None,  # sent where the server's differs
                )
                if out.shape[1]:
                    outputs.append(out)
                a = z
            final = torch.cat(outputs, dim=1).to(hidden.device)
            if kind == protocol.REPLY_HIDDEN:
                full = hidden.new_zeros(hidden.shape)
                full[:, t - keep :] = final.to(hidden.dtype)
                return full
            replies["logits"] = final.float()
            return hidden.new_zeros(hidden.shape)

        with split_plan(SplitPlan("edge", k, exchange=exchange)):
            if self.slicer_config.downlink == "hidden":
                out = base_forward(*args, **kwargs)
                _mark(link, cache, out)
                return out
            # The server ran the head: skip it here (an empty index set) and return its logits instead, with the
            # loss computed from them (the forward here saw no logits).
            call = dict(given)
            labels = call.pop("labels", None)
            as_tuple = call.get("return_dict") is False or (
                call.get("return_dict") is None and not self.config.return_dict
            )
            call |= {"logits_to_keep": torch.zeros(0, dtype=torch.long, device=ref.device), "return_dict": True}
            out = base_forward(**call)
            _mark(link, cache, out)
        out.logits = replies["logits"].to(ref.device)
        if isinstance(to_keep, torch.Tensor):  # positions by index: every one came back
            out.logits = out.logits[:, to_keep.to(ref.device)]
        if labels is not None:
            if self.slicer_config.downlink == "topk_logits":  # the rest of the vocabulary came back as -inf
                raise NotImplementedError("labels (a loss) need every logit: use downlink 'hidden' or 'logits'")
            if out.logits.shape[1] != t:
                raise NotImplementedError("labels need logits at every position: call without logits_to_keep")
            named = inspect.signature(base_forward).parameters
            extra = {name: value for name, value in given.items() if name not in named}  # num_items_in_batch...
            loss = compat.causal_lm_loss(self, out.logits, labels, **extra)
            out = type(out)(loss=loss, **out)  # the loss first, where the model's own output has it
        return out.to_tuple() if as_tuple else out


def _by_name(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call to `function` by name, however they were passed (by position, or through **kwargs)."""
    bound = inspect.signature(function).bind_partial(*args, **kwargs)
    given = dict(bound.arguments)
    for parameter in bound.signature.parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            given.update(given.pop(parameter.name, {}))
    return given


def _mark(link: SuffixLink, cache: Any, out: Any) -> None:
    """Tag the edge's KV cache (the one passed in, or the one the forward made) with what the server holds once
    this forward is done; copies of the cache carry the tag."""
    made = out.values() if isinstance(out, dict) else out  # a ModelOutput, or its tuple
    cache = cache if cache is not None else next((v for v in made if isinstance(v, Cache)), None)
    if cache is not None:
        compat.forget_on_row_changes("_slicer_mark")
        cache._slicer_mark = link.mark()


if TYPE_CHECKING:
    from transformers import GenerationMixin

    class SplitCausalLM(SlicerGenerationMixin, GenerationMixin, PreTrainedModel):
        """What `SlicerModelForCausalLM` returns, as type checkers see it: the model's own causal-LM class with split
        generation mixed in (the class itself is made at load time, one per model class)."""


class SlicerModelForCausalLM:
    """Factory for split-inference models, used like `AutoModelForCausalLM` and, like it, never instantiated.

    `from_pretrained` / `from_model` return the transformers model itself (same object, weights and generation
    config), its class swapped in place for `Slicer<Class>`, a subclass that mixes in `SlicerGenerationMixin`.
    `isinstance(model, LlamaForCausalLM)` stays true; `unsplit(model)` runs it as the plain model.

    ```python
    model = SlicerModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                   slicer_config=SlicerConfig(split_layer=24))
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)
    ```
    """

    def __init__(self) -> None:
        raise TypeError(
            "SlicerModelForCausalLM is a factory, like AutoModelForCausalLM: use "
            "SlicerModelForCausalLM.from_pretrained(model_id, slicer_config=...) or .from_model(model, ...), which "
            "return the transformers model made split"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        slicer_config: SlicerConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
        transport: str | Sequence[str] | Transport = "local",
        transport_options: dict[str, Any] | None = None,
        **hf_kwargs: Any,
    ) -> SplitCausalLM:
        """Load a causal LM with transformers and make it split.

        Args:
            pretrained_model_name_or_path: Hub id or local folder (as for `AutoModelForCausalLM`).
            slicer_config: a `SlicerConfig`, a dict of its fields, a folder, preset or repo holding one, or None
                (the model's own `slicer_config.json`, in its folder or Hub repo, if it has one; else defaults).
            transport: `"local"` (server part in this process, shared weights) or `"grpc://host:port"`
                (a list of URLs is tried in order for failover). With a remote server, weights of layers
                `split_layer..L-1` are released after loading.
            transport_options: for a gRPC transport: `token`, `timeout_s`, `root_certificates`; for a fleet's
                router (`slicer+http(s)://`), those and `router_timeout_s`, `admission_wait_s`.
            hf_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, gguf_file, ...).
        """
        check_model_folder(pretrained_model_name_or_path)
        pretrained_model_name_or_path = expand_home(pretrained_model_name_or_path)
        config = _resolve_config(slicer_config, pretrained_model_name_or_path, hf_kwargs)
        model_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **_config_kwargs(hf_kwargs))
        compat.check_supported(model_config)  # refuse a family that cannot split before loading any weight
        if transport == "local" or isinstance(transport, LocalTransport):
            model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **hf_kwargs)
        else:  # the server runs the suffix: read only the layers this edge runs
            n = compat.num_layers(model_config)
            model = load_layers(pretrained_model_name_or_path, range(config.split_layer_for(n)), **hf_kwargs)
        if "gguf_file" in hf_kwargs:
            compat.clear_gguf_quantizer(model)
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
    ) -> SplitCausalLM:
        """Make an already loaded model split (in place; the same object is returned).

        Raises:
            NotImplementedError: for a family that cannot split (`compat.UNSUPPORTED`, encoder-decoder models).
        """
        compat.check_supported(model.config)
        split = make_split(model, slicer_config, SlicerGenerationMixin, transport, transport_options)
        return cast("SplitCausalLM", split)


def _in_process(model: PreTrainedModel) -> LocalTransport:
    """The in-process server of `model`. A half-precision one keeps transformers' own caches: the KV store's attention
    over a padded batch (or past a sliding window) rounds otherwise, by up to 0.4 of a bfloat16 logit, enough to
    change tokens; in float32, about 1e-7, and the store's batching serves the edge's batch in one forward. Its limits
    are the model's, not a shared server's: its whole context (at least 16,384 positions; 2^20 for a model that names
    none), in one step if need be, any batch, and memory as the KV budget allows."""
    positions = getattr(model.config, "max_position_embeddings", None)
    context = max(ServerLimits.max_context_tokens, positions) if isinstance(positions, int) else 1 << 20
    limits = ServerLimits(  # a step of the whole context too: an encoder's or a recurrent model's is not cut
        max_context_tokens=context,
        max_step_tokens=context,
        max_session_batch=1 << 20,
        max_session_kv_bytes=1 << 62,
    )
    return LocalTransport(SplitServer(model, limits=limits, kv_store=model.dtype == torch.float32))


def _outgrown(server: SplitServer, model: PreTrainedModel) -> bool:
    """Whether `model` changed since its in-process `server` started: its dtype (`model.to`), its shape
    (`resize_token_embeddings`), or its attention where the KV store runs it (`set_attn_implementation`)."""
    moved = server.store is not None and model.config._attn_implementation not in ("sdpa", compat.STORE_ATTENTION)
    return server.dtype != model.dtype or server.fingerprint != protocol.model_fingerprint(model.config) or moved


def make_split(
    model: PreTrainedModel,
    slicer_config: SlicerConfig | None,
    mixin: type[SplitModelMixin],
    transport: str | Sequence[str] | Transport = "local",
    transport_options: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Hook `model`'s blocks and swap its class for `Slicer<Class>` with `mixin` (in place); with a remote
    transport the blocks from the split on are released."""
    n = compat.num_layers(model.config)
    config = slicer_config or SlicerConfig()
    width = getattr(model.config, "hidden_size", None)
    if not config.made_for(width, n):
        logger.warning(
            "this SlicerConfig was made for %s (%s layers, hidden size %s), and this model has %d layers of %s: its "
            "split layer and codec settings were chosen for that model",
            config.model_id or "another model", config.num_hidden_layers, config.hidden_size, n, width,
        )  # fmt: skip
    config = config.replace(
        split_layer=config.split_layer_for(n),
        num_hidden_layers=n,
        hidden_size=width,
        model_id=config.model_id_for(getattr(model.config, "_name_or_path", None) or None, width, n),
    )
    local = isinstance(transport, str) and transport == "local"
    runs = range(n) if local else range(config.split_layer)  # the in-process server runs the rest here too
    layers = compat.decoder_layers(model)
    if released := [i for i in runs if loading.released(layers[i])]:
        which = f"layer {released[0]} holds" if len(released) == 1 else f"layers {released[0]}..{released[-1]} hold"
        raise ConfigError(
            f"{which} no weights here (an edge released them for its server), and this split runs "
            f"{'every layer here' if local else f'layers 0..{config.split_layer - 1} here'}: load the model again"
        )
    came_as, came_hooked = type(model), all(hasattr(layer, "_slicer_hook") for layer in layers)
    attach_hooks(model)
    if not isinstance(model, mixin):
        model.__class__ = _split_class(type(model), mixin)
    try:
        made = _in_process(model) if local else make_transport(transport, **(transport_options or {}))
    except BaseException:  # a transport that cannot be made leaves the model as it came, not half split
        model.__class__ = came_as
        if not came_hooked:
            detach_hooks(model)
        raise
    model.slicer_config = config
    model._slicer_link = None
    model._slicer_busy = threading.RLock()
    model._slicer_local = local
    model._slicer_transport = made
    if not local:
        release_layers(model, range(config.split_layer, n))  # no-op for layers never loaded
    return model


def _config_kwargs(hf_kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("revision", "token", "cache_dir", "local_files_only", "gguf_file", "trust_remote_code", "subfolder")
    return {k: v for k, v in hf_kwargs.items() if k in names}


@functools.cache
def _split_class(base: type, mixin: type[SplitModelMixin]) -> type:
    """`Slicer<Base>`: the model class with `mixin`, its forward keeping the base signature (transformers inspects
    it for `logits_to_keep` and `position_ids`) plus `split_layer`."""

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return mixin._slicer_forward(self, *args, **kwargs)

    sig = inspect.signature(base.forward)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = inspect.Parameter("split_layer", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=int | None)
    var_kw = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    forward.__signature__ = sig.replace(parameters=[*params, extra, *var_kw])
    forward.__doc__ = base.forward.__doc__
    cls = type(f"Slicer{base.__name__}", (mixin, base), {"forward": forward, "_slicer_base": base})
    compat.register_split_class(cls, base, causal_lm=issubclass(mixin, SlicerGenerationMixin))
    return cls


def _resolve_config(slicer_config: Any, model_path: Any, hf_kwargs: dict[str, Any]) -> SlicerConfig:
    """The split settings: as given (an object, a dict, a folder, a preset, a Hub id), else the model's own
    `slicer_config.json` (in its folder or its Hub repo, at the model's revision and subfolder), else the defaults."""
    hub = {k: hf_kwargs[k] for k in ("token", "cache_dir", "local_files_only") if hf_kwargs.get(k) is not None}
    if isinstance(slicer_config, SlicerConfig):
        return slicer_config
    if isinstance(slicer_config, dict):
        return SlicerConfig.from_dict(slicer_config)
    if slicer_config is not None:
        return SlicerConfig.from_pretrained(slicer_config, **hub)
    own = {**hub, "revision": hf_kwargs.get("revision"), "subfolder": hf_kwargs.get("subfolder")}
    own = {key: value for key, value in own.items() if value}  # those given
    if os.path.isdir(str(model_path)):
        folder = os.path.join(str(model_path), own.get("subfolder", ""))
        return (
            SlicerConfig.from_pretrained(folder)
            if os.path.isfile(os.path.join(folder, CONFIG_NAME))
            else SlicerConfig()
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(str(model_path), CONFIG_NAME, **own)
    except EntryNotFoundError:  # the repo holds no split settings (also where a local cache knows it holds none)
        return SlicerConfig()
    except Exception as exc:  # offline without it in the cache, gated, not a repo: the model load says more
        logger.info("no %s for %s (%s): the default split settings", CONFIG_NAME, model_path, exc)
        return SlicerConfig()
    return SlicerConfig.from_pretrained(str(model_path), **own)


@contextlib.contextmanager
def unsplit(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Run `model` as the plain, whole transformers model inside this block (local transport only)."""
    if not getattr(model, "_slicer_local", True):
        raise ConfigError("the unsplit model needs every layer: not available with a remote server")
    original = model.__class__
    model.__class__ = getattr(original, "_slicer_base", original)
    try:
        yield model
    finally:
        model.__class__ = original
