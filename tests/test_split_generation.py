"""The exactness anchor and generate() behaviour: with a lossless codec, split generation is plain
transformers generation, token for token."""

import copy
import inspect
import struct

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, VOCAB, RecordingTransport, tiny_model, transformers_log
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from slicer_hf import ConfigError, ProtocolError, SlicerConfig, SlicerModelForCausalLM, build_codec, protocol
from slicer_hf.link import StepLimits
from slicer_hf.server import ServerLimits, SplitServer
from slicer_hf.transport import LocalTransport

LOSSLESS = SlicerConfig(codec="identity")
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
MISTRAL_W4 = {**LLAMA, "sliding_window": 4}  # a window the prompts below fill


def split(model, **overrides):
    return SlicerModelForCausalLM.from_model(model, LOSSLESS.replace(**overrides))


def prompt(batch=1, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_padded(pad_id=0):
    ids = prompt(3, 9, seed=1)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 5]):
        ids[row, :pad], mask[row, :pad] = pad_id, 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_split_equals_plain_generate(model_pair, arch, k):
    ref, model = model_pair(arch)
    ids = prompt()
    expected = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(split(model).generate(ids, max_new_tokens=12, do_sample=False, split_layer=k), expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_left_padded_batch_equals_plain_generate(model_pair, arch):
    ref, model = model_pair(arch)
    ids, mask = left_padded(ref.config.pad_token_id)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = split(model).generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, split_layer=2)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "limit", [{"max_step_elements": 3 * 4 * 64}, {"max_step_tokens": 4}, {"max_message_bytes": 3600}]
)  # (3600 bytes: 3150 past the headroom, 787 float32 values: four positions of three 64-wide rows)
def test_a_prompt_goes_up_in_steps_that_fit_the_limits_the_server_named(reference_models, limit):
    ref = reference_models["llama"]
    ids, mask = left_padded(ref.config.pad_token_id)  # 3 x 9: four positions of three rows fit a step
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    transport = RecordingTransport(SplitServer(copy.deepcopy(ref), limits=ServerLimits(**limit)))
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=2), transport=transport)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert transport.steps == [(3, 4), (3, 4)]  # the prompt's last position and the decode steps go as NEXT


def test_plain_positions_are_left_for_the_server_to_derive(reference_models, monkeypatch):
    """No step of an unpadded generation carries position ids (4 bytes a position): the server counts them from the
    step's start, the decode steps' too."""
    from slicer_hf.link import SuffixLink

    sent, step = [], SuffixLink.step

    def spy(self, hidden, start, mask, positions, *args, **kwargs):
        sent.append((start, positions))
        return step(self, hidden, start, mask, positions, *args, **kwargs)

    monkeypatch.setattr(SuffixLink, "step", spy)
    model = split(copy.deepcopy(reference_models["llama"]))
    ids = prompt()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, split_layer=1)
    assert [start for start, _ in sent] == [0, *range(ids.shape[1], ids.shape[1] + 3)]
    assert all(positions is None for _, positions in sent)


@pytest.mark.parametrize("earlier", [0, 4000])
def test_a_step_cut_to_the_servers_message_size_fits_it_with_its_position_ids_and_masks(earlier):
    """A step is sized by its values at 4 bytes each; a left-padded batch also sends int32 position ids, mask bits
    and, where the server's mask of the `earlier` positions differs, that mask: 64 rows of 250 positions carry 64 KB
    of position ids, past the room a message keeps for its headers."""
    limits = StepLimits(message_bytes=4_096_000 + 65_536)
    rows, width = 64, 64
    history = rows * (earlier + 250) // 8 + 1 if earlier else 0  # what modeling passes: the most it may send
    chunk = limits.positions(rows, width, wanted=250, extra_bits=33, fixed_bytes=history)
    mask = torch.ones(rows, earlier + chunk, dtype=torch.bool)
    mask[::2, :5] = False  # left padding
    step = protocol.Step(
        1, 1, earlier, rows, chunk, 0, build_codec("identity").encode(torch.randn(rows, chunk, width)),
        mask=mask[:, earlier:], positions=torch.arange(chunk).expand(rows, chunk) + 7,
        history=mask[:, :earlier] if earlier else None,
    )  # fmt: skip
    assert limits.fits(step, width) and chunk >= 240  # and not cut far below what fits


def test_outputs_go_up_in_steps_whose_replies_fit_the_servers_message_size(reference_models):
    ref = reference_models["llama"]
    ids, mask = left_padded(ref.config.pad_token_id)  # 3 x 9: the logits of four positions of three rows fit a reply
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, labels=labels)
    limits = ServerLimits(max_message_bytes=8192)  # 7,168 bytes of replies: the logits of 4 positions of 3 rows
    transport = RecordingTransport(SplitServer(copy.deepcopy(ref), limits=limits))
    config = LOSSLESS.replace(split_layer=2, downlink="logits")
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), config, transport=transport)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, labels=labels)
    assert transport.steps == [(3, 4), (3, 4)]  # and the last position as NEXT: 27 positions' logits would not fit
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)
    assert transport.steps[2:] == [(3, 9)]  # generate() wants the last position's logits alone: its prompt goes whole
    tiny = SplitServer(copy.deepcopy(ref), limits=ServerLimits(max_message_bytes=1024))
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), config, transport=LocalTransport(tiny))
    with pytest.raises(ProtocolError, match="one output of this step takes up to 1,536 bytes"):  # 3 rows' logits
        model(ids, attention_mask=mask)
    assert tiny.stats_dict()["errors"] == {}  # refused by the edge: the server computed nothing in vain


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_seeded_sampling_equals_plain_generate(model_pair, arch):
    ref, model = model_pair(arch)
    ids, mask = left_padded(ref.config.pad_token_id)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    expected = ref.generate(ids, **kwargs)
    model = split(model)
    torch.manual_seed(7)
    assert torch.equal(model.generate(ids, split_layer=3, **kwargs), expected)


def test_unsplit_runs_the_whole_model_and_refuses_a_cache_made_split(model_pair):
    from slicer_hf import SlicerError, unsplit

    ref, model = model_pair("llama")
    model = split(model)
    ids = prompt(1, 6)
    made = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    with unsplit(model) as whole:
        assert type(whole) is type(ref)
        assert torch.equal(whole.generate(ids, max_new_tokens=3, do_sample=False), made.sequences)
        with pytest.raises(SlicerError, match="made by split generation"):  # its top layers hold placeholders
            whole(made.sequences[:, -1:], past_key_values=made.past_key_values)
    assert type(model) is not type(ref)


def test_a_forward_with_gradients_on_warns_that_they_do_not_cross_the_split(model_pair):
    ref, model = model_pair("llama")
    model = split(model)
    with pytest.warns(UserWarning, match="gradients do not cross the split") as warned:
        loss = model(prompt(1, 6), labels=prompt(1, 6)).loss
    assert warned[0].filename == __file__  # it names the caller's line
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None  # what the warning says
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        model(prompt(1, 6))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_split_forward_returns_the_same_logits(model_pair, arch):
    ref, model = model_pair(arch)
    ids = prompt(2, 11)
    expected = ref(ids).logits
    got = split(model)(ids, split_layer=2).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("downlink", ["hidden", "logits", "topk_logits"])
def test_long_prompts_go_up_in_chunks(model_pair, downlink):
    """The early chunks want no output back; the server still runs them (their positions fill its cache)."""
    ref, model = model_pair("llama")
    ids = prompt(1, 40)
    model = split(model, prefill_chunk_tokens=16, downlink=downlink)
    got = model.generate(ids, max_new_tokens=5, do_sample=False, split_layer=2)
    expected = ref.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)
    # 40 prompt tokens in 3 chunks, then 4 single-token decode steps
    assert model.wire_stats().uplink_messages == 1 + 3 + 4  # open + steps


def test_generate_arguments_behave_as_in_transformers(model_pair):
    ref, model = model_pair("qwen2")
    model = split(model)
    ids = prompt()

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 4, dtype=torch.bool)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    def ban_token_5(input_ids, scores):
        scores[:, 5] = -float("inf")
        return scores

    kwargs = dict(
        max_new_tokens=10,
        do_sample=False,
        repetition_penalty=1.3,
        logits_processor=LogitsProcessorList([ban_token_5]),
        stopping_criteria=StoppingCriteriaList([StopAfter()]),
    )
    expected = ref.generate(ids, **kwargs)
    streamer = Collect()
    got = model.generate(ids, streamer=streamer, **kwargs)
    assert torch.equal(got, expected)
    assert got.shape[1] == ids.shape[1] + 4 and 5 not in got[0, ids.shape[1] :].tolist()
    assert torch.equal(torch.cat([c.reshape(1, -1) for c in streamer.chunks[:-1]], dim=1), got)


def test_eos_stops_generation_like_transformers(model_pair):
    ref, model = model_pair("llama")
    ids = prompt()
    first = ref.generate(ids, max_new_tokens=6, do_sample=False)
    eos = int(first[0, ids.shape[1] + 2])
    expected = ref.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = split(model).generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected) and got.shape[1] < first.shape[1]


@pytest.mark.parametrize("downlink", ["topk_logits", "logits"])
def test_logit_downlinks_keep_greedy_output(model_pair, downlink):
    ref, model = model_pair("mistral")
    ids, mask = left_padded()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    model = split(model, downlink=downlink, downlink_topk=8)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), expected)


@pytest.mark.parametrize("downlink", ["hidden", "logits"])
def test_labels_give_the_unsplit_models_loss(model_pair, downlink):
    ref, model = model_pair("llama")
    ids = prompt(length=9)
    with torch.no_grad():
        assert torch.allclose(split(model, downlink=downlink)(ids, labels=ids).loss, ref(ids, labels=ids).loss)


@pytest.mark.parametrize("downlink", ["hidden", "logits"])
def test_the_loss_comes_first_and_takes_the_forwards_loss_arguments_as_in_transformers(model_pair, downlink):
    ref, model = model_pair("llama")
    model = split(model, downlink=downlink)
    ids = prompt(2, 9)
    shifted = torch.cat([ids[:, 1:].flip(1), torch.full((2, 1), -100)], 1)  # not the labels shifted
    for extra in ({}, {"num_items_in_batch": torch.tensor(4)}, {"shift_labels": shifted}):
        with torch.no_grad():
            want, got = ref(ids, labels=ids, **extra), model(ids, labels=ids, **extra)
        assert list(got.keys()) == list(want.keys())  # out[0] is the loss
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    as_tuple = model(ids, labels=ids, return_dict=False)
    assert as_tuple[0].ndim == 0


@pytest.mark.parametrize("downlink", ["hidden", "logits"])
def test_logits_to_keep_as_indices_keeps_those_positions(model_pair, downlink):
    ref, model = model_pair("llama")
    ids, keep = prompt(2, 9), torch.tensor([0, 4])
    with torch.no_grad():
        want = ref(ids, logits_to_keep=keep).logits
        got = split(model, downlink=downlink)(ids, logits_to_keep=keep).logits
    assert got.shape == want.shape == (2, 2, VOCAB)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_labels_are_refused_with_a_top_k_downlink_not_scored_against_minus_infinity(model_pair):
    _, model = model_pair("llama")
    ids = prompt(length=9)
    with pytest.raises(NotImplementedError, match="labels"):
        split(model, downlink="topk_logits")(ids, labels=ids)


def test_topk_logits_downlink_is_smaller_than_hidden(model_pair):
    _, model = model_pair("llama")
    sizes = {}
    for downlink in ["hidden", "topk_logits"]:
        m = split(model, downlink=downlink, downlink_topk=4)
        m.generate(prompt(), max_new_tokens=8, do_sample=False)
        sizes[downlink] = m.wire_stats().downlink_bytes
        m.close_session()
    assert sizes["topk_logits"] < sizes["hidden"]


def test_one_session_spans_several_generate_calls(model_pair):
    ref, model = model_pair("gpt_neox")
    model = split(model)
    for seed in range(3):
        ids = prompt(seed=seed)
        assert torch.equal(
            model.generate(ids, max_new_tokens=5, do_sample=False), ref.generate(ids, max_new_tokens=5, do_sample=False)
        )
    server = model.split_server
    assert len(server.sessions) == 1
    model.close_session()
    assert len(server.sessions) == 0


def test_changing_split_layer_reopens_the_session(model_pair):
    ref, model = model_pair("phi")
    model = split(model)
    ids = prompt()
    expected = ref.generate(ids, max_new_tokens=5, do_sample=False)
    for k in (1, 3, 2):
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, split_layer=k), expected)
    assert len(model.split_server.sessions) == 1


def test_wire_stats_count_what_crossed(model_pair):
    _, model = model_pair("llama")
    model = split(model)
    model.generate(prompt(length=7), max_new_tokens=4, do_sample=False)
    stats = model.wire_stats()
    assert stats.tokens == 7 + 3  # prompt, then one row per decode step (the last token is not sent)
    assert stats.uplink_messages == stats.downlink_messages == 1 + 4
    assert stats.uplink_payload_bytes < stats.uplink_bytes
    server = model.split_server.stats
    assert server.bytes_in == stats.uplink_bytes and server.bytes_out == stats.downlink_bytes
    model.reset_wire_stats()
    assert model.wire_stats().uplink_bytes == 0


def test_another_split_model_run_inside_generate_splits_at_its_own_layer(model_pair, reference_models):
    """A model run by a logits processor (a reward model, a judge) inside another's generate() takes its own split,
    not the running call's."""
    ref, model = model_pair("llama")
    outer, inner = split(model), split(copy.deepcopy(reference_models["llama"]), split_layer=2)
    splits = []

    def judge(ids, scores):
        inner(ids)
        splits.append(inner._slicer_link.open_request["split_layer"])
        return scores

    ids = prompt()
    for k in (1, 3):
        got = outer.generate(
            ids, max_new_tokens=3, do_sample=False, split_layer=k, logits_processor=LogitsProcessorList([judge])
        )
        assert torch.equal(got, ref.generate(ids, max_new_tokens=3, do_sample=False))
    assert splits == [2] * 6


def test_an_attention_set_again_on_a_model_with_an_in_process_server_is_run_as_it_asks(model_pair):
    """The in-process server routes the model's attention through its KV store; `set_attn_implementation` after
    that must not leave the store's rows under plain SDPA with no mask (tokens were wrong), and eager attention gets
    a server of its own (it had been refused)."""
    ref, model = model_pair("llama")
    model, (ids, mask) = split(model), left_padded()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation("sdpa")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)
    eager_ref = copy.deepcopy(ref)  # (the fixture's model stays as it is for the tests after this one)
    for each in (model, eager_ref):
        each.set_attn_implementation("eager")
    eager = eager_ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), eager)
    model.set_attn_implementation("sdpa")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)


def test_continuous_batching_is_refused_by_name(model_pair):
    _, model = model_pair("llama")
    with pytest.raises(NotImplementedError, match="continuous batching"):
        split(model).generate(prompt(2), max_new_tokens=2, do_sample=False, cache_implementation="paged")


@pytest.mark.parametrize("kind", ["static", "sliding_window"])
def test_a_static_cache_is_refused_naming_the_generate_argument_that_asks_for_it(model_pair, kind):
    _, model = model_pair("llama")
    with pytest.raises(NotImplementedError, match="cache_implementation='static', 'sliding_window'"):
        split(model).generate(prompt(2), max_new_tokens=2, do_sample=False, cache_implementation=kind)


def test_a_numpy_integer_is_a_split_layer(model_pair):
    ref, model = model_pair("llama")
    ids = prompt()
    got = split(model).generate(ids, max_new_tokens=3, do_sample=False, split_layer=np.int64(2))
    assert torch.equal(got, ref.generate(ids, max_new_tokens=3, do_sample=False))


def test_bad_split_layer_is_a_clear_error(model_pair):
    _, model = model_pair("llama")
    model = split(model)
    for bad in (0, 4, -1, True):  # True is no layer count, though it equals 1
        with pytest.raises(ConfigError, match="`split_layer` must be an integer in \\[1, 3\\]"):
            model.generate(prompt(), max_new_tokens=2, split_layer=bad)


def test_beam_search_is_refused_not_wrong(model_pair):
    _, model = model_pair("llama")
    with pytest.raises(NotImplementedError, match="beam search"):
        split(model).generate(prompt(), max_new_tokens=2, num_beams=2)
    beams = GenerationConfig(num_beams=2, max_new_tokens=2)
    for how in ({"generation_config": beams}, {}):  # by keyword, and by position (was run, and wrong)
        with pytest.raises(NotImplementedError, match="beam search"):
            split(model).generate(prompt(), *([] if how else [beams]), **how)


@pytest.mark.parametrize(
    "mode, what",
    [
        ({"assistant_early_exit": 1}, "self-speculative"),
        ({"guidance_scale": 1.5}, "classifier-free guidance"),
        ({"dola_layers": "low"}, "DoLa"),
        ({"use_mtp": True}, "multi-token prediction"),
    ],
)
def test_modes_that_reach_into_the_models_layers_are_refused_and_leave_it_whole(model_pair, mode, what):
    ref, model = model_pair("llama")
    model = split(model)
    with pytest.raises(NotImplementedError, match=what):
        model.generate(prompt(), max_new_tokens=4, **mode)
    assert model.config.num_hidden_layers == 4  # an early exit had cut it, and every later call failed
    expected = ref.generate(prompt(), max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(prompt(), max_new_tokens=4, do_sample=False, guidance_scale=1), expected)


@pytest.mark.parametrize(
    "setting, what",
    [("num_beams", "beam search"), ("assistant_early_exit", "self-speculative"), ("guidance_scale", "guidance")],
)
def test_a_mode_set_in_the_models_own_generation_config_is_refused_too(model_pair, setting, what):
    """transformers fills what a given generation_config leaves unset from the model's own (a Hub
    generation_config.json may ask for beams): that merged config is the one checked."""
    ref, model = model_pair("llama")
    model = split(model)
    setattr(model.generation_config, setting, {"num_beams": 4, "assistant_early_exit": 1}.get(setting, 1.5))
    with pytest.raises(NotImplementedError, match=what):
        model.generate(prompt(), generation_config=GenerationConfig(max_new_tokens=4, do_sample=False))
    assert model.config.num_hidden_layers == 4
    if setting != "assistant_early_exit":  # the caller's own value (1: off) wins; for an early exit, off is unset
        said = GenerationConfig(max_new_tokens=4, do_sample=False, **{setting: 1})
        want = ref.generate(prompt(), generation_config=said)
        assert torch.equal(model.generate(prompt(), generation_config=said), want)


def test_a_quantized_kv_cache_is_refused_not_wrong(model_pair):
    """Its edge layers would hold quantized K/V where the server's are exact."""
    from transformers import DynamicCache
    from transformers.cache_utils import QuantoQuantizedLayer

    _, model = model_pair("llama")
    cache = DynamicCache()
    cache.layers = [object.__new__(QuantoQuantizedLayer) for _ in range(4)]  # (no quanto needed to name the type)
    with pytest.raises(NotImplementedError, match=r"quantized KV cache \(QuantoQuantizedLayer\)"):
        split(model)(prompt(), past_key_values=cache)


def test_a_split_model_moved_to_another_dtype_carries_on(model_pair):
    """Its in-process server (and KV store) follow; the session is opened again in the new dtype."""
    ref, model = model_pair("llama")
    model = split(model)
    model.generate(prompt(), max_new_tokens=3, do_sample=False)
    model.to(torch.bfloat16)
    want = copy.deepcopy(ref).to(torch.bfloat16).generate(prompt(), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt(), max_new_tokens=6, do_sample=False), want)


def test_a_deep_copy_of_a_split_model_has_its_own_server(model_pair):
    ref, model = model_pair("llama")
    model = split(model)
    twin = copy.deepcopy(model)
    assert twin.split_server is not model.split_server and twin.model is not model.model
    want = ref.generate(prompt(), max_new_tokens=6, do_sample=False)
    assert torch.equal(twin.generate(prompt(), max_new_tokens=6, do_sample=False), want)
    with torch.no_grad():
        twin.model.layers[3].mlp.up_proj.weight.zero_()  # the copy's own weights, on its own server too
    assert torch.equal(model.generate(prompt(), max_new_tokens=6, do_sample=False), want)
    assert not torch.equal(twin.generate(prompt(), max_new_tokens=6, do_sample=False), want)


def test_slicer_codec_runs_and_compresses(model_pair):
    ref, model = model_pair("llama")
    model = split(model, codec="slicer")
    ids = prompt(1, 16)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 24)
    stats = model.wire_stats()
    fp16_payload = 16 * 64 * 2 * stats.tokens / 16
    assert stats.uplink_payload_bytes < fp16_payload


def test_a_narrower_downlink_dtype_halves_the_downlink(model_pair):
    ref, model = model_pair("llama")
    ids = prompt(1, 9)
    sizes, logits = {}, {}
    for dtype in ("auto", "bfloat16"):
        m = split(model, downlink_dtype=dtype)
        m.generate(ids, max_new_tokens=6, do_sample=False)
        sizes[dtype] = m.wire_stats().downlink_bytes
        logits[dtype] = m(ids, split_layer=2).logits
        m.close_session()
    assert sizes["bfloat16"] < 0.6 * sizes["auto"]
    assert torch.equal(logits["auto"], ref(ids).logits)  # "auto" sends the model dtype: exact
    assert (logits["bfloat16"] - logits["auto"]).abs().max() < 0.05 * logits["auto"].abs().max()


def test_hooks_detach_and_restore_each_layer_exactly(reference_models):
    import copy

    from slicer_hf.compat import decoder_layers
    from slicer_hf.hooks import attach_hooks, detach_hooks

    model = copy.deepcopy(reference_models["gpt2"])
    layers = decoder_layers(model)
    assert all("forward" not in layer.__dict__ for layer in layers)
    attach_hooks(model)
    assert all("forward" in layer.__dict__ for layer in layers)
    detach_hooks(model)
    assert all("forward" not in layer.__dict__ and not hasattr(layer, "_slicer_hook") for layer in layers)
    ids = prompt()
    assert torch.equal(model(ids).logits, reference_models["gpt2"](ids).logits)


# ---------------------------------------------------------------- a KV cache continues only the sequence it was made on
def test_a_cache_continues_exactly_when_nothing_ran_in_between_and_is_refused_when_something_did(model_pair):
    import copy

    from slicer_hf import SlicerError

    ref, model = model_pair("llama")
    split_model = split(model)
    a, b = prompt(seed=3), prompt(seed=4)
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    first = split_model.generate(a, **kwargs)
    plain = ref.generate(a, **kwargs)
    more = dict(max_new_tokens=3, do_sample=False)
    want = ref.generate(plain.sequences, cache=copy.deepcopy(plain.past_key_values), **more)
    kept = copy.deepcopy(first.past_key_values)  # a copy carries what the server held when it was made
    assert torch.equal(split_model.generate(first.sequences, cache=first.past_key_values, **more), want)
    split_model.generate(b, max_new_tokens=2, do_sample=False)  # the server's session now holds b
    with pytest.raises(SlicerError, match="no longer holds"):  # not b's positions taken for a's
        split_model.generate(first.sequences, cache=kept, **more)


def test_of_two_branches_of_one_prefix_the_older_is_refused_and_the_prefix_still_continues(model_pair):
    import copy

    from slicer_hf import SlicerError

    _, model = model_pair("llama")
    split_model = split(model)
    with torch.no_grad():
        prefix = split_model(prompt(length=6), use_cache=True).past_key_values
        x, y = copy.deepcopy(prefix), copy.deepcopy(prefix)
        split_model(prompt(length=2, seed=5), past_key_values=x)  # branch x: positions 6..7
        split_model(prompt(length=2, seed=6), past_key_values=y)  # branch y replaces them on the server
        with pytest.raises(SlicerError, match="no longer holds"):
            split_model(prompt(length=1, seed=7), past_key_values=x)
        split_model(prompt(length=1, seed=7), past_key_values=y)  # the latest branch goes on
        split_model(prompt(length=1, seed=7), past_key_values=copy.deepcopy(prefix))  # positions 0..5 are intact


@pytest.mark.parametrize(
    "change",
    [lambda c: c.reorder_cache(torch.tensor([1, 0])), lambda c: c.batch_select_indices(torch.tensor([1]))],
    ids=["reorder", "select"],
)
def test_a_cache_whose_rows_were_reordered_or_selected_is_refused_not_continued_on_the_servers_old_rows(
    model_pair, change
):
    """What beam search and custom decoding loops do to a cache: the server's rows stay in their old order."""
    from transformers import DynamicCache

    from slicer_hf import SlicerError

    _, model = model_pair("llama")
    split_model = split(model)
    with torch.no_grad():
        cache = DynamicCache(config=split_model.config)
        split_model(prompt(2), past_key_values=cache)
        kept = copy.deepcopy(cache)
        change(cache)
        with pytest.raises(SlicerError, match="reordered or selected"):
            split_model(prompt(len(cache.layers[0].keys), length=1, seed=5), past_key_values=cache)
        split_model(prompt(2, length=1, seed=5), past_key_values=kept)  # a copy made before goes on


class HistoryCounting(LocalTransport):
    """An in-process server's transport that counts the steps carrying a history mask (flag HISTORY)."""

    def __init__(self, server) -> None:
        super().__init__(server)
        self.histories = 0

    def request(self, data: bytes) -> bytes:
        if protocol.message_type(data) == protocol.STEP:
            self.histories += protocol.decode_step(data, check=lambda step: None).history is not None
        return super().request(data)


@pytest.mark.parametrize("kv_store", [True, False])
def test_a_later_turn_that_masks_a_finished_rows_padding_equals_plain_generate(reference_models, kv_store):
    """A batch conversation: row 0 stops at its EOS and is padded while row 1 goes on; the next turn continues the
    cache with `attention_mask = sequences != pad`, which hides cached positions the first turn showed. The server
    takes that mask for its cached positions too (it kept the first turn's)."""
    ref = reference_models["llama"]
    transport = HistoryCounting(SplitServer(copy.deepcopy(ref), kv_store=kv_store))
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS, transport)
    ids = prompt(2, 6, seed=3)
    eos = int(ref.generate(ids, max_new_tokens=2, do_sample=False)[0, -1])  # row 0's second new token
    first = dict(max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True)
    want, got = ref.generate(ids, **first), model.generate(ids, **first)
    assert torch.equal(got.sequences, want.sequences) and (want.sequences[0, 8:] == 0).all()  # row 0 padded
    assert transport.histories == 0  # one turn: the server's mask is the edge's
    sequences = torch.cat([want.sequences, prompt(2, 3, seed=9)], 1)
    mask = torch.cat([want.sequences != 0, torch.ones(2, 3, dtype=torch.bool)], 1).long()
    second = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = ref.generate(sequences, past_key_values=want.past_key_values, **second)
    assert torch.equal(model.generate(sequences, past_key_values=got.past_key_values, **second), expected)
    assert transport.histories == 1  # sent once, with the turn's first step


def test_a_cache_continued_at_another_split_is_refused_naming_the_split(model_pair):
    from slicer_hf import SlicerError

    _, model = model_pair("llama")
    split_model = split(model)
    with torch.no_grad():
        cache = split_model(prompt(length=6), use_cache=True, split_layer=2).past_key_values
        with pytest.raises(SlicerError, match="another split_layer"):
            split_model(prompt(length=1, seed=5), past_key_values=cache, split_layer=3)


def test_padded_batches_of_different_sizes_follow_one_another(model_pair):
    """The edge's account of the mask its server holds starts afresh with a new sequence (a batch of 3 after a batch
    of 2 had failed, and kept failing until the session closed)."""
    ref, model = model_pair("llama")
    model = split(model)
    for batch in (2, 3, 1):
        ids, mask = prompt(batch, 7, seed=batch), torch.ones(batch, 7, dtype=torch.long)
        mask[0, :2] = 0
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), want)


def test_a_turn_regenerated_with_its_mask_history_replays_it_on_a_failover(reference_models):
    """Turn 2 run twice from one turn-1 cache: the second run's steps drop the first's, which carried the mask
    history, so the edge must send it again, or a failover's replay rebuilds turn 1's mask on the next server."""
    ref = reference_models["llama"]
    transport = Switching(SplitServer(copy.deepcopy(ref)), SplitServer(copy.deepcopy(ref)))
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS, transport)
    ids = prompt(2, 6, seed=3)
    eos = int(ref.generate(ids, max_new_tokens=2, do_sample=False)[0, -1])
    first = dict(max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True)
    want, got = ref.generate(ids, **first), model.generate(ids, **first)
    sequences = torch.cat([want.sequences, prompt(2, 3, seed=9)], 1)
    mask = torch.cat([want.sequences != 0, torch.ones(2, 3, dtype=torch.bool)], 1).long()
    second = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    second |= dict(return_dict_in_generate=True, output_logits=True)
    plain = ref.generate(sequences, past_key_values=copy.deepcopy(want.past_key_values), **second)
    expected = torch.stack(plain.logits)
    model.generate(sequences, past_key_values=copy.deepcopy(got.past_key_values), **second)

    def kill_the_first_server(*_: object) -> bool:
        transport.dead = True
        return False

    cache = copy.deepcopy(got.past_key_values)
    again = model.generate(sequences, past_key_values=cache, stopping_criteria=[kill_the_first_server], **second)
    assert model.wire_stats().failovers == 1
    torch.testing.assert_close(torch.stack(again.logits), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_store", [True, False])
def test_going_back_past_a_filled_sliding_window_replays_and_stays_exact(kv_store, caplog):
    import logging

    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(**MISTRAL_W4, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config).eval()
    server = SplitServer(copy.deepcopy(ref), kv_store=kv_store)
    model = SlicerModelForCausalLM.from_model(
        copy.deepcopy(ref), LOSSLESS.replace(split_layer=2), LocalTransport(server)
    )
    with torch.no_grad():
        plain, edge = ref(prompt(length=9), use_cache=True).past_key_values, model(prompt(length=9), use_cache=True)
        model(prompt(length=3, seed=5), past_key_values=copy.deepcopy(edge.past_key_values))  # a branch: 9..11
        # back to position 9, past the 4-wide window the server's cache keeps: it replays instead of failing
        got = model(prompt(length=2, seed=7), past_key_values=copy.deepcopy(edge.past_key_values)).logits
        want = ref(prompt(length=2, seed=7), past_key_values=plain).logits
    assert torch.equal(got.argmax(-1), want.argmax(-1))  # the store attends over a longer (masked) key range: its
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # sums may differ in the last bits with the threads
    # routine for prompt reuse: neither side warns of a failure
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("slicer_hf")]


def test_a_refused_request_leaves_the_model_serving_the_next_one(reference_models):
    ref = reference_models["llama"]
    server = SplitServer(copy.deepcopy(ref), limits=ServerLimits(max_session_batch=2))
    model = SlicerModelForCausalLM.from_model(
        copy.deepcopy(ref), LOSSLESS.replace(split_layer=2), LocalTransport(server)
    )
    with pytest.raises(ProtocolError, match="batch 3 exceeds max_session_batch=2"):
        model.generate(prompt(3, 5), max_new_tokens=2, do_sample=False)
    for _ in range(2):  # the refused sequence is over: nothing of it is replayed onto the next session
        got = model.generate(prompt(1, 5), max_new_tokens=2, do_sample=False)
        assert torch.equal(got, ref.generate(prompt(1, 5), max_new_tokens=2, do_sample=False))
    assert model.wire_stats().failovers == 0


class Switching(LocalTransport):
    """Two in-process servers: the first until it is marked dead, then the second."""

    def __init__(self, first: SplitServer, second: SplitServer) -> None:
        super().__init__(first)
        self.second, self.dead = second, False

    def request(self, data: bytes) -> bytes:
        if self.dead and self.server is not self.second:
            from slicer_hf import TransportError

            raise TransportError("the first server died", retryable=True)
        return super().request(data)

    def reset(self) -> bool:
        self.server = self.second if self.dead else self.server
        return True

    def has_alternatives(self) -> bool:
        return False


class Flaky(LocalTransport):
    """An in-process server whose link fails the next `failures` requests once armed (a dying connection)."""

    failures = 0

    def request(self, data: bytes) -> bytes:
        if self.failures:
            from slicer_hf import TransportError

            self.failures -= 1
            raise TransportError("connection reset", retryable=True)
        return super().request(data)

    def reset(self) -> bool:  # reconnect to the same server
        return True


class Interrupting(LocalTransport):
    """An in-process server whose step replies are lost to a KeyboardInterrupt once armed (Ctrl-C while waiting)."""

    armed = False

    def request(self, data: bytes) -> bytes:
        reply = super().request(data)
        if self.armed and protocol.message_type(data) in (protocol.STEP, protocol.NEXT):
            raise KeyboardInterrupt
        return reply


def test_an_interrupted_step_frees_its_session_on_an_in_process_server(reference_models):
    ref = reference_models["llama"]
    server = SplitServer(copy.deepcopy(ref), limits=ServerLimits(max_sessions=2))
    transport = Interrupting(server)
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=2), transport)
    for _ in range(3):  # more interrupts than the server has room for sessions
        transport.armed = True
        with pytest.raises(KeyboardInterrupt):
            model.generate(prompt(1, 7), max_new_tokens=4, do_sample=False)
        assert server.stats_dict()["sessions_active"] == 0 and server.stats_dict()["kv_bytes_used"] == 0
    transport.armed = False
    expected = ref.generate(prompt(1, 7), max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(prompt(1, 7), max_new_tokens=4, do_sample=False), expected)


def test_models_sharing_one_in_process_transport_keep_their_own_sessions(reference_models):
    ref = reference_models["llama"]
    server = SplitServer(copy.deepcopy(ref))
    shared = LocalTransport(server)
    first, second = (
        SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=2), shared) for _ in "ab"
    )
    ids = prompt(1, 7)
    first.generate(ids, max_new_tokens=2, do_sample=False)
    made = second.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    first.close_session()  # the first model's session alone
    assert server.stats_dict()["sessions_active"] == 1
    out = second.generate(made.sequences, past_key_values=made.past_key_values, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=5, do_sample=False))
    assert second.wire_stats().retries == 0  # its session was never lost


def test_wire_stats_count_one_failover_per_recovery_and_each_failed_attempt_as_a_retry(reference_models):
    ref = reference_models["llama"]
    transport = Flaky(SplitServer(copy.deepcopy(ref)))
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=2), transport)
    ids = prompt(1, 7)
    steps = 0

    def fails_three_times_mid_sequence(*_: object) -> bool:
        nonlocal steps
        steps += 1
        transport.failures = 3 if steps == 2 else transport.failures
        return False

    out = model.generate(ids, max_new_tokens=5, do_sample=False, stopping_criteria=[fails_three_times_mid_sequence])
    assert torch.equal(out, ref.generate(ids, max_new_tokens=5, do_sample=False))
    assert (model.wire_stats().failovers, model.wire_stats().retries) == (1, 3)


class Pipelining(Switching):
    """`Switching`, recording how many messages each `pipeline` call carries."""

    def __init__(self, first: SplitServer, second: SplitServer) -> None:
        super().__init__(first, second)
        self.pipelined: list[int] = []

    def pipeline(self, messages):
        self.pipelined.append(len(messages))
        return super().pipeline(messages)


def test_a_failover_replays_the_lost_sequence_in_one_pipeline_not_a_round_trip_a_step(reference_models):
    ref = reference_models["llama"]
    transport = Pipelining(SplitServer(copy.deepcopy(ref)), SplitServer(copy.deepcopy(ref)))
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=2), transport)
    ids = prompt(1, 7)

    def first_dies_after_six_steps(*_: object) -> bool:
        transport.dead = transport.dead or model.wire_stats().uplink_messages == 7  # OPEN, prefill, 5 decode steps
        return False

    out = model.generate(ids, max_new_tokens=9, do_sample=False, stopping_criteria=[first_dies_after_six_steps])
    assert torch.equal(out, ref.generate(ids, max_new_tokens=9, do_sample=False))
    assert transport.pipelined == [6]  # the prefill and 5 decode steps, all sent before their replies are read
    assert model.wire_stats().failovers == 1


class ShuttingDown(LocalTransport):
    """An in-process server that answers one step, once armed, as a server stopping does (`shutdown`)."""

    armed = False

    def request(self, data: bytes) -> bytes:
        if self.armed and protocol.message_type(data) in (protocol.STEP, protocol.NEXT):
            self.armed = False
            return protocol.encode_error("shutdown", "server shutting down")
        return super().request(data)

    def reset(self) -> bool:  # a new connection: the server restarted, or the next one of a list
        return True


def exact_with_an_event(ref, transport, after_messages: int, event, max_new_tokens: int):
    """A greedy split generation over `transport` that calls `event()` once `after_messages` steps went up, checked
    equal to plain `generate()`; returns the split model."""
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=2), transport)
    ids = prompt(1, 7)

    def watch(*_: object) -> bool:
        if model.wire_stats().uplink_messages == after_messages:
            event()
        return False

    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=[watch])
    assert torch.equal(out, ref.generate(ids, max_new_tokens=max_new_tokens, do_sample=False))
    return model


def test_a_step_refused_by_a_server_shutting_down_moves_on_and_stays_exact(reference_models):
    transport = ShuttingDown(SplitServer(copy.deepcopy(reference_models["llama"])))
    model = exact_with_an_event(reference_models["llama"], transport, 3, lambda: setattr(transport, "armed", True), 5)
    assert model.wire_stats().failovers == 1


@pytest.mark.parametrize(
    "limits",
    [
        ServerLimits(max_step_elements=8 * 64),
        ServerLimits(max_message_bytes=2048),  # a 16-position chunk's 4 KB: refused as too_large, and no other tried
    ],
)
def test_a_failover_to_a_server_with_smaller_step_limits_is_a_clear_error_not_a_refused_replay(
    reference_models, limits
):
    ref = reference_models["llama"]
    small = SplitServer(copy.deepcopy(ref), limits=limits)
    transport = Switching(SplitServer(copy.deepcopy(ref)), small)
    model = SlicerModelForCausalLM.from_model(
        copy.deepcopy(ref), LOSSLESS.replace(split_layer=2, prefill_chunk_tokens=16), transport
    )
    steps = []
    send = transport.request

    def dies_after_the_first_chunk(data: bytes) -> bytes:
        steps.append(protocol.message_type(data))
        transport.dead = steps.count(protocol.STEP) > 1
        return send(data)

    transport.request = dies_after_the_first_chunk
    with pytest.raises(ProtocolError, match=r"went up in steps cut for other limits \(1 x 16 positions of 64\)"):
        model.generate(prompt(1, 40), max_new_tokens=2, do_sample=False)
    assert small.stats_dict()["errors"] == {}  # refused by the edge, before any step of it reached the server


def test_an_opt_that_embeds_narrower_than_its_layers_splits_exactly():
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = dict(hidden_size=64, ffn_dim=96, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(OPTConfig(**opt, vocab_size=VOCAB, word_embed_proj_dim=32)).eval()
    ids = prompt()
    expected = ref.generate(ids, max_new_tokens=6, do_sample=False)
    for downlink, kv_store in [("hidden", True), ("logits", True), ("hidden", False)]:
        server = SplitServer(copy.deepcopy(ref), kv_store=kv_store)
        assert (server.store is not None) == kv_store
        config = LOSSLESS.replace(split_layer=2, downlink=downlink)
        model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), config, LocalTransport(server))
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected), (downlink, kv_store)


def test_packed_sequences_with_no_mask_or_cache_are_refused_not_run_across_their_boundary(model_pair):
    ref, model = model_pair("llama")
    ids, packed = prompt(length=10), torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    with pytest.raises(NotImplementedError, match="pass each sequence as its own"):
        split(model)(ids, position_ids=packed, use_cache=False)
    with torch.no_grad():  # with a cache, transformers reads them as plain positions too
        assert torch.equal(split(model)(ids, position_ids=packed).logits, ref(ids, position_ids=packed).logits)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rotary_frequencies_that_follow_each_forwards_length_are_refused_at_load_and_by_the_server(rope_type):
    from transformers import AutoModelForCausalLM, LlamaConfig

    rope = {"rope_type": rope_type, "factor": 8.0, "rope_theta": 10000.0}
    if rope_type == "dynamic":  # an alpha changes nothing outside Hunyuan's own rotary
        rope |= {"alpha": 1000.0}
    if rope_type == "longrope":
        rope |= {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 32}
    config = LlamaConfig(**LLAMA, vocab_size=VOCAB, max_position_embeddings=256, rope_parameters=rope)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(NotImplementedError, match=f"rope_type '{rope_type}' sets its rotary frequencies"):
        SlicerModelForCausalLM.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2))
    with pytest.raises(NotImplementedError, match="would not be those of generate"):
        SplitServer(model)


def test_a_fixed_ntk_alpha_rotary_labelled_dynamic_as_hunyuan_checkpoints_ship_it_splits_exactly():
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from slicer_hf.bench.architectures import tiny_config

    rope = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}
    tiny = tiny_config("hunyuan_v1_dense").to_dict()
    config = CONFIG_MAPPING["hunyuan_v1_dense"](**{**tiny, "rope_parameters": rope})
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config).eval()
    assert ref.model.rotary_emb.rope_type == "ntk_alpha"  # what transformers builds: frequencies fixed by alpha
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=1))
    ids = prompt(length=12)
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


def test_router_logits_are_refused_like_hidden_states_not_cut_to_the_edges_layers():
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from slicer_hf.bench.architectures import tiny_config

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(CONFIG_MAPPING["mixtral"](**tiny_config("mixtral").to_dict())).eval()
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=1))
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        model(prompt(), output_router_logits=True)
    for m in (ref, model):  # asked for through the config, as the checkpoints of fine-tunes with the aux loss ship it
        m.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="output_router_logits"):  # the loss would hold half the aux loss
        model(prompt(), labels=prompt())
    expected = ref.generate(prompt(), max_new_tokens=4, do_sample=False)  # which never reads them
    assert torch.equal(model.generate(prompt(), max_new_tokens=4, do_sample=False), expected)


def test_output_attentions_are_refused_like_hidden_states_not_cut_to_the_edges_layers(model_pair):
    _, model = model_pair("llama")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        split(model)(prompt(), output_attentions=True)
    model = split(model)
    model.config.output_hidden_states = True  # asked for through the config, not the call
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        model(prompt())


@pytest.mark.parametrize("downlink", ["hidden", "logits"])
def test_arguments_passed_by_position_reach_the_server(model_pair, downlink):
    """forward(input_ids, attention_mask, ...) as well as by keyword: the padded row's mask, and labels."""
    ref, model = model_pair("llama")
    ids, mask = left_padded(ref.config.pad_token_id)
    after_padding = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1) == 0
    labels = ids.masked_fill(after_padding, -100)  # no loss on what padded positions predict
    want = ref(ids, attention_mask=mask, labels=labels)
    parameters = list(inspect.signature(ref.forward).parameters)
    by_position = [{"input_ids": ids, "attention_mask": mask, "labels": labels}.get(p) for p in parameters]
    by_position = by_position[: parameters.index("labels") + 1]
    got = split(model, downlink=downlink)(*by_position)
    real = mask.bool()
    assert torch.allclose(got.logits[real], want.logits[real], atol=1e-5)
    assert torch.allclose(got.loss, want.loss, atol=1e-5)


@pytest.mark.parametrize("downlink", ["hidden", "logits", "topk_logits"])
def test_return_dict_false_gives_a_tuple_with_every_downlink(model_pair, downlink):
    ref, model = model_pair("llama")
    ids = prompt()
    with transformers_log("deprecated") as warned:  # `use_return_dict`: warned every forward
        out = split(model, downlink=downlink)(ids, return_dict=False)
        dict_out = split(model, downlink=downlink)(ids)
    assert isinstance(out, tuple) and out[0].argmax(-1).equal(ref(ids).logits.argmax(-1))
    assert torch.equal(dict_out.logits, out[0]) and not warned


# ---------------------------------------------------------------- a server that answers wrongly
class Tampering(LocalTransport):
    """A server whose answers go through `tamper(request, answer)`."""

    def __init__(self, server: SplitServer, tamper) -> None:
        super().__init__(server)
        self.tamper = tamper

    def request(self, data: bytes) -> bytes:
        return self.tamper(data, super().request(data))


def tampered(reference_models, tamper, **overrides):
    import copy

    ref = reference_models["llama"]
    transport = Tampering(SplitServer(copy.deepcopy(ref)), tamper)
    return SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(**overrides), transport=transport)


def steps_only(rewrite):
    return lambda data, answer: rewrite(answer) if protocol.message_type(data) == protocol.STEP else answer


@pytest.mark.parametrize(
    "downlink, kind",
    [("hidden", protocol.REPLY_LOGITS), ("logits", protocol.REPLY_HIDDEN), ("topk_logits", protocol.REPLY_LOGITS)],
)
def test_a_reply_of_another_kind_than_the_session_asked_for_is_refused(reference_models, downlink, kind):
    def swap_kind(answer: bytes) -> bytes:
        seq, _, body = protocol.decode_reply(answer)
        return protocol.encode_reply(seq, kind, body)

    model = tampered(reference_models, steps_only(swap_kind), downlink=downlink)
    with pytest.raises(ProtocolError, match="got a reply of kind"):
        model(prompt())


@pytest.mark.parametrize("downlink", ["hidden", "logits"])
def test_a_reply_of_nan_is_refused_not_turned_into_tokens(reference_models, downlink):
    def poison(answer: bytes) -> bytes:  # a well-formed reply of the right shape, one value of it NaN
        seq, kind, body = protocol.decode_reply(answer)
        codec = build_codec("identity")
        values = codec.decode(body)
        values.view(-1)[0] = 12345.0
        body = codec.encode(values).replace(struct.pack("<f", 12345.0), struct.pack("<f", float("nan")))
        return protocol.encode_reply(seq, kind, body)

    model = tampered(reference_models, steps_only(poison), downlink=downlink)
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        model.generate(prompt(), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize(
    "answer",
    [{}, {"session": "1"}, {"session": [1]}, {"session": -1}, {"session": 1e300}, {"session": True}],
    ids=["no session", "a string", "a list", "negative", "a float", "a bool"],
)
def test_a_malformed_answer_to_open_is_a_protocol_error(reference_models, answer):
    def fake_opened(data: bytes, real: bytes) -> bytes:
        return protocol.encode_json(protocol.OPENED, answer) if protocol.message_type(data) == protocol.OPEN else real

    with pytest.raises(ProtocolError, match="malformed answer to OPEN"):
        tampered(reference_models, fake_opened)(prompt())


def test_a_generate_result_hands_its_cache_on_under_the_name_this_transformers_uses():
    """How a chat continues a reply's cache: read from the result and passed to the next `generate()` without
    transformers' warning that the name is deprecated (a chat printed it mid-conversation)."""
    from conftest import tiny_model

    from slicer_hf import compat

    model = tiny_model("llama")
    with transformers_log("deprecated") as warned:
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        cache = compat.output_cache(out)
        more = model.generate(out.sequences, max_new_tokens=1, do_sample=False, **{compat.cache_kwarg(model): cache})
    assert cache is not None and cache.get_seq_length() == 5 and more.shape[1] == 6
    assert not warned


def test_a_model_in_a_dtype_the_wire_does_not_carry_is_refused_in_one_line(model_pair):
    """float64 hidden states have no wire dtype: the in-process server refused the packet as a protocol error."""
    _, model = model_pair("llama")
    with pytest.raises(ConfigError, match="runs in float32, float16 or bfloat16.*this one is torch.float64"):
        split(model.double()).generate(prompt(), max_new_tokens=1)


def test_a_split_subclass_of_a_causal_lm_runs_in_the_text_generation_pipeline_without_complaint(reference_models):
    """A user's subclass (or a remote-code class) is named in no auto mapping: registered as a causal LM anyway, its
    split class passes the pipeline's model check."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ref = reference_models["llama"]
    subclass = type("MyLlamaForCausalLM", (type(ref),), {})
    model = subclass(ref.config).eval()
    model.load_state_dict(ref.state_dict())
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w1", pad_token="w0")
    greedy = dict(max_new_tokens=3, do_sample=False)
    with transformers_log("not supported") as complaints:
        got = transformers.pipeline("text-generation", model=split(model), tokenizer=tokenizer)("w3 w4 w5", **greedy)
    want = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)("w3 w4 w5", **greedy)
    assert got == want and not complaints


def test_a_half_precision_model_samples_exactly_as_plain_generate_on_a_padded_sliding_window_batch():
    """In bfloat16 the KV store's padded attention rounds otherwise than transformers' own cache, by up to 0.4 of a
    logit: a reviewer's seeded sampling gave other tokens for 6 seeds of 20 (Mistral, window 8). The in-process
    server of a half-precision model keeps transformers' caches."""
    from conftest import tiny_model

    ref = tiny_model("mistral").to(torch.bfloat16)
    model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=2))
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :11], mask[1, :11] = 0, 0
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=True, num_return_sequences=2)
    for seed in range(12):
        torch.manual_seed(seed)
        expected = ref.generate(**args, pad_token_id=0)
        torch.manual_seed(seed)
        assert torch.equal(model.generate(**args, pad_token_id=0), expected), seed


# ---------------------------------------------------------------------------------------------------- in process
def test_a_split_model_under_autocast_is_refused_not_run_half_outside_it():
    """The in-process server runs its layers on its own thread, where the caller's autocast is off: tokens differed."""
    model = split(tiny_model("llama"), split_layer=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(NotImplementedError, match="torch.autocast"):
        model.generate(prompt(), max_new_tokens=2, do_sample=False)
    model.generate(prompt(), max_new_tokens=2, do_sample=False)  # outside it, as before


def test_the_in_process_server_takes_what_the_model_takes_not_a_shared_servers_caps():
    """A batch of 65 rows, or a context past 16,384 positions, had been refused where plain generate() ran."""
    reference = tiny_model("llama")
    reference.config.max_position_embeddings = 1 << 17
    model = split(copy.deepcopy(reference), split_layer=2)
    ids = prompt(65, 5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert torch.equal(out, reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2))
    limits = model.split_server.limits
    assert limits.max_context_tokens == 1 << 17 and limits.max_session_kv_bytes >= 1 << 50


def test_a_model_resized_or_set_to_another_attention_after_splitting_gets_a_server_that_serves_it():
    """The in-process server kept the model it started with: a resized vocabulary was a model mismatch, and eager
    attention an internal error in every step."""
    reference = tiny_model("llama")
    model = split(copy.deepcopy(reference), split_layer=2)
    model.generate(prompt(), max_new_tokens=2, do_sample=False)
    for changed in (reference, model):
        changed.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt(), max_new_tokens=3), reference.generate(prompt(), max_new_tokens=3))
    for changed in (reference, model):
        changed.set_attn_implementation("eager")
    assert torch.equal(model.generate(prompt(), max_new_tokens=3), reference.generate(prompt(), max_new_tokens=3))


def test_wire_stats_are_a_snapshot_and_a_forward_needs_its_inputs():
    model = split(tiny_model("llama"), split_layer=2)
    model.generate(prompt(), max_new_tokens=2, do_sample=False)
    before = model.wire_stats()
    model.generate(prompt(), max_new_tokens=2, do_sample=False)
    assert model.wire_stats().uplink_bytes > before.uplink_bytes  # the snapshot stayed as it was
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model(attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_a_config_made_for_another_model_is_said_so_and_does_not_lend_its_model_id(reference_models, caplog):
    """A preset of another model (all-MiniLM's, given to a causal LM) had been taken without a word, its model_id
    kept on the split model's config."""
    ref = reference_models["llama"]
    foreign = SlicerConfig.from_pretrained("minilm-l6-split4").replace(split_layer=2, codec="identity")
    with caplog.at_level("WARNING", logger="slicer_hf.modeling"):
        model = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), foreign)
    assert "made for sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden size 384)" in caplog.text
    assert model.slicer_config.model_id != foreign.model_id and model.slicer_config.num_hidden_layers == 4
    caplog.clear()
    with caplog.at_level("WARNING", logger="slicer_hf.modeling"):  # a config of no model, or of this one: no word
        SlicerModelForCausalLM.from_model(copy.deepcopy(ref), LOSSLESS.replace(split_layer=2))
        SlicerModelForCausalLM.from_model(copy.deepcopy(ref), model.slicer_config)
    assert "made for" not in caplog.text


def test_rows_never_exceed_the_servers_session_batch():
    limits = StepLimits(batch=4)
    assert limits.rows(1, 8, wanted=10) == 4 and limits.rows(1, 8, wanted=3) == 3
    assert StepLimits(batch=4, elements=2 * 8).rows(1, 8, wanted=10) == 2  # the tighter bound wins


def test_a_step_of_exactly_the_servers_limits_fits():
    step = protocol.Step(0, 1, 0, 2, 8, 7, b"\0" * 10)
    assert StepLimits(tokens=8, elements=2 * 8 * 4).fits(step, 4)
    assert not StepLimits(tokens=7).fits(step, 4) and not StepLimits(elements=2 * 8 * 4 - 1).fits(step, 4)
    assert StepLimits(message_bytes=len(protocol.encode_step(step))).fits(step, 4)


class RecordingReplays(Switching):
    def __init__(self, first, second):
        super().__init__(first, second)
        self.replayed: list[bytes] = []

    def pipeline(self, messages):
        self.replayed += messages
        return super().pipeline(messages)


def test_a_replay_asks_the_new_server_for_no_outputs(reference_models):
    """Replayed steps rebuild the cache only: each asks for no outputs (need_from = tokens), so the new server
    computes and sends no logits or hidden states for them."""
    ref = reference_models["llama"]
    transport = RecordingReplays(SplitServer(copy.deepcopy(ref)), SplitServer(copy.deepcopy(ref)))
    exact_with_an_event(ref, transport, 7, lambda: setattr(transport, "dead", True), 9)  # the first server dies
    assert len(transport.replayed) == 6
    for message in transport.replayed:
        assert protocol.message_type(message) == protocol.STEP  # a NEXT step wants every output
        step = protocol.decode_step(message, check=lambda s: None)
        assert step.need_from == step.tokens, (step.start, step.tokens, step.need_from)
