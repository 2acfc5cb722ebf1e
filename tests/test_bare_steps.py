"""Leaner steady-state steps: inside a session whose codec, dtype and width are known, a step may leave out its
codec packet's envelope and an ECSQ packet the agreed step; the server rebuilds the same bytes, so decoding is
unchanged and nothing is guessed. A decode step right after the last answered one goes as NEXT, its start and batch
implied, and the server takes it only as exactly that step: a lost or replayed step is a clean error."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from slicer_hf import ProtocolError, SlicerConfig, SlicerModelForCausalLM, build_codec, protocol
from slicer_hf.link import open_request
from slicer_hf.server import SplitServer

CONFIG = SlicerConfig(split_layer=2, codec="slicer", quantizer="ecsq")


def opened(server: SplitServer, dtype: torch.dtype | None) -> dict:
    codec = build_codec(CONFIG)
    body = open_request(CONFIG, server.model.config, "tiny", 2, codec, dtype)
    reply = server.handle(protocol.encode_json(protocol.OPEN, body))
    protocol.raise_if_error(reply)
    return protocol.decode_json(reply)


def send(server: SplitServer, session: int, packet: bytes, bare: bool) -> bytes:
    step = protocol.Step(session, 1, 0, 1, 3, 0, packet, bare=bare)
    return server.handle(protocol.encode_step(step))


def test_the_bare_flag_round_trips():
    message = protocol.encode_step(protocol.Step(7, 1, 0, 1, 1, 0, b"xy", bare=True))
    assert protocol.decode_step(message, check=lambda header: None).bare


def test_a_bare_step_decodes_exactly_as_the_whole_packet():
    server = SplitServer(tiny_model("llama"))
    hidden = torch.randn(1, 3, server.hidden_size, generator=torch.Generator().manual_seed(0))
    codec = build_codec(CONFIG)
    packet = codec.encode(hidden)
    envelope = codec.envelope((1, 3, server.hidden_size), torch.float32)
    assert packet.startswith(envelope)
    whole, lean = opened(server, torch.float32), opened(server, torch.float32)
    assert whole["bare_steps"] and lean["bare_steps"]
    reply_whole = send(server, whole["session"], packet, bare=False)
    reply_lean = send(server, lean["session"], packet[len(envelope) :], bare=True)
    assert reply_lean == reply_whole


def test_a_server_that_cannot_rebuild_the_envelope_refuses_bare_steps_and_keeps_serving():
    server = SplitServer(tiny_model("llama"))
    unknown = opened(server, None)  # no dtype announced: the envelope's dtype is not known
    assert unknown["bare_steps"] is False
    hidden = torch.randn(1, 3, server.hidden_size)
    packet = build_codec(CONFIG).encode(hidden)
    with pytest.raises(ProtocolError, match="dtype announced") as caught:
        protocol.raise_if_error(send(server, unknown["session"], packet[8:], bare=True))
    assert caught.value.code == "bad_request"
    other = opened(server, torch.float32)
    protocol.decode_reply(send(server, other["session"], packet, bare=False))  # others are served as before


def test_a_bare_ecsq_packet_leaves_the_agreed_step_out_and_comes_back_byte_for_byte():
    codec = build_codec(CONFIG)
    hidden = torch.randn(1, 1, 64)
    shape = (1, 1, 64)
    packet = codec.encode(hidden)
    envelope = codec.envelope(shape, torch.float32)
    body = codec.bare(packet, shape, torch.float32)
    assert len(body) == len(packet) - len(envelope) - 3  # outlier count (1 byte) and step (2) are the spec's
    assert codec.unbare(body, shape, torch.float32) == packet
    codec.step = 0.5  # adaptive bitrate moved the step: the packet says so, the peer's codec still has the spec's
    moved = codec.encode(hidden)
    assert len(codec.bare(moved, shape, torch.float32)) == len(moved) - len(envelope)
    assert build_codec(CONFIG).unbare(codec.bare(moved, shape, torch.float32), shape, torch.float32) == moved
    assert codec.bare(packet, (1, 2, 64), torch.float32) is None  # another shape: not this session's packet


def test_a_next_step_round_trips_with_start_and_batch_from_the_session():
    mask = torch.tensor([[True], [False]])
    message = protocol.encode_step(protocol.Step(7, 9, 40, 2, 1, 0, b"xy", mask, bare=True, next=True))
    assert message[1] == protocol.NEXT and len(message) == 2 + 1 + 1 + 1 + 1 + 2

    def from_session(step: protocol.Step) -> None:
        assert step.next and (step.session, step.seq, step.tokens) == (7, 9, 1)
        step.start, step.batch = 40, 2

    step = protocol.decode_step(message, check=from_session)
    assert (step.start, step.batch, step.payload, step.bare) == (40, 2, b"xy", True)
    assert torch.equal(step.mask, mask)
    with pytest.raises(ValueError, match="one position"):
        protocol.encode_step(protocol.Step(7, 9, 40, 2, 3, 0, b"xy", next=True))


def test_a_step_carries_the_mask_of_its_earlier_positions_only_whole_and_never_as_next():
    mask, history = torch.tensor([[True], [True]]), torch.tensor([[True, False, True], [True, True, True]])
    step = protocol.decode_step(
        protocol.encode_step(protocol.Step(7, 9, 3, 2, 1, 0, b"xy", mask, history=history)), check=lambda s: None
    )
    assert torch.equal(step.history, history) and torch.equal(step.mask, mask) and step.payload == b"xy"
    with pytest.raises(ValueError, match=r"\[B, start\]"):
        protocol.encode_step(protocol.Step(7, 9, 4, 2, 1, 0, b"xy", mask, history=history))
    with pytest.raises(ValueError, match="no grid or history"):
        protocol.encode_step(protocol.Step(7, 9, 3, 2, 1, 0, b"xy", mask, history=history, next=True))
    cut = protocol.encode_step(protocol.Step(7, 9, 3, 2, 1, 0, b"", mask, history=history))[:-1]
    with pytest.raises(ProtocolError, match="malformed"):  # its bits missing: refused, not read past the end
        protocol.decode_step(cut, check=lambda s: None)
    # a history with no mask columns: the server had dropped it with the mask the step left off, and answered
    with pytest.raises(ValueError, match="goes with its own mask columns"):
        protocol.encode_step(protocol.Step(7, 9, 3, 2, 1, 0, b"xy", history=history))
    message = bytearray(protocol.encode_step(protocol.Step(7, 9, 3, 2, 1, 0, b"xy", mask, history=history)))
    assert message[7] == protocol.MASK_ONES | protocol.HISTORY  # the flags, after five one-byte varints
    message[7] = protocol.HISTORY
    with pytest.raises(ProtocolError, match="history mask came without its mask columns") as refused:
        protocol.decode_step(bytes(message), check=lambda s: None)
    assert refused.value.code == "malformed"


def decode_step_message(session: int, seq: int, start: int, packet: bytes, next_: bool) -> bytes:
    ones = torch.ones(1, 1, dtype=torch.bool)
    return protocol.encode_step(protocol.Step(session, seq, start, 1, 1, 0, packet, ones, next=next_))


def test_the_server_takes_a_next_step_only_right_after_the_last_one():
    server = SplitServer(tiny_model("llama"))
    codec = build_codec(CONFIG)
    d = server.hidden_size
    prompt, token = codec.encode(torch.randn(1, 3, d)), codec.encode(torch.randn(1, 1, d))
    a, b = opened(server, torch.float32), opened(server, torch.float32)
    assert a["next_steps"]
    replies = {}
    for name, session in (("whole", a["session"]), ("next", b["session"])):
        protocol.decode_reply(server.handle(protocol.encode_step(protocol.Step(session, 1, 0, 1, 3, 0, prompt))))
        replies[name] = server.handle(decode_step_message(session, 2, 3, token, next_=name == "next"))
    assert replies["next"] == replies["whole"]  # the same step: start 3, batch 1
    # a lost step (seq 3 never arrived) or a replayed one: refused, the session closed, the other one untouched
    for seq in (4, 2):
        victim = opened(server, torch.float32)["session"]
        server.handle(protocol.encode_step(protocol.Step(victim, 1, 0, 1, 3, 0, prompt)))
        server.handle(decode_step_message(victim, 2, 3, token, next_=True))
        with pytest.raises(ProtocolError, match="lost or replayed") as caught:
            protocol.raise_if_error(server.handle(decode_step_message(victim, seq, 0, token, next_=True)))
        assert caught.value.code == "bad_seq" and victim not in server.sessions
    fresh = opened(server, torch.float32)["session"]
    with pytest.raises(ProtocolError, match="lost or replayed"):  # no step yet: nothing to follow
        protocol.raise_if_error(server.handle(decode_step_message(fresh, 1, 0, token, next_=True)))
    protocol.decode_reply(server.handle(decode_step_message(a["session"], 3, 4, token, next_=True)))


def generate_lean_and_whole(base, config: SlicerConfig, new_tokens: int, whole) -> tuple:
    """(lean wire stats, whole wire stats) of the same greedy generation, `whole(link)` making the second run's link
    send or ask for whole messages; the two runs must give the same tokens."""
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    runs = []
    for lean in (True, False):
        model = SlicerModelForCausalLM.from_model(base, config)
        if not lean:
            whole(model._link_for(2))
        runs.append((model.generate(ids, do_sample=False, **kwargs), model.wire_stats()))
    assert torch.equal(runs[0][0], runs[1][0])
    return runs[0][1], runs[1][1]


def test_split_generation_sends_lean_steps_and_generates_the_same_tokens():
    base = tiny_model("llama").eval()

    def make_whole(link) -> None:  # a server that does not offer bare or next steps gets whole ones
        link.open()
        link._bare = link._next = False

    lean, whole = generate_lean_and_whole(base, CONFIG, 8, make_whole)
    envelope = len(build_codec(CONFIG).envelope((1, 1, base.config.hidden_size), torch.float32))
    steps = lean.uplink_messages - 1  # the OPEN is a message too; the prompt's step, then 7 decode steps
    # every packet: the envelope and the agreed step (3 bytes); every decode step: start, B, T and need_from
    assert whole.uplink_bytes - lean.uplink_bytes == (envelope + 3) * steps + 4 * (steps - 1)
    assert lean.uplink_payload_bytes == whole.uplink_payload_bytes  # the codec's own bytes are unchanged


def test_compressed_replies_go_bare_to_an_edge_that_asks_and_decode_the_same():
    base = tiny_model("llama").eval()

    def make_whole(link) -> None:  # as an older edge asks: whole packets back
        assert link.open_request.pop("bare_replies") is True

    lean, whole = generate_lean_and_whole(base, CONFIG.replace(downlink_step=0.1), 6, make_whole)
    envelope = len(build_codec(CONFIG).envelope((1, 1, base.config.hidden_size), torch.float32))
    replies = lean.downlink_messages - 1  # the OPENED is a message too
    assert whole.downlink_bytes - lean.downlink_bytes == (envelope + 3) * replies


def test_an_exact_downlink_session_gets_whole_replies_even_when_asked_for_bare_ones():
    server = SplitServer(tiny_model("llama"))
    body = open_request(CONFIG, server.model.config, "tiny", 2, build_codec(CONFIG), torch.float32)
    session = protocol.decode_json(server.handle(protocol.encode_json(protocol.OPEN, {**body, "bare_replies": True})))
    reply = send(server, session["session"], build_codec(CONFIG).encode(torch.randn(1, 3, server.hidden_size)), False)
    assert protocol.decode_reply(reply)[1] == protocol.REPLY_HIDDEN  # no downlink codec: exact, whole
