"""`slicer-hf eval`, `profile`, `calibrate`, `search` and `bench`: measure a split and choose one."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import ModelOpt, on_this_machine, torch_device

INFEASIBLE_EXIT = 3  # `search` found no candidate within the constraints (2 is a usage error)


def _writable(out: Path, option: str = "--out") -> None:
    """Refuse, before any work, an --out this user cannot write: under a file, or in a folder not writable."""
    held = out.expanduser()
    while not held.exists() and held != held.parent:  # the deepest part of the path that exists
        held = held.parent
    if held != out.expanduser() and not held.is_dir():
        raise typer.BadParameter(f"{out}: {held} is a file, not a folder", param_hint=option)
    if not os.access(held if held.is_dir() else held.parent, os.W_OK):
        raise typer.BadParameter(f"{out}: {held} is not writable", param_hint=option)


def _profiled_dtype(dtype: str) -> str:
    from ..tuning.profile import PROFILE_DTYPES

    if dtype not in PROFILE_DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(PROFILE_DTYPES)}", param_hint="--dtype")
    return dtype


def eval_(
    model: ModelOpt = "smollm2",
    text: Annotated[str | None, typer.Option(help="A text file to score.")] = None,
    dataset: Annotated[str | None, typer.Option(help="wikitext-2-raw-v1[:split] or wikitext-2-v1[:split].")] = None,
    split_layer: Annotated[int | None, typer.Option(help="Split layer (default: the config's).")] = None,
    codec: Annotated[str | None, typer.Option(help="Codec name (overrides the config's).")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="SlicerConfig: preset name, folder or Hub repo (default, as for generate: the model folder's own "
            "slicer_config.json; else the SmolLM2 preset for SmolLM2; else SlicerConfig's defaults)."
        ),
    ] = None,
    window: Annotated[int, typer.Option(help="Tokens per scored window.")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="Score at most this many tokens.")] = None,
    downlink_step: Annotated[
        float | None, typer.Option(help="Send the final hidden states back through SLICER ECSQ at this step.")
    ] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """Perplexity, KL to the unsplit model, top-1 agreement and bits per token (both ways) of a split."""
    from ..evaluate import evaluate, format_result

    if bool(text) == bool(dataset):  # an empty one is none
        raise typer.BadParameter("give exactly one of --text FILE or --dataset wikitext-2-raw-v1[:split]")
    source = text or f"{dataset}{'' if ':' in str(dataset) else ':test'}"
    if json_out is not None:  # refused now, not after an hour of scoring
        json_out = str(Path(json_out).expanduser())  # the path checked is the one written
        if Path(json_out).is_dir():
            raise typer.BadParameter(f"{json_out} is a folder: give the JSON file's path", param_hint="--json")
        _writable(Path(json_out), "--json")
    from ..client import default_config

    knobs = {"downlink_step": downlink_step} if downlink_step is not None else None
    config = config or default_config(model)  # the config generate, chat and demo use
    result = evaluate(model, source, split_layer, codec, config, window, max_tokens, json_out, codec_params=knobs)
    print(format_result(result))


def profile(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder (gets profile.json) or a .json file.")],
    model: ModelOpt = "smollm2",
    text: Annotated[
        str, typer.Option(help="Calibration text: a file or a wikitext split.")
    ] = "wikitext-2-v1:validation",  # data.CALIBRATION_TEXT (this module imports no torch)
    tokens: Annotated[int, typer.Option(help="Calibration tokens scored per point.")] = 1024,
    window: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    splits: Annotated[
        str | None, typer.Option(help="Candidate split layers, e.g. 8,16,24 (default: about ten spread out).")
    ] = None,
    steps: Annotated[str | None, typer.Option(help="ECSQ steps of the uplink points, e.g. 0.2,0.3,0.6.")] = None,
    downlink_steps: Annotated[str | None, typer.Option(help="ECSQ steps of the downlink points ('' for none).")] = None,
    rate_distortion: Annotated[
        bool, typer.Option(help="Measure the codec's rate-distortion (a server profile may skip it).")
    ] = True,
    threads: Annotated[
        int | None, typer.Option(help="torch threads, as the device will run (default: torch's).", min=1)
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1.", callback=torch_device)] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="Weights dtype: float32, bfloat16, float16.", callback=_profiled_dtype)
    ] = "float32",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt of the timing run.", min=2)] = 128,
    decode_tokens: Annotated[int, typer.Option(help="New tokens of the timing run.", min=2)] = 32,
) -> None:
    """Measure what a split of MODEL costs on this machine: per-layer prefill and decode time, weights and KV per
    token, and the codec's rate-distortion at each candidate split. Run it on the edge and on the server."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from ..data import load_text, load_tokenizer, resolve_model, token_windows
    from ..tuning.profile import DEFAULT_DOWNLINK_STEPS, DEFAULT_STEPS, check_profile, profile_model

    if out.is_file() and out.suffix != ".json":
        raise typer.BadParameter(
            f"{out} is a file: give a folder (it gets profile.json) or a .json file", param_hint="--out"
        )
    if not rate_distortion:  # (typer's own click: its ParameterSource, by name)
        points = ("text", "tokens", "window", "splits", "steps", "downlink_steps")  # what choose the points
        if given := [n for n in points if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]:
            options = ", ".join("--" + n.replace("_", "-") for n in given)
            raise typer.BadParameter(f"{options} choose the rate-distortion points, which --no-rate-distortion skips")
    _writable(out)
    on_this_machine(device)
    path = resolve_model(model)
    from ..compat import check_supported
    from ..loading import model_config, model_loading

    hf_config = model_config(model, path)
    check_supported(hf_config)  # no such model, or one that does not split: one line, before work
    choices = check_profile(  # and what its profile would be refused for
        hf_config,
        _numbers(splits, int),
        _numbers(steps, float) or DEFAULT_STEPS,
        DEFAULT_DOWNLINK_STEPS if downlink_steps is None else _numbers(downlink_steps, float) or (),
        prompt_tokens,
        decode_tokens,
    )
    windows = None
    if rate_distortion:  # the text's mistakes are found before the weights load
        tokenizer = load_tokenizer(path, "to read the calibration text (--no-rate-distortion profiles costs alone)")
        windows = token_windows(tokenizer, load_text(text), window=window, max_tokens=tokens)
    with model_loading(model):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    result = profile_model(lm, model, windows, text, *choices, prompt_tokens, decode_tokens)
    written = result.save(out)
    e, n = result.edge, result.num_layers
    print(
        f"{model}: {n} layers, decode step {e['decode_step_ms']:.1f} ms (layers "
        f"{sum(layer.decode_ms for layer in result.layers):.1f}, overhead {e['step_overhead_ms']:.1f}) with "
        f"{result.machine['torch_threads']} torch thread(s); {len(result.rate_distortion)} rate-distortion points "
        f"at splits {result.split_layers()}; written to {written}"
    )


def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the config and its basis files.")],
    model: ModelOpt = "smollm2",
    config: Annotated[
        str | None, typer.Option(help="Config to start from: a folder, a preset name or a Hub id (default: ECSQ).")
    ] = None,
    split_layer: Annotated[int | None, typer.Option(help="Split layer (default: the config's).")] = None,
    outliers: Annotated[
        int | None,
        typer.Option(
            help="Exact outliers per row (default: the --config's, else 0: the massive channels stay in the basis, "
            "out of the RMS).",
            min=0,
        ),
    ] = None,
    downlink: Annotated[
        bool, typer.Option(help="Also calibrate the compressed downlink (the last layer's output).")
    ] = False,
    predict: Annotated[
        bool,
        typer.Option(
            help="The downlink's basis predicts each reply from the rows the edge sent (both sides hold them)."
        ),
    ] = True,
    predict_previous: Annotated[
        bool | None,
        typer.Option(
            help="The uplink basis predicts each row from the decoded row before it (closed loop; default: the "
            "--config's, else off)."
        ),
    ] = None,
    text: Annotated[
        str, typer.Option(help="Calibration text: a file or a wikitext split. Keep test text for testing.")
    ] = "wikitext-2-v1:validation",  # data.CALIBRATION_TEXT (this module imports no torch)
    tokens: Annotated[
        int, typer.Option(help="Calibration tokens, used in whole windows (at least 2 x the hidden size).")
    ] = 24576,
    window: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the sampled tokens whose gradients estimate the metric.")] = 0,
) -> None:
    """Fit calibrated SLICER bases for MODEL on calibration text and write a config that uses them
    (rotation='calibrated'): the uplink at the split layer, and with --downlink the compressed downlink."""
    from ..config import SlicerConfig
    from ..tuning.calibrate import calibrate as fit

    if out.is_file():
        raise typer.BadParameter(f"{out} is a file: the config and its basis files go in a folder", param_hint="--out")
    _writable(out)
    base = SlicerConfig.from_pretrained(config) if config else SlicerConfig(outliers=0)
    if outliers is not None:
        base = base.replace(outliers=outliers)
    chained = base.predict_previous if predict_previous is None else predict_previous  # a preset refits as it was
    fitted = fit(model, base, split_layer, downlink, predict, chained, text, tokens, window, seed)
    written = fitted.save_pretrained(out)
    downlink_basis = f", downlink basis {fitted.downlink_basis}" if downlink else ""
    if not downlink and fitted.downlink_basis:
        downlink_basis = f", downlink basis {fitted.downlink_basis} kept from the --config"
    print(
        f"calibrated on {text}: uplink basis {fitted.basis} at split {fitted.split_layer}{downlink_basis}; config "
        f"written to {written}"
    )


def _numbers(text: str | None, kind: type) -> list[Any] | None:
    if text is None or not text.strip():
        return None
    try:
        return [kind(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


def search(
    edge_profile: Annotated[Path, typer.Option(help="Profile of the client device (slicer-hf profile).")],
    server_profile: Annotated[Path, typer.Option(help="Profile of the server machine.")],
    uplink_mbps: Annotated[float, typer.Option(help="Uplink rate, Mbit/s.")],
    downlink_mbps: Annotated[float, typer.Option(help="Downlink rate, Mbit/s.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the chosen SlicerConfig folder here.")] = None,
    rtt_ms: Annotated[float, typer.Option(help="Round-trip time, ms.")] = 0.0,
    max_kl: Annotated[float | None, typer.Option(help="Mean KL to the unsplit model, nats/token.")] = None,
    max_ppl_increase: Annotated[float | None, typer.Option(help="Perplexity increase, percent.")] = None,
    edge_memory_gb: Annotated[float | None, typer.Option(help="The edge's weights + KV cache, GB.")] = None,
    max_token_latency_ms: Annotated[float | None, typer.Option(help="Per decode token, ms.")] = None,
    objective: Annotated[str, typer.Option(help="latency, server-compute or uplink.")] = "latency",
    context_tokens: Annotated[int, typer.Option(help="Positions the edge's KV cache must hold.")] = 2048,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for the time-to-first-token figure.")] = 64,
    overhead_ms: Annotated[float, typer.Option(help="Per-step gRPC/protocol/scheduling time.")] = 2.0,
    burst_bytes: Annotated[
        int, typer.Option(help="Token bucket of a shaped link, bytes (0: a physical line, every byte is serialized).")
    ] = 0,
    splits: Annotated[str | None, typer.Option(help="Consider only these split layers, e.g. 20,24.")] = None,
    compress_downlink: Annotated[bool, typer.Option(help="Consider ECSQ on the downlink too.")] = True,
    adaptive: Annotated[
        bool, typer.Option(help="Write an adaptive-bitrate ladder holding --max-token-latency-ms.")
    ] = False,
    base_config: Annotated[str | None, typer.Option(help="SlicerConfig whose other fields the choice keeps.")] = None,
    push_to_hub: Annotated[str | None, typer.Option(help="Also upload the choice to this Hub repo.")] = None,
) -> None:
    """Choose the split layer and codec knobs for a client's device, link and quality budget: prints the Pareto
    candidates with their predicted figures and writes the chosen SlicerConfig with the predictions beside it. Exits
    with status 3 when no candidate meets the constraints."""
    from ..config import SlicerConfig
    from ..errors import ConfigError
    from ..tuning.planner import Constraints, InfeasibleError, LinkSpec
    from ..tuning.planner import search as run_search

    if max_kl is not None and max_ppl_increase is not None:
        raise typer.BadParameter("give --max-kl or --max-ppl-increase, not both")
    if out is not None:
        if out.is_file():
            raise typer.BadParameter(f"{out} is a file: the chosen config goes in a folder", param_hint="--out")
        _writable(out)
    try:
        result = run_search(
            edge_profile,
            server_profile,
            LinkSpec(uplink_mbps, downlink_mbps, rtt_ms, overhead_ms, burst_bytes=burst_bytes),
            Constraints(max_kl, max_ppl_increase, edge_memory_gb, max_token_latency_ms, context_tokens, prompt_tokens),
            objective,
            SlicerConfig.from_pretrained(base_config) if base_config else None,
            _numbers(splits, int),
            compress_downlink,
            adaptive,
        )
    except InfeasibleError as exc:
        print(f"infeasible: {exc}", file=sys.stderr)
        raise typer.Exit(INFEASIBLE_EXIT) from exc
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    print(result.summary() + "\n")
    print(result.table())
    if out is not None:
        print(f"\nwritten to {result.save(out)}")
    if push_to_hub:
        try:
            print(f"pushed to {result.push_to_hub(push_to_hub)}")
        except Exception as exc:  # offline, no token, no right to the repo: one line, the result above kept
            kept = f"written to {out}" if out is not None else "printed above"
            raise ConfigError(f"the choice ({kept}) did not reach the Hub repo {push_to_hub!r}: {exc}") from None


BENCH_SUITES = {
    "rate-distortion": "rate_distortion",
    "server-compute": "server_compute",
    "codec-speed": "codec_speed",
    "drift": "drift",
    "link": "link",
    "concurrency": "concurrency",
    "soak": "soak",
    "summary": "summary",
    "architectures": "architectures",
    "encoders": "encoders",
    "fleet": "fleet",
    "search": "search",
    "calibrated": "calibrated",
    "prediction": "prediction",
}


def bench(
    ctx: typer.Context,
    suite: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCH_SUITES)}, or 'all'.")],
    torch_threads: Annotated[int, typer.Option(help="torch threads for this process.")] = 1,
) -> None:
    """Run a benchmark suite; it prints a table and writes JSON (and plots) under docs/benchmarks/.

    Extra options go to the suite (`slicer-hf bench SUITE --help` lists them); `--torch-threads` sets torch's threads
    for any suite (the link suite's own `--threads` sets its processes').
    """
    import importlib

    if suite in ("--help", "-h"):  # --help after a suite goes to the suite
        print(ctx.get_help())
        return

    if suite == "all" and ctx.args:  # each suite takes options of its own: none fits them all
        raise typer.BadParameter(f"'all' runs every suite with its defaults; {' '.join(ctx.args)} goes to one suite")
    if torch_threads < 1:
        raise typer.BadParameter(f"must be at least 1, got {torch_threads}", param_hint="--torch-threads")

    import torch

    torch.set_num_threads(torch_threads)
    names = list(BENCH_SUITES) if suite == "all" else [suite]
    for name in names:
        if name not in BENCH_SUITES:
            raise typer.BadParameter(f"unknown suite {name!r}; choose from {', '.join(BENCH_SUITES)} or 'all'")
        print(f"== {name}", flush=True)
        program, sys.argv[0] = sys.argv[0], f"slicer-hf bench {name}"  # what the suite's --help and errors name
        try:
            importlib.import_module(f"slicer_hf.bench.{BENCH_SUITES[name]}").main(ctx.args if suite != "all" else [])
        finally:
            sys.argv[0] = program
