"""Adaptive bitrate: the controller holds a latency target through a link that slows down, never goes below its
quality floor, comes back when the link recovers, does not flap; and a split generation moves its ECSQ step
between decode steps with the server decoding every packet from its own header."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_model

from slicer_hf import ConfigError, SlicerConfig, SlicerModelForCausalLM, build_codec
from slicer_hf.bitrate import BitrateController

STEPS = (0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5)
LADDER = [(s, 2300 + 576 * math.log2(0.3 / s)) for s in STEPS]  # one bit per coordinate per halving of the step
BITS = dict(LADDER)


def simulate(rates_bits_per_ms, controller=None, fixed=None, compute_ms=45.0, jitter_ms=3.0, seed=0):
    """Per-token latencies over a link whose rate follows `rates_bits_per_ms`, and the step each token used."""
    rnd = random.Random(seed)
    latencies, steps = [], []
    for rate in rates_bits_per_ms:
        step = controller.step if controller else fixed
        latency = compute_ms + rnd.gauss(0, jitter_ms) + BITS[step] / rate
        if controller:
            controller.observe(latency, BITS[step])
        latencies.append(latency)
        steps.append(step)
    return latencies, steps


def p90(values):
    return sorted(values)[int(0.9 * len(values))]


DROP = [2000.0] * 40 + [64.0] * 80 + [2000.0] * 40  # 2 Mbit/s, then 64 kbit/s, then 2 Mbit/s again


def test_the_controller_holds_the_target_where_every_fixed_step_of_equal_quality_misses_it():
    controller = BitrateController(LADDER, target_ms=75.0, start=0)
    latencies, steps = simulate(DROP, controller)
    assert p90(latencies[40:120]) < 75.0
    mean_step = sum(steps) / len(steps)  # coarser steps cost quality: compare fixed steps at least as fine
    for fixed in (s for s in STEPS if s <= mean_step):
        fixed_latencies, _ = simulate(DROP, fixed=fixed)
        assert p90(fixed_latencies[40:120]) > 75.0, fixed
    assert steps[0] == 0.1 and steps[-1] == 0.1  # fine while the link is fast, fine again once it recovers
    assert max(steps[60:120]) <= 1.0 and min(steps[60:120]) >= 0.8  # settles on the finest rung that fits


def test_the_controller_never_goes_below_the_quality_floor():
    controller = BitrateController(LADDER[:5], target_ms=50.0)
    _, steps = simulate([16.0] * 60, controller)  # no rung can make 50 ms here
    assert max(steps) == LADDER[4][0] and controller.level == 4


def test_a_slow_first_token_costs_one_rung_not_the_quality_floor():
    controller = BitrateController(LADDER, target_ms=75.0)
    controller.observe(400.0, BITS[0.1])  # nothing yet to tell the uplink's share from the rest
    assert controller.level == 1
    simulate([64.0] * 30, controller)  # a slow link, then, is learnt and stepped over at once
    assert controller.step >= 0.8


def test_a_finer_rung_that_did_not_hold_never_shortens_the_patience():
    for patience in (4, 100):
        controller = BitrateController(LADDER[:3], target_ms=20.0, patience=patience)
        controller.observe(10.0, BITS[0.1])
        controller._move(1, 10.0)  # coarser,
        controller._move(0, 10.0)  # finer again,
        controller._move(1, 30.0)  # and that did not hold
        assert controller._wait == {4: 8, 100: 100}[patience]  # doubled up to 64, or the patience given if larger


def test_the_controller_does_not_flap_on_a_steady_link():
    controller = BitrateController(LADDER, target_ms=75.0, start=3)
    simulate([64.0] * 300, controller, seed=1)
    assert len(controller.changes) <= 8
    assert controller.changes[0]["token"] <= 3  # the first move comes at once


def test_on_a_steady_link_where_only_the_floor_fits_the_controller_stops_trying_finer_rungs():
    """At the floor the latest latencies sit at the base: the slope seen on the finer rung must not be forgotten,
    or every lapse of patience sends a token over the target (about every 65 tokens)."""
    ladder = [(0.1, 3000.0), (0.3, 2000.0), (0.6, 1200.0)]  # 155, 105 and 65 ms at 5 ms + 0.05 ms a bit
    controller = BitrateController(ladder, target_ms=100.0)
    misses = 0
    for _ in range(400):
        latency = 5.0 + 0.05 * ladder[controller.level][1]
        misses += latency > 100.0
        controller.observe(latency, ladder[controller.level][1])
    assert controller.level == 2 and misses <= 4
    assert all(change["token"] < 50 for change in controller.changes)


def test_where_compute_takes_most_of_the_target_one_slow_token_is_not_a_lasting_step_down():
    """Compute alone at 80% of the target leaves a fast link's finest rung well inside it: after a slow token (a
    pause, a retransmit) sends the step coarser, the controller must come back (the room is the target less the
    base, not `low` x the target, which no rung can predict under here)."""
    controller = BitrateController(LADDER, target_ms=75.0)
    steps = []
    for i in range(300):
        latency = 60.0 + 0.5 * math.sin(i) + (40.0 if i == 100 else 0.0) + BITS[controller.step] / 2000.0
        steps.append(controller.step)
        controller.observe(latency, BITS[controller.step])
    assert steps[101] > 0.1  # the slow token moved it,
    assert set(steps[150:]) == {0.1}  # and it is back on the finest rung within 50 tokens


def test_with_compute_near_the_target_the_controller_settles_instead_of_cycling():
    """Compute at 93% of the target: every rung sits above `high` x target but the floor. A finer move predicted
    within `low` of the room but over 90% of the target cycled the step (74 moves in 2,000 tokens)."""
    controller = BitrateController(LADDER, target_ms=75.0)
    _, steps = simulate([1000.0] * 2000, controller, compute_ms=70.0, jitter_ms=0.0)
    assert len(controller.changes) <= 10 and all(change["token"] < 50 for change in controller.changes)
    assert len(set(steps[100:])) == 1


def test_with_compute_near_the_target_one_spike_is_not_a_lasting_step_down():
    """Compute at 91% of the target on a fast link: every rung fits. After one slow token the finer rungs must come
    back, where a finer move needing more margin than a coarser one may land at ratcheted to the floor."""
    rnd = random.Random(0)
    controller = BitrateController(LADDER, target_ms=100.0)
    steps = []
    for t in range(1000):
        latency = 91.0 + rnd.gauss(0, 0.5) + BITS[controller.step] / 20000.0 + (15.0 if t == 100 else 0.0)
        steps.append(controller.step)
        controller.observe(latency, BITS[controller.step])
    assert steps[101] > 0.1 and set(steps[300:]) == {0.1}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_slow_token_on_a_link_with_room_to_spare_is_not_a_lasting_step_down(seed):
    """A 300 ms hiccup (a failover's replay, a pause) read as a slope 12x too steep; on the floor rung every token
    then sat at the base the model kept, whose history filled with negative values: a self-consistent wrong fit that
    kept the floor for good, though every rung met the target (20 ms of compute, 0.01 ms a bit, 50 ms target)."""
    ladder = [(0.05, 3000.0), (0.1, 2000.0), (0.2, 1200.0), (0.4, 700.0), (0.8, 400.0)]
    controller = BitrateController(ladder, target_ms=50.0, start=2)
    rnd, levels = random.Random(seed), []
    for token in range(400):
        bits = ladder[controller.level][1]
        controller.observe(20.0 + 0.01 * bits + rnd.uniform(-0.5, 0.5) + (300.0 if token == 100 else 0.0), bits)
        levels.append(controller.level)
    assert levels[99] == 1 and levels[100] == 4  # the finest rung that fits; the spike's step down
    assert max(levels[150:]) <= 2 and len(set(levels[300:])) == 1  # back at (or a rung from) where it was, settled


@pytest.mark.parametrize("compute_ms", [0.0, 1.0, 2.0])
def test_where_two_rungs_measured_no_compute_the_controller_does_not_keep_trying_a_rung_that_misses(compute_ms):
    """With the latency all uplink, a base of zero is the truth: once a finer rung missed beside the one it left,
    trying it again every 64 tokens cost 33 misses in 2,000 tokens."""
    ladder = [(0.05, 3000.0), (0.1, 2000.0), (0.2, 1200.0), (0.4, 700.0), (0.8, 400.0)]
    controller, misses = BitrateController(ladder, target_ms=50.0, start=3), 0
    for _ in range(2000):
        latency = compute_ms + 0.045 * ladder[controller.level][1]  # 700 bits: 31.5 ms; 1,200: 54 ms
        misses += latency > 50.0
        controller.observe(latency, ladder[controller.level][1])
    assert misses <= 3 and controller.level == 3


def test_a_new_generation_counts_its_room_for_a_finer_move_afresh():
    controller = BitrateController(LADDER, target_ms=75.0, start=3, patience=4)
    for _ in range(3):  # three tokens of room: one short of the patience
        controller.observe(50.0, BITS[0.3])
    controller.restart()
    controller.observe(50.0, BITS[0.3])
    assert controller.step == 0.3 and not controller.changes


def test_moves_are_recorded_with_the_token_and_the_new_step():
    controller = BitrateController(LADDER, target_ms=60.0)
    simulate([32.0] * 10, controller)
    first = controller.changes[0]
    assert set(first) == {"token", "step", "median_ms"} and first["step"] > LADDER[0][0]


@pytest.mark.parametrize(
    "ladder, target, start",
    [
        ([], 50, 0),
        ([(0.3, 100), (0.2, 200)], 50, 0),
        ([(0.2, 100), (0.3, 200)], 50, 0),
        (LADDER, 0, 0),
        (LADDER, 50, 9),
    ],
)
def test_bad_ladders_and_targets_are_refused(ladder, target, start):
    with pytest.raises(ValueError):
        BitrateController(ladder, target, start=start)


def test_the_config_checks_its_ladder():
    with pytest.raises(ConfigError, match="go together"):
        SlicerConfig(quantizer="ecsq", bitrate_ladder=LADDER)
    with pytest.raises(ConfigError, match="ecsq"):
        SlicerConfig(bitrate_ladder=LADDER, target_token_latency_ms=50)
    with pytest.raises(ConfigError, match="fine to coarse"):
        SlicerConfig(quantizer="ecsq", bitrate_ladder=LADDER[::-1], target_token_latency_ms=50)
    config = SlicerConfig(quantizer="ecsq", step=0.3, bitrate_ladder=LADDER, target_token_latency_ms=50)
    assert SlicerConfig.from_dict(config.to_dict()) == config
    assert config.bitrate_controller().step == 0.3
    assert SlicerConfig().bitrate_controller() is None


def test_an_ecsq_packet_carries_its_step_so_any_ecsq_decoder_reads_it():
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(0))
    coarse = build_codec("slicer", quantizer="ecsq", step=1.0)
    announced = build_codec("slicer", quantizer="ecsq", step=0.3)
    packet = coarse.encode(x)
    assert torch.equal(announced.decode(packet), coarse.decode(packet))


def test_split_generation_moves_the_step_and_the_server_decodes_every_packet():
    base = tiny_model("llama").eval()
    ladder = ((0.2, 900.0), (0.6, 600.0), (1.5, 300.0))
    config = SlicerConfig(
        split_layer=2, quantizer="ecsq", step=0.2, bitrate_ladder=ladder, target_token_latency_ms=1e-3
    )  # a target no token can meet: every decision moves coarser, down to the floor
    model = SlicerModelForCausalLM.from_model(base, config)
    codec = model._link_for(2).codec
    sent_steps = []
    encode = codec.encode
    codec.encode = lambda x, given=None: (sent_steps.append(codec.step), encode(x, given=given))[1]
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == 13
    assert sent_steps[0] == 0.2 and sent_steps[-1] == 1.5  # the prompt at the start rung, the last steps at the floor
    changes = model.wire_stats().bitrate_changes
    assert [c["step"] for c in changes] == [s for s in (0.6, 1.5) if s in [c["step"] for c in changes]]
    assert changes[-1]["step"] == 1.5
    assert model.split_server.stats_dict()["sessions_active"] == 1  # no error closed the session
    again = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert again.shape[1] == 8 and sent_steps[-1] == 1.5  # a new generation keeps the rung; its first gap is no token


def test_a_prompt_the_server_makes_go_up_a_position_at_a_time_is_not_paced_as_decoding():
    from slicer_hf.server import ServerLimits, SplitServer
    from slicer_hf.transport import LocalTransport

    base = tiny_model("llama").eval()
    config = SlicerConfig(
        split_layer=2,
        quantizer="ecsq",
        step=0.2,
        bitrate_ladder=((0.2, 900.0), (1.5, 300.0)),
        target_token_latency_ms=1e-3,
    )  # every decode token misses the target; the prompt's positions are no tokens
    server = SplitServer(tiny_model("llama"), limits=ServerLimits(max_step_elements=base.config.hidden_size))
    model = SlicerModelForCausalLM.from_model(base, config, LocalTransport(server))  # one position per step
    codec = model._link_for(2).codec
    sent_steps = []
    encode = codec.encode
    codec.encode = lambda x, given=None: (sent_steps.append(codec.step), encode(x, given=given))[1]
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert sent_steps == [0.2] * 7  # six prompt positions and the first decode step, all at the start rung


def test_the_pause_before_a_generation_that_continues_a_cache_is_no_tokens_latency(monkeypatch):
    """`generate(out.sequences, past_key_values=out.past_key_values)` sends one position first, as a decode step
    does: the user's pause before it was read as that token's latency, and each continued turn went to the floor."""
    import time as real_time
    from types import SimpleNamespace

    from slicer_hf import link

    base = tiny_model("llama").eval()
    ladder = ((0.2, 900.0), (0.6, 600.0), (1.5, 300.0))
    config = SlicerConfig(
        split_layer=2, quantizer="ecsq", step=0.2, bitrate_ladder=ladder, target_token_latency_ms=60e3
    )  # a minute a token: no token of this machine misses it, a pause of ten minutes would
    model = SlicerModelForCausalLM.from_model(base, config)
    paused = [0.0]
    monkeypatch.setattr(link, "time", SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + paused[0]))
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    for _ in range(3):  # the user reads each reply for ten minutes, then the conversation goes on
        paused[0] += 600.0
        seq = out.sequences
        out = model.generate(seq, attention_mask=torch.ones_like(seq), past_key_values=out.past_key_values, **kwargs)
    assert model.wire_stats().bitrate_changes == []


def test_a_token_whose_step_failed_over_is_no_measure_of_the_link(monkeypatch):
    """The reconnection and replay (or a whole timeout) had been read as one token's latency: the step went coarse."""
    import time as real_time
    from types import SimpleNamespace

    from slicer_hf import TransportError, link
    from slicer_hf.server import SplitServer
    from slicer_hf.transport import LocalTransport

    paused = [0.0]

    class LostOnce(LocalTransport):  # the sixth message is lost after ten minutes; a fresh session takes the rest
        sent = 0

        def request(self, data: bytes) -> bytes:
            self.sent += 1
            if self.sent == 6:
                paused[0] += 600.0
                raise TransportError("connection lost")
            return super().request(data)

        def reset(self) -> bool:
            return True

    base = tiny_model("llama").eval()
    config = SlicerConfig(
        split_layer=2, quantizer="ecsq", step=0.2, bitrate_ladder=((0.2, 900.0), (1.5, 300.0)),
        target_token_latency_ms=60e3,
    )  # fmt: skip
    model = SlicerModelForCausalLM.from_model(base, config, LostOnce(SplitServer(tiny_model("llama"))))
    monkeypatch.setattr(link, "time", SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + paused[0]))
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert model.wire_stats().failovers == 1 and model.wire_stats().bitrate_changes == []


def test_a_link_that_flips_between_fast_and_slow_keeps_the_controller_on_its_ladder():
    controller = BitrateController(LADDER, target_ms=75.0)
    rates = ([2000.0] * 6 + [40.0] * 3) * 40  # up-probes, misses and drops interleaved
    _, steps = simulate(rates, controller, seed=3)
    assert set(steps) <= set(STEPS) and 0 <= controller.level < len(LADDER)


def test_a_miss_goes_straight_to_the_finest_rung_predicted_under_90_percent_of_the_target():
    controller = BitrateController([(0.1, 1000.0), (0.2, 420.0), (0.3, 300.0), (0.4, 100.0)], target_ms=100)
    controller.observe(50, 1000)  # 50 ms at 1000 bits
    controller.observe(150, 1000)  # a miss: about 0.1 ms a bit; rung 1 is predicted at 92% of the target, rung 2 at 80%
    assert controller.level == 2
