"""A chained uplink (`predict_previous`): each row coded less a prediction from the decoded row before it in its
sequence. Both sides rebuild that row with the same arithmetic, so they stay in step bit for bit; a step that would
continue from rows the server does not hold is refused, never decoded against other rows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

from slicer_hf import ProtocolError, SlicerConfig, SlicerModelForCausalLM, build_codec, protocol
from slicer_hf.codec.basis import Basis
from slicer_hf.errors import CodecError, ConfigError
from slicer_hf.link import open_request
from slicer_hf.server import SplitServer
from slicer_hf.tuning.calibrate import collect, fit_basis

D, T = 32, 16


def sequences(n: int, seed: int) -> torch.Tensor:
    """`[n, T, D]`: rows that follow the row before them (an AR(1) process), as a layer's states drift slowly."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, D, generator=gen, dtype=torch.float64)]
    for _ in range(T - 1):
        rows.append(0.9 * rows[-1] + 0.45 * torch.randn(n, D, generator=gen, dtype=torch.float64))
    return torch.stack(rows, 1)


def before(x: torch.Tensor) -> torch.Tensor:
    """Each row's predecessor in its sequence, zeros before the first."""
    out = x.roll(1, dims=1)
    out[:, 0] = 0.0
    return out


@pytest.fixture(scope="module")
def bases() -> tuple[Basis, Basis]:
    """(chained, plain) bases fitted on the same rows."""
    x = sequences(300, seed=0)
    rows, grads = x.reshape(-1, D), torch.randn(300 * T, D, generator=torch.Generator().manual_seed(5)).double()
    return fit_basis(rows, grads, given=before(x).reshape(-1, D)), fit_basis(rows, grads)


def codec(basis: Basis, chained: bool, step: float = 0.2):
    return build_codec(
        "slicer",
        quantizer="ecsq",
        step=step,
        outliers=0,
        rotation="calibrated",
        basis=basis.digest,
        trellis=True,
        predict_previous=chained,
    )


def test_one_packet_or_one_row_at_a_time_decode_to_the_very_same_rows(bases):
    c = codec(bases[0], chained=True)
    x = sequences(3, seed=1).float()
    whole = c.decode(c.encode(x))
    previous, rows = None, []
    for t in range(T):  # as decoding sends them: each step continues from the rows the last one left
        row = c.decode(c.encode(x[:, t : t + 1], given=previous), given=previous)
        rows.append(row)
        previous = row[:, -1]
    assert torch.equal(whole, torch.cat(rows, 1))
    assert torch.equal(c.decode(c.encode(x), given=torch.zeros(3, D)), whole)  # None: the sequences start here


@pytest.mark.parametrize("chained", [True, False])
def test_packets_decoded_together_give_what_each_decodes_alone_and_a_bad_one_fails_alone(bases, chained):
    c = codec(bases[0] if chained else bases[1], chained=chained)
    x = sequences(5, seed=4).float()
    givens = [x[:2, 2], x[2:3, 5], None, x[3:, 0]] if chained else [None] * 4
    packets = [
        c.encode(x[:2, 3:4], given=givens[0]),  # a decode step of two sequences
        c.encode(x[2:3, 6:7], given=givens[1]),  # one of one
        c.encode(x[4:, :4]),  # a prefill
        c.encode(x[3:, 1:2], given=givens[3]),
    ]
    shapes = [(2, 1, D), (1, 1, D), (1, 4, D), (2, 1, D)]
    alone = [c.decode(p, expect_shape=s, given=g) for p, s, g in zip(packets, shapes, givens)]
    together = c.decode_batch(
        packets + [packets[0][:-3]], expect_shapes=shapes + [shapes[0]], givens=givens + [givens[0]]
    )
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert isinstance(together[-1], CodecError)  # a truncated packet fails alone


def test_the_chain_spends_fewer_bits_at_the_same_error(bases):
    x = sequences(40, seed=2).float()  # held out
    chained, plain = codec(bases[0], chained=True), codec(bases[1], chained=False)
    sizes, errors = {}, {}
    for name, c in (("chained", chained), ("plain", plain)):
        previous, sizes[name], decoded = None, 0, []
        for t in range(T):
            packet = c.encode(x[:, t : t + 1], given=previous)
            sizes[name] += len(packet)
            decoded.append(c.decode(packet, given=previous))
            previous = decoded[-1][:, -1] if c.chains else None
        errors[name] = (torch.cat(decoded, 1) - x).pow(2).mean()
    assert errors["chained"] <= 1.1 * errors["plain"]
    assert sizes["chained"] < 0.85 * sizes["plain"]


def test_a_chain_needs_a_basis_that_predicts_rows_of_its_width_and_a_calibrated_config(bases):
    with pytest.raises(CodecError, match="predict_previous needs a basis that predicts"):
        codec(bases[1], chained=True)
    with pytest.raises(ConfigError, match="predict_previous"):
        SlicerConfig(quantizer="ecsq", predict_previous=True)
    c = codec(bases[0], chained=True)
    with pytest.raises(CodecError, match=r"shape \(2, 32\)"):
        c.encode(sequences(2, seed=3).float(), given=torch.zeros(2, 4, D))
    with pytest.raises(CodecError, match="sequences"):
        c.encode(torch.randn(D))


def chained_config(model) -> SlicerConfig:
    """An uplink basis fitted on a tiny model's rows at split 2, each predicted from the row before it."""
    windows = torch.randint(3, 128, (16, 64), generator=torch.Generator().manual_seed(1))
    rows, grads = collect(model, windows, [2])[2]
    previous = before(rows.reshape(16, 64, -1)).reshape(rows.shape)
    basis = fit_basis(rows, grads, given=previous)
    return SlicerConfig(
        split_layer=2,
        quantizer="ecsq",
        rotation="calibrated",
        basis=basis.digest,
        outliers=0,
        step=0.05,
        trellis=True,
        predict_previous=True,
    )


class CloseSessionAt(StoppingCriteria):
    """Drops the server's session once, after `at` generated tokens: the edge must replay onto a fresh one."""

    def __init__(self, model, at: int) -> None:
        self.model, self.at, self.calls = model, at, 0

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            server = self.model.split_server
            server.close_session(next(iter(server.sessions)))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_split_generation_keeps_both_sides_in_step_through_chained_steps_and_a_replay():
    base = tiny_model("llama").eval()
    config = chained_config(base)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    runs = []
    for interrupt in (False, True):
        model = SlicerModelForCausalLM.from_model(base, config)
        stop = StoppingCriteriaList([CloseSessionAt(model, 4)] if interrupt else [])
        out = model.generate(ids, stopping_criteria=stop, **kwargs)
        link, server = model._link_for(2), model.split_server
        held = next(iter(server.sessions.values())).last_rows
        assert torch.equal(held, link._chain[1]) and link._chain[0] == out.shape[1] - 1  # the same rows, bit for bit
        assert all(s.chained for s in link._sent[1:]) and not link._sent[0].chained  # the prompt starts afresh
        runs.append((out, model.wire_stats()))
    assert runs[1][1].failovers == 1 and torch.equal(runs[0][0], runs[1][0])  # the replay rebuilt the same state


def test_the_server_refuses_a_chained_step_it_cannot_continue_and_serves_the_rest():
    base = tiny_model("llama")
    config = chained_config(base)
    server = SplitServer(tiny_model("llama"))
    c = build_codec(config)
    d = server.hidden_size

    def session() -> int:
        body = open_request(config, server.model.config, "tiny", 2, c, torch.float32)
        return protocol.decode_json(server.handle(protocol.encode_json(protocol.OPEN, body)))["session"]

    prompt = torch.randn(1, 3, d)
    token = c.encode(torch.randn(1, 1, d), given=c.decode(c.encode(prompt))[:, -1])
    good, victim = session(), session()
    for s in (good, victim):
        protocol.decode_reply(server.handle(protocol.encode_step(protocol.Step(s, 1, 0, 1, 3, 0, c.encode(prompt)))))
    # continuing from position 1, which the server no longer holds (it holds position 2): refused, session closed
    crop = protocol.Step(victim, 2, 2, 1, 1, 0, token, chained=True)
    with pytest.raises(ProtocolError, match="at position 1; this session holds 1 at position 2") as caught:
        protocol.raise_if_error(server.handle(protocol.encode_step(crop)))
    assert caught.value.code == "bad_seq" and victim not in server.sessions
    step = protocol.Step(good, 2, 3, 1, 1, 0, token, chained=True)
    assert protocol.decode_reply(server.handle(protocol.encode_step(step)))[0] == 2  # the other session: served
    plain = SlicerConfig(split_layer=2, quantizer="ecsq")
    body = open_request(plain, server.model.config, "tiny", 2, build_codec(plain), torch.float32)
    other = protocol.decode_json(server.handle(protocol.encode_json(protocol.OPEN, body)))["session"]
    chained = protocol.Step(other, 1, 0, 1, 1, 0, build_codec(plain).encode(torch.randn(1, 1, d)), chained=True)
    with pytest.raises(ProtocolError, match="needs a chained codec"):
        protocol.raise_if_error(server.handle(protocol.encode_step(chained)))


def test_a_predicting_uplink_basis_with_the_chain_off_is_refused_by_both_sides_at_open():
    """Such an uplink would code every row against given rows no step carries: each step had failed instead."""
    base = tiny_model("llama")
    config = chained_config(base).replace(predict_previous=False)
    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), config)
    with pytest.raises(ConfigError, match="predicts each row from the one before it: keep predict_previous=True"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    server = SplitServer(tiny_model("llama"))
    c = build_codec(config)
    body = open_request(config, server.model.config, "tiny", 2, c, torch.float32)
    with pytest.raises(ProtocolError, match="predicts each row from given rows") as caught:
        protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, body)))
    assert caught.value.code == "bad_request" and not server.sessions


def test_the_rate_distortion_measure_codes_a_chained_uplink_as_a_session_sends_it():
    from slicer_hf.compat import decoder_layers
    from slicer_hf.tuning.distortion import measure

    model = tiny_model("llama").eval()
    config = chained_config(model)
    windows = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    _, [row] = measure(model, windows, [2], [{"codec": config.codec, **config.codec_params()}])
    c, seen = build_codec(config), []  # the same rows, coded as split generation codes a prompt, one token a step
    handle = decoder_layers(model)[1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        for ids in windows:
            model(ids[None], use_cache=False)
    handle.remove()
    bits = 0
    for x in seen:
        previous = None
        for t in range(x.shape[1]):
            packet = c.encode(x[:, t : t + 1], given=previous)
            bits += 8 * len(packet)
            previous = c.decode(packet, given=previous)[:, -1]
    assert row["bits_per_token"] == bits / windows.numel()
    predicting = {**config.codec_params(), "predict_previous": False}  # predicts from given rows, as a downlink
    with pytest.raises(ConfigError, match="measure it with `slicer-hf eval`"):
        measure(model, windows, [2], [{"codec": config.codec, **predicting}])
