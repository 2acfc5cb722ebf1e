"""A predicting basis for the compressed downlink: the reply's coordinates less a linear prediction from the rows the
edge sent at the same positions (both sides hold them decoded), so only what the server's layers added is coded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from test_calibrated import assert_malformed_packets_raise_codec_errors_only

from slicer_hf import ProtocolError, SlicerConfig, SlicerModelForCausalLM, build_codec, protocol
from slicer_hf.codec import basis as basis_module
from slicer_hf.codec.basis import Basis, lookup
from slicer_hf.errors import CodecError
from slicer_hf.link import open_request
from slicer_hf.server import SplitServer
from slicer_hf.tuning.calibrate import collect, fit_basis

D_IN, D = 24, 32


def residual_stream(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(given rows [n, D_IN], replies [n, D], gradients [n, D]): each reply a fixed linear map of its given row plus
    a smaller part of its own, as a last layer's output carries the split layer's row."""
    mix = torch.randn(D_IN, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    given = torch.randn(n, D_IN, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2.0, D_IN).double()
    replies = given @ mix + 0.5 * torch.randn(n, D, generator=gen, dtype=torch.float64)
    grads = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return given, replies, grads


@pytest.fixture(scope="module")
def bases() -> tuple[Basis, Basis]:
    """(predicting, plain) bases fitted on the same replies."""
    given, replies, grads = residual_stream(4000, seed=0)
    return fit_basis(replies, grads, given=given), fit_basis(replies, grads)


def codec(basis: Basis, step: float = 0.1):
    return build_codec("slicer", quantizer="ecsq", step=step, outliers=0, rotation="calibrated", basis=basis.digest)


def test_a_predicting_basis_holds_its_predictor_in_its_file_and_digest(bases, tmp_path):
    predicting, plain = bases
    assert predicting.predicts and predicting.given_width == D_IN and not plain.predicts
    assert predicting.digest != plain.digest
    for name in basis_module.PREDICTOR:  # two peers whose predictors differ must not agree on the basis
        other = {n: getattr(predicting, n) for n in predicting.tensors}
        changed = other[name].clone()
        changed[0] = 1 - changed[0] if name == "given_norm" else changed[0] + 1e-3  # given_norm holds 0s and 1s
        other[name] = changed
        assert Basis(**other).digest != predicting.digest, name
    monkey_free = basis_module._Registry()
    saved = predicting.save(tmp_path)
    old, basis_module._REGISTRY = basis_module._REGISTRY, monkey_free
    try:
        loaded = Basis.load(saved)
    finally:
        basis_module._REGISTRY = old
    assert loaded.digest == predicting.digest and torch.equal(loaded.given_weight, predicting.given_weight)
    with pytest.raises(CodecError, match="needs all of"):
        Basis(*(getattr(plain, n) for n in basis_module.TENSORS), given_weight=predicting.given_weight)


def test_the_reply_costs_fewer_bits_at_the_same_error_when_coded_against_the_sent_rows(bases):
    predicting, plain = bases
    given, replies, _ = residual_stream(400, seed=1)  # held out
    x, g = replies.float().reshape(1, -1, D), given.float().reshape(1, -1, D_IN)
    with_prediction = codec(predicting).encode(x, given=g)
    without = codec(plain).encode(x)
    error = (codec(predicting).decode(with_prediction, given=g) - x).pow(2).mean()
    assert error <= 1.1 * (codec(plain).decode(without) - x).pow(2).mean()
    assert len(with_prediction) < 0.8 * len(without)


def test_a_predicted_packet_decodes_only_against_given_rows_of_the_right_shape(bases):
    predicting, plain = bases
    given, replies, _ = residual_stream(4, seed=2)
    x, g = replies.float().reshape(2, 2, D), given.float().reshape(2, 2, D_IN)
    c = codec(predicting)
    packet = c.encode(x, given=g)
    assert torch.equal(c.decode(packet, given=g), codec(predicting, 0.5).decode(packet, given=g))  # deterministic
    with pytest.raises(CodecError, match="pass given="):
        c.decode(packet)
    with pytest.raises(CodecError, match="pass given="):
        c.encode(x)
    with pytest.raises(CodecError, match=r"shape \(2, 2, 24\)"):
        c.decode(packet, given=g.reshape(1, 4, D_IN))
    with pytest.raises(CodecError, match="NaN"):
        c.decode(packet, given=torch.full_like(g, float("nan")))
    with pytest.raises(CodecError, match="no given rows"):
        codec(plain).encode(x, given=g)
    other = c.decode(packet, given=g.flip(1))  # other rows: other replies, never an error or another shape
    assert other.shape == x.shape and not torch.allclose(other, c.decode(packet, given=g))
    assert_malformed_packets_raise_codec_errors_only(
        SimpleNamespace(decode=lambda p: c.decode(p, given=g)), packet, (2, 2, D)
    )


def calibration_windows() -> torch.Tensor:
    return torch.randint(3, 128, (16, 64), generator=torch.Generator().manual_seed(1))


def predicting_config(model) -> SlicerConfig:
    """Uplink and downlink bases fitted on a tiny model (16 x 64 tokens: a predictor of 65 inputs fitted on fewer
    rows would learn their noise), the downlink's predicting from the split rows. Split at 3 of 4 layers: the
    reply is the split row plus one layer's update."""
    layers = model.config.num_hidden_layers
    found = collect(model, calibration_windows(), [3, layers])
    up = fit_basis(*found[3])
    down = fit_basis(*found[layers], given=found[3][0])
    return SlicerConfig(
        split_layer=3,
        quantizer="ecsq",
        rotation="calibrated",
        basis=up.digest,
        outliers=0,
        step=0.05,
        downlink_step=0.05,
        downlink_basis=down.digest,
    )


def test_split_generation_with_a_predicting_downlink_stays_close_and_sends_fewer_bits_down():
    base = tiny_model("llama").eval()
    config = predicting_config(base)
    layers = base.config.num_hidden_layers
    plain = config.replace(downlink_basis=fit_basis(*collect(base, calibration_windows(), [layers])[layers]).digest)
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(2))  # held-out text of the same kind
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        ref_logits = base(ids).logits
    downlink = {}
    for name, cfg in (("predicting", config), ("plain", plain)):
        split = SlicerModelForCausalLM.from_model(base, cfg)
        with torch.no_grad():
            logits = split(ids).logits  # one reply of 64 rows
        assert torch.allclose(logits, ref_logits, atol=0.05 * ref_logits.abs().max()), name
        downlink[name] = split.wire_stats().downlink_bytes
        assert split.generate(ids, **kwargs).shape == (1, 72)  # and decode steps, one row a reply
    assert downlink["predicting"] < 0.9 * downlink["plain"]


def test_a_server_refuses_a_predicting_downlink_for_rows_of_another_width():
    model = tiny_model("llama")
    config = predicting_config(model)
    d = model.config.hidden_size
    given, _, _ = residual_stream(4 * (d + 8), seed=3)
    mismatched = fit_basis(*(torch.randn(len(given), d, dtype=torch.float64) for _ in range(2)), given=given)
    server = SplitServer(tiny_model("llama"))
    body = open_request(config, server.model.config, "tiny", 3, build_codec(config), torch.float32)
    protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, body)))  # the right width: opened
    body["downlink_codec"] = {**body["downlink_codec"], "basis": mismatched.digest}
    with pytest.raises(ProtocolError, match=f"predicts from the step's rows \\(width {D_IN}\\)"):
        protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, body)))
    assert lookup(config.downlink_basis).predicts
