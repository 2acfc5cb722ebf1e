"""Every decoder-only architecture in transformers' auto mapping: the exactness anchor where it splits, a clear
`NotImplementedError` at load time where it cannot, and the support table in docs kept in step with this run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from slicer_hf import SlicerConfig, SlicerModelForCausalLM
from slicer_hf.bench import architectures as sweep

pytestmark = pytest.mark.slow
TABLE = json.loads((Path(__file__).parents[1] / "docs/benchmarks/architectures.json").read_text())
DOCUMENTED = {row["model_type"]: row["status"] for row in TABLE["rows"]}


@pytest.mark.parametrize("model_type", sweep.architectures())
def test_each_architecture_splits_exactly_or_is_refused_up_front(model_type):
    row = sweep.check(model_type)
    assert row["status"] != "fails", row["reason"]
    if TABLE["transformers"] == transformers.__version__:  # the table documents this very version
        assert row["status"] == DOCUMENTED.get(model_type), "rerun: slicer-hf bench architectures --doc ..."


def test_a_failing_architecture_shows_in_the_summary_and_fails_the_sweep(monkeypatch, tmp_path):
    rows = [{"model_type": t, "status": s, "reason": "", "seconds": 0.0} for t, s in [("a", "exact"), ("b", "fails")]]
    assert "- **fails**: 1 that ran and did not equal plain `generate()`" in sweep.markdown(rows)
    assert "**fails**" not in sweep.markdown(rows[:1])
    monkeypatch.setattr(sweep, "check", lambda model_type: next(r for r in rows if r["model_type"] == model_type))
    monkeypatch.setattr(sweep, "architectures", lambda: ["a", "b"])  # the model types transformers maps, here
    with pytest.raises(SystemExit, match="fails for b"):
        sweep.main(["--only", "a", "b", "--out-json", str(tmp_path / "a.json")])


def test_the_sweep_lists_transformers_model_types_not_the_split_classes_registered_for_its_pipeline():
    from conftest import tiny_model
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), SlicerConfig(codec="identity"))
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[f"slicer-{type(model).__name__}"] == type(model).__name__
    assert not [t for t in sweep.architectures() if t.startswith("slicer-")] and "llama" in sweep.architectures()


@pytest.mark.parametrize("min_split_layer", [1, 3])
def test_a_store_whose_prefill_windows_what_the_cache_attends_whole_stays_off_and_splits_stay_exact(
    monkeypatch, min_split_layer
):
    """moshi's own cache attends to every earlier position during a prefill and windows only afterwards; the check
    compared one decode step, passed, and the store gave other tokens at split 3 (window 8) or 1 (window 16)."""
    import copy

    import torch

    from slicer_hf.server import SplitServer
    from slicer_hf.transport import LocalTransport

    monkeypatch.setitem(sweep.TINY, "sliding_window", 8 if min_split_layer == 3 else 16)
    reference = sweep.tiny_model("moshi")
    ids = torch.randint(3, 128, (1, sweep.TINY["sliding_window"] + 4), generator=torch.Generator().manual_seed(1))
    expected = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    server = SplitServer(copy.deepcopy(reference), min_split_layer=min_split_layer)
    assert server.store is None
    config = SlicerConfig(codec="identity", split_layer=min_split_layer)
    split = SlicerModelForCausalLM.from_model(copy.deepcopy(reference), config, transport=LocalTransport(server))
    assert torch.equal(split.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)


@pytest.mark.parametrize("model_type", ["inkling_text", "mimo_v2_flash"])
def test_the_kv_estimate_bounds_a_family_whose_sliding_layers_have_more_and_larger_heads(model_type):
    """inkling_text's sliding layers take `swa_num_key_value_heads` of `swa_head_dim`, mimo_v2_flash's twice the
    config's heads (in its code): counted (the config's fields, the layers' own projections), the estimate the KV
    budget admits sessions by is an upper bound again (it was 768 bytes a position against 49,152 and 1,536 held)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from slicer_hf import compat

    model, length = sweep.tiny_model(model_type), 6  # below the window: every layer keeps every position
    with torch.no_grad():
        cache = model(torch.randint(3, 100, (1, length)), use_cache=True).past_key_values
    held = sum(
        (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
        for layer in cache.layers[1:]
        if isinstance(layer, DynamicLayer) and torch.is_tensor(layer.keys)
    )
    layers = compat.decoder_layers(model)
    assert held // length <= compat.kv_bytes_per_position(model.config, 1, torch.float32, False, layers)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_a_static_cache_is_refused_in_one_line_whatever_masks_the_family_makes(model_type):
    """gemma2's layers of two kinds make a dict of masks: it got an AttributeError from deep inside."""
    import torch

    config = SlicerConfig(codec="identity", split_layer=2)
    split = SlicerModelForCausalLM.from_model(sweep.tiny_model(model_type), config)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with pytest.raises(NotImplementedError, match="use the default dynamic cache"):
        split.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")


def test_at_least_30_architectures_split_exactly():
    assert sum(status == "exact" for status in DOCUMENTED.values()) >= 30


@pytest.mark.parametrize("model_type", ["rwkv", "bert", "bart", "gemma3", "hrm_text", "blt"])
def test_an_unsupported_family_is_refused_before_any_weight_is_read(model_type, tmp_path):
    config = transformers.AutoConfig.for_model(model_type)
    config.save_pretrained(tmp_path)  # a config and no weights: loading any would fail differently
    with pytest.raises(NotImplementedError, match=model_type):
        SlicerModelForCausalLM.from_pretrained(str(tmp_path), slicer_config=SlicerConfig(codec="identity"))


def test_a_model_type_the_sweep_does_not_know_is_a_usage_error_not_untested(capsys):
    from slicer_hf.bench import architectures

    with pytest.raises(SystemExit) as exit_:
        architectures.main(["--only", "lama", "--out-json", ""])
    assert exit_.value.code == 2 and "not causal-LM model types of this transformers: lama" in capsys.readouterr().err


@pytest.mark.parametrize(
    "model_type",
    ["qwen3_next", "falcon_mamba", "qwen3_5_text", "falcon_h1", "olmo_hybrid", "lfm3", "nemotron_h", "llama"],
)
def test_a_prompt_reused_from_a_prefix_cache_goes_back_exactly_on_recurrent_and_storeless_servers(model_type):
    """transformers' prompt-reuse recipe (one prefix's cache, deep-copied for each question) sends the server back to
    the prefix's end. It read a cache's length from layer 0, which a server below its split leaves empty: nothing
    was cropped, and recurrent families went on from the abandoned branch's state, giving other tokens silently."""
    import copy

    import torch

    from slicer_hf.server import SplitServer
    from slicer_hf.transport import LocalTransport

    ref = sweep.tiny_model(model_type)
    server = SplitServer(copy.deepcopy(ref), kv_store=False)  # what a recurrent family gets; llama: asked for
    model = SlicerModelForCausalLM.from_model(
        copy.deepcopy(ref), SlicerConfig(codec="identity", split_layer=2), LocalTransport(server)
    )
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(0))
    for name, m in (("plain", ref), ("split", model)):
        with torch.no_grad():
            prefix = m(ids[:, :10], use_cache=True).past_key_values
        outs = [
            m.generate(question, past_key_values=copy.deepcopy(prefix), max_new_tokens=6, do_sample=False)
            for question in (ids, torch.cat([ids[:, :10], ids[:, 10:].flip(1)], 1))
        ]
        if name == "plain":
            expected = outs
    assert all(torch.equal(a, b) for a, b in zip(outs, expected))
    server.shutdown()


@pytest.mark.parametrize("model_type", ["qwen3_next", "falcon_h1", "mamba"])
def test_a_recurrent_cache_is_not_cut_back_and_says_so(model_type):
    """The chat client cuts the last reply's cache to what the next prompt shares; transformers refuses to crop a
    recurrent layer (a RuntimeError that ended the chat), or a crop left its state past the cut."""
    import torch

    from slicer_hf import compat

    model = sweep.tiny_model(model_type)
    with torch.no_grad():
        cache = model(torch.arange(3, 13)[None], use_cache=True).past_key_values
    assert compat.crop_cache(cache, 4) is False and compat.cache_length(cache) == 10
    assert compat.crop_cache(cache, 10) is True  # nothing past 10: nothing to cut


@pytest.mark.parametrize("model_type", ["mamba", "qwen3_next", "falcon_h1", "llama"])
def test_a_transformers_cache_is_charged_what_it_holds_a_recurrent_state_per_sequence_not_per_position(model_type):
    """Admission charged every position the K/V of every served layer: a Mamba server refused sessions past about
    830 tokens of mamba-2.8b (its state is a fixed 25 MiB), and a hybrid's recurrent state went uncounted (a
    session of 64 rows held 363x its reservation). The charge is now measured from a cache: at least what the
    session's cache holds, and no more than it plus the placeholders below the split (and a layer's length counter
    for each row)."""

    from slicer_hf import compat
    from slicer_hf.server import ServerLimits, SplitServer

    server = SplitServer(sweep.tiny_model(model_type), kv_store=False, limits=ServerLimits(idle_timeout_s=1e9))
    session_id = _open(server, split_layer=2)
    session = server.sessions[session_id]
    start = 0
    for batch_tokens in (9, 1, 1, 20):
        _step(server, session_id, start, batch_tokens, batch=4)
        start += batch_tokens
        held = sum(compat.cache_layer_bytes(session.cache))
        placeholders = 4 * start * 2 * 2 * server.dtype.itemsize  # 4 rows: a [1, T, 1] K and V in layers 0 and 1
        counters = 4 * 2 * 8  # a layer's int64 length (layers 2 and 3), one per cache, charged to each of 4 rows
        assert held <= session.kv_bytes <= held + placeholders + counters
    assert server.kv_bytes_used == session.kv_bytes
    if model_type == "mamba":  # nothing grows with the positions but the placeholders
        assert server._kv_costs[2] == (2 * 2 * server.dtype.itemsize, session.kv_bytes_per_sequence)
    server.shutdown()


def _open(server, split_layer: int) -> int:
    from slicer_hf import build_codec, protocol
    from slicer_hf.link import open_request

    codec = build_codec("identity")
    body = open_request(SlicerConfig(codec="identity"), server.model.config, "tiny", split_layer, codec)
    reply = server.handle(protocol.encode_json(protocol.OPEN, body))
    protocol.raise_if_error(reply)
    return protocol.decode_json(reply)["session"]


def _step(server, session: int, start: int, tokens: int, batch: int) -> None:
    import torch

    from slicer_hf import build_codec, protocol

    payload = build_codec("identity").encode(torch.randn(batch, tokens, server.hidden_size))
    step = protocol.Step(session, start, start, batch, tokens, tokens - 1, payload)
    protocol.raise_if_error(server.handle(protocol.encode_step(step)))


@pytest.mark.parametrize(
    "model_type", ["mamba", "falcon_mamba", "moshi", "qwen3_next", "falcon_h1", "nemotron_h", "llama"]
)
def test_a_store_less_server_chunks_a_padded_prompt_where_the_family_carries_a_forward_on_exactly(model_type):
    """The server runs a long step a chunk at a time where the cache carries a forward on exactly (attention,
    hybrids), and whole, sent whole, where it cannot (Mamba, FalconMamba run one afresh; Moshi's prefill attends past
    its window): a prompt of 300 positions, which the edge had cut into steps of 256, gave a FalconMamba's logits off
    by 0.07 silently, and a server's chunks of 16 a Moshi's by 0.25."""
    import copy

    import torch

    from slicer_hf.server import ServerLimits, SplitServer
    from slicer_hf.transport import LocalTransport

    ref = sweep.tiny_model(model_type)
    server = SplitServer(copy.deepcopy(ref), kv_store=False, limits=ServerLimits(prefill_chunk_tokens=5))
    config = SlicerConfig(codec="identity", split_layer=2)
    split = SlicerModelForCausalLM.from_model(copy.deepcopy(ref), config, LocalTransport(server))
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    options = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(split.generate(input_ids=ids, **options), ref.generate(input_ids=ids, **options))
    long = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (split(long).logits[:, -1] - ref(long).logits[:, -1]).abs().max() < 1e-5
    server.shutdown()


def test_a_mamba_prompt_longer_than_one_step_of_the_server_is_refused_not_cut():
    """Cut into steps, the server would run each afresh from its cache: other logits, silently."""
    import torch

    from slicer_hf.server import ServerLimits, SplitServer
    from slicer_hf.transport import LocalTransport

    server = SplitServer(sweep.tiny_model("mamba"), limits=ServerLimits(max_step_tokens=16))
    split = SlicerModelForCausalLM.from_model(
        sweep.tiny_model("mamba"), SlicerConfig(codec="identity", split_layer=2), LocalTransport(server)
    )
    with pytest.raises(NotImplementedError, match="these 40 positions go to the server in one step"):
        split(torch.randint(3, 128, (1, 40)))
    assert split(torch.randint(3, 128, (1, 16))).logits.shape == (1, 16, 128)  # one step: served
    server.shutdown()


def test_cross_attention_to_an_encoders_states_is_refused_not_run_without_them():
    """TrOCR's layers cross-attend to `encoder_hidden_states` when given: the server's would have run without them."""
    model = SlicerModelForCausalLM.from_model(sweep.tiny_model("trocr"), SlicerConfig(codec="identity", split_layer=1))
    ids, states = torch.randint(1, 100, (1, 6)), torch.randn(1, 4, model.config.d_model)
    for call in (
        lambda: model(ids, encoder_hidden_states=states, use_cache=False),
        lambda: model.generate(ids, encoder_hidden_states=states, max_new_tokens=3, do_sample=False),
    ):
        with torch.no_grad(), pytest.raises(NotImplementedError, match="encoder_hidden_states"):
            call()
    gpt2 = sweep.tiny_model("gpt2")
    gpt2.config.add_cross_attention = True
    with pytest.raises(NotImplementedError, match="add_cross_attention"):
        SlicerModelForCausalLM.from_model(gpt2, SlicerConfig(codec="identity"))


def test_a_logits_downlink_scores_the_loss_as_the_familys_own_forward_does():
    """TrOCR's forward scores each position against its own label, unshifted, unlike transformers' causal loss."""
    reference = sweep.tiny_model("trocr")
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        want = reference(ids, labels=ids).loss
        split = SlicerModelForCausalLM.from_model(
            reference, SlicerConfig(codec="identity", split_layer=1, downlink="logits")
        )
        assert torch.allclose(split(ids, labels=ids).loss, want, atol=1e-6)


def test_a_config_without_use_cache_runs_its_forward_uncached_as_the_plain_model_does():
    reference = sweep.tiny_model("openai-gpt")
    assert not hasattr(reference.config, "use_cache")
    ids = torch.randint(1, 100, (1, 7))
    with torch.no_grad():
        want = reference(ids, labels=ids).loss
        split = SlicerModelForCausalLM.from_model(reference, SlicerConfig(codec="identity", split_layer=1))
        assert torch.allclose(split(ids, labels=ids).loss, want, atol=1e-6)


def test_a_split_that_cannot_make_its_transport_leaves_the_model_as_it_came():
    from slicer_hf import TransportError

    model = sweep.tiny_model("llama")
    ids = torch.randint(1, 100, (1, 6))
    want, plain = model.generate(ids, max_new_tokens=3, do_sample=False), type(model)
    with pytest.raises(TransportError):
        SlicerModelForCausalLM.from_model(model, SlicerConfig(codec="identity"), transport="htp://localhost:1")
    assert type(model) is plain and not any(hasattr(layer, "_slicer_hook") for layer in model.model.layers)
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), want)
