"""Partial loading: each side reads only the decoder layers it runs from safetensors checkpoints."""

import json

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from slicer_hf.compat import decoder_layers
from slicer_hf.loading import load_layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama").save_pretrained(path)
    return path


def on_meta(model):
    return [all(p.device.type == "meta" for p in layer.parameters()) for layer in decoder_layers(model)]


@pytest.mark.parametrize("layers", [range(0, 2), range(3, 4), [0, 3]])
def test_only_the_requested_layers_hold_weights(checkpoint, layers):
    model = load_layers(checkpoint, layers, dtype=torch.float32)
    assert on_meta(model) == [i not in layers for i in range(4)]
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for i in layers:
        for (name, p), q in zip(decoder_layers(model)[i].named_parameters(), decoder_layers(full)[i].parameters()):
            assert torch.equal(p, q), name
    released = {f"model.layers.{i}." for i in range(4) if i not in layers}
    whole = dict(full.named_parameters())
    for name, p in model.named_parameters():  # everything outside the released layers: norm, embeddings, head
        if not any(name.startswith(prefix) for prefix in released):
            assert p.device.type != "meta" and torch.equal(p, whole[name]), name


def test_other_loading_options_fall_back_to_a_whole_load_then_release(checkpoint, monkeypatch):
    import slicer_hf.loading as loading

    whole, real = [], loading._load_whole
    monkeypatch.setattr(loading, "_load_whole", lambda *args: whole.append(args[3]) or real(*args))
    model = load_layers(checkpoint, range(2), dtype=torch.float32, device_map="auto")
    assert whole == [{"dtype": torch.float32, "device_map": "auto"}]
    assert on_meta(model) == [False, False, True, True]


def test_options_that_keep_the_model_on_one_device_load_partially(checkpoint, monkeypatch):
    """attn_implementation, a device_map of one device and low_cpu_mem_usage need no whole load."""
    import slicer_hf.loading as loading

    monkeypatch.setattr(loading, "_load_whole", lambda *args: pytest.fail("loaded whole"))
    for device_map in ("cpu", {"": "cpu"}, torch.device("cpu")):
        model = load_layers(
            checkpoint, range(2), attn_implementation="eager", device_map=device_map, low_cpu_mem_usage=True
        )
        assert model.config._attn_implementation == "eager"
        assert on_meta(model) == [False, False, True, True]
        assert model.get_output_embeddings().weight.device.type == "cpu"


def test_only_the_files_transformers_reads_are_read(checkpoint, tmp_path):
    """Another safetensors file in the folder (an export, a variant) is not the model's: its tensors stay unread."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "with-extra"
    shutil.copytree(checkpoint, folder)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, str(folder / "zz-export.safetensors"))
    model = load_layers(folder, range(2), dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, full.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("in_config", [True, False])
def test_the_default_dtype_is_the_one_transformers_picks(tmp_path, in_config):
    """dtype "auto": the config's, else that of the checkpoint's weights (a config without one loads as stored)."""
    folder = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    if not in_config:
        config = json.loads((folder / "config.json").read_text())
        config.pop("dtype", None), config.pop("torch_dtype", None)
        (folder / "config.json").write_text(json.dumps(config))
    model, full = load_layers(folder, range(4)), AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == full.dtype == torch.bfloat16
    assert {n: b.dtype for n, b in model.named_buffers()} == {n: b.dtype for n, b in full.named_buffers()}
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(ids).logits, full(ids).logits)


def test_a_whole_weight_file_beside_a_stale_index_is_the_one_read_as_transformers_reads_it(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "both"
    tiny_model("llama", seed=1).save_pretrained(folder / "old", max_shard_size="100KB")  # other weights, sharded
    shutil.copytree(folder / "old", folder, dirs_exist_ok=True)
    shutil.copy(checkpoint / "model.safetensors", folder / "model.safetensors")
    model = load_layers(folder, range(2), dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, full.model.layers[0].self_attn.q_proj.weight)


def test_a_model_folder_under_the_home_directory_loads_by_its_tilde_path(checkpoint, tmp_path, monkeypatch):
    """transformers took `~/folder` for a malformed Hub id, after the folder check had found it."""
    import shutil

    from slicer_hf import SlicerConfig, SlicerModelForCausalLM
    from slicer_hf.server.build import load_server

    shutil.copytree(checkpoint, tmp_path / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert on_meta(load_layers("~/tiny", range(2))) == [False, False, True, True]
    config = SlicerConfig(codec="identity", split_layer=2)
    assert SlicerModelForCausalLM.from_pretrained("~/tiny", slicer_config=config).wire_stats().tokens == 0
    assert load_server("~/tiny", min_split_layer=2).num_layers == 4


@pytest.mark.parametrize("tied", [False, True])
def test_a_server_reads_no_input_embeddings_unless_its_head_shares_them(tmp_path, tied):
    """Hidden states come in: an untied model's embedding matrix would be dead weight on the server."""
    from slicer_hf import SlicerConfig, SlicerModelForCausalLM
    from slicer_hf.server.build import load_server
    from slicer_hf.transport import LocalTransport

    ref = tiny_model("llama")
    if tied:
        ref.config.tie_word_embeddings = True
        ref.tie_weights()
    ref.save_pretrained(tmp_path)
    server = load_server(str(tmp_path), min_split_layer=2)
    embeddings = server.model.get_input_embeddings().weight
    assert (embeddings.device.type == "meta") is not tied
    assert on_meta(server.model) == [True, True, False, False]
    config = SlicerConfig(codec="identity", split_layer=2)
    edge = SlicerModelForCausalLM.from_pretrained(tmp_path, slicer_config=config, transport=LocalTransport(server))
    ids = torch.tensor([[5, 9, 17, 3, 44, 8]])
    expected = AutoModelForCausalLM.from_pretrained(tmp_path).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(edge.generate(ids, max_new_tokens=6, do_sample=False), expected)
    server.shutdown()


def test_layers_accelerate_offloads_to_disk_are_held_not_released(checkpoint, tmp_path):
    """Offloaded weights sit on the meta device between forwards, and accelerate's hooks bring them in for each."""
    from slicer_hf import SlicerConfig, SlicerModelForCausalLM

    places = {f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)}
    places |= {name: "cpu" for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
    options = {"device_map": places, "offload_folder": str(tmp_path), "dtype": torch.float32}
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, **options)
    assert on_meta(plain) == [False, True, True, False]
    config = SlicerConfig(codec="identity", split_layer=2)
    model = SlicerModelForCausalLM.from_pretrained(checkpoint, slicer_config=config, **options)
    ids = torch.tensor([[5, 9, 17, 3, 44, 8]])
    expected = plain.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_sharded_checkpoints_load_their_shards_partially(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    model = load_layers(folder, [3], dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert on_meta(model) == [True, True, True, False]
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, full.model.layers[3].mlp.up_proj.weight)


def test_names_transformers_changes_while_loading_are_read_partially(tmp_path, monkeypatch):
    """A head's prefix the base model lacks, and transformers 4's LayerNorm `gamma`/`beta`: renamed as
    transformers renames them, and still only this side's layers are read."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, BertConfig, BertForSequenceClassification

    import slicer_hf.loading as loading

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    assert "bert.encoder.layer.3.output.LayerNorm.gamma" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    full = AutoModel.from_pretrained(tmp_path)
    monkeypatch.setattr(loading, "_load_whole", lambda *args: pytest.fail("loaded whole"))
    model = load_layers(tmp_path, [2, 3], auto_class=AutoModel)
    assert on_meta(model) == [True, True, False, False]
    want = full.state_dict()
    held = {n: t for n, t in model.state_dict().items() if t.device.type != "meta"}
    assert "encoder.layer.3.output.LayerNorm.weight" in held
    assert all(torch.equal(t, want[n]) for n, t in held.items())


def test_a_checkpoint_whose_tensors_transformers_merges_loads_whole(tmp_path, monkeypatch):
    """Stacked MoE experts are built from one tensor per expert: only transformers' own load does that."""
    from transformers import MixtralConfig

    import slicer_hf.loading as loading

    config = MixtralConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
        vocab_size=97, num_local_experts=2,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    whole, real = [], loading._load_whole
    monkeypatch.setattr(loading, "_load_whole", lambda *args: whole.append(args) or real(*args))
    model = load_layers(tmp_path, range(2), dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert len(whole) == 1 and on_meta(model) == [False, False, True]
    for p, q in zip(decoder_layers(model)[1].parameters(), decoder_layers(full)[1].parameters()):
        assert torch.equal(p, q)


def test_a_quantized_checkpoint_loads_whole_with_its_quantizer(checkpoint, tmp_path, monkeypatch):
    """Its tensors are codes and scales, not weights: only transformers' quantizer makes them weights."""
    import json
    import shutil

    import slicer_hf.loading as loading

    folder = tmp_path / "quantized"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    whole = []
    monkeypatch.setattr(loading, "_load_whole", lambda *args: whole.append(args) or "loaded whole")
    assert load_layers(folder, range(2), dtype=torch.float32) == "loaded whole" and len(whole) == 1


def fake_hub(monkeypatch, repo, snapshot) -> list[str]:
    """A Hub that serves the folder `repo` into `snapshot`; returns the names of the files it sent, in order."""
    import fnmatch
    import shutil

    fetched = []

    def snapshot_download(repo_id, allow_patterns, **kwargs):
        snapshot.mkdir(exist_ok=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot / file.name)
                fetched.append(file.name)
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return fetched


def test_from_the_hub_a_whole_weight_file_beside_a_stale_index_is_the_one_read(checkpoint, tmp_path, monkeypatch):
    import shutil

    repo = tmp_path / "repo"
    tiny_model("llama", seed=1).save_pretrained(repo, max_shard_size="100KB")  # stale shards and their index
    shutil.copy(checkpoint / "model.safetensors", repo / "model.safetensors")
    fake_hub(monkeypatch, repo, tmp_path / "snapshot")
    model = load_layers("someone/tiny", range(2), dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight)


def test_from_the_hub_only_the_shards_this_side_reads_are_downloaded(tmp_path, monkeypatch):
    repo, snapshot = tmp_path / "repo", tmp_path / "snapshot"
    tiny_model("llama").save_pretrained(repo, max_shard_size="100KB")
    fetched = fake_hub(monkeypatch, repo, snapshot)
    model = load_layers("someone/tiny", range(2), dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)
    assert on_meta(model) == [False, False, True, True]
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight)
    weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    shallow = {shard for key, shard in weight_map.items() if not key.startswith(("model.layers.2.", "model.layers.3."))}
    deep_only = set(weight_map.values()) - shallow
    assert deep_only and not deep_only & set(fetched)  # shards of layers 2 and 3 alone never came down
