"""Codec kernels on a CUDA device: parity with the pure-torch reference, then throughput against the bandwidth floor.

    python benchmarks/gpu_kernels.py --json gpu_kernels.json                 # H200: --peak-gbps 4800 (default)
    python benchmarks/gpu_kernels.py --rows 1,64,4096 --iters 10             # a quicker pass

1. Parity (on the device): `ops.quantize_rows`, `ops.top_positions`, `ops.pack_bits` / `unpack_bits` and
   `ops.dequantize_rows` with `backend="kernels"` against `backend="reference"` on the same CUDA tensors
   (odd shapes, outlier channels, attention-sink rows; each check also asserts that the ABQ kernel ran, and a batch
   with a 1e6 value, which needs float32 block parameters, that it went whole to the reference); then `SlicerCodec`
   end to end: bytes of a CUDA encode (kernels) against a CPU encode (reference) with rotation off, where the two
   must agree. A bitwidth may differ only where a block's error is within float32 rounding of its budget (`ops`
   docstring); such blocks are counted and their margin reported, anything else fails the run (exit status 1).
2. Throughput for d = --d (4096) and --rows (1..4096, powers of 4), both paths: the device hot path (encode:
   select + ABQ + packing; decode: unpacking + dequantize + scatter) with kernels and with the torch reference on
   the same GPU, and `SlicerCodec.encode` / `decode` end to end. Each line gives median time, GB/s of hidden-state
   input, rows/s and the time over the floor = (bytes read + bytes written) / peak bandwidth.

Prints a table and writes everything to --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from slicer_hf import SlicerConfig, build_codec
from slicer_hf.codec import ops
from slicer_hf.codec.slicer import _tail_fields  # the packed fields exactly as encode lays them out
from slicer_hf.config import available_presets

CANDIDATES = (1, 2, 3, 4, 5, 6, 8)
DISTORTION = 0.08
FIELDS = ("positions", "labels", "signs", "lo", "hi")
# (name, sparsity, blocks, asymmetry or None, excluded outliers)
SELECT_CASES = [
    ("dense", 0.0, 1, None, 0),
    ("sparse-blocks", 0.5, 4, None, 0),
    ("asymmetric-excluded", 0.3, 3, 0.7, 2),
]
PARITY_SHAPES = [(1, 100), (7, 576), (513, 100), (513, 4096), (4096, 4096)]
CODEC_CASES = [
    {"rotation": "none"},
    {"rotation": "none", "sparsity": 0.5, "num_blocks": 4, "index_coding": "rice"},
    {"rotation": "none", "sparsity": 0.3, "asymmetry": 0.7, "num_blocks": 3, "outliers": 0},
    {"rotation": "none", "bit_candidates": (0, 2, 4), "num_blocks": 8, "sparsity": 0.8},
]


def hidden_states(n: int, d: int, seed: int = 0, wide: bool = False) -> torch.Tensor:
    """Gaussian rows with two outlier channels and an attention-sink row (~24,000); float32, CPU. `wide` adds a 1e6
    entry, which needs float32 block parameters: such a batch goes whole to the reference after the selection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 2
    if d > 8:
        x[:, 5] *= 40
        x[:, d // 2] *= -30
    x[0] *= 100
    if wide:
        x[-1, 3] = 1e6
    return x


class ABQLaunches:
    """Counts launches of the ABQ kernel, so that a parity check whose batch went to the reference is caught."""

    def __init__(self) -> None:
        self.kernels, self.count = ops._kernel_module(), 0
        self.real = self.kernels.quantize_selected
        self.kernels.quantize_selected = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.real(*args, **kwargs)


# ------------------------------------------------------------------------------------------------- parity
def check_parity(device: torch.device, max_rows: int) -> list[dict[str, Any]]:
    shapes = [(n, d) for n, d in PARITY_SHAPES if n <= max_rows]
    results = []
    for n, d in shapes:
        x = hidden_states(n, d, seed=n + d).to(device)
        for name, sparsity, blocks, asymmetry, n_excl in SELECT_CASES:
            excluded = ops.top_positions(x, n_excl, backend="reference") if n_excl else None
            y = x.scatter(1, excluded, 0.0) if n_excl else x
            avail = d - n_excl
            k = min(avail, max(1, round((1 - sparsity) * avail)))
            m = max(1, min(blocks, k))
            k_pos = None if asymmetry is None else round(asymmetry * k)
            args = (y, k, m, k_pos, excluded, CANDIDATES, DISTORTION)
            results.append(_compare_quantized(f"quantize_rows {name} [{n}, {d}]", args))
        results.append(_compare_tensors(f"top_positions [{n}, {d}]", ops.top_positions, (x, 2)))
    wide = (hidden_states(7, 576, seed=1, wide=True).to(device), 576, 1, None, None, CANDIDATES, DISTORTION)
    results.append(_compare_quantized("quantize_rows wide batch (to the reference) [7, 576]", wide, expect_wide=True))
    results.extend(_compare_bitstreams(device, shapes))
    results.extend(_compare_codec(device, max_rows))
    results.extend(_compare_presets(device))
    return results


def _compare_quantized(name: str, args: tuple, expect_wide: bool = False) -> dict[str, Any]:
    ref = ops.quantize_rows(*args, backend="reference")
    launches = ABQLaunches()
    try:
        ker = ops.quantize_rows(*args, backend="kernels")
    finally:
        launches.kernels.quantize_selected = launches.real
    kernel_ran = launches.count > 0
    bad = [f for f in FIELDS if not torch.equal(getattr(ref, f), getattr(ker, f))]
    bits_differ = ref.bits != ker.bits  # [N, M]
    same_bits = ~bits_differ.gather(1, ref.labels) & (ref.bits.gather(1, ref.labels) > 0)
    if not torch.equal(ref.codes[same_bits], ker.codes[same_bits]):
        bad.append("codes")
    n_ties = int(bits_differ.sum())
    margin = _tie_margin(args, ref, ker, bits_differ) if n_ties else None
    ok = not bad and (margin is None or margin < 1e-5) and kernel_ran != expect_wide == ref.wide
    check = {"check": name, "ok": ok, "mismatched": bad, "bitwidth_ties": n_ties, "tie_margin": margin}
    return check | {"abq_kernel_ran": kernel_ran}


def _tie_margin(args: tuple, ref: ops.QuantizedRows, ker: ops.QuantizedRows, differ: torch.Tensor) -> float:
    """Largest |err - budget| / budget, in float64, over blocks whose bitwidths differ (near 0 for honest ties)."""
    y, k = args[0], args[1]
    mags = y.gather(1, ref.positions).abs().double()  # [N, K]
    budget = (DISTORTION**2) * mags.pow(2).sum(1) / k  # [N]
    worst = 0.0
    for row, block in differ.nonzero().tolist():
        members = ref.labels[row] == block
        blk = mags[row][members]
        lo, hi = ref.lo[row, block].double(), ref.hi[row, block].double()
        c = torch.tensor(float(min(ref.bits[row, block], ker.bits[row, block])), dtype=torch.float64, device=y.device)
        codes = ops.quantize(blk, lo, hi, c)
        err = (ops.dequantize(lo, hi, c, codes) - blk).pow(2).sum()
        limit = budget[row] * members.sum()
        worst = max(worst, float((err - limit).abs() / limit))
    return worst


def _compare_tensors(name: str, fn: Callable, args: tuple) -> dict[str, Any]:
    ok = torch.equal(fn(*args, backend="reference"), fn(*args, backend="kernels"))
    return {"check": name, "ok": ok}


def _compare_bitstreams(device: torch.device, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for n in (1, 7, 513, max((n * d for n, d in shapes), default=1)):
        widths = torch.randint(0, 33, (n,), generator=g).to(device)
        codes = torch.randint(0, 1 << 62, (n,), generator=g).to(device)
        for offset in (0, 5):
            packed = ops.pack_bits(codes, widths, offset, backend="reference")
            out.append(_compare_tensors(f"pack_bits n={n} offset={offset}", ops.pack_bits, (codes, widths, offset)))
            out.append(
                _compare_tensors(f"unpack_bits n={n} offset={offset}", ops.unpack_bits, (packed, widths, offset))
            )
    for n, d in shapes:
        q = ops.quantize_rows(hidden_states(n, d).to(device), d // 2, 4, None, None, (0, 2, 4, 8), DISTORTION)
        fields = (q.positions, q.labels, q.signs, q.codes, q.lo, q.hi, q.bits, d)
        out.append(_compare_tensors(f"dequantize_rows [{n}, {d}]", ops.dequantize_rows, fields))
    return out


@contextlib.contextmanager
def _reference_only() -> Iterator[None]:
    before = os.environ.get(ops.ENV_FORCE_REFERENCE)
    os.environ[ops.ENV_FORCE_REFERENCE] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ops.ENV_FORCE_REFERENCE)
        else:
            os.environ[ops.ENV_FORCE_REFERENCE] = before


def _compare_codec(device: torch.device, max_rows: int) -> list[dict[str, Any]]:
    """CUDA encode (kernels) against CPU encode (reference); rotation off, so the same float ops run on both."""
    out = []
    for params in CODEC_CASES:
        codec = build_codec("slicer", **params)
        for n, d in [(n, d) for n, d in [(1, 576), (7, 100), (513, 4096)] if n <= max_rows]:
            x = hidden_states(n, d, seed=3)
            with _reference_only():  # the host's codec: the reference, even where the interpreter runs the kernels
                on_host = codec.encode(x)
                on_host_decoded = codec.decode(on_host)
            on_device = codec.encode(x.to(device))
            decoded = codec.decode(on_host, device=device)
            same_values = torch.equal(decoded.cpu(), on_host_decoded)
            out.append(
                {
                    "check": f"SlicerCodec {params} [{n}, {d}]",
                    "ok": on_device == on_host and same_values and decoded.device.type == device.type,
                    "same_bytes": on_device == on_host,
                    "same_decode": same_values,
                }
            )
    return out


def _compare_presets(device: torch.device) -> list[dict[str, Any]]:
    """The shipped presets' codecs (calibrated ECSQ, chained, trellis) encode rows that live on the GPU: the same
    rows decode as from the host, up to the float rounding of the row RMS on the device."""
    out = []
    for name in available_presets():
        config = SlicerConfig.from_pretrained(name)
        codec = build_codec(config)
        width = config.hidden_size or 576
        x = hidden_states(3, width, seed=4)  # one sequence of three rows
        given = hidden_states(1, width, seed=5)[0] if codec.chains else None  # the row before it

        def encode(rows: torch.Tensor, codec: Any = codec, given: Any = given) -> torch.Tensor:
            return codec.decode(codec.encode(rows, given=None if given is None else given.to(rows.device)), given=given)

        check = {"check": f"preset {name} encodes GPU rows"}
        try:
            on_host, on_device = encode(x), encode(x.to(device))
            error = ((on_device - on_host).norm() / on_host.norm()).item()
            out.append({**check, "ok": error < 1e-2, "relative_difference": error})
        except Exception as exc:  # noqa: BLE001 - a failing check is reported, not raised
            out.append({**check, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return out


# ------------------------------------------------------------------------------------------------- throughput
def device_time(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of `fn`: between CUDA events on a GPU (the device's work, and any wait of the host within
    `fn` that holds the stream: an op that reads a size back), wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type != "cuda":
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
            continue
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def wall_time(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall seconds of `fn`, host work included, waiting for the device after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    d, peak, warmup, iters = args.d, args.peak_gbps, args.warmup, args.iters
    codec = build_codec("slicer")  # the defaults: dense, rotation, 2 outliers, zstd
    lines = []
    for n in [int(r) for r in args.rows.split(",")]:
        x = hidden_states(n, d).to(device=device, dtype=torch.bfloat16)  # what a decoder layer hands over
        y = x.float()
        q = ops.quantize_rows(y, d, 1, None, None, CANDIDATES, DISTORTION, backend="reference")
        assert not q.wide, "a batch that needs float32 parameters would time the reference ABQ on the kernel path"
        widths = _tail_fields(q, 1)[1]
        packed = ops.pack_bits(*_tail_fields(q, 1), 0, backend="reference")

        def encode_hot(backend: str, y: torch.Tensor = y) -> torch.Tensor:
            q = ops.quantize_rows(y, d, 1, None, None, CANDIDATES, DISTORTION, backend=backend)
            return ops.pack_bits(*_tail_fields(q, 1), 0, backend=backend)

        def decode_hot(backend: str, q: ops.QuantizedRows = q, packed=packed, widths=widths) -> torch.Tensor:
            ops.unpack_bits(packed, widths, 0, backend=backend)
            return ops.dequantize_rows(q.positions, q.labels, q.signs, q.codes, q.lo, q.hi, q.bits, d, backend=backend)

        x_bytes = x.numel() * x.element_size()
        hot = y.numel() * 4 + packed.numel()  # float32 rows in and packed fields out, or the reverse
        for backend in ("kernels", "reference"):
            seconds = device_time(lambda b=backend: encode_hot(b), device, warmup, iters)
            lines.append(_line("encode hot path", backend, n, seconds, x_bytes, hot, peak))
            seconds = device_time(lambda b=backend: decode_hot(b), device, warmup, iters)
            lines.append(_line("decode hot path", backend, n, seconds, x_bytes, hot, peak))

        data = codec.encode(x)
        wire = x_bytes + len(data)  # hidden states read, payload written (or the reverse)
        paths = ["kernels"] + (["reference"] if n <= args.reference_max_rows else [])
        for path in paths:  # the reference: SLICER_HF_FORCE_REFERENCE=1, rows go to the host's torch code
            os.environ[ops.ENV_FORCE_REFERENCE] = "1" if path == "reference" else "0"
            reps = iters if path == "kernels" else max(3, iters // 4)
            seconds = wall_time(lambda x=x: codec.encode(x), device, 1, reps)
            lines.append(_line("SlicerCodec.encode", path, n, seconds, x_bytes, wire, peak))
            seconds = wall_time(lambda data=data: codec.decode(data, device=device), device, 1, reps)
            lines.append(_line("SlicerCodec.decode", path, n, seconds, x_bytes, wire, peak))
        os.environ.pop(ops.ENV_FORCE_REFERENCE)
        print(f"  rows={n}: done", flush=True)
    return lines


def _line(op: str, path: str, n: int, seconds: float, x_bytes: int, moved: int, peak_gbps: float) -> dict:
    floor = moved / (peak_gbps * 1e9)
    return {
        "op": op,
        "path": path,
        "rows": n,
        "time_us": seconds * 1e6,
        "hidden_gbps": x_bytes / seconds / 1e9,
        "rows_per_s": n / seconds,
        "bytes_moved": moved,
        "floor_us": floor * 1e6,
        "x_floor": seconds / floor,
    }


def print_table(lines: list[dict]) -> None:
    cols = ("op", 20, "s"), ("path", 10, "s"), ("rows", 6, "d"), ("time_us", 11, ".1f"), ("hidden_gbps", 12, ".3g")
    cols += ("rows_per_s", 11, ".3g"), ("floor_us", 10, ".3g"), ("x_floor", 9, ".3g")
    print("".join(f"{name:>{width}}" if kind != "s" else f"{name:<{width}}" for name, width, kind in cols))
    for r in lines:
        print(
            "".join(
                f"{r[name]:{'<' if kind == 's' else '>'}{width}{'' if kind == 's' else kind}}"
                for name, width, kind in cols
            )
        )


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=4096, help="hidden size")
    parser.add_argument("--rows", default=",".join(str(4**i) for i in range(7)), help="comma-separated row counts")
    parser.add_argument("--peak-gbps", type=float, default=4800.0, help="peak memory bandwidth, GB/s (H200: 4800)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default="gpu_kernels.json", help="where to write the results")
    parser.add_argument("--reference-max-rows", type=int, default=256, help="largest batch for the CPU reference")
    parser.add_argument(
        "--parity-max-rows", type=_at_least_one, default=4096, help="largest batch in the parity checks"
    )
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument(
        "--device",
        default="cuda",
        help="cuda; 'cpu' is a dry run of this script under the Triton interpreter (TRITON_INTERPRET=1 and "
        "SLICER_HF_KERNELS=interpret), for checking the script, not for numbers",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if (device.type == "cuda" and not torch.cuda.is_available()) or not ops.use_kernels(device):
        print(
            f"no codec kernels on {device}: needs CUDA and Triton, or for a CPU dry run the interpreter",
            file=sys.stderr,
        )
        return 2
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "d": args.d,
        "peak_gbps": args.peak_gbps,
    }
    ok = True
    if not args.skip_parity:
        print("parity (kernels vs torch reference, on the device):", flush=True)
        report["parity"] = check_parity(device, args.parity_max_rows)
        for r in report["parity"]:
            ok &= r["ok"]
            extra = (
                f"  bitwidth ties {r['bitwidth_ties']} (margin {r['tie_margin']:.2e})" if r.get("bitwidth_ties") else ""
            )
            print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['check']}{extra}", flush=True)
    print(f"throughput, d={args.d}:", flush=True)
    report["throughput"] = measure(args, device)
    print_table(report["throughput"])
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"parity {'passed' if ok else 'FAILED'}; wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
