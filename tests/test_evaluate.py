"""`slicer-hf eval` and the benchmark suites, on a tiny model with the real tokenizer and real text."""

from __future__ import annotations

import json
import math

import pytest
import torch
from live import tiny_smol_dir
from typer.testing import CliRunner

from slicer_hf import ConfigError, SlicerConfig, build_codec
from slicer_hf.bench.concurrency import floors_ms_per_token, rows_by_layer
from slicer_hf.cli import app
from slicer_hf.evaluate import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 4-layer random Llama with SmolLM2's tokenizer, and a preset folder for it."""
    return tiny_smol_dir(tmp_path_factory.mktemp("tiny-smol"), SlicerConfig(split_layer=3, codec="slicer"))


def test_a_bad_text_is_named_in_one_line_before_any_weight_loads(tiny_dir, tmp_path, monkeypatch):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from slicer_hf import MissingDataError

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(MissingDataError, match="neither a file nor a WikiText-2 release"):
        evaluate(str(tiny_dir), str(tmp_path / "nosuch.txt"))
    with pytest.raises(ConfigError, match="fewer than one window of 512"):
        evaluate(str(tiny_dir), str(empty))
    with pytest.raises(ConfigError, match="max_tokens. must be >= window"):
        evaluate(str(tiny_dir), str(empty), max_tokens=100)
    with pytest.raises(ConfigError, match="a window of 1024 tokens exceeds the model's 512 positions"):
        evaluate(str(tiny_dir), str(empty), window=1024)  # learned positions would index past their table
    command = [sys.executable, "-c", "from slicer_hf.cli import main; main()", "eval", "--model", str(tiny_dir)]
    done = subprocess.run([*command, "--text", str(empty)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip() == "error: the text has 0 tokens, fewer than one window of 512"
    weights_only = tmp_path / "weights"  # a folder of weights alone has no tokenizer to read the text with
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(ConfigError, match="no tokenizer for .*; one is needed to read the text"):
        evaluate(str(weights_only), str(empty))


def test_lossless_eval_matches_the_unsplit_model_exactly(tiny_dir):
    r = evaluate(
        str(tiny_dir),
        "wikitext-2-v1:validation",
        split_layer=2,
        codec="identity",
        window=64,
        max_tokens=128,
        progress=False,
    )
    assert r["tokens_scored"] == 2 * 63
    assert r["ppl"] == r["ppl_ref"] and r["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert r["top1_agreement"] == 1.0
    assert r["bits_per_token"] == 8 * (4 + 3 + 64 * 4)  # envelope (4 bytes + 3 dims) + float32 row


def test_eval_reports_the_split_it_ran_when_neither_config_nor_option_names_one(tiny_dir):
    r = evaluate(str(tiny_dir), "wikitext-2-v1:validation", codec="identity", window=32, max_tokens=32, progress=False)
    assert r["split_layer"] == r["config"]["split_layer"] == 3  # the model's default: 3/4 of its 4 layers


def test_lossy_eval_reports_the_damage_and_the_savings(tiny_dir):
    r = evaluate(
        str(tiny_dir),
        "wikitext-2-v1:validation",
        config=str(tiny_dir / "preset"),
        codec="int8",
        window=64,
        max_tokens=128,
        progress=False,
    )
    assert r["kl_mean"] > 0 and r["bits_per_token"] < 64 * 16
    # as a session sends it: a NEXT message (6 bytes: version, type, session, a 2-byte seq, flags) around the packet
    # less its envelope
    envelope = len(build_codec("int8").envelope((1, 1, 64), torch.float32))
    assert r["bits_per_token_with_step_header"] == r["bits_per_token"] - 8 * (envelope - 6)


def test_lossy_eval_scores_the_split_against_the_unsplit_model_as_their_definitions_say(tiny_dir, tmp_path):
    """The quality figures the docs quote, recomputed here from their definitions: a lossy perplexity read off the
    reference, a reversed KL, agreement read off one side or a change of the wrong sign had all passed."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slicer_hf.data import load_text, token_windows

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # peaked next-token distributions, where KL's direction shows (a random head's are flat)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight * 30)
    model.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.save_pretrained(tmp_path)
    config = SlicerConfig(split_layer=2, codec="slicer", sparsity=0.8, num_blocks=1)  # coarse: top-1 moves
    r = evaluate(str(tmp_path), "wikitext-2-v1:validation", config=config, window=64, max_tokens=128, progress=False)
    codec = build_codec(config)
    windows = token_windows(tokenizer, load_text("wikitext-2-v1:validation"), 64, 128)
    ref_lp, out_lp, targets = [], [], []
    with torch.no_grad():
        for ids in windows:
            ids = ids[None]
            ref_lp.append(F.log_softmax(model(ids).logits[0, :-1], -1))
            handle = model.model.layers[1].register_forward_hook(
                lambda m, a, out: (
                    (codec.decode(codec.encode(out[0] if isinstance(out, tuple) else out)),)
                    if isinstance(out, tuple)
                    else codec.decode(codec.encode(out))
                )
            )
            out_lp.append(F.log_softmax(model(ids).logits[0, :-1], -1))
            handle.remove()
            targets.append(ids[0, 1:])
    ref_lp, out_lp, targets = torch.cat(ref_lp), torch.cat(out_lp), torch.cat(targets)
    n = len(targets)
    ppl_ref = math.exp(-ref_lp.gather(1, targets[:, None]).sum().item() / n)
    ppl = math.exp(-out_lp.gather(1, targets[:, None]).sum().item() / n)
    assert r["tokens_scored"] == n and r["ppl_ref"] == pytest.approx(ppl_ref, rel=1e-5)
    assert r["ppl"] == pytest.approx(ppl, rel=1e-5) and r["ppl"] != pytest.approx(ppl_ref, rel=1e-6)
    assert r["ppl_change_pct"] == pytest.approx(100 * (ppl / ppl_ref - 1), abs=1e-3) and r["ppl_change_pct"] > 0.1
    kl = F.kl_div(out_lp, ref_lp, log_target=True, reduction="sum").item() / n  # KL(reference || split)
    reverse = F.kl_div(ref_lp, out_lp, log_target=True, reduction="sum").item() / n
    assert r["kl_mean"] == pytest.approx(kl, rel=1e-3) and abs(reverse - kl) > 0.01 * kl
    agree = (ref_lp.argmax(-1) == out_lp.argmax(-1)).float().mean().item()
    assert r["top1_agreement"] == pytest.approx(agree) and r["top1_agreement"] < 1


@pytest.mark.parametrize(
    "downlink",
    [{}, {"downlink_dtype": "bfloat16"}, {"downlink": "logits"}, {"downlink": "logits", "downlink_dtype": "float16"}],
)
def test_eval_sizes_replies_as_a_decode_step_gets_them(tiny_dir, downlink):
    from transformers import AutoModelForCausalLM

    from slicer_hf import SlicerModelForCausalLM

    config = SlicerConfig(split_layer=2, codec="int8", **downlink)
    r = evaluate(str(tiny_dir), "wikitext-2-v1:validation", config=config, window=64, max_tokens=64, progress=False)
    model = SlicerModelForCausalLM.from_model(AutoModelForCausalLM.from_pretrained(tiny_dir), config)
    cache = model(torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
    for token in range(8, 140):  # single-token steps, as decoding sends them, until eval's 2-byte sequence numbers
        if token == 137:
            model.reset_wire_stats()
        cache = model(torch.tensor([[token]]), cache=cache, use_cache=True).past_key_values
    stats = model.wire_stats()
    assert r["downlink_bits_per_token"] == 8 * stats.downlink_bytes / stats.downlink_messages


def test_eval_refuses_what_it_cannot_score(tiny_dir):
    from slicer_hf import ConfigError

    with pytest.raises(ConfigError, match="topk_logits"):  # everything outside the top k comes back as -inf
        evaluate(str(tiny_dir), "wikitext-2-v1:validation", config=SlicerConfig(split_layer=2, downlink="topk_logits"))
    with pytest.raises(ValueError, match="window"):  # a one-token window predicts nothing
        evaluate(str(tiny_dir), "wikitext-2-v1:validation", split_layer=2, window=1, max_tokens=4)


def test_codec_speed_suite_runs_from_the_cli(tiny_dir, tmp_path):
    out = tmp_path / "codec_speed.json"
    args = ["bench", "codec-speed", "--model", str(tiny_dir), "--config", str(tiny_dir / "preset"), "--out-json"]
    result = CliRunner().invoke(app, [*args, str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["codec"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fp16", "int8", "topk", "slicer"}
    assert rows["fp16"]["bits_per_token"] == 8 * (len(build_codec("fp16").envelope((1, 1, 64), torch.float32)) + 128)


def test_a_suite_config_whose_split_the_model_lacks_is_a_clear_error(tiny_dir):
    result = CliRunner().invoke(app, ["bench", "codec-speed", "--model", str(tiny_dir), "--out-json", "/dev/null"])
    assert isinstance(result.exception, ConfigError)  # the CLI prints it as one line; it had been KeyError: 'h'
    assert "split layer 24: this model has 4 layers, so it must be 1..3" in str(result.exception)


def test_a_suite_config_without_a_split_splits_where_generate_would(tiny_dir, tmp_path):
    from slicer_hf.bench.common import suite_config

    SlicerConfig(codec="slicer").save_pretrained(tmp_path / "nosplit")
    assert suite_config(str(tmp_path / "nosplit"), str(tiny_dir)).split_layer == SlicerConfig().split_layer_for(4)
    out = tmp_path / "codec_speed.json"
    args = ["bench", "codec-speed", "--model", str(tiny_dir), "--config", str(tmp_path / "nosplit"), "--out-json"]
    result = CliRunner().invoke(app, [*args, str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["split_layer"] == 3


def test_eval_cli_writes_json(tiny_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--dataset",
            "wikitext-2-v1:validation",
            "--split-layer",
            "2",
            "--codec",
            "fp16",
            "--window",
            "64",
            "--max-tokens",
            "64",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fp16 @ layer 2/4" in result.output
    assert json.loads(out.read_text())["tokens_scored"] == 63


def test_eval_cli_needs_exactly_one_text_source(tiny_dir):
    for source in [[], ["--text", ""], ["--dataset", ""], ["--text", "a.txt", "--dataset", "wikitext-2-raw-v1"]]:
        result = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), *source])
        assert result.exit_code == 2 and "exactly one of --text" in result.output, source


def test_drift_suite_runs_from_the_cli(tiny_dir, tmp_path):
    out = tmp_path / "drift.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "drift",
            "--model",
            str(tiny_dir),
            "--config",
            str(tiny_dir / "preset"),
            "--prompts",
            "1",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "8",
            "--bucket",
            "4",
            "--out-json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["positions"] for r in rows] == ["1-4", "5-8"]
    assert all(0.0 <= r["top1_agreement"] <= 1.0 and r["kl_mean"] >= 0 for r in rows)


def test_server_compute_suite_measures_a_real_server(tiny_dir, tmp_path):
    out = tmp_path / "server.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "server-compute",
            "--model",
            str(tiny_dir),
            "--config",
            str(tiny_dir / "preset"),
            "--prompt-tokens",
            "8",
            "--decode-steps",
            "4",
            "--repeats",
            "1",
            "--out-json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())
    rows = measured["rows"]
    assert [r["downlink"] for r in rows] == ["hidden", "topk_logits", "logits"]
    preset = SlicerConfig.from_pretrained(tiny_dir / "preset")  # what was measured is on record
    assert measured["uplink_codec"] == json.loads(json.dumps({"codec": preset.codec, **preset.codec_params()}))
    assert rows[0]["uplink_bits_per_decode_token"] % 8 == 0 and rows[0]["uplink_bits_per_decode_token"] > 0
    assert rows[-1]["split_layer"] == 1 and rows[-1]["saving_vs_whole"] == 1.0
    assert all(math.isfinite(r["server_cpu_ms_per_decode_token"]) for r in rows)  # tiny model: noise-level CPU


def test_concurrency_suite_measures_batched_and_one_by_one(tiny_dir, tmp_path):
    out = tmp_path / "concurrency.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "concurrency",
            "--model",
            str(tiny_dir),
            "--config",
            str(tiny_dir / "preset"),
            "--clients",
            "1",
            "3",
            "--prompt-tokens",
            "4",
            "--decode-steps",
            "3",
            "--out-json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["server_prepack"] is True  # the server's default
    assert [(r["scenario"], r["batching"], r["clients"]) for r in rows] == [
        (scenario, batching, n)
        for scenario in ("one split", "mixed splits")
        for batching in (False, True)
        for n in (1, 3)
    ]
    assert all(r["decode_tokens"] == r["clients"] * 3 and r["refused"] == 0 for r in rows)
    assert all(r["rows_per_forward"] == 1 for r in rows if not r["batching"])
    assert all(r["floor_ms_per_token"] > 0 and r["p99_step_ms"] >= r["p50_step_ms"] for r in rows)
    assert all(r["streamed_floor_ms_per_token"] > 0 and r["codec_ms_per_decode_token"] > 0 for r in rows)
    assert all(r["linear_floor_ms_per_token"] > 0 for r in rows)
    for r in rows:  # the server's CPU, split by where it went: the compute thread's parts fit in that thread's time
        assert r["compute_cpu_ms_per_decode_token"] > 0 and r["codec_cpu_ms_per_decode_token"] > 0
        assert r["scheduling_cpu_ms_per_decode_token"] >= 0 and r["network_cpu_ms_per_decode_token"] > 0
        assert r["compute_cpu_ms_per_decode_token"] <= 1.05 * r["compute_ms_per_decode_token"] + 0.01  # CPU <= wall
    assert len({tuple(r["splits"]) for r in rows}) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_floor_is_measured_in_the_dtype_of_the_served_weights(dtype):
    weights = {5: [torch.randn(48, 32, dtype=dtype), torch.randn(32, 48, dtype=dtype)]}
    for streamed in (False, True):
        floors = floors_ms_per_token(weights, {5: 4.0}, streamed=streamed)
        assert 0 < floors["floor"] <= floors["linear"]  # the faster kernel, or torch's alone


def test_with_mixed_splits_a_layer_runs_only_the_rows_split_at_or_below_it():
    assert rows_by_layer([20, 24, 27], 30.0, 30) == {
        **dict.fromkeys(range(20, 24), 10.0),
        **dict.fromkeys(range(24, 27), 20.0),
        **dict.fromkeys(range(27, 30), 30.0),
    }
    assert rows_by_layer([24] * 8, 7.5, 30) == dict.fromkeys(range(24, 30), 7.5)


def test_the_floor_of_a_forward_counts_each_layer_at_its_rows_and_between_whole_row_counts(monkeypatch):
    from slicer_hf.bench import concurrency

    cost = {}  # a matmul's modelled time: a fixed part (its weight's read) and a part per row

    def modelled(fn, repeats=0, warmup=0):  # the products fn runs, summed
        cost["now"] = 0.0
        fn()
        return cost["now"]

    def product(x, weight):
        cost["now"] += 1e-3 * weight.shape[0] + 1e-4 * x.shape[0]
        return x

    monkeypatch.setattr(concurrency, "median_time", modelled)
    monkeypatch.setattr(torch.nn.functional, "linear", product)
    monkeypatch.setattr(concurrency, "packable", lambda device, dtype: False)
    weights = {0: [torch.zeros(3, 2)], 1: [torch.zeros(5, 2)]}
    got = floors_ms_per_token(weights, {0: 1.5, 1: 3.0})  # 1.5 rows: halfway between 1 and 2
    forward = (3e-3 + 1.5e-4) + (5e-3 + 3e-4)
    assert got["linear"] == pytest.approx(1000 * forward / 3.0) and got["floor"] == got["linear"]
    # one by one, two sessions split at layers 0 and 1: layer 0 runs in half the forwards, of one row
    one_by_one = floors_ms_per_token(weights, rows_by_layer([0, 1], 1.0, 2))
    assert one_by_one["linear"] == pytest.approx(1000 * (0.5 * (3e-3 + 1e-4) + (5e-3 + 1e-4)))
    # streamed, the same: the weights at a whole row count do not dilute the share of those between two
    three = {j: [torch.zeros(4, 2)] for j in range(3)}
    at = rows_by_layer([0, 1, 2], 1.0, 3)
    hot, streamed = floors_ms_per_token(three, at), floors_ms_per_token(three, at, streamed=True)
    assert streamed["linear"] == pytest.approx(hot["linear"])
