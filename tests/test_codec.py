import importlib.util
import re
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slicer_hf import CodecError, ConfigError, SlicerConfig, build_codec
from slicer_hf.codec import available_codecs, codec_from_spec, indices
from slicer_hf.codec.bits import BitReader, BitWriter

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 1, 576), (1, 1, 1), (7, 100), (2, 3, 63), (513,), (1, 4, 4096)]
# Lossy codecs with the relative L2 error each must stay under on Gaussian rows with outlier channels.
LOSSY_BOUNDS = {  # about 1.5x the worst error of the shapes below (bounds 2-7x loose had let a halved int8 scale pass)
    "fp16": ("fp16", {}, 3e-4),
    "bf16": ("bf16", {}, 2e-3),
    "int8": ("int8", {}, 0.055),
    "topk": ("topk", {"sparsity": 0.5}, 0.23),
    "slicer-default": ("slicer", {}, 0.055),
    "slicer-sparse-blocks": ("slicer", {"sparsity": 0.5, "num_blocks": 4, "rotation": "none"}, 0.24),
    "slicer-asymmetric": ("slicer", {"sparsity": 0.3, "asymmetry": 0.7, "rotation": "none", "outliers": 0}, 0.21),
    "slicer-tight": ("slicer", {"distortion": 0.01, "bit_candidates": (2, 4, 8, 12)}, 0.003),
}
HAS_CONSTRICTION = importlib.util.find_spec("constriction") is not None
needs_constriction = pytest.mark.skipif(not HAS_CONSTRICTION, reason="quantizer='ecsq' needs constriction")
if HAS_CONSTRICTION:
    LOSSY_BOUNDS["slicer-ecsq"] = ("slicer", {"quantizer": "ecsq"}, 0.08)
    LOSSY_BOUNDS["slicer-ecsq-unrotated"] = ("slicer", {"quantizer": "ecsq", "rotation": "none", "step": 0.1}, 0.027)


def hidden_states(*shape, seed=0, dtype=torch.float32):
    """Gaussian rows with two massive outlier channels and an attention-sink row, like real residual streams."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2
    if shape[-1] > 8:
        x[..., 5] *= 40
        x[..., shape[-1] // 2] *= -30
    x.reshape(-1, shape[-1])[0] *= 100  # sink row: ~24,000 at the outliers
    return x.to(dtype)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_identity_round_trip_is_exact(dtype, shape):
    codec = build_codec("identity")
    x = hidden_states(*shape, dtype=dtype)
    y = codec.decode(codec.encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)


@pytest.mark.parametrize("case", list(LOSSY_BOUNDS))
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 100), (513, 64)])
def test_lossy_codecs_stay_inside_their_error_bound(case, shape):
    name, params, bound = LOSSY_BOUNDS[case]
    codec = build_codec(name, **params)
    x = hidden_states(*shape)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel_err(y, x) < bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_lossy_codecs_restore_dtype(dtype):
    for name in ["fp16", "bf16", "int8", "topk", "slicer"]:
        codec = build_codec(name)
        assert codec.decode(codec.encode(hidden_states(2, 64, dtype=dtype))).dtype == dtype


def test_attention_sink_magnitudes_do_not_overflow():
    x = hidden_states(1, 2, 576)
    x[0, 0, 507] = 24_000.0
    x[0, 1, 247] = 1e6  # beyond float16: the slicer codec switches to float32 parameters
    for name in ["bf16", "int8", "topk", "slicer"]:
        codec = build_codec(name)
        y = codec.decode(codec.encode(x))
        assert torch.isfinite(y).all(), name
        assert abs(y[0, 0, 507].item() - 24_000.0) < 0.02 * 24_000.0, name


def test_fp16_refuses_values_it_cannot_hold():
    with pytest.raises(CodecError, match="overflow float16"):
        build_codec("fp16").encode(torch.tensor([[1e6, 1.0]]))


@pytest.mark.parametrize("name", ["identity", "fp16", "bf16", "int8", "topk", "slicer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_a_clear_error(name, bad):
    x = hidden_states(1, 16)
    x[0, 3] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        build_codec(name).encode(x)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 0), torch.tensor(1.0)])
def test_bad_tensors_are_refused(bad):
    with pytest.raises(CodecError):
        build_codec("slicer").encode(bad)


@pytest.mark.parametrize("name", available_codecs())
def test_same_input_gives_same_bytes(name):
    x = hidden_states(3, 576, seed=4)
    assert build_codec(name).encode(x) == build_codec(name).encode(x.clone())


@pytest.mark.parametrize(
    "name,params",
    [
        ("topk", {"sparsity": 0.7}),
        ("slicer", {"sparsity": 0.7, "rotation": "none", "outliers": 0}),
        ("slicer", {"sparsity": 0.7, "rotation": "none", "outliers": 0, "asymmetry": 0.5}),
    ],
)
def test_ties_are_broken_by_lowest_index(name, params):
    codec = build_codec(name, **params)
    same = torch.ones(1, 10)
    assert torch.equal(codec.decode(codec.encode(same)), torch.tensor([[1.0] * 3 + [0.0] * 7]))
    signs = torch.tensor([[1.0, -1.0] * 5])  # with a fixed asymmetry, 2 positives and 1 negative: the first of each
    assert torch.equal(codec.decode(codec.encode(signs)), torch.tensor([[1.0, -1.0, 1.0] + [0.0] * 7]))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.6, 0.9])
def test_slicer_keeps_exactly_k_entries(sparsity):
    codec = build_codec("slicer", sparsity=sparsity, rotation="none", outliers=0, num_blocks=3)
    x = hidden_states(4, 100, seed=1)
    y = codec.decode(codec.encode(x))
    k = round((1 - sparsity) * 100)
    assert ((y != 0).sum(dim=1) <= k).all()
    kept = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    assert (y.gather(1, kept) != 0).float().mean() > 0.95  # the largest entries survive (0-bit mids aside)


def test_asymmetry_controls_the_sign_mix():
    x = hidden_states(1, 200, seed=2)
    codec = build_codec("slicer", sparsity=0.8, asymmetry=1.0, rotation="none", outliers=0)
    y = codec.decode(codec.encode(x))
    assert (y < 0).sum() == 0 and (y > 0).sum() == 40


def test_tighter_budget_costs_more_bits_and_less_error():
    x = hidden_states(8, 576, seed=3)
    loose, tight = build_codec("slicer", distortion=0.2), build_codec("slicer", distortion=0.02)
    assert len(loose.encode(x)) < len(tight.encode(x))
    assert rel_err(tight.decode(tight.encode(x)), x) < rel_err(loose.decode(loose.encode(x)), x)


def test_measure_reports_the_bytes_encode_returns():
    x = hidden_states(1, 5, 576)
    for name in available_codecs():
        codec = build_codec(name)
        stats = codec.measure(x)
        assert stats.nbytes == len(codec.encode(x))
        assert stats.tokens == 5 and stats.bits_per_token == 8 * stats.nbytes / 5


def test_build_codec_from_config_and_spec():
    codec = build_codec(SlicerConfig(split_layer=3, sparsity=0.5, num_blocks=2))
    assert codec.name == "slicer" and codec.sparsity == 0.5 and codec.num_blocks == 2
    again = codec_from_spec(codec.spec())
    x = hidden_states(2, 64)
    assert again.encode(x) == codec.encode(x)
    with pytest.raises(CodecError, match="unknown codec"):
        build_codec("zip")
    with pytest.raises(CodecError, match="version"):
        codec_from_spec({**codec.spec(), "version": 99})
    for spec in ({"name": "identity", "version": 1, "config_or_name": "x"}, {"name": {}, "version": 1}):
        with pytest.raises(CodecError):  # a peer's spec: a TypeError had been an internal error with a traceback
            codec_from_spec(spec)


def test_decoder_refuses_other_codecs_packets():
    data = build_codec("fp16").encode(hidden_states(1, 8))
    with pytest.raises(CodecError, match="codec id"):
        build_codec("slicer").decode(data)


def test_shape_claims_cannot_force_huge_allocations():
    data = bytearray(build_codec("identity").encode(torch.zeros(1, 4)))
    data[4:] = bytes([0xFF, 0xFF, 0xFF, 0x7F, 0x04])  # a 268-million-row claim
    with pytest.raises(CodecError, match="max_elements|exceeds the limit|truncated"):
        build_codec("identity").decode(bytes(data))


FUZZ_CODECS = {name: build_codec(name) for name in available_codecs()}
FUZZ_CODECS["slicer-sparse"] = build_codec("slicer", sparsity=0.6, num_blocks=4, rotation="none")
if HAS_CONSTRICTION:
    FUZZ_CODECS["slicer-ecsq"] = build_codec("slicer", quantizer="ecsq")
FUZZ_PACKETS = {
    name: [codec.encode(hidden_states(*shape, seed=i)) for i, shape in enumerate([(1, 1, 576), (3, 100), (2, 7)])]
    for name, codec in FUZZ_CODECS.items()
}


def _decode_only_raises_codec_error(codec, data):
    start = time.perf_counter()
    try:
        out = codec.decode(data)
    except CodecError:
        pass
    else:
        assert isinstance(out, torch.Tensor)
    assert time.perf_counter() - start < 10.0  # a guard against a packet that buys minutes, not a speed test (ms)


fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(name=st.sampled_from(sorted(FUZZ_CODECS)), which=st.integers(0, 2), cut=st.integers(0, 10_000))
def test_truncated_packets_raise_codec_error(name, which, cut):
    data = FUZZ_PACKETS[name][which]
    _decode_only_raises_codec_error(FUZZ_CODECS[name], data[: cut % max(len(data), 1)])


@fuzz
@given(
    name=st.sampled_from(sorted(FUZZ_CODECS)),
    which=st.integers(0, 2),
    flips=st.lists(st.integers(0, 1 << 20), max_size=8),
)
def test_bit_flipped_packets_raise_codec_error_or_decode(name, which, flips):
    data = bytearray(FUZZ_PACKETS[name][which])
    for flip in flips:
        data[(flip >> 3) % len(data)] ^= 1 << (flip & 7)
    _decode_only_raises_codec_error(FUZZ_CODECS[name], bytes(data))


@fuzz
@given(name=st.sampled_from(sorted(FUZZ_CODECS)), data=st.binary(max_size=600))
def test_random_bytes_raise_codec_error(name, data):
    _decode_only_raises_codec_error(FUZZ_CODECS[name], data)


@fuzz
@given(name=st.sampled_from(sorted(FUZZ_CODECS)), tail=st.binary(max_size=64))
def test_valid_header_with_garbage_body_raises_codec_error(name, tail):
    data = FUZZ_PACKETS[name][1]
    _decode_only_raises_codec_error(FUZZ_CODECS[name], data[:8] + tail)


def test_bulk_values_beyond_float16_use_float32_parameters_not_clipping():
    x = hidden_states(2, 64)
    x[0, 10:20] = 2e5  # ten entries beyond float16, more than the exact outliers can hold
    codec = build_codec("slicer", outliers=2, rotation="none")
    y = codec.decode(codec.encode(x))
    assert torch.isfinite(y).all()
    assert (y[0, 10:20] - 2e5).abs().max() < 0.01 * 2e5


@pytest.mark.parametrize("params", [{"outliers": 8, "rotation": "none"}, {"outliers": 8}])
def test_rows_made_only_of_outliers_round_trip(params):
    codec = build_codec("slicer", **params)
    x = hidden_states(3, 5)
    y = codec.decode(codec.encode(x))
    assert torch.allclose(y, x, rtol=1e-3)  # every entry an exact outlier, rotated or not


def test_empty_batches_round_trip():
    for name in available_codecs():
        codec = build_codec(name)
        y = codec.decode(codec.encode(torch.zeros(0, 3, 16)))
        assert y.shape == (0, 3, 16)


# ------------------------------------------------------------------------------------------------ ECSQ
def _residual_rel_err(y, x, n_out=2):
    """Relative L2 error of each row's non-outlier part (what ECSQ quantizes), averaged over rows."""
    out = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :n_out]
    residual = x.scatter(1, out, 0.0)
    return ((y - x).double().norm(dim=1) / residual.double().norm(dim=1)).mean().item()


@needs_constriction
@pytest.mark.parametrize("rotation", ["orthogonal", "none"])
@pytest.mark.parametrize("step", [0.05, 0.1, 0.3, 0.6])
def test_ecsq_error_scales_with_the_step(step, rotation):
    # uniform steps of step x rms: error RMS step / sqrt(12) of the residual's RMS, while step << 1
    codec = build_codec("slicer", quantizer="ecsq", step=step, rotation=rotation)
    x = hidden_states(64, 576, seed=5)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert _residual_rel_err(y, x) == pytest.approx(step / 12**0.5, rel=0.1)
    out = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :2]
    assert torch.equal(y.gather(1, out), x.gather(1, out).half().float())  # exact outliers


@needs_constriction
def test_ecsq_coarser_steps_cost_fewer_bits():
    x = hidden_states(16, 576, seed=6)
    sizes = [len(build_codec("slicer", quantizer="ecsq", step=s).encode(x)) for s in (0.1, 0.2, 0.3, 0.4)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4


@needs_constriction
def test_ecsq_beats_the_blocks_at_a_similar_error():
    x = hidden_states(64, 576, seed=7)
    blocks = build_codec("slicer", num_blocks=2, distortion=0.15)
    ecsq = build_codec("slicer", quantizer="ecsq", step=0.25)
    err_blocks, err_ecsq = (rel_err(c.decode(c.encode(x)), x) for c in (blocks, ecsq))
    assert err_ecsq <= 1.1 * err_blocks
    assert len(ecsq.encode(x)) < 0.9 * len(blocks.encode(x))


@needs_constriction
@pytest.mark.parametrize("params", [{}, {"rotation": "none"}, {"outliers": 0}, {"step": 0.05}])
def test_ecsq_is_deterministic_and_self_describing(params):
    x = hidden_states(3, 576, seed=8)
    codec = build_codec("slicer", quantizer="ecsq", **params)
    data = codec.encode(x)
    assert data == build_codec("slicer", quantizer="ecsq", **params).encode(x.clone())
    # the packet says ECSQ and carries the step: a decoder built with other knobs reads it
    assert torch.equal(build_codec("slicer").decode(data), codec.decode(data))
    assert codec_from_spec(codec.spec()).encode(x) == data


@needs_constriction
@pytest.mark.parametrize("shape", [(1, 1, 576), (7, 100), (513, 64), (1, 1, 1), (2, 2), (0, 3, 16)])
@pytest.mark.parametrize("params", [{}, {"rotation": "none"}, {"outliers": 0}, {"outliers": 8, "rotation": "none"}])
def test_ecsq_odd_shapes_round_trip(shape, params):
    codec = build_codec("slicer", quantizer="ecsq", **params)
    x = hidden_states(*shape) if shape[0] else torch.zeros(shape)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel():
        assert rel_err(y, x) < 0.1


@needs_constriction
def test_ecsq_zero_rows_cost_no_codes():
    codec = build_codec("slicer", quantizer="ecsq")
    x = hidden_states(4, 100, seed=9)
    x[1] = 0.0
    y = codec.decode(codec.encode(x))
    assert torch.equal(y[1], torch.zeros(100))
    zeros = torch.zeros(3, 100)
    assert torch.equal(codec.decode(codec.encode(zeros)), zeros)
    # envelope (6 bytes), ECSQ header (4), per row 2 outliers (7 + 16 bits each) and a 16-bit RMS; no codes
    assert len(codec.encode(zeros)) == 6 + 4 + (3 * (2 * 23 + 16) + 7) // 8


@needs_constriction
def test_ecsq_extreme_magnitudes():
    codec = build_codec("slicer", quantizer="ecsq")
    x = hidden_states(1, 2, 576)
    x[0, 0, 507] = 24_000.0
    x[0, 1, 247] = 1e6  # beyond float16: float32 outliers
    y = codec.decode(codec.encode(x))
    assert torch.isfinite(y).all() and y[0, 1, 247] == 1e6
    bulk = torch.randn(2, 64) * 1e5  # row RMS beyond float16: float32 RMS
    assert rel_err(codec.decode(codec.encode(bulk)), bulk) < 0.1
    small = torch.randn(2, 64) * 1e-7  # row RMS below float16's normal range: float32 RMS
    assert rel_err(codec.decode(codec.encode(small)), small) < 0.1


@needs_constriction
def test_ecsq_extreme_steps_round_trip_or_are_refused_where_codes_would_clip():
    onehot = torch.zeros(8, 4096)
    onehot[:, 7] = 3.0  # all codes 0 but one: the cheapest a valid stream gets
    flat = -torch.ones(4, 64)
    coarse = build_codec("slicer", quantizer="ecsq", step=4.0, rotation="none", outliers=0)
    for x in (onehot, flat):
        assert coarse.decode(coarse.encode(x)).shape == x.shape
    fine = build_codec("slicer", quantizer="ecsq", step=1e-4, rotation="orthogonal", outliers=0)
    assert rel_err(fine.decode(fine.encode(flat)), flat) < 1e-3  # codes up to 10,000 steps: within the largest
    tiny = build_codec("slicer", quantizer="ecsq", step=1e-6, rotation="none", outliers=0)
    for x in (onehot, flat):  # codes past the largest (32,767) wiped a row out (relative error 0.97) without a word
        with pytest.raises(CodecError, match=r"too fine: .* use a step of at least"):
            tiny.encode(x)


def test_the_step_a_too_fine_refusal_names_is_taken_once_the_wire_rounds_it():
    """The named step was rounded up, then to float16 on the wire, which could take it below what the rows need: at
    width 1,546 the refusal named 0.0012, and a step of 0.0012 was refused again."""
    for d in (1546, 1000, 3000):
        x = torch.zeros(1, d)
        x[0, 0] = 1.0
        with pytest.raises(CodecError, match=r"use a step of at least ([0-9.e-]+)") as refused:
            build_codec("slicer", quantizer="ecsq", rotation="none", outliers=0, step=1e-5).encode(x)
        named = float(re.search(r"at least ([0-9.e-]+)", str(refused.value)).group(1))
        build_codec("slicer", quantizer="ecsq", rotation="none", outliers=0, step=named).encode(x)


def test_ecsq_settings_are_validated():
    with pytest.raises(ConfigError, match="`quantizer` must be one of"):
        build_codec("slicer", quantizer="vq")
    for level in (0, 100, "3", True):
        with pytest.raises(ConfigError, match="`zstd_level` must be an integer in"):
            build_codec("slicer", zstd_level=level)
    with pytest.raises(ConfigError, match="bit_candidates"):
        build_codec("slicer", bit_candidates=None)
    with pytest.raises(ConfigError, match=r"`step` must be in \(0, 4\], got 0"):
        build_codec("slicer", quantizer="ecsq", step=0)
    with pytest.raises(ConfigError, match="`sparsity` must be 0 with quantizer='ecsq'"):
        build_codec("slicer", quantizer="ecsq", sparsity=0.5)


@needs_constriction
def test_ecsq_stream_must_hold_exactly_the_codes():
    codec = build_codec("slicer", quantizer="ecsq")
    data = codec.encode(hidden_states(2, 576, seed=10))
    for bad in (data + b"\x01", data[:-1], data + b"\x00", data[:-40]):
        with pytest.raises(CodecError):
            codec.decode(bad)
    claim = bytearray(build_codec("slicer", quantizer="ecsq", step=4.0).encode(torch.ones(1, 4)))
    claim[4] = 0x7F  # d = 127 instead of 4 from the same few bytes
    with pytest.raises(CodecError):
        codec.decode(bytes(claim))


@pytest.mark.parametrize("lead", [0, 3, 8])  # whole-byte fields read byte-aligned, and shifted off the byte grid
def test_bit_reader_reads_back_what_the_writer_wrote(lead):
    g = np.random.default_rng(lead)
    sections = [(g.integers(0, 1 << w, 5, dtype=np.uint64), w) for w in (16, 8, 32, 64, 5, 16, 1)]
    w = BitWriter()
    w.write(np.zeros(lead, dtype=np.uint64), 1)
    for codes, width in sections:
        w.write(codes, width)
    r = BitReader(w.getvalue())
    r.read(lead, 1)
    for codes, width in sections:
        assert (r.read(len(codes), width) == codes).all()
    with pytest.raises(CodecError, match="truncated"):
        r.read(1, 16)


def test_unary_sections_read_back_between_other_fields_and_a_short_or_overlong_one_is_refused():
    """Rice-coded positions: each row's unary runs (zeros, then a one) and remainders, row after row, with a field
    after the section; a unary section that runs out, or runs past what its row's gaps can take, is refused."""
    from slicer_hf.codec.indices import read_positions, write_positions

    g = np.random.default_rng(0)
    d, k = 512, 40
    positions = np.stack([np.sort(g.choice(d, k, replace=False)) for _ in range(6)])
    w = BitWriter()
    write_positions(w, positions, d, "rice")
    w.write(np.array([5]), 3)
    r = BitReader(w.getvalue())
    assert (read_positions(r, 6, k, d) == positions).all()
    assert int(r.read(1, 3)[0]) == 5
    for unary in ([1], [9, 0]):  # one row of k=2 at d=8, Rice parameter 0: too few values, then a gap past d
        crafted = BitWriter()
        crafted.write(np.array([1]), 1)
        crafted.write(np.array([0]), 4)
        crafted.write_unary(np.array(unary))
        with pytest.raises(CodecError, match="unary section truncated or too long"):
            read_positions(BitReader(crafted.getvalue()), 1, 2, 8)


@pytest.mark.parametrize("index_coding", ["rice", "bitmap", "auto"])
def test_sparse_packets_of_many_rows_round_trip_their_positions(index_coding):
    codec = build_codec(
        "slicer", sparsity=0.9, index_coding=index_coding, entropy_coding="none", rotation="none", outliers=0
    )
    x = hidden_states(512, 64)
    kept = codec.decode(codec.encode(x)) != 0
    k = int(kept[0].sum())
    assert k > 0 and (kept.sum(1) == k).all()
    want = x.abs().topk(k, dim=1).indices.sort(1).values  # every row's own positions, not a neighbour's
    assert (kept.nonzero()[:, 1].reshape(512, k) == want).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(1, 24), st.data())
def test_position_sections_read_back_whatever_mix_of_bitmap_and_rice_rows_and_any_cut_is_refused(d, n, data):
    """Rows of clustered, spread or random positions (bitmaps and every Rice parameter, in one section); the reader
    stops where the section ends, and a stream cut short is a `CodecError`, never another exception."""
    from slicer_hf.codec.indices import read_positions, write_positions

    k = data.draw(st.integers(1, d - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    spread = [np.sort(rng.choice(d, k, replace=False)) for _ in range(n)]
    shapes = [lambda: np.arange(k) + rng.integers(0, d - k + 1), lambda: np.linspace(0, d - 1, k).astype(int)]
    rows = [p if rng.random() < 0.5 else np.unique(shapes[rng.integers(2)]()) for p in spread]
    positions = np.stack([p if len(p) == k else spread[i] for i, p in enumerate(rows)])
    w = BitWriter()
    write_positions(w, positions, d, data.draw(st.sampled_from(["auto", "rice", "bitmap"])))
    w.write(np.array([0b101]), 3)  # what follows the section
    stream = w.getvalue()
    r = BitReader(stream)
    assert (read_positions(r, n, k, d) == positions).all()
    assert int(r.read(1, 3)[0]) == 0b101
    for cut in range(len(stream) - 1):
        with pytest.raises(CodecError):
            read_positions(BitReader(stream[:cut]), n, k, d)


@pytest.mark.parametrize("mode", ["rice", "bitmap"])
def test_a_position_section_unpacks_no_more_bits_than_its_rows_can_take(monkeypatch, mode):
    """What follows the section (codes, or a crafted tail of megabytes) is not unpacked with it: a byte of bits each,
    and an index of each one-bit, would cost tens of times the packet."""
    from slicer_hf.codec.indices import read_positions, write_positions

    n, k, d = 4, 3, 64
    positions = np.array([[1, 5, 9], [0, 2, 63], [10, 20, 30], [61, 62, 63]])
    w = BitWriter()
    write_positions(w, positions, d, mode)
    stream = w.getvalue() + b"\xff" * (1 << 20)
    unpacked = []
    plain = BitReader._bits
    spy = lambda self, start, count: unpacked.append(count) or plain(self, start, count)  # noqa: E731
    monkeypatch.setattr(BitReader, "_bits", spy)
    assert (read_positions(BitReader(stream), n, k, d) == positions).all()
    assert max(unpacked) <= n * d + n  # each row's most (a bitmap's d bits), beside its flags


@pytest.mark.parametrize("params", [{}, {"sparsity": 0.6, "num_blocks": 3}])
def test_big_packets_decode_a_chunk_at_a_time_to_the_same_rows(monkeypatch, params):
    """The reference decode bounds its working set by rebuilding rows in chunks."""
    from slicer_hf.codec import ops

    codec = build_codec("slicer", **params)
    packet = codec.encode(hidden_states(37, 64))
    whole = codec.decode(packet)
    monkeypatch.setattr(ops, "CHUNK_FIELDS", 7)  # chunk edges inside rows and inside fields' runs
    assert torch.equal(codec.decode(packet), whole)


@pytest.mark.parametrize("params", [{}, {"sparsity": 0.6, "num_blocks": 3}])
def test_a_big_packet_unpacks_its_entries_a_chunk_of_rows_at_a_time(monkeypatch, params):
    """Each kept entry's label, sign and code take tens of bytes of int64 on the way to one float: unpacked for all
    rows at once, a zstd body of a few dozen bytes made the decoder hold 14x the tensor it decodes."""
    from slicer_hf.codec import ops

    codec = build_codec("slicer", **params)
    packet = codec.encode(hidden_states(37, 64))
    unpack, fields = ops.unpack_bits, []
    monkeypatch.setattr(
        ops,
        "unpack_bits",
        lambda data, widths, *a, **kw: (fields.append(widths.numel()), unpack(data, widths, *a, **kw))[1],
    )
    monkeypatch.setattr(ops, "CHUNK_FIELDS", 4 * 64)
    codec.decode(packet)
    assert fields and max(fields) <= 4 * 64


@pytest.mark.parametrize("flags", [b"\x01\x01\x01\x00", b"\x11\x00\xcd\x34"])  # blocks, ECSQ: rotated, tiny bodies
def test_a_rotated_packet_cannot_claim_an_unbounded_width(flags):
    from slicer_hf.codec.slicer import MAX_ROTATED_WIDTH, rotation_blocks

    codec = build_codec("slicer")
    wide = codec.envelope((1, MAX_ROTATED_WIDTH + 1), torch.float32) + flags + bytes(8)
    with pytest.raises(CodecError, match="rotated"):  # refused from its header, before any rotation is built
        codec.decode(wide)
    assert len({id(q) for _, q in rotation_blocks(8192)}) == 1  # a width's blocks share one seeded matrix


@pytest.mark.parametrize(
    "name,params,bound",
    [
        ("slicer", {"bit_candidates": (8,)}, 0.02),
        ("slicer", {"quantizer": "ecsq", "step": 0.05}, 0.03),
        ("grouped", {"bits": 8, "outliers": 2}, 0.02),
        ("topk", {"sparsity": 0.0}, 0.01),
    ],
)
def test_rows_below_float16s_normal_range_keep_their_precision(name, params, bound):
    """Parameters of rows whose largest entry float16 would flush or coarsen go as float32, as large ones do."""
    codec = build_codec(name, **params)
    for scale in (1e-9, 1e-6):
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * scale
        assert rel_err(codec.decode(codec.encode(x)), x) < bound, scale


@pytest.mark.parametrize("name", [n for n in available_codecs() if n != "identity"])
def test_values_beyond_float32_arithmetic_are_refused_at_encode(name):
    x = torch.full((2, 8), 3e38)  # finite, but a row's squares overflow float32: garbage or an undecodable packet
    with pytest.raises(CodecError, match="beyond what codec"):
        build_codec(name).encode(x)
    assert torch.equal(build_codec("identity").decode(build_codec("identity").encode(x)), x)


def test_an_int8_packet_with_a_non_finite_scale_is_refused():
    packet = bytearray(build_codec("int8").encode(torch.ones(1, 4)))
    packet[-8:-4] = np.float32(np.inf).tobytes()  # the row's scale, before its 4 codes
    with pytest.raises(CodecError, match="non-finite int8 scale"):
        build_codec("int8").decode(bytes(packet))


def test_finite_fields_that_decode_to_infinite_values_are_refused():
    packet = bytearray(build_codec("int8").encode(torch.ones(1, 4)))
    packet[-8:-4] = np.float32(3e38).tobytes()  # a finite scale, but 127 x 3e38 is not
    with pytest.raises(CodecError, match="decodes to NaN or infinite values"):
        build_codec("int8").decode(bytes(packet))
    [refused] = build_codec("int8").decode_batch([bytes(packet)])
    assert isinstance(refused, CodecError)


@pytest.mark.parametrize(
    "name,params", [("bf16", {}), ("grouped", {}), ("slicer", {}), ("slicer", {"quantizer": "ecsq"})]
)
def test_float16_values_at_its_largest_come_back_finite(name, params):
    """A reconstruction may overshoot by a fraction of a step: float16 holds it at its largest, not at infinity."""
    codec = build_codec(name, **params)
    x = torch.full((2, 64), 65504.0, dtype=torch.float16)
    x[1, ::2] = -65504.0
    got = codec.decode(codec.encode(x))
    assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
    assert rel_err(got, x) < 0.1


def test_blocks_pick_the_same_bits_for_a_row_at_any_scale():
    """The bit budget is relative: rows too small for their squares in float32 (below 1e-19) are coded alike."""
    codec = build_codec("slicer")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    sizes = {len(codec.encode(x * scale)) for scale in (1e-15, 1e-25, 1e-30)}  # all with float32 parameters
    assert len(sizes) == 1
    assert rel_err(codec.decode(codec.encode(x * 1e-30)), x * 1e-30) < 0.1


def test_a_blocks_body_longer_than_its_fields_is_refused_before_they_are_unpacked():
    import zstandard

    codec = build_codec("slicer", rotation="none", outliers=0)  # what a server builds from a default spec
    n, d = 512, 576
    body = zstandard.ZstdCompressor().compress(bytes(n * d * 3))  # 884 KB of zeros in 0.1 KB
    packet = codec.envelope((n, d), torch.float32) + bytes([2]) + bytes([0xC0, 0x04]) + bytes([1, 0]) + body
    with pytest.raises(CodecError, match="its fields take"):
        codec.decode(packet)


def test_block_labels_that_break_equal_cardinality_are_refused():
    """Magnitude splitting cuts the survivors into blocks of equal size: a packet whose labels say otherwise (one
    flipped label bit) is not any encoder's."""
    x = torch.tensor([[0.1, -2.0, 0.3, 0.05, -0.7, 9.0, 0.2, -0.01, 1.5, -1.1, 0.0, 0.4, -0.3, 0.6, -0.05, 0.8]])
    codec = build_codec(
        "slicer", sparsity=0.5, num_blocks=2, outliers=1, rotation="none", entropy_coding="none", bit_candidates=(4,)
    )
    packet = bytearray(codec.encode(x))
    first_label = 8 * (6 + 4) + (4 + 16) + (1 + 16)  # envelope, header; outlier (position, value), bitmap positions
    packet[first_label // 8] ^= 1 << (first_label % 8)
    with pytest.raises(CodecError, match="equal cardinality"):
        codec.decode(bytes(packet))


def test_a_packet_of_no_rows_that_carries_entries_is_refused():
    codec = build_codec("slicer", rotation="none")
    packet = bytearray(codec.encode(torch.randn(1, 1, 16)))
    packet[4] = 0  # the first dimension: 1 row becomes none, its entries stay
    with pytest.raises(CodecError, match="a packet of no rows carries"):
        codec.decode(bytes(packet))


def test_a_batch_decodes_where_the_kernels_run_as_one_packet_does(monkeypatch):
    """The server decodes its packets together (decode_batch): on a device with the codec kernels, there too."""
    from slicer_hf.codec import ops
    from slicer_hf.codec import slicer as slicer_module

    seen = []

    def record(self, *args, **kwargs):
        seen.append(slicer_module._DECODE_DEVICE.get())
        raise CodecError("recorded")

    monkeypatch.setattr(slicer_module.SlicerCodec, "_decode_rows", record)
    monkeypatch.setattr(ops, "use_kernels", lambda device, *args, **kwargs: torch.device(device).type == "meta")
    codec = build_codec("slicer")
    packet = codec.encode(torch.randn(1, 3, 64))
    with pytest.raises(CodecError, match="recorded"):
        codec.decode(packet, device="meta")
    assert isinstance(codec.decode_batch([packet], device="meta")[0], CodecError)
    assert seen == [torch.device("meta")] * 2


@pytest.mark.parametrize(
    "spec, at", [({"codec": "grouped", "outliers": 2}, 2), ({"quantizer": "ecsq", "outliers": 2}, 1)]
)
def test_a_packet_claiming_more_outliers_a_row_than_a_config_can_ask_for_is_refused(spec, at):
    """Each is read as a wide float off byte alignment: 255 a row made a 1.4 KB packet cost 2.5 GB to decode."""
    codec = build_codec(SlicerConfig(**{"codec": "slicer", **spec}))
    x = torch.randn(1, 3, 128)
    packet = bytearray(codec.encode(x))
    head = len(codec.envelope(tuple(x.shape), torch.float32))
    assert packet[head + at] == 2  # the outlier count
    for claim in (65, 255):
        packet[head + at] = claim
        with pytest.raises(CodecError, match=f"outliers={claim}"):
            codec.decode(bytes(packet))


def test_the_bit_reader_unpacks_a_long_read_a_chunk_at_a_time():
    import tracemalloc

    codes = np.random.default_rng(0).integers(0, 1 << 13, 1 << 20, dtype=np.uint64)
    w = BitWriter()
    w.write(np.zeros(3, dtype=np.uint64), 1)  # off the byte grid
    w.write(codes, 13)
    r = BitReader(w.getvalue())
    r.read(3, 1)
    tracemalloc.start()
    try:
        got = r.read(len(codes), 13)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (got == codes).all()
    assert peak < 48 << 20  # the result (8 MB) and a chunk's work arrays; all at once took 25x the result


def test_a_float16_packet_that_decodes_to_infinity_is_refused_not_clamped():
    import struct

    codec = build_codec("int8")
    x = torch.ones(1, 1, 8, dtype=torch.float16)
    packet = bytearray(codec.encode(x))
    head = len(codec.envelope((1, 1, 8), torch.float16))
    packet[head : head + 4] = struct.pack("<f", 3e38)  # the row's float32 scale: code 127 x 3e38 is infinite
    with pytest.raises(CodecError, match="NaN or infinite"):
        codec.decode(bytes(packet))


@pytest.mark.parametrize("bit_offset", [0, 5])
def test_packing_fields_a_chunk_at_a_time_writes_what_the_bit_writer_writes(monkeypatch, bit_offset):
    """The reference packer works through long runs of fields in chunks (its per-field work is 80 bytes of int64)."""
    from slicer_hf.codec import ops

    monkeypatch.setattr(ops, "CHUNK_FIELDS", 1000)
    rng = np.random.default_rng(1)
    widths = rng.integers(0, 33, 10_007)
    codes = rng.integers(0, 1 << 32, 10_007, dtype=np.uint64) & ((np.uint64(1) << widths.astype(np.uint64)) - 1)
    w = BitWriter()
    w.write(np.zeros(bit_offset, dtype=np.uint64), 1)
    for code, width in zip(codes, widths):
        w.write(np.array([code], dtype=np.uint64), int(width))
    packed = ops.pack_bits(torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(widths), bit_offset)
    assert bytes(packed.numpy()) == w.getvalue()


def test_the_reference_quantizer_works_a_chunk_of_rows_at_a_time_and_agrees_with_one_pass(monkeypatch):
    """Chunks give the rows of one pass; where one chunk's rows need float32 block parameters, every chunk uses them
    (one packet has one width)."""
    from slicer_hf.codec import ops

    y = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    y[33] *= 1e6  # past float16: this row's chunk needs float32 parameters
    args = (y, 48, 3, None, None, (1, 2, 3, 4, 6, 8), 0.08)
    whole = ops._quantize_rows_reference(*args)
    monkeypatch.setattr(ops, "REFERENCE_CHUNK_VALUES", 64 * 8)  # 8 rows a chunk
    chunked = ops._quantize_rows_reference(*args)
    assert whole.wide and chunked.wide
    for name in ("positions", "labels", "signs", "codes", "lo", "hi", "bits"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name


def test_a_kernel_or_memory_failure_while_decoding_is_the_machines_fault_not_a_malformed_packet(monkeypatch):
    """Every failure in a decode had been reported as a malformed packet: the server blamed the client for its own
    device, closed the session, and logged a warning instead of an internal error."""
    from types import SimpleNamespace

    from slicer_hf.codec import ops

    codec = build_codec("slicer", step=0.3)
    packet = codec.encode(torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0)))

    def dequantize_rows(*args):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    def unpack_bits(*args):
        return ops.unpack_bits(*args, backend="reference")

    kernels = SimpleNamespace(unpack_bits=unpack_bits, dequantize_rows=dequantize_rows)
    with monkeypatch.context() as patch:
        patch.setattr(ops, "_kernels", lambda t, backend, *rest: None if backend == "reference" else kernels)
        with pytest.raises(ops.KernelError, match="dequantize_rows failed: RuntimeError: Triton Error"):
            codec.decode(packet)
        assert all(isinstance(out, ops.KernelError) for out in codec.decode_batch([packet, packet]))  # each alone

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(CodecError):  # a packet's own failures stay the packet's
        codec.decode(packet[: len(packet) // 2])
    monkeypatch.setattr(ops, "dequantize_rows", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        codec.decode(packet)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_quantize_as_their_float32_values_on_either_backend(dtype):
    """The kernels work in float32; the reference had computed budgets and errors in the rows' half precision."""
    from slicer_hf.codec import ops

    y = (torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    candidates = (1, 2, 3, 4, 5, 6, 8)
    half, full = (ops.quantize_rows(r, 64, 4, None, None, candidates, 0.08, "reference") for r in (y, y.float()))
    for field in ("positions", "labels", "signs", "codes", "lo", "hi", "bits"):
        assert torch.equal(getattr(half, field), getattr(full, field)), field


@pytest.mark.parametrize("case", ["identity", *LOSSY_BOUNDS, "grouped"])
def test_a_packet_with_a_byte_appended_is_refused(case):
    name, params, _ = LOSSY_BOUNDS.get(case, (case, {}, None))
    codec = build_codec(name, **params)
    packet = codec.encode(hidden_states(2, 3, 64))
    with pytest.raises(CodecError):
        codec.decode(packet + b"\0")


def test_a_varint_padded_past_its_limit_with_empty_continuation_bytes_is_refused():
    from slicer_hf.codec.bits import Reader

    with pytest.raises(CodecError, match="exceeds the limit 64"):
        Reader(bytes([0x81] + [0x80] * 6 + [0x00])).varint(limit=64)  # 1, spelled in eight bytes


def test_position_sections_that_hold_too_few_positions_or_one_past_the_row_are_refused():
    """Read directly: the codecs' catch-all would turn any other failure into a CodecError too."""
    from slicer_hf.codec.indices import read_positions

    w = BitWriter()  # one bitmap row of 16 bits holding 3 positions, where 4 are kept
    w.write(np.array([0]), 1)
    bitmap = np.zeros(16, np.uint64)
    bitmap[[1, 2, 3]] = 1
    w.write(bitmap, 1)
    with pytest.raises(CodecError, match="holds 3 positions"):
        read_positions(BitReader(w.getvalue()), 1, 4, 16)
    w = BitWriter()  # one Rice row (r = 0) of gaps 0 and 7 in a row of 8: positions 0 and 8
    w.write(np.array([1]), 1)
    w.write(np.array([0]), 4)
    w.write_unary(np.array([0, 7]))
    with pytest.raises(CodecError, match="past 7"):
        read_positions(BitReader(w.getvalue()), 1, 2, 8)


def test_a_grouped_code_one_past_its_range_is_refused_not_decoded_to_another_value():
    codec = build_codec("grouped", bits=4, group_size=32, outliers=1)
    packet = bytearray(codec.encode(torch.randn(1, 100, generator=torch.Generator().manual_seed(0))))
    packet[-1] |= 0xF0  # the last 4-bit code: 15, where codes run to 7
    with pytest.raises(CodecError, match="code out of range"):
        codec.decode(bytes(packet))


@pytest.mark.parametrize("mode", ["rice", "bitmap"])
def test_positions_of_more_rows_than_one_chunk_holds_round_trip(monkeypatch, mode):
    """Rows are read a chunk of bits at a time: every chunk's rows come back, not the first chunk's alone."""
    monkeypatch.setattr(indices, "CHUNK_BITS", 64)  # 4 rows of 16 positions a chunk
    rng = np.random.default_rng(0)
    rows, kept, width = 11, 5, 16
    positions = np.sort(np.stack([rng.choice(width, kept, replace=False) for _ in range(rows)]), axis=1)
    writer = BitWriter()
    indices.write_positions(writer, positions, width, mode)
    np.testing.assert_array_equal(indices.read_positions(BitReader(writer.getvalue()), rows, kept, width), positions)
