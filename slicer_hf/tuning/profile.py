"""`slicer-hf profile`: what a split costs on the machine where it runs, as a JSON profile that `search` reads.

A profile holds, for one model on one machine (its CPU or GPU, torch threads and library versions):

- per decoder layer: forward time per token in prefill and per decode step, weight bytes and KV bytes per token;
- what runs on the edge around the layers: embedding and head times and weights, and the rest of a `generate()`
  step (sampling, masks, rotary tables) as `step_overhead_ms`;
- the codec's rate-distortion on calibration text: for each candidate split layer and ECSQ step, bits per token
  against KL and perplexity change, with encode and decode times; and the same for a compressed downlink.

Run it on the edge device and on the server machine; the search takes one of each (here both may be one machine
with different thread counts). The timings do not depend on the text; the rate-distortion points do not depend on
the machine, so a server profile may skip them (`--no-rate-distortion`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..compat import check_window, decoder_layers, kv_bytes_per_position
from ..compat import num_layers as layer_count
from ..config import SlicerConfig
from ..errors import ConfigError
from ..version import __version__

PROFILE_FORMAT = "slicer_hf.profile/1"
PROFILE_NAME = "profile.json"
DEFAULT_STEPS = (0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5)
DEFAULT_DOWNLINK_STEPS = (0.05, 0.1, 0.2)
# The SLICER knobs every profiled ECSQ point shares (the preset's); only the step moves.
ECSQ_BASE: dict[str, Any] = {
    "codec": "slicer",
    "quantizer": "ecsq",
    "sparsity": 0.0,
    "outliers": 2,
    "rotation": "orthogonal",
}


@dataclasses.dataclass
class LayerCost:
    """One decoder layer on this machine."""

    prefill_ms_per_token: float
    decode_ms: float
    weight_bytes: int
    kv_bytes_per_token: int


@dataclasses.dataclass
class RatePoint:
    """One codec setting at one split: `codec` 'slicer' (ECSQ at `step`) or 'fp16'; `split_layer` L is the
    downlink (the last layer's output)."""

    split_layer: int
    codec: str
    step: float | None
    bits_per_token: float
    kl: float
    ppl_change_pct: float
    top1_agreement: float
    encode_ms: float
    decode_ms: float

    @property
    def setting(self) -> tuple[int, str, float | None]:
        """What the point measured (split, codec, step), on whichever machine."""
        return self.split_layer, self.codec, self.step


EDGE_COSTS = ("embed_decode_ms", "head_decode_ms", "step_overhead_ms", "embed_bytes", "head_bytes")  # search reads


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(data: Any, fields: dict[str, Any], where: str, exact: bool = False) -> None:
    """Raise `ConfigError` unless `data` is an object whose `fields` pass their checks ((predicate, rule) each);
    `exact`: and it holds no other field."""
    place = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{place}expected an object, got {type(data).__name__}")
    missing = [name for name in fields if name not in data]
    extra = sorted(set(data) - set(fields)) if exact else []
    if missing or extra:
        raise ConfigError(f"{place}missing fields {missing}" if missing else f"{place}unknown fields {extra}")
    for name, check in fields.items():
        value = data[name]
        ok, rule = check
        if not ok(value):
            raise ConfigError(f"{place}{name} must be {rule}, got {value!r}")


_OBJECT = (lambda v: isinstance(v, dict), "an object")
_LIST = (lambda v: isinstance(v, list), "a list")
_COST = (lambda v: _is_number(v) and v >= 0, "a number >= 0")
_COUNT = (lambda v: type(v) is int and v >= 1, "an integer >= 1")
PROFILE_DTYPES = ("float32", "bfloat16", "float16")  # the weights dtypes a profile may hold
_DTYPE = (lambda v: v in PROFILE_DTYPES, f"one of {', '.join(PROFILE_DTYPES)}")
_LAYER_FIELDS = {
    "prefill_ms_per_token": _COST,
    "decode_ms": _COST,
    "weight_bytes": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "kv_bytes_per_token": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
}
_POINT_FIELDS = {
    "split_layer": _COUNT,
    "codec": (lambda v: v in ("slicer", "fp16"), "'slicer' or 'fp16'"),
    "step": (lambda v: v is None or (_is_number(v) and v > 0), "None or a number > 0"),
    "bits_per_token": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "kl": (_is_number, "a finite number"),  # a measured KL near 0 may round below it
    "ppl_change_pct": (_is_number, "a finite number"),
    "top1_agreement": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "encode_ms": _COST,
    "decode_ms": _COST,
}


@dataclasses.dataclass
class Profile:
    """What `slicer-hf profile` measured; `save` / `load` as JSON.

    Args:
        machine: platform, CPU or GPU, torch threads.
        versions: python, torch, transformers, slicer_hf.
        model: id, layers, hidden size, vocabulary, dtype, fingerprint.
        layers: per decoder layer costs.
        edge: embedding / head time and weights, the rest of a decode step (`step_overhead_ms`), prefill and decode
            token counts measured.
        rate_distortion: the codec's points (empty when skipped), with `calibration` saying on which text.
        calibration: text source, tokens scored, unsplit perplexity.
    """

    machine: dict[str, Any]
    versions: dict[str, Any]
    model: dict[str, Any]
    layers: list[LayerCost]
    edge: dict[str, float]
    rate_distortion: list[RatePoint] = dataclasses.field(default_factory=list)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = PROFILE_FORMAT

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def points(self, split_layer: int) -> list[RatePoint]:
        """The rate-distortion points measured at `split_layer`, most bits first."""
        points = [p for p in self.rate_distortion if p.split_layer == split_layer]
        return sorted(points, key=lambda p: -p.bits_per_token)

    def split_layers(self) -> list[int]:
        """Split layers with rate-distortion points (the downlink, k = L, not included)."""
        return sorted({p.split_layer for p in self.rate_distortion if p.split_layer < self.num_layers})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        """Rebuild from `to_dict`; anything else raises `ConfigError` naming what is wrong."""
        if not isinstance(data, dict):
            raise ConfigError(f"a profile is a JSON object, got {type(data).__name__}")
        if data.get("format") != PROFILE_FORMAT:
            raise ConfigError(f"not a slicer_hf profile of format {PROFILE_FORMAT!r}: format={data.get('format')!r}")
        try:
            _check_fields(
                data, {"machine": _OBJECT, "versions": _OBJECT, "model": _OBJECT, "layers": _LIST, "edge": _OBJECT}, ""
            )
            model = data["model"]
            _check_fields(model, {"hidden_size": _COUNT, "num_hidden_layers": _COUNT}, "model")
            _check_fields({"dtype": model.get("dtype", "float32")}, {"dtype": _DTYPE}, "model")  # optional
            _check_fields(data["edge"], dict.fromkeys(data["edge"], _COST) | dict.fromkeys(EDGE_COSTS, _COST), "edge")
            _check_fields({"calibration": data.get("calibration", {})}, {"calibration": _OBJECT}, "")  # optional
            for i, layer in enumerate(data["layers"]):
                _check_fields(layer, _LAYER_FIELDS, f"layers[{i}]", exact=True)
            points = data.get("rate_distortion", [])
            if not isinstance(points, list):
                raise ConfigError(f"rate_distortion must be a list, got {type(points).__name__}")
            for i, point in enumerate(points):
                _check_fields(point, _POINT_FIELDS, f"rate_distortion[{i}]", exact=True)
                if (point["codec"] == "slicer") != (point["step"] is not None):
                    raise ConfigError(f"rate_distortion[{i}]: a 'slicer' point has an ECSQ step, an 'fp16' one none")
            profile = cls(
                machine=dict(data["machine"]),
                versions=dict(data["versions"]),
                model=dict(data["model"]),
                layers=[LayerCost(**layer) for layer in data["layers"]],
                edge={k: float(v) for k, v in data["edge"].items()},
                rate_distortion=[RatePoint(**point) for point in points],
                calibration=dict(data.get("calibration", {})),
            )
        except ConfigError as exc:
            raise ConfigError(f"malformed profile: {exc}") from None
        layers = profile.layers
        if not layers or profile.model["num_hidden_layers"] != len(layers):
            claimed = profile.model["num_hidden_layers"]
            raise ConfigError(f"profile lists {len(layers)} layers for a model of {claimed}")
        bad = [p.split_layer for p in profile.rate_distortion if not 1 <= p.split_layer <= len(layers)]
        if bad:
            raise ConfigError(f"profile has rate-distortion points at split layers outside [1, {len(layers)}]: {bad}")
        return profile

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile to `path` (a folder, or a path not ending in .json, gets `profile.json`)."""
        target = Path(path)
        if target.suffix != ".json" or target.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target = target / PROFILE_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read a profile from a `.json` file or a folder holding `profile.json`."""
        source = Path(path)
        if source.is_dir():
            source = source / PROFILE_NAME
        if not source.is_file():
            raise ConfigError(f"no profile at {path}")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source} is not JSON: {exc}") from exc
        return cls.from_dict(data)


# ------------------------------------------------------------------------------------------- measuring
def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the profile was measured."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "slicer_hf": __version__,
    }


def _module_bytes(module: torch.nn.Module, seen: set[int]) -> int:
    """Bytes of the module's parameters and buffers not already counted (tied weights count once)."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() in seen or tensor.device.type == "meta":
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


class _Stopwatch:
    """Forward pre/post hooks that time each watched module per call, keyed by the call's token count."""

    def __init__(self, modules: dict[str, torch.nn.Module], sync: bool) -> None:
        self.sync = sync
        self.times: dict[tuple[str, int], list[float]] = defaultdict(list)
        self._t0: dict[str, tuple[float, int]] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, name: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            self._t0[name] = (self._now(), int(x.shape[1]) if x.ndim > 1 else 1)

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            t0, tokens = self._t0.pop(name)
            self.times[(name, tokens)].append(self._now() - t0)

        return hook

    def median_ms(self, name: str, tokens: int) -> float:
        return 1e3 * statistics.median(self.times[(name, tokens)])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.inference_mode()
def measure_timing(
    model: Any, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-layer prefill and decode times of `model` (a plain causal LM), and the edge's parts around the layers.

    A greedy `generate()` of `decode_tokens` tokens after a `prompt_tokens` random prompt runs `repeats` times
    (after one warm-up); hooks time each decoder layer, the input embedding and the head; medians are kept. What a
    decode step costs beyond them (norm, sampling, masks, `generate()`'s own work) is `step_overhead_ms`.
    """
    if min(prompt_tokens, decode_tokens) < 2 or repeats < 1:  # one new token has no decode step to time
        raise ConfigError(
            "a timing run needs prompt_tokens >= 2, decode_tokens >= 2 and repeats >= 1, got "
            f"{prompt_tokens}, {decode_tokens} and {repeats}"
        )
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    watched = {f"layer{i}": layer for i, layer in enumerate(layers)}
    watched["embed"] = model.get_input_embeddings()
    watched["head"] = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=gen).to(device)
    kwargs = dict(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False, use_cache=True)
    pad = model.generation_config.pad_token_id
    kwargs["pad_token_id"] = pad if pad is not None else model.generation_config.eos_token_id
    model.generate(ids, attention_mask=torch.ones_like(ids), **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    watch = _Stopwatch(watched, sync=device.type == "cuda")
    step_ms: list[float] = []
    try:
        for _ in range(repeats):
            stamps: list[float] = []
            streamer = _Stamps(stamps, device.type == "cuda")
            model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
            step_ms += [1e3 * (b - a) for a, b in zip(stamps[1:], stamps[2:])]  # decode steps: new tokens 2..
    finally:
        watch.remove()
    if not watch.times[("layer0", 1)]:  # every step ran the whole sequence again
        raise ConfigError(
            f"{model.config.model_type} decodes without a KV cache (each step runs the whole sequence again): a "
            "profile times decode steps of one token, which it never runs"
        )
    per_layer = [
        {
            "prefill_ms_per_token": watch.median_ms(f"layer{i}", prompt_tokens) / prompt_tokens,
            "decode_ms": watch.median_ms(f"layer{i}", 1),
        }
        for i in range(len(layers))
    ]
    embed, head = watch.median_ms("embed", 1), watch.median_ms("head", 1)
    step = statistics.median(step_ms)
    edge = {
        "prompt_tokens": float(prompt_tokens),
        "decode_tokens": float(decode_tokens),
        "decode_step_ms": step,
        "embed_decode_ms": embed,
        "head_decode_ms": head,
        "step_overhead_ms": max(step - embed - head - sum(layer["decode_ms"] for layer in per_layer), 0.0),
    }
    return per_layer, edge


class _Stamps:
    """A streamer that notes when the prompt and each new token arrive."""

    def __init__(self, stamps: list[float], sync: bool) -> None:
        self.stamps, self.sync = stamps, sync

    def put(self, value: Any) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure_memory(model: Any) -> tuple[list[tuple[int, int]], dict[str, float]]:
    """(weight bytes, KV bytes per token) per decoder layer, and the embedding's and the head's weight bytes."""
    seen: set[int] = set()
    embed = _module_bytes(model.get_input_embeddings(), seen)
    head = _module_bytes(model.get_output_embeddings(), seen)  # 0 when tied to the embedding
    dtype = next(model.parameters()).dtype
    layers = decoder_layers(model)
    n = len(layers)
    kv_one = kv_bytes_per_position(model.config, n - 1, dtype, placeholders=False)  # one layer's K and V
    costs = [(_module_bytes(layer, seen), kv_one) for layer in layers]
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() not in seen)
    return costs, {"embed_bytes": float(embed), "head_bytes": float(head), "other_bytes": float(rest)}


def measure_rate_distortion(
    model: Any,
    windows: torch.Tensor,
    split_layers: Sequence[int],
    steps: Sequence[float] = DEFAULT_STEPS,
    downlink_steps: Sequence[float] = DEFAULT_DOWNLINK_STEPS,
) -> tuple[float, list[RatePoint]]:
    """ECSQ at each step (and fp16) at each split layer, and ECSQ at each downlink step on the last layer's output.

    Returns (the unsplit perplexity on `windows`, the points).
    """
    from .distortion import measure

    n = len(decoder_layers(model))
    uplink = [{**ECSQ_BASE, "step": s} for s in steps] + [{"codec": "fp16"}]
    base_ppl, rows = measure(model, windows, list(split_layers), uplink, skip_refused=("fp16",))  # rows past 65504
    if downlink_steps:
        rows += measure(model, windows, [n], [{**ECSQ_BASE, "step": s} for s in downlink_steps])[1]
    points = [
        RatePoint(
            split_layer=r["split_layer"],
            codec=r["setting"]["codec"],
            step=r["setting"].get("step"),
            bits_per_token=r["bits_per_token"],
            kl=r["kl_nats"],
            ppl_change_pct=r["perplexity_change_pct"],
            top1_agreement=r["top1_agreement"],
            encode_ms=r["encode_us_per_token"] / 1e3,
            decode_ms=r["decode_us_per_token"] / 1e3,
        )
        for r in rows
    ]
    return base_ppl, points


def default_splits(num_layers: int) -> list[int]:
    """About ten split layers spread over [1, L-1], always including 3/4 of the model (the default split)."""
    stride = max(1, round(num_layers / 10))
    splits = set(range(stride, num_layers, stride)) | {SlicerConfig().split_layer_for(num_layers)}
    return sorted(k for k in splits if 1 <= k < num_layers)


def _ecsq_steps(values: Sequence[float], name: str) -> list[float]:
    """The points' ECSQ steps, each once, ascending; one ECSQ cannot take is refused before the timing run."""
    if bad := [s for s in values if not 0.0 < s <= 4.0]:  # NaN fails too
        raise ConfigError(f"{name} must be ECSQ steps in (0, 4], got {bad}")
    return sorted(set(values))


def check_profile(
    config: Any,
    split_layers: Sequence[int] | None,
    steps: Sequence[float],
    downlink_steps: Sequence[float],
    prompt_tokens: int,
    decode_tokens: int,
) -> tuple[list[int], list[float], list[float]]:
    """What a profile of a model of `config` would be refused for, found from its config alone (before its weights
    load and its timing run, which take minutes); returns the splits and steps it runs."""
    n = layer_count(config)
    if n < 2:
        raise ConfigError(f"a model of {n} decoder layer cannot be split: there is no layer for the server to run")
    if split_layers is not None and not split_layers:
        raise ConfigError("no split layers to profile (split_layers is empty): give some, or None for the default")
    splits = sorted(set(split_layers)) if split_layers is not None else default_splits(n)
    if bad := [k for k in splits if not 1 <= k < n]:
        raise ConfigError(f"candidate split layers must be in [1, {n - 1}] for this {n}-layer model, got {bad}")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and prompt_tokens + decode_tokens > positions:
        raise ConfigError(
            f"the timing run's {prompt_tokens} prompt and {decode_tokens} new tokens exceed the model's {positions} "
            "positions: give fewer (prompt_tokens, decode_tokens)"
        )
    return splits, _ecsq_steps(steps, "steps"), _ecsq_steps(downlink_steps, "downlink_steps")


def profile_model(
    model: Any,
    model_id: str | os.PathLike[str],
    windows: torch.Tensor | None,
    text: str | None = None,
    split_layers: Sequence[int] | None = None,
    steps: Sequence[float] = DEFAULT_STEPS,
    downlink_steps: Sequence[float] = DEFAULT_DOWNLINK_STEPS,
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
) -> Profile:
    """Profile a loaded causal LM on this machine.

    Args:
        model: a plain transformers causal LM, every layer local, in eval mode.
        model_id: the id or folder it came from (recorded).
        windows: calibration token windows `[W, T]`; None skips the rate-distortion points.
        text: where the windows came from (recorded).
        split_layers: candidate splits for the rate-distortion points (default: `default_splits`).
        steps: ECSQ steps of the uplink points.
        downlink_steps: ECSQ steps of the downlink points.
        prompt_tokens, decode_tokens, repeats: the timing run.
    """
    from .. import protocol
    from .distortion import check_finite

    splits, steps, downlink_steps = check_profile(
        model.config, split_layers, steps, downlink_steps, prompt_tokens, decode_tokens
    )
    device = next(model.parameters()).device
    if windows is not None:
        check_window(model.config, int(windows.shape[1]))
        check_finite(model, windows[:1].to(device), splits)
    timing, edge = measure_timing(model, prompt_tokens, decode_tokens, repeats)
    memory, weights = measure_memory(model)
    layers = [LayerCost(t["prefill_ms_per_token"], t["decode_ms"], w, kv) for t, (w, kv) in zip(timing, memory)]
    edge.update(weights)
    points: list[RatePoint] = []
    calibration: dict[str, Any] = {}
    if windows is not None:
        base_ppl, points = measure_rate_distortion(model, windows.to(device), splits, steps, downlink_steps)
        calibration = {
            "text": None if text is None else str(text),  # a file given as a Path too
            "tokens": int(windows.numel()),
            "window": int(windows.shape[1]),
            "ppl": base_ppl,
        }
    return Profile(
        machine=machine_info(device),
        versions=versions(),
        model={
            "id": str(model_id),  # a folder given as a Path too
            "num_hidden_layers": len(decoder_layers(model)),
            "hidden_size": int(model.config.hidden_size),
            "vocab_size": int(model.config.vocab_size),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "fingerprint": protocol.model_fingerprint(model.config),
        },
        layers=layers,
        edge=edge,
        rate_distortion=points,
        calibration=calibration,
    )


__all__ = [
    "DEFAULT_DOWNLINK_STEPS",
    "DEFAULT_STEPS",
    "LayerCost",
    "Profile",
    "RatePoint",
    "default_splits",
    "profile_model",
]
