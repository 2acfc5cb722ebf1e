"""End-to-end tokens/s of split generation over a bandwidth-shaped link: fp16 hidden states against SLICER.

The benchmark builds its own link: a network namespace `slicer-bench-<pid>` joined to this (root) namespace by a
veth pair with a private /30 (10.231.x.y), both ends shaped with `tc qdisc ... tbf` so uplink and downlink are each
limited to the same rate. A real `slicer-hf serve` process runs the suffix of the model inside the namespace; the
edge (`SlicerModelForCausalLM` over `grpc://<namespace address>:<port>`) runs here. For each rate, each variant
(uplink codec, downlink) greedily generates from a fixed WikiText prompt; repeats are interleaved across variants
and medians reported. A TCP bulk transfer first measures what the shaped link actually carries each way.
The namespace and the veth pair are removed on the way out, also after an error, Ctrl-C or SIGTERM. Needs root
and iproute2 (`ip`, `tc`). A run killed with SIGKILL leaves them behind: `ip netns del slicer-bench-<pid>`.

    python -m slicer_hf.bench.link --rates unshaped 10 1 --variants fp16 slicer slicer+topk_logits \\
        --repeats 3 --out-json docs/benchmarks/link.json --plot docs/benchmarks/link.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.generation import BaseStreamer

from .. import protocol
from ..config import SlicerConfig
from ..data import CALIBRATION_TEXT, load_text, resolve_model, token_windows
from ..launch import parse_server_url, start_server, stop_server  # noqa: F401 (parse_server_url: re-exported)
from ..transport.grpc import STATS_METHOD, GrpcTransport
from .common import at_least, exit_on_sigterm, suite_arguments, suite_config
from .netns import (  # noqa: F401 - re-exported: the link benchmark's public helpers
    NETNS_PREFIX,
    TBF_BURST,
    TBF_LATENCY,
    LinkSetupError,
    ShapedLink,
    goodput_bytes,
    measure_goodput,
    netns_unavailable_reason,
    parse_rate,
    rate_label,
    tbf_command,
)

DEFAULT_VARIANTS = ("fp16", "slicer", "slicer+topk_logits")
# Medians over repeats of these per-generation numbers make a row.
METRICS = (
    "ttft_s",
    "decode_tokens_per_s",
    "e2e_tokens_per_s",
    "total_s",
    "prefill_link_s",
    "decode_link_ms_per_token",
    "decode_server_ms_per_token",
    "decode_edge_ms_per_token",
    "decode_encode_ms_per_token",
    "prefill_uplink_bytes",
    "prefill_downlink_bytes",
    "decode_uplink_bytes_per_token",
    "decode_downlink_bytes_per_token",
    "uplink_bits_per_position",
    "downlink_bits_per_position",
    "link_uplink_bytes",
    "link_downlink_bytes",
)


def server_command(
    link: ShapedLink, model_path: str, min_split_layer: int, extra_args: Sequence[str] = ()
) -> list[str]:
    """`slicer-hf serve` inside the link's namespace, on its address, a free port, dying with this process."""
    # setpriv: the server gets SIGTERM if this process dies without cleaning up (it survives `ip netns exec`).
    guard = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
    serve = [sys.executable, "-m", "slicer_hf.cli", "serve", "--model", model_path, "--host", link.ns_addr]
    options = ["--port", "0", "--min-split-layer", str(min_split_layer), "--log-level", "warning", *extra_args]
    return [*guard, *link.exec_prefix(), *serve, *options]


# ------------------------------------------------------------------------------------------- generation
def variant_config(base: SlicerConfig, variant: str) -> SlicerConfig:
    """`base` with the variant's uplink codec and downlink: 'codec' or 'codec+downlink' (e.g. 'slicer+topk_logits').

    Args:
        base: the preset (split layer, SLICER knobs, downlink when the variant names none; a compressed downlink
            only for the 'slicer' codec, other codecs get exact hidden states back).
        variant: e.g. "fp16", "slicer", "slicer+topk_logits", "fp16+fp16" (hidden states in float16 both ways).
    """
    codec, _, downlink = variant.partition("+")
    config = base if codec == "slicer" else base.replace(downlink_step=None, downlink_basis=None)
    if downlink == "fp16":
        return config.replace(
            codec=codec, downlink="hidden", downlink_dtype="float16", downlink_step=None, downlink_basis=None
        )
    return config.replace(codec=codec, downlink=downlink or base.downlink)


class _TokenClock(BaseStreamer):
    """Timestamps each `put` (the prompt, then every new token). When the first new token arrives (the prefill
    exchange is over) it calls `at_first_token` and records how long that took, to be left out of the timings."""

    def __init__(self, at_first_token: Callable[[], None]) -> None:
        self.at_first_token = at_first_token
        self.times: list[float] = []
        self.paused_s = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 2:
            self.at_first_token()
            self.paused_s = time.perf_counter() - self.times[1]

    def end(self) -> None:
        pass


def measure_generation(
    model: Any, input_ids: torch.Tensor, new_tokens: int, link: ShapedLink, server_compute_s: Callable[[], float]
) -> dict[str, Any]:
    """One greedy generation of exactly `new_tokens` tokens: timings, protocol and link bytes, and where the time went.

    Every request's round trip is timed on the edge; the server's compute time (model and downlink encoding, from
    its STATS read before, after the prefill and at the end) is subtracted from it, so `*_link_*` is what the
    link, gRPC, the protocol and the server's uplink decoding added. The rest of the wall time is the edge's own
    compute, of which the uplink codec's encoding is timed too. The STATS read after the prefill goes over the link
    and is left out of every timing.

    Args:
        model: a `SlicerModelForCausalLM` with a remote transport (its session already open).
        input_ids: the prompt `[1, P]`.
        new_tokens: tokens to generate (also the minimum, so EOS cannot cut it short).
        link: the link whose byte counters to read.
        server_compute_s: reads the server's cumulative compute time.
    """
    transport, waits = model._slicer_transport, []
    codec, encodes = model._link_for(model.slicer_config.split_layer).codec, []
    request, encode = transport.request, codec.encode

    def timed_request(data: bytes) -> bytes:
        t0 = time.perf_counter()
        try:
            return request(data)
        finally:
            waits.append(time.perf_counter() - t0)

    def timed_encode(hidden: torch.Tensor, given: torch.Tensor | None = None) -> bytes:
        t0 = time.perf_counter()
        try:
            return encode(hidden, given=given)
        finally:
            encodes.append(time.perf_counter() - t0)

    at_prefill: dict[str, Any] = {}

    def counters_and_server() -> tuple[tuple[int, int], float, tuple[int, int]]:
        """The link's byte counters, then the server's compute time (a STATS call on a connection of its own), and the
        bytes that call moved: left out of the generation's."""
        before = link.byte_counters()
        server = server_compute_s()
        after = link.byte_counters()
        return before, server, (after[0] - before[0], after[1] - before[1])

    def snapshot() -> None:
        at_prefill.update(wire=dataclasses.replace(model.wire_stats()), waits=len(waits), encodes=len(encodes))
        at_prefill["link"], at_prefill["server"], at_prefill["stats"] = counters_and_server()

    model.reset_wire_stats()
    clock = _TokenClock(snapshot)
    (tx0, rx0), server0, moved = counters_and_server()
    tx0, rx0 = tx0 + moved[0], rx0 + moved[1]  # from after that call
    transport.request, codec.encode = timed_request, timed_encode  # instance attributes, removed below
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=model.generation_config.pad_token_id,
            )
        total_s = time.perf_counter() - started - clock.paused_s
    finally:
        del transport.request, codec.encode
    (tx1, rx1), server1, _ = counters_and_server()
    tx1, rx1 = tx1 - at_prefill["stats"][0], rx1 - at_prefill["stats"][1]  # less the STATS call at the first token
    stats, prefill, n = model.wire_stats(), at_prefill["wire"], at_prefill["waits"]
    prompt, new = input_ids.shape[1], out.shape[1] - input_ids.shape[1]
    steps = new - 1  # decode steps: every new token after the first
    decode_s = clock.times[-1] - clock.times[1] - clock.paused_s
    decode_link_s = sum(waits[n:]) - (server1 - at_prefill["server"])
    return {
        "prompt_tokens": prompt,
        "new_tokens": new,
        "ttft_s": clock.times[1] - started,
        "decode_tokens_per_s": steps / decode_s,
        "e2e_tokens_per_s": new / total_s,
        "total_s": total_s,
        "prefill_link_s": sum(waits[:n]) - (at_prefill["server"] - server0),
        "decode_link_ms_per_token": 1e3 * decode_link_s / steps,
        "decode_server_ms_per_token": 1e3 * (server1 - at_prefill["server"]) / steps,
        "decode_edge_ms_per_token": 1e3 * (decode_s - sum(waits[n:])) / steps,
        "decode_encode_ms_per_token": 1e3 * sum(encodes[at_prefill["encodes"] :]) / steps,
        "prefill_uplink_bytes": prefill.uplink_bytes,
        "prefill_downlink_bytes": prefill.downlink_bytes,
        "decode_uplink_bytes_per_token": (stats.uplink_bytes - prefill.uplink_bytes) / steps,
        "decode_downlink_bytes_per_token": (stats.downlink_bytes - prefill.downlink_bytes) / steps,
        "uplink_bits_per_position": stats.uplink_bits_per_token,
        "downlink_bits_per_position": 8 * stats.downlink_bytes / max(stats.tokens, 1),  # per position sent
        "link_uplink_bytes": tx1 - tx0,
        "decode_link_uplink_bytes_per_token": (tx1 - at_prefill["link"][0]) / steps,
        "decode_link_downlink_bytes_per_token": (rx1 - at_prefill["link"][1]) / steps,
        "link_downlink_bytes": rx1 - rx0,
        "failovers": stats.failovers,
        "retries": stats.retries,
        "ids": out[0, prompt:].tolist(),
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of `METRICS` over the repeats of one (rate, variant)."""
    first = samples[0]
    row = {key: first[key] for key in ("rate_mbit", "variant", "codec", "downlink", "prompt_tokens", "new_tokens")}
    row.update({key: statistics.median(s[key] for s in samples) for key in METRICS})
    row["repeats"] = len(samples)
    return row


def wikitext_prompt(tokenizer: Any, text_source: str, prompt_tokens: int) -> torch.Tensor:
    """The first `prompt_tokens` tokens of a text (no special tokens), as `[1, prompt_tokens]`."""
    text = load_text(text_source)[: 50 * prompt_tokens]  # plenty of characters for that many tokens
    return token_windows(tokenizer, text, window=prompt_tokens, max_tokens=prompt_tokens)[:1]  # [1, P]


def run(
    model: str | None = None,
    config: SlicerConfig | str | None = None,
    rates_mbit: Sequence[float | None] = (None, 10.0, 1.0),
    variants: Sequence[str] = DEFAULT_VARIANTS,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    repeats: int = 3,
    text: str = CALIBRATION_TEXT,
    prompt_ids: torch.Tensor | None = None,
    out_json: str | Path | None = None,
    plot_path: str | Path | None = None,
    request_timeout_s: float = 120.0,
    threads: int | None = 1,
    burst: str = TBF_BURST,
) -> dict[str, Any]:
    """Build the shaped link, serve the model inside it and measure every (rate, variant); optionally write JSON/plot.

    Args:
        model: model folder or Hub id; None or "smollm2" for the converted default model.
        config: the base `SlicerConfig` (or its folder); None for the SmolLM2 preset in `configs/`.
        rates_mbit: link rates in Mbit/s, each direction; None is an unshaped row.
        variants: "codec" or "codec+downlink" names (see `variant_config`).
        prompt_tokens: prompt length, taken from the start of `text`.
        new_tokens: tokens generated per run (greedy, exactly this many).
        repeats: runs per (rate, variant); rows hold medians.
        text: text source for the prompt (see `data.load_text`).
        prompt_ids: use this prompt `[1, P]` instead (e.g. for a model without a tokenizer).
        out_json: where to write the result (None: do not write).
        plot_path: where to write the tokens/s plot (None: no plot).
        request_timeout_s: how long one request may wait for its reply before the run fails.
        threads: torch threads for the edge (this process, for the run) and for the server; None leaves the
            defaults. One each keeps the two processes from competing for cores as two machines would not.
        burst: tbf bucket size, tc syntax (the issue's setting is 32kbit, 4 KB).

    Returns:
        `{"meta": {...}, "goodput": [...], "rows": [medians per (rate, variant)], "samples": [...],
        "generations": {...}}`.
    """
    import transformers
    from transformers import AutoTokenizer

    from ..modeling import SlicerModelForCausalLM

    if (reason := netns_unavailable_reason()) is not None:
        raise LinkSetupError(f"cannot build the shaped link: {reason}")
    if repeats < 1 or new_tokens < 2:
        raise ValueError(f"need repeats >= 1 and new_tokens >= 2, got {repeats} and {new_tokens}")
    started = time.perf_counter()
    variants = list(variants)
    path = resolve_model(model)
    base = suite_config(config, path)
    tokenizer = None
    if prompt_ids is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompt_ids = wikitext_prompt(tokenizer, text, prompt_tokens)
    configs = {v: variant_config(base, v) for v in variants}
    samples: list[dict[str, Any]] = []
    goodput: list[dict[str, Any]] = []
    link = ShapedLink.for_pid(burst=burst)
    threads_before = torch.get_num_threads()
    with link:
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        server, url = start_server(server_command(link, path, base.split_layer), env=env)
        stats = GrpcTransport([url], timeout_s=request_timeout_s)
        server_compute_s = lambda: float(protocol.decode_json(stats.unary(STATS_METHOD))["compute_s"])  # noqa: E731
        edges: dict[str, Any] = {}
        try:
            torch.set_num_threads(threads or threads_before)
            print(f"server {server.pid} in netns {link.name} on {url}; edge in the root namespace", flush=True)
            for v, cfg in configs.items():
                edges[v] = SlicerModelForCausalLM.from_pretrained(
                    path, slicer_config=cfg, transport=url, transport_options={"timeout_s": request_timeout_s}
                ).eval()
            for rate in rates_mbit:
                link.set_rate(rate)
                goodput.append({"rate_mbit": rate, **measure_goodput(link, goodput_bytes(rate))})
                print(f"{rate_label(rate)}: TCP goodput {_goodput_text(goodput[-1])} Mbit/s up/down", flush=True)
                for v in variants:  # opens the session, connects, settles TCP at this rate; not measured
                    measure_generation(edges[v], prompt_ids, 2, link, server_compute_s)
                for r in range(repeats):
                    for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotate the order
                        cfg = configs[v]
                        sample = {"rate_mbit": rate, "variant": v, "codec": cfg.codec, "downlink": cfg.downlink}
                        measured = measure_generation(edges[v], prompt_ids, new_tokens, link, server_compute_s)
                        samples.append({**sample, "repeat": r, **measured})
                        print(_progress(samples[-1]), flush=True)
        finally:
            torch.set_num_threads(threads_before)
            for edge in edges.values():
                edge.close_session()
            stop_server(server)
    rows = [
        summarize([s for s in samples if s["rate_mbit"] == rate and s["variant"] == v])
        for rate in rates_mbit
        for v in variants
    ]
    reference = next(iter(variants)) if "fp16" not in variants else "fp16"
    ref_ids = next(s["ids"] for s in samples if s["variant"] == reference)
    generations = {}
    for v in variants:
        ids = next(s["ids"] for s in samples if s["variant"] == v)
        same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
        generations[v] = {
            "ids": ids,
            "text": tokenizer.decode(ids) if tokenizer is not None else None,
            f"leading_tokens_equal_to_{reference}": same,
        }
    d = edges[variants[0]].config.hidden_size if edges else base.hidden_size
    result = {
        "meta": {
            "model": path if model is None else model,
            "split_layer": base.split_layer,
            "num_hidden_layers": base.num_hidden_layers,
            "hidden_size": d,
            "variants": {
                v: {"codec": c.codec, "downlink": c.downlink, "downlink_topk": c.downlink_topk}
                for v, c in configs.items()
            },
            "prompt": text if tokenizer is not None else "given token ids",
            "prompt_tokens": int(prompt_ids.shape[1]),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "fp16_prefill_uplink_payload_bytes": int(prompt_ids.shape[1]) * d * 2,
            "tbf": {"burst": burst, "latency": TBF_LATENCY, "directions": "both (each veth end's egress)"},
            "netns": link.name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads_per_process": threads or threads_before,
            "cpus": os.cpu_count(),
            "elapsed_s": time.perf_counter() - started,
        },
        "goodput": goodput,
        "rows": rows,
        "samples": [{k: v for k, v in s.items() if k != "ids"} for s in samples],
        "generations": generations,
    }
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if plot_path is not None:
        plot(result, plot_path)
    return result


# ------------------------------------------------------------------------------------------- reporting
def _goodput_text(g: dict[str, Any]) -> str:
    up, down = g["uplink_mbit_s"], g["downlink_mbit_s"]
    return " / ".join(f"{x:,.0f}" if x >= 100 else f"{x:.2f}" for x in (up, down))


def _progress(s: dict[str, Any]) -> str:
    return (
        f"  {rate_label(s['rate_mbit']):>10} {s['variant']:<20} repeat {s['repeat']}: TTFT {s['ttft_s']:.3f} s "
        f"(link {s['prefill_link_s']:.3f}), decode {s['decode_tokens_per_s']:.2f} tok/s "
        f"(link {s['decode_link_ms_per_token']:.1f} ms/token), end-to-end {s['e2e_tokens_per_s']:.2f} tok/s, "
        f"up {s['decode_uplink_bytes_per_token']:.0f} B/token, down {s['decode_downlink_bytes_per_token']:.0f} B/token"
    )


def wire_ms_per_token(row: dict[str, Any]) -> float | None:
    """Serialization time of one decode step's protocol bytes at the row's rate (uplink + downlink), in ms.

    What a physical line of that rate would add per token at least (no TCP/IP/HTTP2 headers, no propagation).
    Through tbf the measured time can be lower: a message under the burst size passes at once after a pause.
    """
    if row["rate_mbit"] is None:
        return None
    step_bytes = row["decode_uplink_bytes_per_token"] + row["decode_downlink_bytes_per_token"]
    return 1e3 * 8 * step_bytes / (row["rate_mbit"] * 1e6)


def lowest_rate_within(rows: Sequence[dict[str, Any]], variant: str, tolerance: float = 0.1) -> dict[str, Any]:
    """The lowest symmetric rate at which `variant`'s end-to-end tokens/s stays within `tolerance` of its unshaped
    rate: the lowest measured rate that does (every faster one doing so too), and between it and the next slower
    measured rate an estimate, tokens/s interpolated linearly in log(rate).

    Args:
        rows: `run`'s rows (medians); the variant needs an unshaped row.
        variant: one of the run's variants.
        tolerance: the share of the unshaped rate that may be lost.
    """
    mine = {r["rate_mbit"]: r["e2e_tokens_per_s"] for r in rows if r["variant"] == variant}
    if None not in mine:
        raise ValueError(f"{variant!r} has no unshaped row to compare with")
    floor = (1.0 - tolerance) * mine.pop(None)
    rates = sorted(mine, reverse=True)
    keep = next((i for i, rate in enumerate(rates) if mine[rate] < floor), len(rates))
    lowest = rates[keep - 1] if keep else None
    slower = rates[keep] if keep < len(rates) else None
    estimate = lowest
    if lowest is not None and slower is not None:
        a, b = mine[lowest], mine[slower]  # a >= floor > b
        t = (a - floor) / (a - b)
        estimate = math.exp(math.log(lowest) + t * (math.log(slower) - math.log(lowest)))
    return {
        "variant": variant,
        "floor_tokens_per_s": floor,
        "lowest_measured_mbit": lowest,
        "first_slower_measured_mbit": slower,
        "estimate_mbit": estimate,
    }


def describe_within(found: dict[str, Any]) -> str:
    """One line for a `lowest_rate_within` result."""
    name, lowest, slower = found["variant"], found["lowest_measured_mbit"], found["first_slower_measured_mbit"]
    if lowest is None and slower is None:
        return f"{name}: no shaped rate measured"
    if lowest is None:
        return f"{name}: more than 10% below unshaped already at {slower} Mbit/s, the fastest rate measured"
    return (
        f"{name}: within 10% of unshaped down to {lowest} Mbit/s measured "
        f"({'no slower rate measured' if slower is None else f'next slower {slower}'}), "
        f"about {found['estimate_mbit']:.3g} Mbit/s"
    )


def markdown_table(result: dict[str, Any]) -> str:
    """The rows (medians) as a markdown table; the link column carries the measured TCP goodput.

    Args:
        result: what `run` returns.
    """
    goodput = {g["rate_mbit"]: g for g in result["goodput"]}
    lines = [
        "| link (TCP goodput up / down, Mbit/s) | variant | prompt | new | TTFT (s) | of which link (s) "
        "| decode tok/s | end-to-end tok/s | prefill up (B) | decode up B/token | decode down B/token "
        "| link ms/token | serialization ms/token | compute ms/token: edge (its encoding) + server |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        bound = wire_ms_per_token(r)
        lines.append(
            f"| {rate_label(r['rate_mbit'])} ({_goodput_text(goodput[r['rate_mbit']])}) | {r['variant']} "
            f"| {r['prompt_tokens']} | {r['new_tokens']} | {r['ttft_s']:.2f} | {r['prefill_link_s']:.2f} "
            f"| {r['decode_tokens_per_s']:.2f} | {r['e2e_tokens_per_s']:.2f} | {r['prefill_uplink_bytes']:,.0f} "
            f"| {r['decode_uplink_bytes_per_token']:,.0f} | {r['decode_downlink_bytes_per_token']:,.0f} "
            f"| {r['decode_link_ms_per_token']:.1f} | {'-' if bound is None else f'{bound:.1f}'} "
            f"| {r['decode_edge_ms_per_token']:.0f} ({r['decode_encode_ms_per_token']:.1f}) "
            f"+ {r['decode_server_ms_per_token']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Three panels by link rate, one bar per variant: end-to-end tokens/s, time to first token (dark: the link's
    part) and the link's time per decode token.

    Args:
        result: what `run` returns.
        path: image file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    rates = sorted(dict.fromkeys(r["rate_mbit"] for r in rows), key=lambda x: float("inf") if x is None else x)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["rate_mbit"], r["variant"]): r for r in rows}
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [
        ("e2e_tokens_per_s", None, "end-to-end tokens/s (higher is better)", "%.2f"),
        ("ttft_s", "prefill_link_s", "time to first token, s (dark: link)", "%.2f"),
        (
            "decode_link_ms_per_token",
            None,
            "per decode token outside compute, ms\n(link, gRPC, uplink decoding)",
            "%.1f",
        ),
    ]
    for ax, (key, part, title, fmt) in zip(axes, panels):
        for i, v in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(rates))]
            bars = ax.bar(xs, [by[(rate, v)][key] for rate in rates], width, label=v, color=f"C{i}", alpha=0.55)
            ax.bar_label(bars, fmt=fmt, fontsize=7)
            if part:
                ax.bar(xs, [by[(rate, v)][part] for rate in rates], width, color=f"C{i}")
        ax.set_xticks(range(len(rates)), [rate_label(rate) for rate in rates])
        ax.set(title=title, xlabel="link rate, each direction (tc tbf)")
        ax.grid(True, axis="y", lw=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(variants), fontsize=8, frameon=False)
    meta = result["meta"]
    fig.suptitle(
        f"{Path(str(meta['model'])).name}, split at layer {meta['split_layer']}, {meta['prompt_tokens']}-token prompt, "
        f"{meta['new_tokens']} new tokens greedy, median of {meta['repeats']}; edge and server share a 2-core CPU",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the legend below
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = suite_arguments(__doc__)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the converted SmolLM2-135M)")
    parser.add_argument("--config", default=None, help="SlicerConfig folder or preset (default: the SmolLM2 preset)")
    parser.add_argument(
        "--rates",
        nargs="+",
        type=parse_rate,
        default=[None, 10.0, 1.0],
        help="Mbit/s each way, or 'unshaped' (default: unshaped 10 1)",
    )
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="codec or codec+downlink")
    parser.add_argument("--prompt-tokens", type=at_least(1), default=64, help="tokens of the prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="at least 2: the first token is the prefill's")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="generations per rate and variant (medians)")
    parser.add_argument("--text", default=CALIBRATION_TEXT, help="prompt source (file or wikitext split)")
    parser.add_argument("--out-json", default="docs/benchmarks/link.json", help="where the JSON goes")
    parser.add_argument("--plot", default=None, help="also write the tokens/s plot to this image file")
    parser.add_argument(
        "--request-timeout-s",
        type=at_least(0, float, above=True),
        default=120.0,
        help="the client's timeout per request",
    )
    parser.add_argument("--burst", default=TBF_BURST, help="tbf burst, tc syntax")
    parser.add_argument("--threads", type=at_least(0), default=1, help="torch threads per process (0: torch's choice)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (the first new token is the prefill's), got {args.new_tokens}")
    exit_on_sigterm()  # the server is stopped and the namespace removed
    result = run(
        args.model,
        args.config,
        args.rates,
        args.variants,
        args.prompt_tokens,
        args.new_tokens,
        args.repeats,
        args.text,
        out_json=None,
        plot_path=args.plot,
        request_timeout_s=args.request_timeout_s,
        threads=args.threads or None,
        burst=args.burst,
    )
    result["meta"]["command"] = "python -m slicer_hf.bench.link " + shlex.join(sys.argv[1:] if argv is None else argv)
    if None in args.rates:
        result["within_10pct"] = [lowest_rate_within(result["rows"], v) for v in args.variants]
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n" + markdown_table(result))
    for found in result.get("within_10pct", []):
        print(describe_within(found))
    return result


if __name__ == "__main__":
    main()
