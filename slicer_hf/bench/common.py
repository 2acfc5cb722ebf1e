"""Helpers shared by the benchmark suites: output files, markdown tables, the machine they ran on."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from .. import compat
from ..config import SlicerConfig, default_config_dir
from ..errors import ConfigError


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def codec_record(config: SlicerConfig) -> dict[str, Any]:
    """What a suite's JSON records of the uplink codec it measured: its name and the parameters `build_codec` takes
    (`bench summary --check` compares them with the shipped preset's)."""
    return {"codec": config.codec, **config.codec_params()}


def at_least(least: float, kind: type = int, above: bool = False) -> Callable[[str], Any]:
    """An argparse `type`: a number of `kind` of at least `least` (or above it), anything else a usage error (exit
    2) before the suite runs, not a traceback in its middle (`--clients 0`, `--repeats 0`)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (value > least if above else value >= least):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'above' if above else 'at least'} {least}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its message
    return parse


def write_json(result: dict[str, Any], path: str | Path | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**result, "environment": environment()}, indent=2) + "\n")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """`columns`: (header, key, format spec)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if f else str(r[k]) for _, k, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def median_time(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, where it has one its help text does not already name."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        named = "(default" in text or "%(default)" in text  # its help says it already
        if default is None or default is False or default is argparse.SUPPRESS or not action.option_strings or named:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        shown = shown.replace("%", "%%")  # argparse %-formats help
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def suite_arguments(doc: str | None) -> argparse.ArgumentParser:
    """A suite's argument parser, described by its docstring's first paragraph; each option's help ends with its
    default."""
    return argparse.ArgumentParser(
        description=" ".join((doc or "").split("\n\n")[0].split()), formatter_class=_DefaultsFormatter
    )


def suite_config(config: str | SlicerConfig | None, model_path: str) -> SlicerConfig:
    """The config a suite runs (`--config`, a folder or preset; default the SmolLM2 preset), split where `generate`
    would split this model when it names no split layer."""
    if not isinstance(config, SlicerConfig):
        config = SlicerConfig.from_pretrained(config or default_config_dir())
    layers = compat.num_layers(AutoConfig.from_pretrained(model_path))
    split = config.split_layer_for(layers)
    if not 1 <= split < layers:  # the SmolLM2 preset's 24 on a smaller model, say: the suite would find no split
        raise ConfigError(
            f"split layer {split}: this model has {layers} layers, so it must be 1..{layers - 1} (give --config "
            "with a split_layer that fits)"
        )
    return config.replace(split_layer=split)


def suite_parser(doc: str | None, out_json: str) -> argparse.ArgumentParser:
    """The options every real-model suite takes: --model, --config, --out-json."""
    parser = suite_arguments(doc)
    parser.add_argument("--model", default="smollm2", help="Hub id, local folder, or 'smollm2' (embedded)")
    parser.add_argument("--config", default=None, help="SlicerConfig folder or preset (default: the SmolLM2 preset)")
    parser.add_argument(
        "--out-json",
        default=out_json,
        help="where the JSON goes (by default the committed results, when run from the checkout)",
    )
    return parser


def codec_sweep(model: Any, settings: dict[str, dict[str, Any]], splits: Sequence[int]) -> Iterator[tuple[str, int]]:
    """Each (setting name, split layer) in turn, with `model` (a split model) set to that codec setting on a fresh
    session, so that `wire_stats()` counts that pair alone; the model's own config comes back afterwards."""
    base = model.slicer_config
    try:
        for name, setting in settings.items():
            model.slicer_config = base.replace(**setting)
            for k in splits:
                model.close_session()
                yield name, k
    finally:
        model.slicer_config = base


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so a suite's `finally` blocks stop the servers it started (from the main
    thread: elsewhere signals cannot be handled)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
