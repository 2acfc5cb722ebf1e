"""Leaner steady-state steps: inside a session whose codec, dtype and width are known, a STEP may leave out its
codec packet's envelope; the server rebuilds the same bytes, so decoding is unchanged and nothing is guessed."""

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


def test_split_generation_leaves_the_envelope_out_and_generates_the_same_tokens():
    base = tiny_model("llama").eval()
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    runs = {}
    for bare in (True, False):
        model = SlicerModelForCausalLM.from_model(base, CONFIG)
        link = model._link_for(2)
        link.open()
        link._bare = bare and link._bare  # a server that does not offer bare steps gets whole packets
        runs[bare] = (model.generate(ids, **kwargs), model.wire_stats())
    (lean_ids, lean), (whole_ids, whole) = runs[True], runs[False]
    assert torch.equal(lean_ids, whole_ids)
    envelope = len(build_codec(CONFIG).envelope((1, 1, base.config.hidden_size), torch.float32))
    steps = lean.uplink_messages - 1  # the OPEN is a message too
    assert whole.uplink_bytes - lean.uplink_bytes == envelope * steps
    assert lean.uplink_payload_bytes == whole.uplink_payload_bytes  # the codec's own bytes are unchanged
