"""SLICER-Search validated on the real model: for each client (a link rate, edge threads, a quality budget and an
objective) the search's choice is run over a `tc tbf` shaped link against a real server, next to the preset, and
what the search predicted is set against what was measured; then adaptive bitrate holds a latency target through
a link whose uplink drops mid-generation, where every fixed step of equal quality misses it.

    python -m slicer_hf.bench.search --edge-1 docs/benchmarks/profiles/cpu-1thread.json \\
        --edge-2 docs/benchmarks/profiles/cpu-2threads.json --out-json docs/benchmarks/search.json

The profiles come from `slicer-hf profile` (the server's is the 1-thread one: the server runs with one thread).
Rate-distortion points do not depend on the machine: a profile without them borrows the other's. Latency per token
is the median over `--repeats` generations of each one's mean decode step; uplink bytes are the STEP messages of
decode steps (`wire_stats()`); KL is measured with `slicer-hf eval` on WikiText-2 test text (the search saw
validation text). Needs root and iproute2, as `slicer_hf.bench.link`.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import protocol
from ..config import SlicerConfig, default_config_dir
from ..data import CALIBRATION_TEXT, resolve_model
from ..evaluate import evaluate
from ..launch import start_server, stop_server
from ..transport.grpc import STATS_METHOD, GrpcTransport
from ..tuning import Constraints, LinkSpec, Profile, search
from ..tuning.planner import Candidate, _config_of, predict
from .common import at_least, exit_on_sigterm, markdown_table, suite_arguments, write_json
from .link import measure_generation, server_command, wikitext_prompt
from .netns import ShapedLink, netns_unavailable_reason, tbf_command

BURST = "1600b"  # about one MTU: a token's messages beyond it wait for the bucket
BURST_BYTES = 1600


@dataclasses.dataclass(frozen=True)
class Client:
    """One validation case."""

    name: str
    mbps: float
    edge_threads: int
    objective: str
    max_kl: float
    edge_memory_gb: float | None = None


CLIENTS = (
    Client("phone, 256 kbit/s, strict", 0.256, 1, "latency", 0.005),
    Client("phone, 256 kbit/s, loose", 0.256, 1, "uplink", 0.03),
    Client("laptop, 10 Mbit/s, 2 threads", 10.0, 2, "server-compute", 0.01, edge_memory_gb=0.6),
    Client("laptop, 1 Mbit/s, 2 threads", 1.0, 2, "latency", 0.03),
)


def _with_points(profile: Profile, donor: Profile) -> Profile:
    if profile.rate_distortion:
        return profile
    return dataclasses.replace(profile, rate_distortion=donor.rate_distortion, calibration=donor.calibration)


def _decode_ms(sample: dict[str, Any]) -> float:
    return 1e3 / sample["decode_tokens_per_s"]


def _measure(model: Any, prompt: torch.Tensor, new_tokens: int, repeats: int, link: Any, compute: Any) -> dict:
    measure_generation(model, prompt, 2, link, compute)  # opens the session, warms up
    runs = [measure_generation(model, prompt, new_tokens, link, compute) for _ in range(repeats)]
    return {
        "ms_per_token": statistics.median(_decode_ms(r) for r in runs),
        "uplink_bytes_per_token": statistics.median(r["decode_uplink_bytes_per_token"] for r in runs),
        "downlink_bytes_per_token": statistics.median(r["decode_downlink_bytes_per_token"] for r in runs),
        "server_ms_per_token": statistics.median(r["decode_server_ms_per_token"] for r in runs),
        "link_bytes_up_per_token": statistics.median(r["decode_link_uplink_bytes_per_token"] for r in runs),
        "link_bytes_down_per_token": statistics.median(r["decode_link_downlink_bytes_per_token"] for r in runs),
    }


def run(
    edge1: Profile,
    edge2: Profile,
    model: str | None = None,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    repeats: int = 3,
    kl_tokens: int = 1024,
    adaptive_tokens: int = 80,
    out_dir: Path = Path("docs/benchmarks/search"),
    parts: tuple[str, ...] = ("clients", "adaptive"),
) -> dict[str, Any]:
    """Validate the search's choices and adaptive bitrate over a shaped link (see the module docstring)."""
    from transformers import AutoTokenizer

    from ..modeling import SlicerModelForCausalLM

    if (reason := netns_unavailable_reason()) is not None:
        raise RuntimeError(f"cannot build the shaped link: {reason}")
    edge1, edge2 = _with_points(edge1, edge2), _with_points(edge2, edge1)
    server = edge1
    preset = SlicerConfig.from_pretrained(default_config_dir())
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = wikitext_prompt(tokenizer, CALIBRATION_TEXT, prompt_tokens)
    profiles = {1: edge1, 2: edge2}
    rows, threads_before = [], torch.get_num_threads()
    link = ShapedLink.for_pid(burst=BURST)
    with link:
        command = server_command(link, path, 1, ["--threads", "1"])
        server_proc, url = start_server(command, env={"OMP_NUM_THREADS": "1"})
        stats = GrpcTransport([url], timeout_s=300)
        compute = lambda: float(protocol.decode_json(stats.unary(STATS_METHOD))["compute_s"])  # noqa: E731

        def measure(cfg: SlicerConfig, tokens: int = new_tokens) -> dict[str, float]:
            edge = SlicerModelForCausalLM.from_pretrained(
                path, slicer_config=cfg, transport=url, transport_options={"timeout_s": 300}
            ).eval()
            try:
                return _measure(edge, prompt, tokens, repeats, link, compute)
            finally:
                edge.close_session()

        try:
            torch.set_num_threads(1)
            overhead = _calibrate(edge1, server, preset, measure)
            print(f"calibration: {overhead}", flush=True)
            choices = {}
            for c in CLIENTS if "clients" in parts else ():
                link_spec = LinkSpec(c.mbps, c.mbps, overhead_ms=overhead["overhead_ms"], burst_bytes=BURST_BYTES)
                budget = Constraints(max_kl=c.max_kl, edge_memory_gb=c.edge_memory_gb, prompt_tokens=prompt_tokens)
                result = search(profiles[c.edge_threads], server, link_spec, budget, c.objective, base=preset)
                result.save(out_dir / c.name.replace(", ", "_").replace(" ", "-").replace("/", ""))
                choices[c.name] = result
                print(f"{c.name}: {result.chosen.label()}", flush=True)
            for c in CLIENTS if "clients" in parts else ():
                torch.set_num_threads(c.edge_threads)
                link.set_rate(c.mbps)
                measured = {"chosen": measure(choices[c.name].config), "preset": measure(preset)}
                print(f"  {c.name}: {measured}", flush=True)
                rows.append(_row(c, choices[c.name], measured))
            adaptive_rows = None
            if "adaptive" in parts:
                adaptive = _adaptive_choice(edge1, server, preset, prompt_tokens, overhead["overhead_ms"])
                kl_of = {p.step: p.kl for p in edge1.points(adaptive.config.split_layer) if p.codec == "slicer"}
                adaptive_rows = _adaptive_runs(adaptive, kl_of, link, url, path, prompt, adaptive_tokens, repeats)
        finally:
            torch.set_num_threads(threads_before)
            stop_server(server_proc)
    for row, c in zip(rows, CLIENTS):  # KL on test text, after the timed runs (nothing else competes for the CPU)
        cfg = choices[c.name].config
        ev = evaluate("smollm2" if model is None else model, "wikitext-2-raw-v1:test", config=cfg, window=512,
                      max_tokens=kl_tokens, progress=False)  # fmt: skip
        row["kl_measured"], row["ppl_change_measured_pct"] = ev["kl_mean"], ev["ppl_change_pct"]
        tiny = row["kl_predicted"] < 1e-4  # fp16 both ways: a relative error of nothing says nothing
        row["kl_error_pct"] = float("nan") if tiny else 100 * (row["kl_measured"] / row["kl_predicted"] - 1)
        print(f"  {c.name}: KL {ev['kl_mean']:.4f} measured, {row['kl_predicted']:.4f} predicted", flush=True)
    return {
        "meta": {
            "model": path,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "kl_tokens": kl_tokens,
            "tbf_burst": BURST,
            "server_threads": 1,
            "calibration": overhead,
            "preset": preset.to_dict(),
            "profiles": {"edge_1_thread": edge1.machine, "edge_2_threads": edge2.machine},
        },
        "clients": rows,
        "adaptive": adaptive_rows,
    }


def _calibrate(edge: Profile, server: Profile, preset: SlicerConfig, measure: Any) -> dict[str, float]:
    """The per-step overhead the profiles do not see (gRPC, the protocol, the split's hooks, the server's
    scheduling): the measured latency on the unshaped link, minus the prediction without overhead, of the profiled
    setting nearest the preset's (at its split, the ECSQ step closest to its own, the codec as profiled: a calibrated
    preset's basis and trellis were not)."""
    k = preset.split_layer
    points = [p for p in edge.points(k) if p.codec == "slicer"]
    if not points:
        raise RuntimeError(f"the edge profile holds no SLICER ECSQ point at the preset's split {k}")
    point = min(points, key=lambda p: (abs(p.step - preset.step), p.step))
    unshaped = LinkSpec(10_000.0, 10_000.0, overhead_ms=0.0)
    prediction = predict(edge, server, k, point, None, unshaped, Constraints())
    config = _config_of(Candidate(k, "slicer", point.step, None, prediction), edge, preset)
    measured = measure(config)["ms_per_token"]
    predicted = prediction.token_latency_ms
    if measured < 0.8 * predicted:  # the overhead is never negative: a profile that predicts too much stays so
        warnings.warn(
            f"the profiles predict {predicted:.1f} ms a token where this machine took {measured:.1f} ms: they were "
            "measured on another machine or load (run `slicer-hf profile` here again), and every prediction below "
            "is as high",
            stacklevel=2,
        )
    return {
        "step": point.step,
        "predicted_ms": predicted,
        "measured_ms": measured,
        "overhead_ms": max(measured - predicted, 0.0),
    }


def _row(c: Client, result: Any, measured: dict[str, dict[str, float]]) -> dict[str, Any]:
    p, got, base = result.chosen.prediction, measured["chosen"], measured["preset"]
    key = {"latency": "ms_per_token", "uplink": "uplink_bytes_per_token", "server-compute": "server_ms_per_token"}
    return {
        "client": c.name,
        "objective": c.objective,
        "max_kl": c.max_kl,
        "edge_memory_gb": c.edge_memory_gb,
        "choice": result.chosen.label(),
        "ms_predicted": p.token_latency_ms,
        "ms_measured": got["ms_per_token"],
        "ms_error_pct": 100 * (got["ms_per_token"] / p.token_latency_ms - 1),
        "up_bytes_predicted": p.uplink_bits / 8,
        "up_bytes_measured": got["uplink_bytes_per_token"],
        "up_error_pct": 100 * (got["uplink_bytes_per_token"] / (p.uplink_bits / 8) - 1),
        "server_ms_predicted": p.server_ms,
        "server_ms_measured": got["server_ms_per_token"],
        "kl_predicted": p.kl,
        "objective_chosen": got[key[c.objective]],
        "objective_preset": base[key[c.objective]],
        "measured": measured,
    }


# ------------------------------------------------------------------------------------------- adaptive bitrate
FAST_MBPS, SLOW_MBPS, DROP_AFTER, ADAPTIVE_MAX_KL, P90_ALLOWANCE = 2.0, 0.032, 40, 0.03, 1.3


def _adaptive_choice(
    edge: Profile, server: Profile, preset: SlicerConfig, prompt_tokens: int, overhead_ms: float
) -> Any:
    """The search's adaptive config at the preset's split for a 2 Mbit/s link, its quality floor KL 0.03. The target
    is the latency predicted for the floor's step once the uplink has dropped to SLOW_MBPS, times P90_ALLOWANCE (a
    token's p90 sits 20-30% above its median on this machine): reachable by the floor, not by the finer steps."""
    k = preset.split_layer
    floor = max((p for p in edge.points(k) if p.codec == "slicer" and p.kl <= ADAPTIVE_MAX_KL), key=lambda p: p.step)
    slow_link = LinkSpec(SLOW_MBPS, FAST_MBPS, overhead_ms=overhead_ms, burst_bytes=BURST_BYTES)
    slow = predict(edge, server, k, floor, None, slow_link, Constraints())
    budget = Constraints(
        max_kl=ADAPTIVE_MAX_KL,
        max_token_latency_ms=round(P90_ALLOWANCE * slow.token_latency_ms),
        prompt_tokens=prompt_tokens,
    )
    link = LinkSpec(FAST_MBPS, FAST_MBPS, overhead_ms=overhead_ms, burst_bytes=BURST_BYTES)
    return search(edge, server, link, budget, "latency", preset, [k], compress_downlink=False, adaptive=True)


def _adaptive_runs(
    choice: Any,
    kl_of: dict[float, float],
    link: ShapedLink,
    url: str,
    path: str,
    prompt: torch.Tensor,
    tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """Per-token latencies when the uplink drops from FAST to SLOW after DROP_AFTER tokens: adaptive, and each
    ladder step held fixed."""
    from ..modeling import SlicerModelForCausalLM
    from .link import _TokenClock

    torch.set_num_threads(1)
    ladder = choice.config.bitrate_ladder
    variants = {"adaptive": choice.config}
    variants |= {
        f"fixed {s:g}": choice.config.replace(step=s, bitrate_ladder=(), target_token_latency_ms=None)
        for s, _ in ladder
    }
    out = []
    for name, cfg in variants.items():
        edge = SlicerModelForCausalLM.from_pretrained(path, slicer_config=cfg, transport=url).eval()
        samples = []
        for _ in range(repeats):
            link.set_rates(FAST_MBPS, FAST_MBPS)
            edge.close_session()  # a fresh session: the controller starts again from its first rung
            steps_used = _record_steps(edge._link_for(cfg.split_layer).codec)
            drop = lambda: subprocess.run(  # noqa: E731 - the uplink only: the namespace side keeps its rate
                tbf_command(link.host_dev, SLOW_MBPS, burst=link.burst), check=True, capture_output=True
            )
            clock = _TokenClock(lambda: None)
            streamer = _DropAfter(clock, DROP_AFTER, drop)
            with torch.inference_mode():
                edge.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, streamer=streamer)  # fmt: skip
            del edge._link_for(cfg.split_layer).codec.encode
            gaps = [1e3 * (b - a) for a, b in zip(clock.times[1:], clock.times[2:])]  # decode tokens 2..
            decode_steps = steps_used[-len(gaps) :]
            samples.append(
                {
                    "fast_ms": gaps[: DROP_AFTER - 1],
                    "slow_ms": gaps[DROP_AFTER:],
                    "mean_kl": statistics.mean(kl_of[s] for s in decode_steps),
                    "changes": edge.wire_stats().bitrate_changes,
                    "steps": decode_steps,
                }
            )
        edge.close_session()
        slow = [x for s in samples for x in s["slow_ms"]]
        fast = [x for s in samples for x in s["fast_ms"]]
        out.append(
            {
                "variant": name,
                "p90_slow_ms": _p90(slow),
                "p90_fast_ms": _p90(fast),
                "median_slow_ms": statistics.median(slow),
                "mean_kl": statistics.mean(s["mean_kl"] for s in samples),
                "meets_target": _p90(slow) <= choice.config.target_token_latency_ms,
                "changes": samples[-1]["changes"],
                "samples": samples,
            }
        )
        brief = {k: v for k, v in out[-1].items() if k != "samples"}
        print(f"  adaptive test / {name}: {brief}", flush=True)
    return {
        "target_ms": choice.config.target_token_latency_ms,
        "fast_mbps": FAST_MBPS,
        "slow_mbps": SLOW_MBPS,
        "drop_after": DROP_AFTER,
        "ladder": [list(r) for r in ladder],
        "config": choice.config.to_dict(),
        "rows": out,
    }


def _record_steps(codec: Any) -> list[float]:
    """Wrap `codec.encode` (an instance attribute, deleted afterwards) to note the step of every packet."""
    steps: list[float] = []
    encode = codec.encode

    def noting(x: torch.Tensor, given: torch.Tensor | None = None) -> bytes:
        steps.append(codec.step)
        return encode(x, given=given)

    codec.encode = noting
    return steps


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


class _DropAfter:
    """Passes tokens to `clock` and calls `action` once after `after` new tokens."""

    def __init__(self, clock: Any, after: int, action: Any) -> None:
        self.clock, self.after, self.action, self.seen = clock, after, action, -1

    def put(self, value: torch.Tensor) -> None:
        self.clock.put(value)
        self.seen += 1
        if self.seen == self.after:
            self.action()

    def end(self) -> None:
        pass


# ------------------------------------------------------------------------------------------- reporting
def markdown(result: dict[str, Any]) -> str:
    clients = (
        ""
        if not result["clients"]
        else markdown_table(
            result["clients"],
            [
                ("client", "client", ""),
                ("objective", "objective", ""),
                ("choice", "choice", ""),
                ("ms/token pred.", "ms_predicted", ".1f"),
                ("meas.", "ms_measured", ".1f"),
                ("err %", "ms_error_pct", "+.1f"),
                ("up B/token pred.", "up_bytes_predicted", ".0f"),
                ("meas.", "up_bytes_measured", ".0f"),
                ("err %", "up_error_pct", "+.1f"),
                ("KL pred.", "kl_predicted", ".4f"),
                ("meas.", "kl_measured", ".4f"),
                ("err %", "kl_error_pct", "+.1f"),
                ("objective: chosen", "objective_chosen", ".1f"),
                ("preset", "objective_preset", ".1f"),
            ],
        )
    )
    adaptive = (
        ""
        if not result["adaptive"]
        else markdown_table(
            result["adaptive"]["rows"],
            [
                ("variant", "variant", ""),
                ("p90 ms/token before the drop", "p90_fast_ms", ".1f"),
                ("p90 ms/token after", "p90_slow_ms", ".1f"),
                ("median after", "median_slow_ms", ".1f"),
                ("mean KL (profiled)", "mean_kl", ".4f"),
                ("meets the target", "meets_target", ""),
            ],
        )
    )
    return clients + "\n\n" + adaptive + "\n"


def plot(adaptive: dict[str, Any], path: str | Path) -> None:
    """Per-token latency through the uplink drop (the first repeat): adaptive against the finest and the coarsest
    fixed step, with the target; below, the step adaptive bitrate used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["variant"]: r for r in adaptive["rows"]}
    fixed = [name for name in rows if name != "adaptive"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(3, 1))
    for i, name in enumerate(["adaptive", fixed[0], fixed[-1]]):
        sample = rows[name]["samples"][0]
        series = [*sample["fast_ms"], float("nan"), *sample["slow_ms"]]  # token DROP_AFTER straddles the drop
        top.plot(range(2, 2 + len(series)), series, lw=1.4 if name == "adaptive" else 0.9, color=f"C{i}", label=name)
    top.axhline(adaptive["target_ms"], color="k", ls="--", lw=0.8, label=f"target {adaptive['target_ms']:g} ms")
    for ax in (top, bottom):
        ax.axvline(adaptive["drop_after"] + 1, color="grey", lw=0.8)
    top.set(ylabel="ms per token", title=f"uplink {adaptive['fast_mbps']:g} -> {adaptive['slow_mbps']:g} Mbit/s "
            f"after token {adaptive['drop_after']}")  # fmt: skip
    top.legend(fontsize=8)
    steps = rows["adaptive"]["samples"][0]["steps"]
    bottom.step(range(2, 2 + len(steps)), steps, where="post", color="C0")
    bottom.set(ylabel="ECSQ step", xlabel="new token")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = suite_arguments(__doc__)
    parser.add_argument("--edge-1", default="docs/benchmarks/profiles/cpu-1thread.json",
                        help="profile with 1 torch thread (also the server's)")  # fmt: skip
    parser.add_argument("--edge-2", default="docs/benchmarks/profiles/cpu-2threads.json",
                        help="profile with 2 torch threads")  # fmt: skip
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the converted SmolLM2-135M)")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="generations per client (medians)")
    parser.add_argument(
        "--new-tokens", type=at_least(2), default=32, help="tokens each generation decodes (the first is the prefill's)"
    )
    parser.add_argument("--kl-tokens", type=at_least(512), default=1024, help="test tokens, in windows of 512")
    parser.add_argument("--out-json", default="docs/benchmarks/search.json",
                        help="the JSON; the clients' configs go to the folder of its name less .json")  # fmt: skip
    parser.add_argument("--only", choices=("clients", "adaptive"), default=None, help="run one part")
    parser.add_argument("--plot", default=None, help="write the adaptive-bitrate plot to this image")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    started = time.perf_counter()
    result = run(Profile.load(args.edge_1), Profile.load(args.edge_2), args.model, new_tokens=args.new_tokens,
                 repeats=args.repeats, kl_tokens=args.kl_tokens, out_dir=Path(args.out_json).with_suffix(""),
                 parts=(args.only,) if args.only else ("clients", "adaptive"))  # fmt: skip
    result["meta"]["elapsed_s"] = time.perf_counter() - started
    result["meta"]["command"] = "python -m slicer_hf.bench.search " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(result, args.out_json)
    if args.plot and result["adaptive"]:
        plot(result["adaptive"], args.plot)
    print("\n" + markdown(result))
    return result


if __name__ == "__main__":
    main()
