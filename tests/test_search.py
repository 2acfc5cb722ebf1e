"""SLICER-Search: profiles round-trip and refuse bad input; the planner predicts, ranks by the objective, respects
every constraint, names the binding one when none can be met, and writes a config that loads."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from slicer_hf import ConfigError, SlicerConfig, build_codec, protocol
from slicer_hf.cli import app
from slicer_hf.tuning import (
    Constraints,
    InfeasibleError,
    LayerCost,
    LinkSpec,
    Profile,
    RatePoint,
    profile_model,
    search,
)
from slicer_hf.tuning.planner import (
    FRAMING_BYTES_DOWN,
    FRAMING_BYTES_UP,
    SEGMENT_BYTES,
    _on_wire,
    _pareto,
    _step_overhead_bits,
    candidates,
    predict,
)
from slicer_hf.tuning.profile import PROFILE_FORMAT, default_splits, measure_timing

L, D = 8, 64
STEPS = (0.2, 0.4, 0.8, 1.6)


def synthetic_profile(layer_ms: float = 2.0, fingerprint: str = "f" * 16) -> Profile:
    """An 8-layer model: each layer `layer_ms` per decode token and 1 MB of weights; ECSQ bits fall by one bit per
    coordinate each time the step doubles; KL grows as step^2 and is larger at deeper splits."""
    points = []
    for k in range(2, L, 2):
        for s in STEPS:
            bits = D * (4 - math.log2(s / 0.2)) + 40
            kl = 0.002 * (s / 0.2) ** 2 * (1 + k / L)
            points.append(RatePoint(k, "slicer", s, bits, kl, 10 * kl, 0.99, 0.2, 0.1))
        points.append(RatePoint(k, "fp16", None, 16 * D + 32, 1e-6, 0.0, 1.0, 0.01, 0.01))
    points += [RatePoint(L, "slicer", s, D * 3.0, 0.001 * s / 0.1, 0.01 * s / 0.1, 0.99, 0.1, 0.1) for s in (0.1, 0.2)]
    return Profile(
        machine={"cpu": "test", "torch_threads": 1},
        versions={"torch": torch.__version__},
        model={
            "id": "synthetic",
            "num_hidden_layers": L,
            "hidden_size": D,
            "vocab_size": 100,
            "fingerprint": fingerprint,
        },
        layers=[LayerCost(layer_ms / 4, layer_ms, 1_000_000, 1024) for _ in range(L)],
        edge={
            "embed_decode_ms": 0.1,
            "head_decode_ms": 0.5,
            "step_overhead_ms": 1.0,
            "decode_step_ms": L * layer_ms + 1.6,
            "embed_bytes": 2e6,
            "head_bytes": 0.0,
            "other_bytes": 0.0,
        },
        rate_distortion=points,
        calibration={"text": "synthetic"},
    )


EDGE, SERVER = synthetic_profile(layer_ms=4.0), synthetic_profile(layer_ms=1.0)
FAST, SLOW = LinkSpec(100.0, 100.0), LinkSpec(0.05, 100.0)


# ------------------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("run", [{"decode_tokens": 1}, {"prompt_tokens": 1}, {"repeats": 0}])
def test_a_timing_run_with_no_decode_step_to_time_is_refused_before_it_runs(run):
    with pytest.raises(ConfigError, match="a timing run needs prompt_tokens >= 2, decode_tokens >= 2"):
        measure_timing(tiny_model("llama").eval(), **run)
    option = "--" + next(iter(run)).replace("_", "-")
    if option != "--repeats":  # the CLI refuses before loading anything
        result = CliRunner().invoke(app, ["profile", "--model", "nowhere", "--out", "p.json", option, "1"])
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output


@pytest.mark.parametrize("layers, splits", [(1, None), (4, [4]), (4, [0, 2])])
def test_a_profile_without_a_split_to_measure_is_refused_before_its_timing_run(layers, splits, monkeypatch):
    """A 1-layer model, or a split at the last layer (where no server layer is left), used to yield a profile that
    the search could not use, after minutes of timing."""
    import slicer_hf.tuning.profile as profiling

    monkeypatch.setattr(profiling, "measure_timing", lambda *a, **k: pytest.fail("timed a profile it then refused"))
    model = tiny_model("llama").eval()
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    match = "cannot be split" if layers == 1 else r"must be in \[1, 3\]"
    with pytest.raises(ConfigError, match=match):
        profile_model(model, "tiny", None, split_layers=splits)


@pytest.mark.parametrize(
    "option, value, refusal",
    [("--splits", "0,9", r"must be in \[1, 3\]"), ("--steps", "-1", "step"), ("--splits", "a,b", "comma-separated")],
)
def test_the_profile_command_refuses_its_bad_choices_before_the_weights_load(
    option, value, refusal, tmp_path, monkeypatch
):
    """They had been refused only after the model's weights loaded."""
    import transformers

    tiny_model("llama").config.save_pretrained(tmp_path / "m")  # a config is all a refusal needs
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    args = ["profile", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "p.json")]  # refused before the text
    result = CliRunner().invoke(app, [*args, option, value])
    assert result.exit_code != 0
    said = result.output + str(result.exception)
    assert re.search(refusal, said), said


@pytest.mark.parametrize(
    "options, refusal",
    [
        ({"prompt_tokens": 60, "decode_tokens": 8}, "timing run's 60 prompt and 8 new tokens exceed the model's 64"),
        ({"prompt_tokens": 8, "decode_tokens": 4, "windows": torch.zeros(1, 80, dtype=torch.long)}, "window of 80"),
    ],
)
def test_a_profile_longer_than_the_models_positions_is_refused_before_its_timing_run(options, refusal, monkeypatch):
    """calibrate and eval checked their windows; profile went on into a raw IndexError on learned positions, after
    its timing run (or within it, at the default 128-token prompt)."""
    import slicer_hf.tuning.profile as profiling

    monkeypatch.setattr(profiling, "measure_timing", lambda *a, **k: pytest.fail("timed a profile it then refused"))
    model = tiny_model("llama").eval()
    model.config.max_position_embeddings = 64
    windows = options.pop("windows", None)
    with pytest.raises(ConfigError, match=refusal):
        profile_model(model, "tiny", windows, "random", split_layers=[2], **options)


def test_a_profile_leaves_out_the_fp16_points_where_the_rows_overflow_float16():
    """Rows past 65,504 made the fp16 point raise, and the whole profile (its timing run too) was lost."""
    model = tiny_model("llama").eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)  # the residual stream carries the embeddings: far past float16
    windows = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="codec fp16 left out at split 2: .*overflow float16"):
        profile = profile_model(
            model, "tiny", windows, "random", split_layers=[2], steps=(0.5,), downlink_steps=(), repeats=1
        )
    assert {(p.split_layer, p.codec) for p in profile.rate_distortion} == {(2, "slicer")}


def test_a_profile_of_a_real_model_round_trips_through_json(tmp_path):
    model = tiny_model("llama").eval()
    windows = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    profile = profile_model(
        model, "tiny", windows, "random", split_layers=[1, 3], steps=(0.3, 1.0), downlink_steps=(0.1,), repeats=1
    )
    assert profile.num_layers == 4 and profile.split_layers() == [1, 3]
    assert {(p.split_layer, p.codec, p.step) for p in profile.rate_distortion} == {
        (1, "slicer", 0.3), (1, "slicer", 1.0), (1, "fp16", None), (3, "slicer", 0.3), (3, "slicer", 1.0),
        (3, "fp16", None), (4, "slicer", 0.1),
    }  # fmt: skip
    assert all(
        layer.decode_ms > 0 and layer.weight_bytes > 0 and layer.kv_bytes_per_token > 0 for layer in profile.layers
    )
    coarse, fine = (next(p for p in profile.points(1) if p.step == s) for s in (1.0, 0.3))
    assert coarse.bits_per_token < fine.bits_per_token
    assert profile.machine["torch_threads"] == torch.get_num_threads() and "transformers" in profile.versions
    assert Profile.load(profile.save(tmp_path)) == profile
    assert Profile.load(profile.save(tmp_path / "p.json")) == profile


def test_default_splits_spread_over_the_model_and_hold_three_quarters():
    assert default_splits(30) == [3, 6, 9, 12, 15, 18, 21, 22, 24, 27]
    assert default_splits(4) == [1, 2, 3]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format="other/1"), "format"),
        (lambda d: d.pop("layers"), "malformed"),
        (lambda d: d["layers"].pop(), "layers for a model of"),
        (lambda d: d["rate_distortion"][0].update(split_layer=99), "outside"),
        (lambda d: d["layers"][0].update(bogus=1), "malformed"),
        # every field search reads is checked here, not met later as a bare TypeError or KeyError
        (lambda d: d["model"].update(num_hidden_layers="four"), r"model: num_hidden_layers must be an integer"),
        (lambda d: d["model"].pop("hidden_size"), r"model: missing fields \['hidden_size'\]"),
        (lambda d: d["model"].update(dtype="foo"), "model: dtype must be one of"),
        (lambda d: d.update(edge=[]), "edge must be an object"),
        (lambda d: d["edge"].pop("head_decode_ms"), r"edge: missing fields \['head_decode_ms'\]"),
        (lambda d: d["layers"][1].update(decode_ms=None), r"layers\[1\]: decode_ms must be a number >= 0"),
        (lambda d: d["layers"][1].update(decode_ms=-2.0), r"layers\[1\]: decode_ms must be a number >= 0"),
        (lambda d: d["layers"][1].update(decode_ms=True), r"layers\[1\]: decode_ms must be a number >= 0"),
        (lambda d: d["layers"][0].update(weight_bytes="1"), "weight_bytes must be an integer >= 0"),
        (lambda d: d["rate_distortion"][0].update(split_layer="1"), "split_layer must be an integer >= 1"),
        (lambda d: d["rate_distortion"][0].update(split_layer=1.5), "split_layer must be an integer >= 1"),
        (lambda d: d["rate_distortion"][0].update(kl=float("nan")), "kl must be a finite number"),
        (lambda d: d["rate_distortion"][0].update(codec="zip"), "codec must be 'slicer' or 'fp16'"),
        (lambda d: d["rate_distortion"][0].update(step=None), "a 'slicer' point has an ECSQ step"),
        (lambda d: d.update(rate_distortion={}), "rate_distortion must be a list"),
        (lambda d: d.update(calibration=None), "calibration must be an object"),
        (lambda d: d.update(calibration="wikitext"), "calibration must be an object"),
        (lambda d: d["edge"].update(other_bytes="2e6"), "edge: other_bytes must be a number >= 0"),
    ],
)
def test_a_broken_profile_is_refused_with_what_is_wrong(tmp_path, change, message):
    data = json.loads(json.dumps(EDGE.to_dict()))
    change(data)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        Profile.load(tmp_path / "p.json")


def test_missing_or_non_json_profiles_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no profile"):
        Profile.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        Profile.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="JSON object"):
        Profile.from_dict([1, 2])


# ------------------------------------------------------------------------------------------- predictions
def test_the_predicted_bits_of_a_decode_step_are_those_of_its_bare_messages():
    """A profile's point is the whole packet; a steady-state step and a compressed reply go bare, leaving out the
    envelope and what the session agreed on (an ECSQ packet's step and outlier count)."""
    from slicer_hf.tuning.planner import _reply_bits
    from slicer_hf.tuning.profile import ECSQ_BASE

    knobs = {k: v for k, v in ECSQ_BASE.items() if k != "codec"}
    codec = build_codec("slicer", **knobs, step=0.3)
    packet = codec.encode(torch.randn(1, 1, D, generator=torch.Generator().manual_seed(5)))
    bare = codec.bare(packet, (1, 1, D), torch.float32)
    ones = torch.ones(1, 1, dtype=torch.bool)
    step = protocol.Step(1 << 20, 1 << 20, 1 << 14, 1, 1, 0, bare, ones, bare=True, next=True)
    assert 8 * len(packet) + _step_overhead_bits(EDGE, "slicer") == 8 * len(protocol.encode_step(step))
    point = RatePoint(L, "slicer", 0.3, 8 * len(packet), 0.0, 0.0, 1.0, 0.0, 0.0)
    assert _reply_bits(EDGE, point) == 8 * len(protocol.encode_reply(1 << 20, protocol.REPLY_HIDDEN_BARE, bare))


def test_a_prediction_adds_edge_server_and_link_time():
    up = next(p for p in EDGE.points(4) if p.step == 0.4)
    p = predict(EDGE, SERVER, 4, up, None, FAST, Constraints())
    assert p.edge_ms == pytest.approx(0.1 + 4 * 4.0 + 0.5 + 1.0 + up.encode_ms)
    assert p.server_ms == pytest.approx(4 * 1.0 + up.decode_ms)
    sent = _on_wire(p.uplink_bits / 8, FAST.framing_bytes_up) / (FAST.uplink_mbps * 125)  # ms: no burst allowance
    got = _on_wire(p.downlink_bits / 8, FAST.framing_bytes_down) / (FAST.downlink_mbps * 125)
    assert p.link_ms == pytest.approx(FAST.rtt_ms + FAST.overhead_ms + sent + got)
    assert p.token_latency_ms == pytest.approx(p.edge_ms + p.server_ms + p.link_ms)
    assert p.uplink_bits == pytest.approx(up.bits_per_token + _step_overhead_bits(EDGE, "slicer"))
    assert p.downlink_bits > 32 * D  # the exact float32 reply
    slow = predict(EDGE, SERVER, 4, up, None, SLOW, Constraints())
    extra = (p.uplink_bits / 8 + SLOW.framing_bytes_up) * (1 / 6.25 - 1 / 12_500)  # ms at 0.05 vs 100 Mbit/s
    assert slow.link_ms - p.link_ms == pytest.approx(extra)
    assert p.edge_memory_gb == pytest.approx((2e6 + 4e6 + 2048 * 4 * 1024) / 1e9)
    # the first token: the whole prompt's prefill through both machines' layers (a quarter of a decode step's time a
    # token here), its codec, the prompt and the first reply on the link, then the edge's head and step overhead
    n = Constraints().prompt_tokens
    prefill = n * (4 * 4.0 / 4 + 4 * 1.0 / 4 + up.encode_ms + up.decode_ms)
    for link, fast in ((FAST, p), (SLOW, slow)):
        prompt = _on_wire((n * up.bits_per_token + _step_overhead_bits(EDGE, "slicer")) / 8, link.framing_bytes_up)
        reply = _on_wire(p.downlink_bits / 8, link.framing_bytes_down)
        on_link = prompt / (link.uplink_mbps * 125) + reply / (link.downlink_mbps * 125)
        assert fast.ttft_ms == pytest.approx(prefill + on_link + link.rtt_ms + link.overhead_ms + 0.5 + 1.0)


def test_a_compressed_downlink_adds_its_kl_and_shrinks_the_reply():
    up = next(p for p in EDGE.points(4) if p.step == 0.4)
    down = EDGE.points(L)[0]
    exact, lossy = (predict(EDGE, SERVER, 4, up, d, FAST, Constraints()) for d in (None, down))
    assert lossy.kl == pytest.approx(exact.kl + down.kl) and lossy.downlink_bits < exact.downlink_bits / 5


def test_the_pareto_set_holds_no_dominated_candidate():
    cands = candidates(EDGE, SERVER, SLOW, Constraints())
    front = _pareto(cands)
    key = lambda c: (c.prediction.token_latency_ms, c.prediction.server_ms, c.prediction.uplink_bits, c.prediction.kl)
    dominated = lambda c: any(all(a <= b for a, b in zip(key(o), key(c))) and key(o) != key(c) for o in cands)  # noqa: E731
    assert {id(c) for c in front} == {id(c) for c in cands if not dominated(c)}  # no more, and no fewer
    assert 1 < len(front) < len(cands)


# ------------------------------------------------------------------------------------------- choosing
def test_each_objective_picks_its_own_best_feasible_candidate():
    budget = Constraints(max_kl=0.02)
    by = {obj: search(EDGE, SERVER, SLOW, budget, obj) for obj in ("latency", "server-compute", "uplink")}
    for result in by.values():
        assert all(c.prediction.kl <= 0.02 for c in result.ranked)
        assert result.chosen == result.ranked[0]
    feasible = by["latency"].ranked
    assert by["latency"].chosen.prediction.token_latency_ms == min(c.prediction.token_latency_ms for c in feasible)
    assert by["server-compute"].chosen.split_layer == 6  # the deepest profiled split: the server runs least
    assert by["uplink"].chosen.prediction.uplink_bits == min(c.prediction.uplink_bits for c in feasible)
    assert by["uplink"].chosen.step > 0.2


def test_tighter_budgets_move_the_choice():
    loose = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.05), "uplink").chosen
    strict = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.004), "uplink").chosen
    assert strict.step < loose.step and strict.prediction.kl <= 0.004
    roomy = search(EDGE, SERVER, FAST, Constraints(max_kl=0.05), "server-compute").chosen
    small = search(EDGE, SERVER, FAST, Constraints(max_kl=0.05, edge_memory_gb=0.015), "server-compute").chosen
    assert small.split_layer < roomy.split_layer and small.prediction.edge_memory_gb <= 0.015


def test_a_slow_uplink_makes_the_latency_objective_spend_fewer_bits():
    fast = search(EDGE, SERVER, FAST, Constraints(max_kl=0.05), "latency").chosen
    slow = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.05), "latency").chosen
    assert slow.prediction.uplink_bits < fast.prediction.uplink_bits


def test_infeasible_constraints_name_the_binding_one_and_the_nearest_point():
    with pytest.raises(InfeasibleError) as caught:
        search(EDGE, SERVER, SLOW, Constraints(max_kl=0.02, max_token_latency_ms=5.0))
    err = caught.value
    assert err.binding == "max_token_latency_ms"
    assert err.nearest.prediction.kl <= 0.02  # it meets the other budget
    assert "max_token_latency_ms=5 ms" in str(err) and "relax max_token_latency_ms to" in str(err)
    assert "Even alone, no candidate meets max_token_latency_ms" in str(err)
    with pytest.raises(InfeasibleError, match="binding one is max_kl") as caught:
        search(EDGE, SERVER, FAST, Constraints(max_kl=1e-9))
    assert caught.value.nearest.codec == "fp16"


def test_a_relaxed_limit_is_printed_rounded_up_even_one_ulp_above_a_round_number():
    from slicer_hf.config import at_least

    for value in (0.05373000000000001, 0.9710000000000001, 988.5000000000001, 0.02581376, 11.4548, 9.99996, 2.0):
        assert value <= float(at_least(value)) <= value * 1.001, value


@pytest.mark.parametrize("limit", ["max_token_latency_ms", "edge_memory_gb"])
def test_relaxing_a_limit_to_the_value_the_error_names_makes_the_search_feasible(limit):
    """The value is rounded up, never down to just below what the nearest point needs."""
    tight = {"max_token_latency_ms": 5.0, "edge_memory_gb": 1e-4}[limit]
    with pytest.raises(InfeasibleError) as caught:
        search(EDGE, SERVER, SLOW, Constraints(max_kl=0.02, **{limit: tight}))
    value = float(re.search(rf"relax {limit} to ([0-9.e+-]+)", str(caught.value)).group(1))
    relaxed = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.02, **{limit: value})).chosen
    assert getattr(relaxed.prediction, limit.removeprefix("max_")) <= value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": "speed"}, "objective must be one of"),
        ({"server": synthetic_profile(fingerprint="0" * 16)}, "different models"),
        ({"splits": [3]}, r"no rate-distortion points at the split layers asked for \(\[3\]\); the profiles hold"),
        ({"splits": []}, r"no split layers to consider \(splits is empty\); the profiles hold splits \[2, 4, 6\]"),
        ({"adaptive": True}, "needs a per-token latency target .max_token_latency_ms, --max-token-latency-ms"),
    ],
)
def test_bad_search_arguments_are_refused(kwargs, message):
    args = {"edge": EDGE, "server": SERVER, "link": FAST, "constraints": Constraints(), **kwargs}
    with pytest.raises(ConfigError, match=message):
        search(**args)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LinkSpec(0, 1),
        lambda: LinkSpec(1, float("nan")),
        lambda: LinkSpec(1, 1, rtt_ms=-1),
        lambda: Constraints(max_kl=-0.1),
        lambda: Constraints(context_tokens=0),
    ],
)
def test_bad_links_and_budgets_are_refused(make):
    with pytest.raises(ConfigError):
        make()


def test_profiles_without_rate_distortion_points_cannot_be_searched():
    bare = dataclasses.replace(EDGE, rate_distortion=[])
    with pytest.raises(ConfigError, match="rate-distortion"):
        search(bare, bare, FAST)
    assert search(bare, SERVER, FAST).chosen  # the server's points serve when the edge skipped them


def test_the_choice_saves_as_a_config_with_its_predictions(tmp_path):
    result = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.02), "uplink")
    result.save(tmp_path)
    config = SlicerConfig.from_pretrained(tmp_path)
    chosen = result.chosen
    assert (config.split_layer, config.codec, config.quantizer, config.step) == (
        chosen.split_layer,
        "slicer",
        "ecsq",
        chosen.step,
    )
    assert config.num_hidden_layers == L and config.model_id == "synthetic"
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["chosen"]["label"] == chosen.label() and saved["feasible"] == len(result.ranked)
    assert saved["profiles"]["edge"]["machine"]["cpu"] == "test"


def test_adaptive_writes_a_ladder_within_the_quality_floor():
    result = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.01, max_token_latency_ms=200), adaptive=True)
    config = result.config
    assert config.target_token_latency_ms == 200 and config.step in [s for s, _ in config.bitrate_ladder]
    k = config.split_layer
    allowed = {p.step for p in EDGE.points(k) if p.codec == "slicer" and p.kl + _down_kl(result) <= 0.01}
    assert {s for s, _ in config.bitrate_ladder} == allowed
    assert config.bitrate_controller().step == config.step


def test_an_adaptive_ladder_of_one_rung_is_called_so():
    """A quality budget that admits one ECSQ step writes a ladder with nothing to move to: said, not left to find."""
    result = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.003, max_token_latency_ms=10_000), adaptive=True)
    assert len(result.config.bitrate_ladder) == 1 and "one rung: nothing to move to" in result.summary()
    roomier = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.01, max_token_latency_ms=10_000), adaptive=True)
    assert len(roomier.config.bitrate_ladder) > 1 and "one rung" not in roomier.summary()


def test_a_step_the_profile_lists_twice_is_one_rung_of_the_ladder():
    twice = dataclasses.replace(EDGE, rate_distortion=EDGE.rate_distortion * 2)
    once = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.01, max_token_latency_ms=200), adaptive=True)
    result = search(twice, SERVER, SLOW, Constraints(max_kl=0.01, max_token_latency_ms=200), adaptive=True)
    assert result.config.bitrate_ladder == once.config.bitrate_ladder


def test_a_base_config_made_for_another_model_does_not_lend_the_choice_its_model_id():
    other = SlicerConfig(model_id="someone/other-model", hidden_size=D + 1, num_hidden_layers=L)
    assert search(EDGE, SERVER, FAST, base=other).config.model_id == "synthetic"
    same = SlicerConfig(model_id="someone/synthetic", hidden_size=D, num_hidden_layers=L)
    assert search(EDGE, SERVER, FAST, base=same).config.model_id == "someone/synthetic"


@pytest.mark.parametrize("steps", [{"steps": (0.3, 5.0)}, {"downlink_steps": (0.0,)}, {"steps": (float("nan"),)}])
def test_a_profile_refuses_a_step_ecsq_cannot_take_before_its_timing_run(steps, monkeypatch):
    import slicer_hf.tuning.profile as profiling

    monkeypatch.setattr(profiling, "measure_timing", lambda *a, **k: pytest.fail("timed a profile it then refused"))
    with pytest.raises(ConfigError, match=r"steps must be ECSQ steps in \(0, 4\]"):
        profile_model(tiny_model("llama").eval(), "tiny", None, **steps)


def test_the_profile_and_search_commands_refuse_an_out_that_is_a_file_before_they_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("")
    result = CliRunner().invoke(app, ["profile", "--model", "nowhere", "--out", "notes.txt"])
    assert result.exit_code == 2 and "Invalid value for --out" in result.output
    EDGE.save(tmp_path / "edge.json")
    profiles = ["--edge-profile", "edge.json", "--server-profile", "edge.json", "--uplink-mbps", "1"]
    result = CliRunner().invoke(app, ["search", *profiles, "--downlink-mbps", "1", "--out", "notes.txt"])
    assert result.exit_code == 2 and "notes.txt is a file" in result.output
    assert "pareto" not in result.output.lower()  # refused before the search (its table had come first)


def test_a_profile_saved_to_a_folder_named_like_a_json_file_goes_in_that_folder(tmp_path):
    (tmp_path / "edge.json").mkdir()
    assert EDGE.save(tmp_path / "edge.json") == tmp_path / "edge.json" / "profile.json"
    assert Profile.load(tmp_path / "edge.json") == EDGE


def test_a_split_given_twice_is_profiled_once():
    model = tiny_model("llama").eval()
    windows = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    profile = profile_model(model, "tiny", windows, "random", [2, 2], steps=(0.5,), downlink_steps=(), repeats=1)
    assert sorted((p.split_layer, p.codec) for p in profile.rate_distortion) == [(2, "fp16"), (2, "slicer")]


@pytest.mark.parametrize(
    "break_model, dtype, refusal",
    [
        (lambda m: m.lm_head.weight.mul_(1e7), torch.float16, "log-probabilities are not finite in float16"),
        (lambda m: m.lm_head.weight.mul_(3e4), torch.float32, "perplexity on this text is out of range"),
        (lambda m: m.model.layers[0].mlp.down_proj.weight.mul_(1e7), torch.float16, "after layer 2 are not finite"),
    ],
)
def test_a_model_that_overflows_is_refused_before_its_timing_run(break_model, dtype, refusal, monkeypatch):
    """Its profile had been lost after the timing run to a math.exp traceback, written with NaN fields, or refused
    as a codec's failure to encode."""
    import slicer_hf.tuning.profile as profiling

    monkeypatch.setattr(profiling, "measure_timing", lambda *a, **k: pytest.fail("timed a profile it then refused"))
    model = tiny_model("llama").eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # not tied to the embeddings
    with torch.no_grad():
        break_model(model)
    windows = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=refusal):
        profile_model(model.to(dtype), "tiny", windows, "random", split_layers=[2])


def test_the_timing_run_uses_the_cache_a_model_leaves_off_and_refuses_one_without_any():
    """MPT's config leaves use_cache off: every step had run the whole sequence, and the timing found no decode
    step to time (a StatisticsError traceback); openai-gpt has no cache at all."""
    from slicer_hf.bench.architectures import tiny_model as any_family

    timing, _ = measure_timing(any_family("mpt"), prompt_tokens=4, decode_tokens=3, repeats=1)
    assert all(layer["decode_ms"] > 0 for layer in timing)
    with pytest.raises(ConfigError, match="openai-gpt decodes without a KV cache"):
        measure_timing(any_family("openai-gpt"), prompt_tokens=4, decode_tokens=3, repeats=1)


def test_commands_that_write_a_folder_refuse_one_under_a_file_before_they_run(tmp_path, monkeypatch):
    """Calibrating or profiling first (minutes on a real model), then failing to save, had been a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("")
    under = "notes.txt/out"
    EDGE.save(tmp_path / "edge.json")
    search = ["search", "--edge-profile", "edge.json", "--server-profile", "edge.json"]
    for args in (
        ["profile", "--model", "nowhere"],
        ["calibrate", "--model", "nowhere"],
        [*search, "--uplink-mbps", "1", "--downlink-mbps", "1"],
    ):
        result = CliRunner().invoke(app, [*args, "--out", under])
        assert result.exit_code == 2 and "notes.txt is a file, not a folder" in result.output, result.output


def test_an_adaptive_search_says_where_the_written_config_starts_when_the_objective_chose_another_step():
    """The uplink objective picks the coarsest step; adaptive bitrate starts at the finest that meets the target."""
    result = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.01, max_token_latency_ms=10_000), "uplink", adaptive=True)
    assert result.config.step != result.chosen.step
    assert result.adaptive["start_step"] == result.config.step == min(result.adaptive["ladder"])
    assert f"the config starts at ecsq {result.config.step:g}" in result.summary()
    assert result.to_dict()["adaptive"] == result.adaptive
    assert search(EDGE, SERVER, SLOW, Constraints(max_kl=0.01)).adaptive is None


def test_the_table_says_how_many_pareto_candidates_it_leaves_out():
    result = search(EDGE, SERVER, SLOW, Constraints(max_kl=1.0))
    hidden = len(result.pareto) - 2
    assert hidden > 0 and f"... and {hidden} more Pareto candidates" in result.table(limit=2)
    assert "more Pareto" not in result.table(limit=len(result.pareto))


def _down_kl(result) -> float:
    step = result.chosen.downlink_step
    return 0.0 if step is None else next(p.kl for p in EDGE.points(L) if p.step == step)


# ------------------------------------------------------------------------------------------- the commands
def test_the_search_command_prints_the_pareto_set_and_writes_the_choice(tmp_path):
    EDGE.save(tmp_path / "edge.json")
    SERVER.save(tmp_path / "server.json")
    args = ["search", "--edge-profile", str(tmp_path / "edge.json"), "--server-profile", str(tmp_path / "server.json")]
    args += ["--uplink-mbps", "0.05", "--downlink-mbps", "100", "--max-kl", "0.02", "--objective", "uplink"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "choice")])
    assert result.exit_code == 0, result.output
    assert "| * |" in result.output and "written to" in result.output
    assert SlicerConfig.from_pretrained(tmp_path / "choice").split_layer in (2, 4, 6)
    tight = CliRunner().invoke(app, [*args, "--max-token-latency-ms", "1"])
    assert tight.exit_code == 3 and "binding one is max_token_latency_ms" in tight.output
    both = CliRunner().invoke(app, [*args, "--max-ppl-increase", "1"])
    assert both.exit_code != 0 and "not both" in both.output


def test_a_search_whose_upload_fails_says_so_in_one_line_and_keeps_its_choice(tmp_path, monkeypatch):
    """Offline, the upload's ConnectError had been a traceback after the search's work."""
    import huggingface_hub

    from slicer_hf import ConfigError

    class Offline:
        def __init__(self, token=None):
            raise OSError("no route to the Hub")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    EDGE.save(tmp_path / "edge.json")
    args = ["search", "--edge-profile", str(tmp_path / "edge.json"), "--server-profile", str(tmp_path / "edge.json")]
    args += ["--uplink-mbps", "0.05", "--downlink-mbps", "100", "--max-kl", "0.02", "--out", str(tmp_path / "choice")]
    args += ["--push-to-hub", "me/x"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError)  # what the command line prints as one line
    said = str(result.exception)
    assert f"written to {tmp_path / 'choice'}" in said and "no route to the Hub" in said
    assert SlicerConfig.from_pretrained(tmp_path / "choice").split_layer is not None


def test_profile_options_that_choose_rate_distortion_points_are_refused_with_no_rate_distortion():
    """They had been accepted, and ignored."""
    args = ["profile", "--model", "nowhere", "--out", "p.json", "--no-rate-distortion", "--window", "7", "--steps", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--window, --steps choose the rate-distortion points" in result.output


def test_an_empty_list_of_splits_is_refused_before_the_timing_run(monkeypatch):
    """It had passed the check, timed the model, and written a profile the search refuses."""
    import slicer_hf.tuning.profile as profiling

    monkeypatch.setattr(profiling, "measure_timing", lambda *a, **k: pytest.fail("timed a profile it then refused"))
    with pytest.raises(ConfigError, match="no split layers to profile"):
        profile_model(tiny_model("llama").eval(), "tiny", None, split_layers=[])


def test_a_profile_of_a_model_named_by_a_path_saves(tmp_path):
    """A folder given as a Path had been stored as it was, and the profile failed to save after its timing run."""
    model = tiny_model("llama").eval()
    profile = profile_model(model, tmp_path / "m", None, prompt_tokens=4, decode_tokens=2, repeats=1)
    assert Profile.load(profile.save(tmp_path / "p.json")).model["id"] == str(tmp_path / "m")


def test_the_profile_command_measures_a_model_folder(tmp_path):
    from live import tiny_smol_dir

    folder = tiny_smol_dir(tmp_path / "m", SlicerConfig(split_layer=2))
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["profile", "--model", str(folder), "--out", str(tmp_path / "prof"), "--text", str(text)]
    args += ["--tokens", "64", "--window", "32", "--splits", "2", "--steps", "0.5", "--downlink-steps", ""]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--decode-tokens", "4", "--prompt-tokens", "8"])
    assert result.exit_code == 0, result.output
    profile = Profile.load(tmp_path / "prof")
    assert profile.format == PROFILE_FORMAT and profile.machine["torch_threads"] == 1
    assert [(p.split_layer, p.codec) for p in profile.rate_distortion] == [(2, "slicer"), (2, "fp16")]
    assert profile.calibration["tokens"] == 64


def test_a_token_bucket_link_costs_nothing_until_a_token_outgrows_its_refill():
    up = next(p for p in EDGE.points(4) if p.step == 0.4)
    line = predict(EDGE, SERVER, 4, up, None, LinkSpec(1.0, 1.0), Constraints())
    shaped = predict(EDGE, SERVER, 4, up, None, LinkSpec(1.0, 1.0, burst_bytes=1 << 20), Constraints())
    compute = shaped.edge_ms + shaped.server_ms + 2.0  # + the per-step overhead
    assert shaped.token_latency_ms == pytest.approx(compute)  # the bucket refills between tokens
    up_bytes = line.uplink_bits / 8 + FRAMING_BYTES_UP
    down_bytes = line.downlink_bits / 8 + FRAMING_BYTES_DOWN  # one segment: d = 64
    assert line.token_latency_ms == pytest.approx(compute + (up_bytes + down_bytes) / 125.0)  # 1 Mbit/s: 125 B/ms
    crawl = predict(EDGE, SERVER, 4, up, None, LinkSpec(1.0, 0.01, burst_bytes=1 << 20), Constraints())
    assert crawl.token_latency_ms == pytest.approx(down_bytes / 1.25)  # the link sets the pace


def test_a_message_longer_than_one_segment_pays_each_segments_headers():
    from slicer_hf.tuning.planner import MSS, _on_wire

    assert _on_wire(1000, FRAMING_BYTES_UP) == 1000 + FRAMING_BYTES_UP
    assert _on_wire(3 * MSS, FRAMING_BYTES_DOWN) == 3 * MSS + FRAMING_BYTES_DOWN + 2 * SEGMENT_BYTES


def test_adaptive_search_keeps_to_ecsq_even_where_fp16_would_win():
    free = LinkSpec(100.0, 100.0, burst_bytes=1 << 20)  # fp16 costs nothing more here, and decodes fastest
    budget = Constraints(max_kl=0.05, max_token_latency_ms=500)
    assert search(EDGE, SERVER, free, budget, "server-compute").chosen.codec == "fp16"
    assert search(EDGE, SERVER, free, budget, "server-compute", adaptive=True).config.codec == "slicer"


def test_an_adaptive_search_that_only_fp16_could_meet_says_it_considered_ecsq_alone():
    """Without --adaptive fp16 meets this KL budget: the message had said no candidate meets it even alone."""
    budget = Constraints(max_kl=1e-6, max_token_latency_ms=10_000)
    assert search(EDGE, SERVER, FAST, budget).chosen.codec == "fp16"
    with pytest.raises(InfeasibleError, match=r"no split and ECSQ setting \(adaptive bitrate moves the ECSQ step"):
        search(EDGE, SERVER, FAST, budget, adaptive=True)


def test_push_to_hub_uploads_the_config_its_predictions_and_a_card_in_one_commit(fake_hub):
    uploaded = fake_hub
    result = search(EDGE, SERVER, SLOW, Constraints(max_kl=0.02), "uplink")
    assert result.push_to_hub("someone/phone", token="hf_x").endswith("/commit/abc")
    assert set(uploaded["files"]) == {"slicer_config.json", "search.json", "README.md"}
    assert json.loads(uploaded["files"]["search.json"])["chosen"]["label"] == result.chosen.label()


def test_the_validation_suite_reports_its_tables_and_plot(tmp_path):
    from slicer_hf.bench import search as suite

    row = {"client": "c", "objective": "latency", "choice": "split 2", "ms_predicted": 10.0, "ms_measured": 11.0,
           "ms_error_pct": 10.0, "up_bytes_predicted": 100.0, "up_bytes_measured": 99.0, "up_error_pct": -1.0,
           "kl_predicted": 0.01, "kl_measured": 0.011, "kl_error_pct": 10.0, "objective_chosen": 11.0,
           "objective_preset": 20.0}  # fmt: skip
    runs = [{"fast_ms": [10.0] * 5, "slow_ms": [12.0] * 5, "steps": [0.1] * 11}]
    adaptive = {"target_ms": 15.0, "fast_mbps": 2.0, "slow_mbps": 0.032, "drop_after": 6, "rows": [
        {"variant": v, "p90_fast_ms": 10.0, "p90_slow_ms": 12.0, "median_slow_ms": 11.0, "mean_kl": 0.01,
         "meets_target": True, "samples": runs} for v in ("adaptive", "fixed 0.1", "fixed 0.6")]}  # fmt: skip
    table = suite.markdown({"clients": [row], "adaptive": adaptive})
    assert "| c | latency | split 2 | 10.0 | 11.0 | +10.0 |" in table and "| adaptive | 10.0 | 12.0 |" in table
    suite.plot(adaptive, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_the_validation_suite_calibrates_its_overhead_on_a_setting_the_shipped_profile_holds():
    """The preset's step (0.36, calibrated, trellis) was never profiled: the overhead is measured at the nearest
    profiled step, on the codec as profiled."""
    from slicer_hf.bench import search as suite

    shipped = Profile.load(Path(__file__).resolve().parents[1] / "docs/benchmarks/profiles/cpu-2threads.json")
    preset, measured = SlicerConfig.from_pretrained("smollm2-135m-split24"), []
    result = suite._calibrate(shipped, shipped, preset, lambda cfg: measured.append(cfg) or {"ms_per_token": 80.0})
    steps = [p.step for p in shipped.points(24) if p.codec == "slicer"]
    assert preset.step not in steps and result["step"] == min(steps, key=lambda s: abs(s - preset.step))
    (config,) = measured
    assert config.step == result["step"] and config.split_layer == 24 and not config.trellis and config.basis is None
    assert result["overhead_ms"] == max(80.0 - result["predicted_ms"], 0.0)


def test_the_validation_suite_warns_when_the_profiles_predict_far_more_than_this_machine_takes():
    """The shipped profiles predicted 82.8 ms a token where a quieter run took 44.2: the overhead, never negative,
    could not correct it, and every error came out near -40% with nothing said."""
    from slicer_hf.bench import search as suite

    shipped = Profile.load(Path(__file__).resolve().parents[1] / "docs/benchmarks/profiles/cpu-2threads.json")
    preset = SlicerConfig.from_pretrained("smollm2-135m-split24")
    with pytest.warns(UserWarning, match="run `slicer-hf profile` here again"):
        fast = suite._calibrate(shipped, shipped, preset, lambda cfg: {"ms_per_token": 1.0})
    assert fast["overhead_ms"] == 0.0


@pytest.mark.parametrize("preset", ["smollm2-135m-split24", "smollm2-135m-split24-both"])
def test_a_calibrated_preset_as_the_base_gives_the_codec_that_was_profiled(preset):
    base = SlicerConfig.from_pretrained(preset)
    for objective, link in (("uplink", SLOW), ("server-compute", FAST)):
        config = search(EDGE, SERVER, link, Constraints(max_kl=0.05), objective, base=base).config
        assert config.basis is None and config.downlink_basis is None and not config.trellis
        assert config.rotation != "calibrated" and config.downlink_topk == base.downlink_topk  # the rest is kept


def test_an_adaptive_search_without_ecsq_points_is_refused_clearly():
    fp16_only = dataclasses.replace(EDGE, rate_distortion=[p for p in EDGE.rate_distortion if p.codec == "fp16"])
    with pytest.raises(ConfigError, match="no ECSQ points"):
        search(fp16_only, fp16_only, SLOW, Constraints(max_token_latency_ms=500), adaptive=True)


def test_each_machines_codec_time_comes_from_its_own_profile():
    """The server's decode and downlink encode from the server's profile, the edge's encode from the edge's: a
    server whose codec runs 100x faster predicts less server time (both had come from the edge's profile)."""
    fast = [
        dataclasses.replace(p, encode_ms=p.encode_ms / 100, decode_ms=p.decode_ms / 100) for p in EDGE.rate_distortion
    ]
    quick_server = dataclasses.replace(SERVER, rate_distortion=fast)
    up = next(p for p in EDGE.points(4) if p.step == 0.4)
    down = next(p for p in EDGE.points(L) if p.step == 0.1)
    slow, quick = (predict(EDGE, s, 4, up, down, FAST, Constraints()) for s in (SERVER, quick_server))
    assert slow.server_ms - quick.server_ms == pytest.approx(0.99 * (up.decode_ms + down.encode_ms))
    assert slow.edge_ms == quick.edge_ms
    prompt = Constraints().prompt_tokens  # the prompt's packets are decoded on the server too
    assert slow.ttft_ms - quick.ttft_ms == pytest.approx(prompt * 0.99 * up.decode_ms)


def test_the_servers_points_count_where_the_edge_did_not_measure_them():
    """An edge profiled at fewer splits (a slow device) and without downlink points: the server's splits and downlink
    steps had been dropped whenever the edge held any point at all."""
    edge = dataclasses.replace(EDGE, rate_distortion=[p for p in EDGE.rate_distortion if p.split_layer == 2])
    found = {(c.split_layer, c.downlink_step) for c in candidates(edge, SERVER, FAST, Constraints())}
    assert {k for k, _ in found} == {2, 4, 6} and {s for _, s in found} == {None, 0.1, 0.2}
    assert search(edge, SERVER, FAST, splits=[6]).chosen.split_layer == 6
    mine = next(p for p in EDGE.rate_distortion if p.split_layer == 2 and p.step == 0.4)
    theirs = dataclasses.replace(mine, kl=9.0)  # the server's measure of a point the edge measured too
    server = dataclasses.replace(SERVER, rate_distortion=[theirs])
    found = candidates(edge, server, FAST, Constraints())
    [candidate] = [c for c in found if (c.split_layer, c.step, c.downlink_step) == (2, 0.4, None)]
    assert candidate.prediction.kl == mine.kl  # the edge's own measure


def test_a_link_whose_figures_overflow_a_prediction_is_refused_not_written_as_infinity():
    with pytest.raises(ConfigError, match="overflow"):
        search(EDGE, SERVER, LinkSpec(1e-310, 100.0))
    with pytest.raises(ConfigError, match="overflow"):
        search(EDGE, SERVER, LinkSpec(100.0, 100.0, rtt_ms=1.7e308, overhead_ms=1.7e308))


def test_an_exact_reply_is_predicted_in_the_dtype_the_server_computes_in():
    """A bfloat16 server's reply had been predicted at the size of a float32 edge's: twice what it sends."""
    half = dataclasses.replace(SERVER, model={**SERVER.model, "dtype": "bfloat16"})
    up = next(p for p in EDGE.points(4) if p.step == 0.4)
    wide, narrow = (predict(EDGE, server, 4, up, None, FAST, Constraints()).downlink_bits for server in (SERVER, half))
    header = 8 * len(protocol.encode_reply(1 << 20, protocol.REPLY_HIDDEN, b""))
    for bits, dtype in ((wide, torch.float32), (narrow, torch.bfloat16)):
        assert bits == header + 8 * len(build_codec("identity").encode(torch.zeros(1, 1, D, dtype=dtype)))


def test_the_written_config_sends_the_downlink_in_the_dtype_its_bits_were_predicted_for():
    base = SlicerConfig(downlink_dtype="float16")
    assert search(EDGE, SERVER, FAST, base=base).config.downlink_dtype == "auto"


def test_a_coarser_step_that_measured_more_bits_is_no_rung_of_the_ladder():
    inverted = [
        dataclasses.replace(p, bits_per_token=p.bits_per_token + 10 * D) if p.codec == "slicer" and p.step == 0.8 else p
        for p in EDGE.rate_distortion
    ]
    edge = dataclasses.replace(EDGE, rate_distortion=inverted)
    result = search(edge, SERVER, SLOW, Constraints(max_kl=0.05, max_token_latency_ms=200), adaptive=True)
    steps = [s for s, _ in result.config.bitrate_ladder]
    bits = [b for _, b in result.config.bitrate_ladder]
    assert bits == sorted(bits, reverse=True) and 0.8 not in steps


def test_profiles_without_fingerprints_of_models_of_other_sizes_are_not_searched_together():
    def bare(profile, layers):
        model = {k: v for k, v in profile.model.items() if k != "fingerprint"} | {"num_hidden_layers": layers}
        return dataclasses.replace(profile, model=model)

    with pytest.raises(ConfigError, match="different models"):
        search(bare(EDGE, L), bare(SERVER, L + 22), FAST)
    search(bare(EDGE, L), bare(SERVER, L), FAST)  # the same sizes: taken as one model
