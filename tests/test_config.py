import json
import logging
import tempfile
from pathlib import Path

import pytest
import torch

from slicer_hf import CodecError, ConfigError, SlicerConfig
from slicer_hf.config import CONFIG_NAME


def test_round_trip_is_sorted_and_version_stamped(tmp_path):
    config = SlicerConfig(split_layer=24, sparsity=0.5, num_blocks=4, bit_candidates=(8, 2, 4, 2))
    path = config.save_pretrained(tmp_path)
    assert path == tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    assert list(data) == sorted(data)
    assert data["slicer_hf_version"]
    assert data["bit_candidates"] == [2, 4, 8]
    assert SlicerConfig.from_pretrained(tmp_path) == config


def test_from_pretrained_applies_overrides(tmp_path):
    SlicerConfig(split_layer=3).save_pretrained(tmp_path)
    assert SlicerConfig.from_pretrained(tmp_path, split_layer=5).split_layer == 5


def test_unknown_keys_from_newer_versions_warn_not_crash(tmp_path, caplog):
    data = SlicerConfig(split_layer=2).to_dict() | {"quantum_entanglement": True}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        config = SlicerConfig.from_pretrained(tmp_path)
    assert config.split_layer == 2
    assert "quantum_entanglement" in caplog.text


def test_a_config_a_newer_version_saved_says_so_where_this_one_cannot_read_it(tmp_path, caplog):
    data = SlicerConfig(split_layer=2).to_dict() | {"quantizer": "ecsq2", "slicer_hf_version": "99.0.0"}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data | {"quantum_entanglement": True}))
    with pytest.raises(
        ConfigError, match=r"got 'ecsq2' \(this config was saved by slicer_hf 99.0.0, this is .*upgrade"
    ):
        SlicerConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data | {"quantizer": "ecsq", "quantum_entanglement": True}))
    with caplog.at_level(logging.WARNING):
        SlicerConfig.from_pretrained(tmp_path)
    assert "saved by slicer_hf 99.0.0" in caplog.text
    data["slicer_hf_version"] = "0.0.1"  # an older one: the value is simply wrong
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="got 'ecsq2'$"):
        SlicerConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sparsity", 1.2, "`sparsity` must be in [0, 1), got 1.2"),
        ("split_layer", 0, "`split_layer` must be an integer >= 1"),
        ("codec", "gzip", "`codec` must be one of"),
        ("asymmetry", 1.5, "`asymmetry` must be 'auto' or in [0, 1]"),
        ("num_blocks", 0, "`num_blocks` must be an integer in [1, 64]"),
        ("num_blocks", 2.5, "`num_blocks` must be an integer in [1, 64]"),
        ("outliers", 1.5, "`outliers` must be an integer in [0, 64]"),
        ("prefill_chunk_tokens", 256.0, "`prefill_chunk_tokens` must be an integer >= 1"),  # JSON's 256.0
        ("distortion", 0.0, "`distortion` must be in (0, 1)"),
        ("bit_candidates", (3, 17), "`bit_candidates`"),
        ("downlink", "carrier-pigeon", "`downlink` must be one of"),
        # the wrong type is named too, never a bare TypeError/ValueError from a comparison
        ("sparsity", "0.5", "`sparsity` must be in [0, 1), got '0.5'"),
        ("step", "0.3", "`step` must be in (0, 4], got '0.3'"),
        ("step", float("nan"), "`step` must be in (0, 4], got nan"),
        ("distortion", None, "`distortion` must be in (0, 1), got None"),
        ("asymmetry", "most", "`asymmetry` must be 'auto' or in [0, 1], got 'most'"),
        ("bit_candidates", ("x",), "`bit_candidates` must be a non-empty set of integer bitwidths"),
        ("bit_candidates", (2.7,), "`bit_candidates` must be a non-empty set of integer bitwidths"),  # not rounded
        ("bit_candidates", 4, "`bit_candidates` must be a non-empty set of integer bitwidths"),
        ("split_layer", True, "`split_layer` must be an integer >= 1"),
        ("num_hidden_layers", "30", "`num_hidden_layers` must be an integer >= 1 or None, got '30'"),
        ("hidden_size", 0, "`hidden_size` must be an integer >= 1 or None, got 0"),
        ("model_id", 135, "`model_id` must be a string or None, got 135"),
        ("downlink_step", True, "`downlink_step` must be None or in (0, 4]"),
    ],
)
def test_validation_names_field_rule_and_value(field, value, message):
    with pytest.raises(ConfigError) as info:
        SlicerConfig(**{field: value})
    assert message in str(info.value)


def test_a_malformed_bitrate_ladder_or_target_is_named():
    adaptive = {"quantizer": "ecsq", "target_token_latency_ms": 40.0}
    with pytest.raises(ConfigError, match="`bitrate_ladder` must be a list of \\(step, bits\\) pairs"):
        SlicerConfig(**adaptive, bitrate_ladder=[(0.3,)])
    with pytest.raises(ConfigError, match="`target_token_latency_ms` must be a number > 0, got '40'"):
        SlicerConfig(**adaptive | {"target_token_latency_ms": "40"}, bitrate_ladder=[(0.3, 2000.0), (0.6, 1000.0)])


def test_json_and_cli_values_are_normalised():
    config = SlicerConfig(
        asymmetry="0.5",
        bit_candidates=[8, 2, 2],
        bitrate_ladder=[[0.3, 2000], [0.6, 1000]],
        quantizer="ecsq",
        target_token_latency_ms=40,
    )
    assert (config.asymmetry, config.bit_candidates) == (0.5, (2, 8))
    assert config.bitrate_ladder == ((0.3, 2000.0), (0.6, 1000.0))


def test_numpy_numbers_become_pythons_so_the_config_saves_and_opens_sessions(tmp_path):
    """np.float32(0.3) passed every check, then failed as JSON when saved or when a session opened."""
    import numpy as np

    config = SlicerConfig(step=np.float32(0.3), distortion=np.float16(0.05), split_layer=np.int64(3))
    assert (type(config.step), type(config.distortion), type(config.split_layer)) == (float, float, int)
    config.save_pretrained(tmp_path)
    assert SlicerConfig.from_pretrained(tmp_path) == config


def test_split_layer_must_leave_server_layers():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        SlicerConfig(split_layer=30, num_hidden_layers=30)
    assert [SlicerConfig().split_layer_for(n) for n in range(2, 9)] == [1, 2, 3, 4, 4, 5, 6]  # 3/4, one left over


def test_a_basis_is_named_by_a_digest_of_16_lowercase_hex_digits():
    for basis in ("abc", "", "0123456789ABCDEF", "0123456789abcdef0"):
        with pytest.raises(ConfigError, match="basis"):
            SlicerConfig(quantizer="ecsq", rotation="calibrated", basis=basis)


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no slicer_config.json"):
        SlicerConfig.from_pretrained(tmp_path)


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SlicerConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"split_layer": 2}', encoding="utf-16")  # not UTF-8
    with pytest.raises(ConfigError, match="not valid JSON"):
        SlicerConfig.from_pretrained(tmp_path)


def test_hub_repo_ids_go_through_hf_hub_download(tmp_path, monkeypatch):
    SlicerConfig(split_layer=7).save_pretrained(tmp_path)
    calls = []

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert SlicerConfig.from_pretrained("someone/slicer-preset", revision="v1").split_layer == 7
    assert calls == [("someone/slicer-preset", CONFIG_NAME, "v1")]


def test_push_to_hub_uploads_config_and_model_card(fake_hub):
    uploaded = fake_hub
    config = SlicerConfig(split_layer=24, model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    url = config.push_to_hub("someone/preset", private=True, token="hf_x")
    assert url.endswith("/commit/abc")
    assert uploaded["repo"] == ("someone/preset", True, True)
    assert json.loads(uploaded["files"][CONFIG_NAME])["split_layer"] == 24
    assert "SmolLM2-135M-Instruct" in uploaded["files"]["README.md"]


def test_push_to_hub_keeps_the_card_a_model_repo_already_has_and_answers_a_pr_with_its_url(fake_hub):
    fake_hub["existing"].add("README.md")  # a model repo: its own card must stay
    url = SlicerConfig(split_layer=24).push_to_hub("someone/model", create_pr=True)
    assert sorted(fake_hub["files"]) == [CONFIG_NAME]
    assert url == "https://huggingface.co/someone/model/discussions/1"


def test_a_config_that_cannot_be_saved_pushes_nothing_and_makes_no_repo(fake_hub, tmp_path):
    config = SlicerConfig(quantizer="ecsq", rotation="calibrated", basis="0123456789abcdef")  # registered nowhere
    with pytest.raises(CodecError, match="unknown SLICER basis"):
        config.push_to_hub("someone/preset")
    assert "repo" not in fake_hub and "files" not in fake_hub
    with pytest.raises(CodecError, match="unknown SLICER basis"):
        config.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / CONFIG_NAME).exists()  # no config left without its basis


def test_presets_ship_in_the_package_and_load_by_name_and_from_configs():
    from pathlib import Path

    from slicer_hf.config import available_presets

    assert "smollm2-135m-split24" in available_presets()
    for name in available_presets():
        by_name = SlicerConfig.from_pretrained(name)
        assert by_name == SlicerConfig.from_pretrained(Path(__file__).parents[1] / "configs" / name)
    assert SlicerConfig.from_pretrained("smollm2-135m-split24", split_layer=20).split_layer == 20
    with pytest.raises(ConfigError, match="the preset 'smollm2-135m-split24' has no subfolder 'x'"):  # not the Hub
        SlicerConfig.from_pretrained("smollm2-135m-split24", subfolder="x", local_files_only=True)


def test_a_pushed_preset_reads_back_from_a_hub_like_folder(tmp_path, monkeypatch):
    """push_to_hub writes the Hub layout (repo/slicer_config.json + README.md) that from_pretrained reads."""
    import shutil
    from types import SimpleNamespace

    hub = tmp_path / "hub"

    class LocalHubApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            (hub / repo_id).mkdir(parents=True, exist_ok=exist_ok)

        def file_exists(self, repo_id, filename):
            return (hub / repo_id / filename).is_file()

        def upload_folder(self, repo_id, folder_path, commit_message, create_pr):
            shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
            return SimpleNamespace(commit_url=f"local://{repo_id}", pr_url=None)

    def download(repo_id, filename, revision=None):
        path = hub / repo_id / filename
        if not path.is_file():
            raise FileNotFoundError(path)
        return str(path)

    monkeypatch.setattr("huggingface_hub.HfApi", LocalHubApi)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    preset = SlicerConfig.from_pretrained("smollm2-135m-split24")
    preset.push_to_hub("someone/smollm2-split24")
    from slicer_hf.codec.basis import basis_file

    names = sorted(p.name for p in (hub / "someone/smollm2-split24").iterdir())
    assert names == sorted(["README.md", CONFIG_NAME, basis_file(preset.basis)])  # the calibrated basis travels too
    assert SlicerConfig.from_pretrained("someone/smollm2-split24") == preset


def test_grouped_codec_settings_live_in_the_config(tmp_path):
    from slicer_hf import build_codec

    config = SlicerConfig(codec="grouped", bits=6, group_size=16, outliers=1)
    assert build_codec(config).params() == {"bits": 6, "group_size": 16, "outliers": 1}
    config.save_pretrained(tmp_path)
    assert SlicerConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ConfigError, match="`bits` must be an integer in \\[2, 16\\], got 1"):
        SlicerConfig(codec="grouped", bits=1)
    with pytest.raises(ConfigError, match="`group_size`"):
        SlicerConfig(codec="grouped", group_size=0)


def split_model_folder(path, config: SlicerConfig):
    """A tiny Llama saved in `path` with `config` as its slicer_config.json."""
    from conftest import tiny_model

    tiny_model("llama").save_pretrained(path)
    config.save_pretrained(path)
    return path


def test_a_model_repo_on_the_hub_gives_its_own_split_settings(tmp_path, monkeypatch):
    """Read from a Hub cache, as offline: the repo's slicer_config.json, at the model's revision and subfolder."""
    from slicer_hf import SlicerModelForCausalLM

    commit = "a" * 40
    repo = tmp_path / "cache" / "models--someone--tiny-split"
    split_model_folder(repo / "snapshots" / commit / "v2", SlicerConfig(split_layer=1, codec="int8"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = dict(cache_dir=tmp_path / "cache", subfolder="v2")
    model = SlicerModelForCausalLM.from_pretrained("someone/tiny-split", **hub)
    assert (model.slicer_config.split_layer, model.slicer_config.codec) == (1, "int8")
    named = SlicerModelForCausalLM.from_pretrained("someone/tiny-split", slicer_config={"split_layer": 2}, **hub)
    assert named.slicer_config.split_layer == 2  # a dict of fields is a config too


def test_a_named_config_repo_is_fetched_with_the_models_credentials(tmp_path, monkeypatch):
    from slicer_hf import SlicerModelForCausalLM

    folder = split_model_folder(tmp_path / "model", SlicerConfig())
    SlicerConfig(split_layer=1).save_pretrained(tmp_path / "private")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(tmp_path / "private" / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    model = SlicerModelForCausalLM.from_pretrained(folder, slicer_config="someone/private", token="hf_x", cache_dir="c")
    assert model.slicer_config.split_layer == 1
    assert calls == [("someone/private", CONFIG_NAME, {"token": "hf_x", "cache_dir": "c"})]


def test_save_pretrained_with_push_to_hub_uploads_the_split_settings_too(tmp_path, monkeypatch):
    from slicer_hf import SlicerModelForCausalLM

    model = SlicerModelForCausalLM.from_pretrained(split_model_folder(tmp_path / "model", SlicerConfig(split_layer=1)))
    pushed = []

    def push_to_hub(self, repo_id, **kwargs):
        with tempfile.TemporaryDirectory() as folder:  # as transformers does: save, then upload the folder
            self.save_pretrained(folder)
            pushed.append((repo_id, kwargs, sorted(p.name for p in Path(folder).iterdir())))

    monkeypatch.setattr(type(model), "push_to_hub", push_to_hub)
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="someone/split", commit_message="m")
    [(repo_id, kwargs, files)] = pushed
    assert repo_id == "someone/split" and kwargs == {"token": None, "commit_message": "m"}
    assert CONFIG_NAME in files and (tmp_path / "out" / CONFIG_NAME).is_file()


def test_layers_an_edge_released_are_not_run_again(tmp_path):
    from slicer_hf import SlicerModelForCausalLM

    folder = split_model_folder(tmp_path / "model", SlicerConfig(split_layer=2))
    edge = SlicerModelForCausalLM.from_pretrained(folder, transport="grpc://127.0.0.1:9")  # nothing listens
    with pytest.raises(ConfigError, match="layers 2..3 hold no weights here"):
        SlicerModelForCausalLM.from_model(edge, SlicerConfig(split_layer=2))  # in process: every layer runs here
    with pytest.raises(ConfigError, match="layer 2 holds no weights here"):
        SlicerModelForCausalLM.from_model(edge, SlicerConfig(split_layer=3), transport="grpc://127.0.0.1:9")
    with pytest.raises(ConfigError, match="fixed at 2 with a remote server"):  # it holds layers 0..1 alone
        edge.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, split_layer=3)


def test_a_null_ladder_in_a_config_file_is_no_ladder_and_saves_again(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"split_layer": 2, "bitrate_ladder": None}))
    config = SlicerConfig.from_pretrained(tmp_path)
    assert config.bitrate_ladder == ()
    config.save_pretrained(tmp_path / "again")
    assert SlicerConfig.from_pretrained(tmp_path / "again") == config


def test_a_folder_given_with_a_tilde_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    SlicerConfig(split_layer=3).save_pretrained(tmp_path / "cfg")
    assert SlicerConfig.from_pretrained("~/cfg").split_layer == 3


def test_switches_must_be_true_or_false_and_unknown_fields_are_named():
    for value in (None, 0, "", "true", 1):
        with pytest.raises(ConfigError, match="`trellis` must be true or false"):
            SlicerConfig(trellis=value)
        with pytest.raises(ConfigError, match="`predict_previous` must be true or false"):
            SlicerConfig(predict_previous=value)
    with pytest.raises(ConfigError, match="no field 'split_layers'.*'split_layer'"):
        SlicerConfig().replace(split_layers=3)
    with pytest.raises(ConfigError, match="no field 'split_layers'"):
        SlicerConfig.from_pretrained("smollm2-135m-split24", split_layers=3)


def test_leaving_a_calibrated_basis_names_every_field_to_clear_at_the_first_refusal():
    with pytest.raises(ConfigError, match="set basis=None, trellis=False and predict_previous=False"):
        SlicerConfig.from_pretrained("smollm2-135m-split24", rotation="orthogonal")
    fix = {"basis": None, "trellis": False, "predict_previous": False}
    assert SlicerConfig.from_pretrained("smollm2-135m-split24", rotation="orthogonal", **fix).rotation == "orthogonal"
