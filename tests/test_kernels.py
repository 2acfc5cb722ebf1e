"""Triton kernels against the pure-torch reference (the specification), the dispatch rule, and the packaging.

The CPU runs the kernels under the Triton interpreter, which works only when TRITON_INTERPRET=1 is set before
`triton` is first imported. A whole test session has usually imported triton by the time this file runs, so
`test_interpreter_suite` reruns this file's parity tests (`-k parity`) in a child process with the interpreter on;
there, or under `TRITON_INTERPRET=1 pytest tests/test_kernels.py`, the `device` fixture's "cpu" runs them
directly. CUDA, when present, runs the compiled kernels in this process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from slicer_hf import CodecError, build_codec
from slicer_hf.codec import ops
from slicer_hf.codec.bits import BitWriter

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ops.kernels_importable()
INTERPRETER = KERNELS and importlib.import_module("slicer_hf._triton_kernels").interpreter_active()
CANDIDATES = (1, 2, 3, 4, 5, 6, 8)
FIELDS = ("positions", "labels", "signs", "codes", "lo", "hi", "bits")

# numpy, under the interpreter, warns where float32 overflows to inf exactly as torch does silently
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.fixture(params=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def device(request: pytest.FixtureRequest) -> torch.device:
    """CPU under the Triton interpreter, plus CUDA with compiled kernels where a GPU is present."""
    if not KERNELS:
        pytest.skip("triton is not installed")
    if request.param == "cuda" and INTERPRETER:
        pytest.skip("CUDA runs the compiled kernels, in the parent process")
    if request.param == "cpu" and not INTERPRETER:
        pytest.skip("the CPU runs the kernels under the interpreter, in test_interpreter_suite's child process")
    return torch.device(request.param)


def hidden_states(n: int, d: int, seed: int = 0, wide: bool = False) -> torch.Tensor:
    """Gaussian rows with outlier channels, an attention-sink row (~24,000) and awkward rows; `wide` adds a 1e6
    entry and a row of float32 subnormals, which need float32 block parameters (the reference's job)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 2
    if d > 8:
        x[:, 5] *= 40
        x[:, d // 2] *= -30
    x[0] *= 100
    if wide:
        x[-1, min(3, d - 1)] = 1e6
    awkward = [
        lambda r: r.fill_(1.5).mul_(torch.where(torch.arange(d) % 3 == 0, -1.0, 1.0)),  # magnitude ties
        lambda r: r.zero_(),
        lambda r: r.mul_(1e-40 if wide else 1e-3),  # float32 subnormals, or small values float16 holds
        lambda r: r.copy_(torch.randint(-3, 4, (d,), generator=g).float()),  # ties and zeros
    ]
    for i, make in enumerate(awkward):
        if 1 + i < n - 1:
            make(x[1 + i])
    return x


@pytest.fixture
def abq_kernel(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the ABQ kernel's launches: a parity check whose batch went to the reference compares it with itself."""
    if not KERNELS:
        return []
    kernels, calls = importlib.import_module("slicer_hf._triton_kernels"), []
    real = kernels.quantize_selected
    monkeypatch.setattr(kernels, "quantize_selected", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def assert_same_quantized(ref: ops.QuantizedRows, ker: ops.QuantizedRows) -> None:
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(ker, name)
        if name == "codes":  # codes of 0-bit blocks never reach the wire
            on_wire = ref.bits.gather(1, ref.labels) > 0
            a, b = a[on_wire], b[on_wire]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), name
    assert ref.wide == ker.wide


def both(fn, *args, **kwargs):
    return fn(*args, **kwargs, backend="reference"), fn(*args, **kwargs, backend="kernels")


# ------------------------------------------------------------------------------------------------- parity
SHAPES = [(n, d) for d in (100, 576, 4096) for n in (1, 7, 513)]


def test_parity_when_only_the_kept_entries_need_float32_parameters(device):
    """Float32 block parameters follow the entries kept, not the whole row: tiny positives that asymmetric filtering
    keeps beside ordinary negatives, and tiny entries beside an excluded outlier."""
    y = torch.tensor([[-1.0, 1e-6, 2e-6, 3e-6, -0.5, 4e-6]], device=device)
    ref, ker = both(ops.quantize_rows, y, 3, 1, 3, None, CANDIDATES, 0.05)
    assert ref.wide
    assert_same_quantized(ref, ker)
    y, excluded = torch.tensor([[1.0, 1e-6, 2e-6, 3e-6]], device=device), torch.tensor([[0]], device=device)
    ref, ker = both(ops.quantize_rows, y, 3, 1, None, excluded, CANDIDATES, 0.05)
    assert ref.wide
    assert_same_quantized(ref, ker)


def test_parity_a_batch_with_a_row_that_needs_float32_parameters_goes_whole_to_the_reference(device, abq_kernel):
    """A packet carries float16 or float32 block parameters for all its rows: one row past float16 (a 1e6 entry,
    subnormals) sends the batch to the reference after the selection kernel, with the reference's results."""
    x = hidden_states(7, 100, seed=3, wide=True).to(device)
    ref, ker = both(ops.quantize_rows, x, 100, 1, None, None, CANDIDATES, 0.08)
    assert ref.wide and not abq_kernel
    assert_same_quantized(ref, ker)


def test_parity_asking_for_more_top_positions_than_the_width_gives_every_position(device):
    x = hidden_states(3, 10).to(device)
    ref, ker = both(ops.top_positions, x, 11)
    assert torch.equal(ref, ker) and torch.equal(ref.cpu(), torch.arange(10).expand(3, 10))


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
def test_parity_dense_rows(device, shape, abq_kernel):
    """The default selection (every entry, one block): outliers, quantization, decode."""
    n, d = shape
    x = hidden_states(n, d, seed=n + d).to(device)
    ref_top, ker_top = both(ops.top_positions, x, 2)
    assert torch.equal(ref_top, ker_top)
    ref, ker = both(ops.quantize_rows, x, d, 1, None, None, CANDIDATES, 0.08)
    assert abq_kernel and not ref.wide
    assert_same_quantized(ref, ker)
    fields = (ref.positions, ref.labels, ref.signs, ref.codes, ref.lo, ref.hi, ref.bits, d)
    ref_rows, ker_rows = both(ops.dequantize_rows, *fields)
    assert torch.equal(ref_rows, ker_rows)


# name: (sparsity, blocks, asymmetry, excluded outliers, candidates)
CASES = {
    "sparse-blocks": (0.5, 4, None, 0, CANDIDATES),
    "asymmetric-excluded": (0.3, 3, 0.7, 2, CANDIDATES),
    "positives-only": (0.8, 2, 1.0, 0, CANDIDATES),
    "many-blocks-zero-bit": (0.1, 64, None, 1, (0, 1, 3, 16)),
}
# 64 blocks on 513 rows take ~40 s under the interpreter: that case runs on the two smaller shapes only
CASE_PARAMS = [
    (case, shape)
    for case in CASES
    for shape in [(7, 100), (1, 4096), (513, 576)]
    if not (case == "many-blocks-zero-bit" and shape[0] > 7)
]


@pytest.mark.parametrize(("case", "shape"), CASE_PARAMS, ids=[f"{c}-{n}x{d}" for c, (n, d) in CASE_PARAMS])
def test_parity_selection_and_quantization(device, case, shape, abq_kernel):
    n, d = shape
    sparsity, blocks, asymmetry, n_excl, candidates = CASES[case]
    x = hidden_states(n, d, seed=n * d).to(device)
    excluded = ops.top_positions(x, n_excl, backend="reference") if n_excl else None
    y = x.scatter(1, excluded, 0.0) if n_excl else x
    k = max(1, round((1 - sparsity) * (d - n_excl)))
    m = min(blocks, k)
    k_pos = None if asymmetry is None else round(asymmetry * k)
    ref, ker = both(ops.quantize_rows, y, k, m, k_pos, excluded, candidates, 0.05)
    assert abq_kernel and not ref.wide
    assert_same_quantized(ref, ker)
    assert (ker.positions.diff(dim=1) > 0).all()
    fields = (ref.positions, ref.labels, ref.signs, ref.codes, ref.lo, ref.hi, ref.bits, d)
    ref_rows, ker_rows = both(ops.dequantize_rows, *fields)
    assert torch.equal(ref_rows, ker_rows)


@pytest.mark.parametrize("bit_offset", [0, 3, 7])
@pytest.mark.parametrize("n", [1, 7, 513, 4096])
def test_parity_pack_and_unpack(device, n, bit_offset):
    g = torch.Generator().manual_seed(n + bit_offset)
    widths = torch.randint(0, 33, (n,), generator=g).to(device)
    codes = torch.randint(0, 1 << 62, (n,), generator=g).to(device)  # bits above each width are ignored
    ref, ker = both(ops.pack_bits, codes, widths, bit_offset)
    assert ref.dtype == ker.dtype == torch.uint8 and torch.equal(ref, ker)
    expected = codes & ((1 << widths) - 1)
    for unpacked in both(ops.unpack_bits, ref, widths, bit_offset):
        assert torch.equal(unpacked, expected)


def test_parity_codec_encodes_on_the_kernel_path(device, monkeypatch):
    """`SlicerCodec.encode` really routes through the kernels, and gives the reference's bytes."""
    kernels = importlib.import_module("slicer_hf._triton_kernels")
    calls = []
    real = kernels.select_rows
    monkeypatch.setattr(kernels, "select_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(ops.ENV_KERNELS, "interpret")
    codec = build_codec("slicer", rotation="none")
    x = hidden_states(6, 64).reshape(2, 3, 64).to(device)
    data = codec.encode(x)
    assert calls, "the kernels did not run"
    monkeypatch.setenv(ops.ENV_FORCE_REFERENCE, "1")
    assert data == codec.encode(x.cpu())


CODEC_CASES = {
    "default": {},
    "no-rotation": {"rotation": "none"},
    "sparse-rice": {"rotation": "none", "sparsity": 0.6, "num_blocks": 4, "index_coding": "rice"},
    "asymmetric": {"sparsity": 0.3, "asymmetry": 0.7, "num_blocks": 3, "outliers": 0, "entropy_coding": "none"},
    "zero-bit-blocks": {"rotation": "none", "bit_candidates": (0, 2, 4), "num_blocks": 8, "sparsity": 0.8},
}


@pytest.mark.parametrize("shape", [(7, 576), (1, 4096)], ids=["7x576", "1x4096"])
@pytest.mark.parametrize("case", list(CODEC_CASES))
def test_parity_codec_bytes_and_values(device, case, shape, monkeypatch, abq_kernel):
    """Kernel path on `device` against the host reference: the same bytes, the same decoded values."""
    params = CODEC_CASES[case]
    if device.type == "cuda" and params.get("rotation") != "none":
        pytest.skip("the rotation is a torch matmul, rounded differently on the CPU and on CUDA")
    codec = build_codec("slicer", **params)
    x = hidden_states(*shape, seed=11)
    monkeypatch.setenv(ops.ENV_KERNELS, "interpret")
    data = codec.encode(x.to(device))
    assert abq_kernel, "the batch went to the reference"
    decoded = codec.decode(data, device=device)
    monkeypatch.setenv(ops.ENV_FORCE_REFERENCE, "1")
    assert data == codec.encode(x)
    assert decoded.device.type == device.type
    assert torch.equal(decoded.cpu(), codec.decode(data))


# Bytes of the original (pre-kernel) implementation; rotation and zstd off, so no BLAS or zstd version enters.
PINNED = {
    "plain": ({"rotation": "none", "entropy_coding": "none"}, (5, 100), 0, 369),
    "sparse-blocks": (
        {"sparsity": 0.5, "num_blocks": 4, "rotation": "none", "entropy_coding": "none"},
        (3, 576),
        1,
        797,
    ),
    "asymmetric": (
        {"sparsity": 0.3, "asymmetry": 0.7, "num_blocks": 3, "rotation": "none", "entropy_coding": "none"},
        (7, 100),
        2,
        558,
    ),
    "rice-zero-bit": (
        {
            "sparsity": 0.9,
            "num_blocks": 2,
            "bit_candidates": (0, 2, 4),
            "rotation": "none",
            "entropy_coding": "none",
            "index_coding": "rice",
        },
        (4, 576),
        3,
        299,
    ),
    "wide-outliers": ({"rotation": "none", "entropy_coding": "none", "outliers": 1}, (2, 64), 4, 124),
}
PINNED_SHA256 = {
    "plain": "c6d8941baa9cf29d00e1844f33d901dbd03c95652dac8aae7952c9c16ea3d3f9",
    "sparse-blocks": "d04b4bd2df53b4d1d7f1a3eb500d69d04e847dd290350c10513028484d21b503",
    "asymmetric": "ae1ffd037d8fd89b23cd6570687e19e2cf2247238e6f8ac486c59c96ffc4e222",
    "rice-zero-bit": "077b28d7184158a70f9dda4ea2ad28c00946701f1123ebdb3ccf7e433b577523",
    "wide-outliers": "8c1fdcb7230f7bd42072f435f623373a8612b7625fe0ffea024c91a14d4308e4",
}


def pinned_input(shape: tuple[int, int], seed: int, wide: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2
    x[..., 5] *= 40
    x[..., shape[-1] // 2] *= -30
    x[0] *= 100
    if wide:
        x[1, 7] = 1e6
    return x


@pytest.mark.parametrize("path", ["reference", "kernels"])
@pytest.mark.parametrize("name", list(PINNED))
def test_parity_pinned_packets(name, path, monkeypatch):
    """Encode keeps the bytes of the implementation before the kernels, on both paths."""
    if path == "kernels" and not INTERPRETER:
        pytest.skip("the kernel path on CPU tensors runs in test_interpreter_suite's child process")
    params, shape, seed, size = PINNED[name]
    if path == "kernels":
        monkeypatch.setenv(ops.ENV_KERNELS, "interpret")
    else:
        monkeypatch.delenv(ops.ENV_KERNELS, raising=False)
    data = build_codec("slicer", **params).encode(pinned_input(shape, seed, wide=name == "wide-outliers"))
    assert len(data) == size and hashlib.sha256(data).hexdigest() == PINNED_SHA256[name]


# ------------------------------------------------------------------------------------------------- reference
def test_reference_pack_is_the_bitwriter_stream():
    g = torch.Generator().manual_seed(5)
    for offset in range(8):
        widths = torch.randint(0, 33, (300,), generator=g)
        codes = torch.randint(0, 1 << 40, (300,), generator=g)
        w = BitWriter()
        w.write(np.zeros(offset, dtype=np.uint64), 1)
        w.write(codes.numpy().astype(np.uint64), widths.numpy())
        assert ops.pack_bits(codes, widths, offset, backend="reference").numpy().tobytes() == w.getvalue()
    with pytest.raises(CodecError, match="truncated"):
        ops.unpack_bits(torch.zeros(2, dtype=torch.uint8), torch.full((3,), 6), 0)


# ------------------------------------------------------------------------------------------------- dispatch
def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv(ops.ENV_FORCE_REFERENCE, raising=False)
    monkeypatch.delenv(ops.ENV_KERNELS, raising=False)
    assert not ops.use_kernels("cpu")
    assert ops.use_kernels("cuda") == KERNELS
    assert not ops.use_kernels("meta")
    monkeypatch.setenv(ops.ENV_KERNELS, "interpret")
    assert ops.use_kernels("cpu") == INTERPRETER
    monkeypatch.setenv(ops.ENV_FORCE_REFERENCE, "1")
    assert not ops.use_kernels("cuda") and not ops.use_kernels("cpu")
    assert not ops.use_kernels("cuda", backend="reference")
    with pytest.raises(CodecError, match="backend"):
        ops.use_kernels("cpu", backend="triton")
    if KERNELS and not INTERPRETER:
        with pytest.raises(CodecError, match="TRITON_INTERPRET"):
            ops.use_kernels("cpu", backend="kernels")


def test_parity_float64_rows_rank_as_the_reference_does(device):
    """The kernels rank float32 keys, which tie magnitudes float64 tells apart: float64 rows go to the reference."""
    x = torch.tensor([[1.0, 1.0 + 1e-12, -0.5]], dtype=torch.float64, device=device)
    assert ops.top_positions(x, 1).tolist() == [[1]]
    assert ops.quantize_rows(x, 1, 1, None, None, CANDIDATES, 0.05).positions.tolist() == [[1]]


@pytest.mark.skipif(not KERNELS, reason="triton is not installed")
def test_every_kernel_launches_on_the_gpu_of_its_tensors(monkeypatch):
    """Triton launches on the current GPU: each launcher makes its tensors' GPU current first (`cuda:1` tensors
    while `cuda:0` is current were refused as 'cannot be accessed from Triton')."""
    kernels = importlib.import_module("slicer_hf._triton_kernels")
    launch = importlib.import_module("slicer_hf._triton_kernels._launch")
    for name in ("select_rows", "quantize_selected", "pack_bits", "unpack_bits", "dequantize_rows"):
        assert getattr(getattr(kernels, name), "__wrapped__", None) is not None, name
    made_current = []

    class Current:
        def __init__(self, device):
            made_current.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Current)
    on_gpu = type("OnGpu", (), {"device": torch.device("cuda", 1)})()
    assert launch.on_their_device(lambda t, x: made_current[-1] if made_current else None)(on_gpu, 0) == on_gpu.device
    launch.on_their_device(lambda t: None)(torch.zeros(1))  # a CPU tensor (the interpreter's): nothing made current
    assert made_current == [torch.device("cuda", 1)]


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.delenv(ops.ENV_KERNELS, raising=False)
    monkeypatch.setattr(ops, "_kernel_module", lambda: pytest.fail("the kernels ran for a CPU tensor"))
    codec = build_codec("slicer")
    x = hidden_states(3, 64)
    assert codec.decode(codec.encode(x)).shape == x.shape


# ------------------------------------------------------------------------------------------------- packaging
def _kernel_modules() -> set[str]:
    return {p.stem for p in (ROOT / "triton_kernels").glob("*.py")}


def test_wheel_installs_the_kernels_under_a_private_name(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ["slicer_hf", "triton_kernels"]:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "whl"]
    proc = subprocess.run([*map(str, cmd), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        top_level = next(z.read(n).decode() for n in names if n.endswith(".dist-info/top_level.txt"))
    assert {f"slicer_hf/_triton_kernels/{m}.py" for m in _kernel_modules()} <= names, "pyproject's py-modules list"
    assert not [n for n in names if n.startswith("triton_kernels")]
    assert top_level.split() == ["slicer_hf"]
    from slicer_hf.config import available_presets

    assert {f"slicer_hf/presets/{p}/slicer_config.json" for p in available_presets()} <= names, "presets ship"


def test_installed_package_maps_the_private_name(tmp_path):
    """`import slicer_hf._triton_kernels` works from outside the checkout; no top-level `triton_kernels` is ours."""
    if not KERNELS:
        pytest.skip("triton is not installed")
    script = (
        "import importlib.util, slicer_hf, slicer_hf._triton_kernels as k; print(slicer_hf.__file__); "
        "print(k.__file__); print(getattr(importlib.util.find_spec('triton_kernels'), 'origin', None))"
    )
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    if proc.returncode and "No module named 'slicer_hf'" in proc.stderr:
        pytest.skip("slicer-hf is not installed")
    assert proc.returncode == 0, f"reinstall (pip install -e .): {proc.stderr[-2000:]}"
    package_file, kernel_file, top_level = proc.stdout.split("\n")[:3]
    if Path(package_file).is_relative_to(ROOT):  # an editable install of this checkout
        assert Path(kernel_file).parent == ROOT / "triton_kernels"
    else:
        assert Path(kernel_file).parent.parts[-2:] == ("slicer_hf", "_triton_kernels")
    assert str(ROOT) not in top_level  # None, or Triton's own package


# ------------------------------------------------------------------------------------------------- compiled / child
def test_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90 without a GPU: catches what only the compiler sees (the interpreter runs
    Python). Checks the codegen keeps the reference's rounding: IEEE division, no fused multiply-add."""
    if not KERNELS or INTERPRETER:
        pytest.skip("needs triton in compiled mode")
    import triton
    from slicer_hf._triton_kernels import dequant, pack, quant, select
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    i64, i32, f32 = "*i64", "i32", "*fp32"
    kernels = [  # (kernel, types of its runtime arguments in order, constexpr values)
        (
            select._select_kernel,
            [f32, "*i8", i64, i64, f32, i32, i32, i32, i32, i32],
            {"ASYM": True, "HAS_EXCL": True, "WITH_VALUES": True, "BLOCK_R": 1, "BLOCK_D": 4096, "IDX_BITS": 12},
        ),
        (
            quant._quantize_kernel,
            [f32, i64, "*i32", i64, "*i8", f32, f32, i64, i32, i32, i32, i32, "fp32"],
            {"BLOCK_R": 1, "BLOCK_K": 4096, "BLOCK_M": 4},
        ),
        (pack._pack_kernel, [i64, i64, i64, "*i32", i32], {"BLOCK": 1024}),
        (pack._unpack_kernel, ["*i32", i64, i64, i64, i32, i32], {"BLOCK": 1024}),
        (dequant._dequantize_kernel, [i64, i64, "*i8", i64, f32, f32, i64, f32, i32, i32, i32, i32], {"BLOCK": 1024}),
    ]
    kernels[0][2]["LOW_BITS"] = select.MAG_BITS + 12
    for fn, types, constexprs in kernels:
        runtime = [p.name for p in fn.params if not p.is_constexpr]
        signature = {**dict(zip(runtime, types, strict=True)), **dict.fromkeys(constexprs, "constexpr")}
        try:
            compiled = triton.compile(
                ASTSource(fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": 8, "enable_fp_fusion": False},
            )
        except (FileNotFoundError, PermissionError) as exc:  # no runnable ptxas in this triton build
            pytest.skip(f"cannot run ptxas: {exc}")
        ptx = compiled.asm["ptx"]
        assert not re.search(r"\bfma\.", ptx) and not re.search(r"div\.(full|approx)", ptx), fn.__name__


def test_interpreter_suite():
    """Run this file's parity tests on the CPU under the Triton interpreter, in a fresh process."""
    if not KERNELS:
        pytest.skip("triton is not installed")
    if INTERPRETER:
        pytest.skip("this process is the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1", ops.ENV_KERNELS: "interpret"}
    env.pop(ops.ENV_FORCE_REFERENCE, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "parity", __file__]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=560)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 40, summary
