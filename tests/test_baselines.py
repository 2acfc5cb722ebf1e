"""The group-wise integer baseline (`grouped`): blockwise int8/int4, grouped int6, int8 with exact outliers."""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slicer_hf import CodecError, build_codec

SETTINGS = {
    "int8+outliers": ({"bits": 8, "group_size": 4096, "outliers": 2}, 0.01),
    "int6/32+outliers": ({"bits": 6, "group_size": 32, "outliers": 2}, 0.02),
    "int4/32+outliers": ({"bits": 4, "group_size": 32, "outliers": 2}, 0.08),
    "blockwise int8/64": ({"bits": 8, "group_size": 64}, 0.03),
    "blockwise int4/64": ({"bits": 4, "group_size": 64}, 0.3),
}


def rows(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2
    if shape[-1] > 8:
        x[..., 5] *= 40
    return x


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("shape", [(1, 1, 576), (7, 100), (2, 3, 63), (1, 1)])
def test_grouped_round_trip_stays_inside_its_bound(name, shape):
    params, bound = SETTINGS[name]
    codec = build_codec("grouped", **params)
    x = rows(*shape)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape
    assert ((y - x).norm() / x.norm()).item() < bound


def test_exact_outliers_are_what_make_int8_work_on_outlier_channels():
    x = rows(4, 576)
    plain = build_codec("grouped", bits=8, group_size=4096)
    exact = build_codec("grouped", bits=8, group_size=4096, outliers=1)
    err = {c: ((c.decode(c.encode(x)) - x).norm() / x.norm()).item() for c in (plain, exact)}
    assert err[exact] < err[plain] / 5


def test_fewer_bits_cost_bytes_in_proportion():
    x = rows(1, 1, 576)
    sizes = {b: len(build_codec("grouped", bits=b, group_size=32).encode(x)) for b in (4, 6, 8)}
    assert sizes[4] < sizes[6] < sizes[8]


def test_values_beyond_float16_switch_to_float32_fields():
    x = rows(2, 64)
    x[1, 3:9] = 3e5
    codec = build_codec("grouped", bits=8, group_size=16, outliers=2)
    y = codec.decode(codec.encode(x))
    assert torch.isfinite(y).all() and (y[1, 3:9] - 3e5).abs().max() < 0.01 * 3e5


@pytest.mark.parametrize("bad", [{"bits": 1}, {"group_size": 0}, {"outliers": 65}])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(CodecError):
        build_codec("grouped", **bad)


CODEC = build_codec("grouped", bits=6, group_size=32, outliers=2)
PACKET = CODEC.encode(rows(3, 100))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, len(PACKET)), flips=st.lists(st.integers(0, 8 * len(PACKET) - 1), max_size=6))
def test_damaged_packets_raise_codec_error_only(cut, flips):
    data = bytearray(PACKET[:cut] if cut < len(PACKET) else PACKET)
    for flip in flips:
        if data:
            data[(flip >> 3) % len(data)] ^= 1 << (flip & 7)
    with contextlib.suppress(CodecError):
        assert CODEC.decode(bytes(data)).shape == (3, 100)


def test_sixteen_bit_groups_of_small_values_keep_their_precision():
    """At 16 bits a group's scale is 1/32,767 of its largest value: float16 held it subnormal long before the values
    were, and rows of size 0.1 came back with 35 times the error of float32 scales."""
    rows = 0.1 * torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    codec = build_codec("grouped", bits=16, group_size=32)
    err = (codec.decode(codec.encode(rows)) - rows).norm() / rows.norm()
    assert err < 4e-5


def test_int8_keeps_each_rows_largest_value_and_rounds_the_rest_to_half_a_step():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    codec = build_codec("int8")
    y = codec.decode(codec.encode(x))
    peak = x.abs().amax(1)
    torch.testing.assert_close(y.abs().amax(1), peak, rtol=1e-6, atol=0)
    assert ((y - x).abs() <= peak[:, None] / 254 * (1 + 1e-5)).all()
