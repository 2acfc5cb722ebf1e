"""Soak: many clients against one `slicer-hf serve` process on loopback for a long while, with faults and protocol
fuzzing beside them. It reports the server's RSS over time, per-window p50/p99 step latency, sessions left open,
and checks that every generation it samples equals plain `generate()` (lossless codec).

Faults: clients that vanish mid-stream (a cancelled stream, and a client process killed with SIGKILL), slow
readers (a stream that pipelines steps and reads the replies slowly), and a server killed and restarted on the
same port under load (clients reconnect with backoff and replay their sessions).

    slicer-hf bench soak --clients 32 --duration-s 600 --fuzz-cases 2000 --out-json docs/benchmarks/soak.json
    slicer-hf bench soak --short        # what CI runs: 8 clients, 40 s, 200 fuzz cases

Every loop is bounded in count and time; every address is on loopback.
"""

from __future__ import annotations

import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from .. import protocol
from ..codec import build_codec
from ..config import SlicerConfig
from ..data import resolve_model
from ..launch import start_server, stop_server
from ..link import open_request
from ..modeling import SlicerModelForCausalLM
from ..transport.grpc import STATS_METHOD, GrpcTransport
from .common import at_least, exit_on_sigterm, markdown_table, suite_arguments, write_json
from .fuzz import run_fuzz


def tiny_model_dir() -> str:
    """A random 6-layer Llama (hidden 128) in a temporary folder: the soak tests the server, not the model."""
    path = tempfile.mkdtemp(prefix="slicer-soak-model-")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@dataclass
class Run:
    """What the soak saw; appended to from many threads (list appends are atomic)."""

    started: float = field(default_factory=time.monotonic)
    steps: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, step latency s)
    rss: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, server pid, RSS bytes, sessions)
    generations: int = 0
    checked: int = 0
    mismatches: int = 0
    client_errors: list[str] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started


class Fleet:
    """The server process, restartable on its port."""

    def __init__(self, path: str, args: list[str]) -> None:
        self.path, self.args = path, args
        self.proc, self.url = start_server(path, args)
        self.port = self.url.rsplit(":", 1)[1]

    def restart(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc, _ = start_server(self.path, [*self.args, "--port", self.port])

    def stats(self) -> dict[str, Any]:
        return protocol.decode_json(GrpcTransport([self.url], timeout_s=30).unary(STATS_METHOD))

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def client_loop(i: int, fleet: Fleet, config: SlicerConfig, reference: Any, lock: threading.Lock, run: Run,
                deadline: float, new_tokens: int, check_every: int) -> None:  # fmt: skip
    rng = random.Random(i)
    try:
        model = SlicerModelForCausalLM.from_pretrained(
            fleet.path, slicer_config=config, transport=fleet.url, transport_options={"timeout_s": 120}
        )
        link = model._link_for(config.split_layer)
        link.max_attempts = 14  # rides out a server restart (about 25 s of backoff in all)
        plain = link.transport.request

        def timed(data: bytes) -> bytes:
            started = time.monotonic()
            reply = plain(data)
            if data[1] in (protocol.STEP, protocol.NEXT):
                run.steps.append((run.now(), time.monotonic() - started))
            return reply

        link.transport.request = timed
        n = 0
        while time.monotonic() < deadline:
            ids = torch.randint(
                3,
                model.config.vocab_size,
                (1, rng.randint(4, 24)),
                generator=torch.Generator().manual_seed(rng.randrange(1 << 30)),
            )
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            run.generations += 1
            n += 1
            if n % check_every == 1:
                with lock:
                    expected = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                run.checked += 1
                run.mismatches += int(not torch.equal(out, expected))
        model.close_session()
    except Exception as exc:  # reported in the verdict
        run.client_errors.append(f"client {i}: {type(exc).__name__}: {exc}")


def vanish_by_cancel(fleet: Fleet, request: dict[str, Any], hidden_size: int) -> None:
    """Open a session, send a prefill, and cancel the stream without CLOSE."""
    transport = GrpcTransport([fleet.url], timeout_s=30)
    reply = transport.request(protocol.encode_json(protocol.OPEN, request))
    session = protocol.decode_json(reply)["session"]
    payload = build_codec("identity").encode(torch.randn(1, 8, hidden_size))
    transport.request(protocol.encode_step(protocol.Step(session, 1, 0, 1, 8, 7, payload)))
    transport.close()


def vanish_by_kill(fleet: Fleet, config: SlicerConfig) -> None:
    """A client process, mid-session, killed with SIGKILL: the server's keepalive or the closed socket frees it."""
    script = (
        "import time, torch\n"
        "from slicer_hf import SlicerConfig, SlicerModelForCausalLM\n"
        f"m = SlicerModelForCausalLM.from_pretrained({fleet.path!r}, slicer_config=SlicerConfig(codec='identity', "
        f"split_layer={config.split_layer}), transport={fleet.url!r})\n"
        "m.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def slow_reader(fleet: Fleet, request: dict[str, Any], hidden_size: int, steps: int = 12, pause_s: float = 0.5) -> None:
    """Pipeline a prefill and `steps` decode steps on one stream, then read the replies one per `pause_s`."""
    codec = build_codec("identity")
    messages = [protocol.encode_json(protocol.OPEN, request)]
    # the session id is the server's to choose: send OPEN alone first, then pipeline the steps
    with grpc.insecure_channel(fleet.url.removeprefix("grpc://"), options=protocol.channel_options(64 << 20)) as ch:
        outbox: list[bytes] = []
        gate = threading.Event()

        def requests():
            yield messages[0]
            gate.wait(30)
            yield from outbox

        replies = ch.stream_stream(protocol.SESSION_METHOD)(requests(), timeout=120)
        session = protocol.decode_json(next(replies))["session"]
        outbox.append(
            protocol.encode_step(protocol.Step(session, 1, 0, 1, 32, 31, codec.encode(torch.randn(1, 32, hidden_size))))
        )
        for j in range(steps):
            outbox.append(
                protocol.encode_step(
                    protocol.Step(session, j + 2, 32 + j, 1, 1, 0, codec.encode(torch.randn(1, 1, hidden_size)))
                )
            )
        gate.set()
        for _ in range(steps + 1):
            time.sleep(pause_s)
            protocol.raise_if_error(next(replies))
        replies.cancel()


def windows(run: Run, width_s: float) -> list[dict[str, Any]]:
    rows = []
    end = max((t for t, _ in run.steps), default=0.0)
    for w in range(int(end // width_s) + 1):
        lat = sorted(1000 * d for t, d in run.steps if w * width_s <= t < (w + 1) * width_s)
        if lat:
            rows.append({
                "window": f"{w * width_s:.0f}-{(w + 1) * width_s:.0f} s",
                "steps": len(lat),
                "p50_ms": statistics.median(lat),
                "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                "max_ms": lat[-1],
            })  # fmt: skip
    return rows


def rss_growth(run: Run, warmup_share: float = 0.25) -> dict[str, Any]:
    """RSS growth of the last server incarnation after its warm-up: median of its last 5 samples over the median
    of 5 samples at the end of the warm-up."""
    pid = run.rss[-1][1]
    samples = [(t, rss) for t, p, rss, _ in run.rss if p == pid]
    t0, t1 = samples[0][0], samples[-1][0]
    warm = [rss for t, rss in samples if t >= t0 + warmup_share * (t1 - t0)][:5]
    last = [rss for _, rss in samples[-5:]]
    base, end = statistics.median(warm), statistics.median(last)
    return {"warm_rss_mb": base / 2**20, "end_rss_mb": end / 2**20, "growth": end / base - 1, "samples": len(samples)}


def soak(
    model: str = "tiny",
    clients: int = 32,
    duration_s: float = 600.0,
    fuzz_cases: int = 2000,
    new_tokens: int = 16,
    check_every: int = 5,
    window_s: float = 60.0,
    restart_at: float = 0.25,
    vanish_every_s: float = 15.0,
    slow_every_s: float = 20.0,
    kill_every_s: float = 120.0,
) -> dict[str, Any]:
    path = tiny_model_dir() if model == "tiny" else resolve_model(model)
    model_config = AutoConfig.from_pretrained(path)
    split = max(1, model_config.num_hidden_layers // 2)
    config = SlicerConfig(codec="identity", split_layer=split)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    request = open_request(config, model_config, model, split, build_codec("identity"))
    hidden = model_config.hidden_size
    args = ["--min-split-layer", str(split), "--log-level", "warning", "--threads", "1"]
    args += ["--max-sessions", str(clients + 16), "--open-timeout-s", "10", "--idle-timeout-s", "60"]
    fleet = Fleet(path, args)
    run, lock = Run(), threading.Lock()
    deadline = time.monotonic() + duration_s
    stop = threading.Event()
    fuzz: dict[str, Any] = {}

    def sampler() -> None:
        while not stop.wait(2.0):
            try:
                run.rss.append((run.now(), fleet.proc.pid, fleet.rss(), fleet.stats()["sessions_active"]))
            except Exception:  # the server is restarting
                continue

    def run_fuzzer() -> None:  # after the restart: its cases need a server that stays up
        fuzz.update(run_fuzz(fleet.url, model_config, fuzz_cases, split).as_dict())

    restarted = threading.Event()  # the fuzzer runs once the server has restarted: the soak waits for it then

    def faults() -> None:
        restart_t = time.monotonic() + restart_at * duration_s
        staged = {  # what each client fault does and says, and how often it comes
            "vanish": (
                lambda: vanish_by_cancel(fleet, request, hidden),
                "client vanished (stream cancelled mid-session)",
                vanish_every_s,
            ),
            "slow": (
                lambda: slow_reader(fleet, request, hidden),
                "slow reader (13 pipelined steps read at 2/s)",
                slow_every_s,
            ),
            "kill": (
                lambda: vanish_by_kill(fleet, config),
                "client process killed (SIGKILL) mid-session",
                kill_every_s,
            ),
        }
        due = {kind: time.monotonic() + first for kind, first in (("vanish", 5), ("slow", 8), ("kill", 10))}
        while not stop.is_set() and time.monotonic() < deadline - 5:
            now = time.monotonic()
            kind = min(due, key=due.__getitem__)  # the fault due first: each kind gets its turn
            try:
                if not restarted.is_set() and now >= restart_t:
                    run.faults.append((run.now(), "server killed (SIGKILL) and restarted on its port"))
                    fleet.restart()
                    restarted.set()
                    threading.Thread(target=run_fuzzer, daemon=True).start()
                elif now >= due[kind]:
                    stage, what, every = staged[kind]
                    due[kind] = now + every
                    stage()
                    run.faults.append((run.now(), what))
                else:
                    stop.wait(0.5)
            except Exception as exc:  # a fault that could not be staged is a finding too
                run.faults.append((run.now(), f"fault failed: {type(exc).__name__}: {exc}"))
                stop.wait(1.0)

    threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=faults, daemon=True)]
    threads += [
        threading.Thread(
            target=client_loop,
            args=(i, fleet, config, reference, lock, run, deadline, new_tokens, check_every),
            daemon=True,
        )
        for i in range(clients)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads[2:]:
            t.join(timeout=duration_s + 300)
        fuzz_deadline = time.monotonic() + max(600.0, duration_s)
        while restarted.is_set() and not fuzz and time.monotonic() < fuzz_deadline:  # it may outlast the clients
            time.sleep(1.0)
        stop.set()
        settled = time.monotonic() + 60
        while time.monotonic() < settled and fleet.stats()["sessions_active"] != 0:
            time.sleep(0.5)
        final = fleet.stats()
        run.rss.append((run.now(), fleet.proc.pid, fleet.rss(), final["sessions_active"]))
        alive = fleet.proc.poll() is None
    finally:
        stop.set()
        stop_server(fleet.proc)
        if model == "tiny":
            shutil.rmtree(path, ignore_errors=True)
    growth = rss_growth(run)
    return {
        "clients": clients,
        "duration_s": duration_s,
        "model": model,
        "split_layer": split,
        "generations": run.generations,
        "steps": len(run.steps),
        "checked_generations": run.checked,
        "mismatches": run.mismatches,
        "client_errors": run.client_errors,
        "faults": run.faults,
        "server_alive": alive,
        "sessions_active_end": final["sessions_active"],
        "server_errors": final["errors"],
        "rss": growth,
        "rss_samples": [(round(t, 1), pid, rss) for t, pid, rss, _ in run.rss],
        "windows": windows(run, window_s),
        "fuzz": fuzz,
    }


def report(result: dict[str, Any]) -> str:
    rss, fuzz = result["rss"], result["fuzz"]
    lines = [
        f"soak: {result['clients']} clients x {result['duration_s']:.0f} s on {result['model']} "
        f"(split {result['split_layer']}): {result['generations']} generations, {result['steps']} steps",
        markdown_table(
            result["windows"],
            [
                ("window", "window", ""),
                ("steps", "steps", "d"),
                ("p50 ms", "p50_ms", ".1f"),
                ("p99 ms", "p99_ms", ".1f"),
                ("max ms", "max_ms", ".1f"),
            ],
        ),  # fmt: skip
        f"server RSS after warm-up {rss['warm_rss_mb']:.1f} MB -> end {rss['end_rss_mb']:.1f} MB "
        f"({100 * rss['growth']:+.1f}%)",
        f"sessions_active at the end: {result['sessions_active_end']}; server alive: {result['server_alive']}",
        f"exactness: {result['checked_generations']} generations checked, {result['mismatches']} mismatches; "
        f"client errors: {len(result['client_errors'])}",
        f"faults staged: {len(result['faults'])} ({sum('failed' in f for _, f in result['faults'])} failed to stage)",
        f"fuzz: {fuzz.get('cases', 0)} cases, {fuzz.get('messages', 0)} messages, refusals {fuzz.get('refusals')}, "
        f"failures {fuzz.get('failures')}",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    samples = result["rss_samples"]
    top.plot([t for t, _, _ in samples], [rss / 2**20 for _, _, rss in samples], ".-", ms=3)
    top.set_ylabel("server RSS (MB)")
    for t, what in result["faults"]:
        if "restarted" in what:
            top.axvline(t, color="red", lw=0.8)
    rows = result["windows"]
    mids = [float(r["window"].split("-")[0]) + result["window_s"] / 2 for r in rows]
    bottom.plot(mids, [r["p50_ms"] for r in rows], "o-", label="p50")
    bottom.plot(mids, [r["p99_ms"] for r in rows], "s-", label="p99")
    bottom.set_ylabel("step latency (ms)")
    bottom.set_xlabel("seconds into the soak (red: server killed and restarted)")
    bottom.legend()
    fig.suptitle(f"soak: {result['clients']} clients, {result['duration_s']:.0f} s, one server on loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = suite_arguments(__doc__)
    parser.add_argument("--model", default="tiny", help="'tiny' (a random Llama), 'smollm2', a folder or Hub id")
    parser.add_argument("--clients", type=at_least(1), default=32, help="clients generating at once")
    parser.add_argument(
        "--duration-s", type=at_least(0, float, above=True), default=600.0, help="how long the clients run"
    )
    parser.add_argument("--fuzz-cases", type=at_least(0), default=2000, help="malformed messages sent beside them")
    parser.add_argument(
        "--window-s", type=at_least(0, float, above=True), default=60.0, help="latency percentiles per window"
    )
    parser.add_argument("--short", action="store_true", help="CI mode: 8 clients, 40 s, 200 fuzz cases, 10 s windows")
    parser.add_argument("--out-json", default=None, help="where the JSON goes (default: none written)")
    parser.add_argument("--plot", default=None, help="write a PNG of RSS and latency over time")
    args = parser.parse_args(argv)
    if args.short:
        args.clients, args.duration_s, args.fuzz_cases, args.window_s = 8, 40.0, 200, 10.0
    options: dict[str, Any] = {}
    if args.short:
        options = {"vanish_every_s": 8.0, "slow_every_s": 10.0, "kill_every_s": 60.0}
    exit_on_sigterm()  # the server and the model go too
    result = soak(args.model, args.clients, args.duration_s, args.fuzz_cases, window_s=args.window_s, **options)
    result["window_s"] = args.window_s
    print(report(result), flush=True)
    write_json(result, args.out_json)
    if args.plot:
        plot(result, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
