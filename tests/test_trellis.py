"""Trellis-coded quantization in a calibrated basis (`SlicerConfig.trellis`): every code is a point its trellis state
allows, the decoder finds the encoder's points, and at equal error it spends fewer bits than rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_calibrated import D, assert_malformed_packets_raise_codec_errors_only, synthetic

from slicer_hf import SlicerConfig, build_codec
from slicer_hf.codec import trellis
from slicer_hf.codec.basis import Basis
from slicer_hf.errors import CodecError, ConfigError
from slicer_hf.tuning.calibrate import fit_basis


@pytest.fixture(scope="module")
def wide() -> Basis:
    """A basis for rows of 100 channels (more than three runs of trellises, and not a multiple of 16)."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(3000, 100, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 4.0, 100).double()
    return fit_basis(rows, torch.randn(3000, 100, generator=gen, dtype=torch.float64))


def codec(basis: Basis, step: float, trellised: bool):
    config = SlicerConfig(quantizer="ecsq", rotation="calibrated", basis=basis.digest, outliers=0, step=step)
    return build_codec(config.replace(trellis=trellised))


def walk(codes: np.ndarray) -> np.ndarray:
    """The unions an 8-state trellis allows along each interleaved trellis, walked state by state from state 0."""
    n, d = codes.shape
    out = np.zeros_like(codes)
    for row in range(n):
        for first in range(trellis.TRELLISES):
            state = 0
            for c in range(first, d, trellis.TRELLISES):
                out[row, c] = ((state >> 1) ^ (state >> 2)) & 1
                state = ((state << 1) | (int(codes[row, c]) & 1)) & 7
    return out


def test_every_code_is_a_point_of_the_union_its_trellis_state_allows():
    gen = np.random.default_rng(0)
    w = gen.laplace(size=(5, 100)) * np.linspace(0.1, 6.0, 100)
    codes = trellis.quantize(w, np.linspace(0.1, 6.0, 100), bound=200)
    assert np.array_equal(trellis.unions(codes), walk(codes))
    points = codes + 0.5 * trellis.unions(codes)
    assert np.abs(points - w).max() <= 1.0  # never farther than one step from the coordinate
    assert np.abs(codes).max() <= 200


def test_many_rows_are_searched_a_chunk_at_a_time_with_the_same_codes(monkeypatch):
    gen = np.random.default_rng(1)
    scale = np.linspace(0.2, 4.0, 40)
    w = gen.laplace(size=(23, 40)) * scale
    whole = trellis.quantize(w, scale, bound=50)
    monkeypatch.setattr(trellis, "CHUNK_VALUES", 3 * 40)  # chunks of 3 rows, the last one short
    assert np.array_equal(trellis.quantize(w, scale, bound=50), whole)


def test_codes_stay_within_the_bound():
    w = np.full((2, 40), 1e6)
    w[1] *= -1
    codes = trellis.quantize(w, np.ones(40), bound=7)
    assert codes.max() <= 7 and codes.min() >= -7


def test_the_decoder_finds_the_encoders_points(wide):
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 4.0, 100)
    c = codec(wide, 0.4, trellised=True)
    packet = c.encode(x)
    y = c.decode(packet)
    assert y.shape == x.shape and torch.equal(codec(wide, 0.1, trellised=False).decode(packet), y)
    assert c.encode(x) == packet  # deterministic
    # the rows' error is what the trellis promises: at most one step per coordinate, in the basis
    f = wide.f64
    rms = wide.row_rms(x.reshape(-1, 100).double())[:, None]
    err = ((x.reshape(-1, 100).double() - y.reshape(-1, 100).double()) / rms) @ f["forward"]
    assert err.abs().max() <= 0.4 * 1.01


@pytest.mark.parametrize("width", [D, 100])  # 100: more than three runs of trellises, each of many steps
def test_at_equal_error_the_trellis_spends_fewer_bits_than_rounding(width, wide):
    if width == D:
        rows, grads = synthetic(6000, seed=0)
        basis, held = fit_basis(rows[:4000], grads[:4000]), rows[4000:].float()
    else:
        gen = torch.Generator().manual_seed(7)
        basis, held = wide, torch.randn(2000, 100, generator=gen) * torch.linspace(0.2, 4.0, 100)
    f = basis.f64

    def cost(step: float, trellised: bool) -> tuple[float, float]:
        c = codec(basis, step, trellised)
        packet = c.encode(held.reshape(1, -1, width))
        out = c.decode(packet).reshape(-1, width).double()
        rms = basis.row_rms(held.double())[:, None]
        err = (((out - held.double()) / rms) @ f["forward"]).pow(2).sum(1).mean()
        return 8 * len(packet) / len(held), float(err)

    rounded = [cost(s, False) for s in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)]
    for step in (0.3, 0.4):
        bits, err = cost(step, True)
        errs, bitss = np.log([e for _, e in rounded]), [b for b, _ in rounded]
        assert errs[0] < np.log(err) < errs[-1]
        assert bits < 0.98 * np.interp(np.log(err), errs, bitss)  # 2% fewer bits at equal error, at least


def test_malformed_trellis_packets_raise_codec_errors_only(wide):
    c = codec(wide, 0.4, trellised=True)
    packet = c.encode(torch.randn(1, 3, 100, generator=torch.Generator().manual_seed(2)))
    assert_malformed_packets_raise_codec_errors_only(c, packet, (1, 3, 100))
    rotated = build_codec("slicer", quantizer="ecsq", outliers=0).encode(torch.randn(1, 1, 100))
    flags_at = len(rotated) - len(rotated[len(c.envelope((1, 1, 100), torch.float32)) :])
    forged = bytearray(rotated)
    forged[flags_at] |= 64  # the trellis flag without a calibrated basis
    with pytest.raises(CodecError, match="calibrated basis"):
        c.decode(bytes(forged))


def test_the_trellis_goes_with_a_calibrated_basis_and_into_the_spec_only_when_on(wide):
    with pytest.raises(ConfigError, match="trellis"):
        SlicerConfig(quantizer="ecsq", trellis=True)
    with pytest.raises(ConfigError, match="trellis"):
        SlicerConfig(quantizer="ecsq", rotation="calibrated", basis=wide.digest, trellis=1)
    config = SlicerConfig(quantizer="ecsq", rotation="calibrated", basis=wide.digest, outliers=0)
    assert "trellis" not in build_codec(config).spec()
    assert build_codec(config.replace(trellis=True)).spec()["trellis"] is True
    # the compressed downlink is trellis-coded only with a basis of its own
    both = config.replace(trellis=True, downlink_step=0.1, downlink_basis=wide.digest)
    assert both.downlink_codec().spec()["trellis"] is True
    assert "trellis" not in config.replace(trellis=True, downlink_step=0.1).downlink_codec().spec()
    assert "trellis" not in SlicerConfig(downlink_step=0.1, downlink_basis=wide.digest, trellis=True).codec_params()


def test_the_prediction_bench_credits_a_predictor_only_with_what_it_predicts():
    from slicer_hf.bench.prediction import laplace_bits, predict, ridge

    gen = np.random.default_rng(1)
    x = gen.normal(size=(4000, 8))
    z = x @ gen.normal(size=(8, 16)) * 0.5 + gen.laplace(size=(4000, 16))
    w = ridge(x[:3000], z[:3000], 1e-4)
    residual = z[3000:] - predict(w, x[3000:])
    plain_scale, scale = np.abs(z[:3000] - z[:3000].mean(0)).mean(0), np.abs(z[:3000] - predict(w, x[:3000])).mean(0)
    bits, err = laplace_bits(residual, scale, 0.3)
    plain_bits, plain_err = laplace_bits(z[3000:] - z[:3000].mean(0), plain_scale, 0.3)
    assert bits < 0.9 * plain_bits and abs(err / plain_err - 1) < 0.05  # fewer bits for the same error
    noise = gen.normal(size=(4000, 8))  # a feature that predicts nothing buys nothing
    w = ridge(noise[:3000], z[:3000], 1e-4)
    bits, _ = laplace_bits(z[3000:] - predict(w, noise[3000:]), plain_scale, 0.3)
    assert bits > 0.99 * plain_bits


@pytest.mark.parametrize("kind", ["rotated", "calibrated", "trellised"])
def test_a_large_packet_is_entropy_coded_in_slices_into_the_same_stream(wide, kind, monkeypatch):
    """constriction holds the GIL through a call: a server's codec thread coding 8M values in one call stopped every
    other session's rounds for a second. Slices of the rANS work make the same bytes, and decode the same rows."""
    import constriction

    from slicer_hf.codec import entropy

    made = build_codec("slicer", quantizer="ecsq", step=0.3) if kind == "rotated" else codec(wide, 0.3, kind[0] == "t")
    x = torch.randn(37, 100, generator=torch.Generator().manual_seed(3))
    whole = made.encode(x)
    rows = made.decode(whole)
    calls = []

    class Counted:  # an ANS coder whose calls are counted
        def __init__(self, *args):
            self.coder = plain(*args)

        def encode_reverse(self, *args):
            calls.append("encode")
            return self.coder.encode_reverse(*args)

        def decode(self, *args):
            calls.append("decode")
            return self.coder.decode(*args)

        def __getattr__(self, name):
            return getattr(self.coder, name)

    plain = constriction.stream.stack.AnsCoder
    monkeypatch.setattr(constriction.stream.stack, "AnsCoder", Counted)
    monkeypatch.setattr(entropy, "SLICE", 7)
    assert made.encode(x) == whole and torch.equal(made.decode(whole), rows)
    assert calls.count("encode") >= 37 * 100 // 7 and calls.count("decode") >= 37 * 100 // 7  # a call a slice
