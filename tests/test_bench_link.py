"""The bandwidth-shaped link benchmark: pure helpers without networking, then one tiny real run as root."""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess

import pytest
import torch
from conftest import VOCAB, tiny_model

from slicer_hf import SlicerConfig
from slicer_hf.bench import link as bench

NO_NETNS = bench.netns_unavailable_reason()
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=f"no network namespaces here: {NO_NETNS}")


def test_tbf_command_shapes_or_unshapes_one_device():
    shaped = " ".join(bench.tbf_command("eth9", 1.0))
    assert shaped == "tc qdisc replace dev eth9 root tbf rate 1mbit burst 32kbit latency 400ms"
    assert bench.tbf_command("v0", 0.5, netns="ns")[:4] == ["ip", "netns", "exec", "ns"]
    assert "0.5mbit" in bench.tbf_command("v0", 0.5, netns="ns")
    assert " ".join(bench.tbf_command("v0", None)) == "tc qdisc del dev v0 root"
    assert "64kbit" in bench.tbf_command("v0", 10, burst="64kbit")


def test_link_names_addresses_and_commands():
    link = bench.ShapedLink.for_pid(4194303)  # the largest Linux pid: names must still fit in 15 characters
    assert link.name == "slicer-bench-4194303"
    assert max(len(link.host_dev), len(link.ns_dev)) <= 15 and link.host_dev != link.ns_dev
    net = ipaddress.ip_network(f"{link.host_addr}/30", strict=False)
    assert ipaddress.ip_address(link.ns_addr) in net and net.subnet_of(ipaddress.ip_network("10.231.0.0/16"))
    assert {link.host_addr, link.ns_addr}.isdisjoint({str(net.network_address), str(net.broadcast_address)})
    other = bench.ShapedLink.for_pid(4194302)
    assert other.host_addr not in (link.host_addr, link.ns_addr) and other.name != link.name

    setup = [" ".join(c) for c in link.setup_commands()]
    assert setup[0] == f"ip netns add {link.name}"
    assert f"ip link add {link.host_dev} type veth peer name {link.ns_dev}" in setup
    assert f"ip netns exec {link.name} ip addr add {link.ns_addr}/30 dev {link.ns_dev}" in setup
    uplink, downlink = link.shape_commands(10, 10)  # one tbf on each end: each direction is limited
    assert uplink == bench.tbf_command(link.host_dev, 10) and downlink == bench.tbf_command(link.ns_dev, 10, link.name)
    assert [c[:3] for c in link.teardown_commands()] == [["ip", "link", "del"], ["ip", "netns", "del"]]


def test_server_command_runs_inside_the_namespace_on_its_address():
    link = bench.ShapedLink.for_pid(1234)
    cmd = bench.server_command(link, "/models/m", 24, ["--no-batching"])
    at = cmd.index("ip")
    assert cmd[at : at + 4] == link.exec_prefix()
    serve = cmd[at + 4 :]
    assert serve[1:4] == ["-m", "slicer_hf.cli", "serve"]
    for flag, value in [
        ("--host", link.ns_addr),
        ("--port", "0"),
        ("--min-split-layer", "24"),
        ("--model", "/models/m"),
    ]:
        assert serve[serve.index(flag) + 1] == value
    assert serve[-1] == "--no-batching"


def test_parsers_and_labels():
    assert bench.parse_server_url("slicer-hf serving /m on grpc://10.231.0.2:4567\n") == "grpc://10.231.0.2:4567"
    assert bench.parse_server_url("WARNING something on fire") is None
    rates = ("unshaped", "none", "0", "0.0", "10", "0.5")
    assert [bench.parse_rate(t) for t in rates] == [None, None, None, None, 10.0, 0.5]
    for bad in ("-1", "fast", "inf", "nan"):  # argparse shows an ArgumentTypeError's message (a ValueError's not)
        with pytest.raises(argparse.ArgumentTypeError, match="positive"):
            bench.parse_rate(bad)
    assert [bench.rate_label(r) for r in (None, 1.0, 0.5)] == ["unshaped", "1 Mbit/s", "0.5 Mbit/s"]
    assert bench.goodput_bytes(1.0) == 125_000 and bench.goodput_bytes(0.01) == 64 << 10
    assert bench.goodput_bytes(None) == bench.goodput_bytes(1e9) == 16 << 20


def test_variant_config_changes_only_codec_and_downlink():
    base = SlicerConfig(split_layer=24, codec="slicer", distortion=0.05)
    fp16 = bench.variant_config(base, "fp16")
    assert (fp16.codec, fp16.downlink, fp16.split_layer) == ("fp16", "hidden", 24)
    topk = bench.variant_config(base, "slicer+topk_logits")
    assert (topk.codec, topk.downlink, topk.distortion) == ("slicer", "topk_logits", 0.05)


def test_fp16_both_ways_and_a_compressed_downlink_only_with_slicer():
    base = SlicerConfig(split_layer=24, codec="slicer", quantizer="ecsq", downlink_step=0.1)
    both = bench.variant_config(base, "fp16+fp16")
    assert (both.codec, both.downlink, both.downlink_dtype, both.downlink_step) == ("fp16", "hidden", "float16", None)
    assert bench.variant_config(base, "fp16").downlink_step is None  # fp16 up: exact hidden states back
    assert bench.variant_config(base, "slicer").downlink_step == 0.1


def test_not_root_is_a_clear_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in bench.netns_unavailable_reason()


def _sample(rate, variant, scale):
    return {
        "rate_mbit": rate,
        "variant": variant,
        "codec": variant,
        "downlink": "hidden",
        "prompt_tokens": 64,
        "new_tokens": 32,
        **{key: scale * (i + 1) for i, key in enumerate(bench.METRICS)},
    }


def test_summary_table_and_plot(tmp_path):
    samples = [_sample(1.0, "fp16", s) for s in (1.0, 3.0, 2.0)]
    row = bench.summarize(samples)
    assert row["repeats"] == 3 and row["ttft_s"] == 2.0 and row["variant"] == "fp16" and row["rate_mbit"] == 1.0
    # one decode step of 1,000 B up and 250 B down at 1 Mbit/s takes 10 ms on a line
    assert bench.wire_ms_per_token(
        {**row, "decode_uplink_bytes_per_token": 1000, "decode_downlink_bytes_per_token": 250}
    ) == (pytest.approx(10.0))
    assert bench.wire_ms_per_token({**row, "rate_mbit": None}) is None
    rows = [row, bench.summarize([_sample(1.0, "slicer", 1.0)]), bench.summarize([_sample(None, "fp16", 1.0)])]
    rows.append(bench.summarize([_sample(None, "slicer", 1.0)]))
    goodput = [{"rate_mbit": r, "uplink_mbit_s": 0.96, "downlink_mbit_s": 0.95} for r in (1.0, None)]
    meta = {"model": "m", "split_layer": 2, "prompt_tokens": 64, "new_tokens": 32, "repeats": 3}
    result = {"rows": rows, "goodput": goodput, "meta": meta}
    table = bench.markdown_table(result).splitlines()
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert table[2].startswith("| 1 Mbit/s (0.96 / 0.95) | fp16 | 64 | 32 |")
    assert table[-1].startswith("| unshaped (0.96 / 0.95) | slicer |")
    bench.plot(result, tmp_path / "link.png")
    assert (tmp_path / "link.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_netns
def test_link_is_removed_when_the_body_fails():
    link = bench.ShapedLink.for_pid(os.getpid() + 7)  # not the pid a real run in this process would use
    with pytest.raises(RuntimeError, match="boom"), link:
        link.set_rate(1.0)
        shown = subprocess.run(["tc", "qdisc", "show", "dev", link.host_dev], capture_output=True, text=True).stdout
        assert "tbf" in shown and "rate 1Mbit" in shown
        raise RuntimeError("boom")
    assert not link.exists()


@pytest.mark.slow
@pytest.mark.network
@needs_netns
def test_tiny_run_over_a_1_mbit_link(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    prompt = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    result = bench.run(
        str(model_dir),
        SlicerConfig(),  # no split named: where generate splits this model, 3 of its 4 layers
        rates_mbit=[1.0],
        variants=["fp16", "slicer"],
        new_tokens=4,
        repeats=1,
        prompt_ids=prompt,
        out_json=tmp_path / "link.json",
    )
    assert not os.path.exists(f"/run/netns/{result['meta']['netns']}")  # cleaned up
    assert result["meta"]["split_layer"] == 3
    (goodput,) = result["goodput"]
    assert 0.7 < goodput["uplink_mbit_s"] < 1.1 and 0.7 < goodput["downlink_mbit_s"] < 1.1  # the shaping works
    fp16, slicer = result["rows"]
    assert (fp16["variant"], slicer["variant"]) == ("fp16", "slicer")
    for row in (fp16, slicer):
        assert (row["prompt_tokens"], row["new_tokens"], row["rate_mbit"]) == (16, 4, 1.0)
        assert row["e2e_tokens_per_s"] > 0 and 0 < row["ttft_s"] < row["total_s"]
        assert row["link_uplink_bytes"] > row["prefill_uplink_bytes"]  # TCP/IP and HTTP/2 headers on top
    assert fp16["prefill_uplink_bytes"] > 16 * 64 * 2 > slicer["prefill_uplink_bytes"]  # fp16: 2 B per element
    assert fp16["decode_uplink_bytes_per_token"] > slicer["decode_uplink_bytes_per_token"]
    assert fp16["decode_downlink_bytes_per_token"] == slicer["decode_downlink_bytes_per_token"]  # same downlink
    assert len(result["generations"]["slicer"]["ids"]) == 4
    assert (tmp_path / "link.json").is_file()


@needs_netns
def test_each_direction_of_the_link_is_shaped_on_its_own():
    def qdisc(*prefix, dev):
        return subprocess.run([*prefix, "tc", "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout

    with bench.ShapedLink.for_pid(os.getpid() + 7) as link:
        link.set_rates(1.0, None)  # the uplink only
        assert "tbf" in qdisc(dev=link.host_dev) and "1Mbit" in qdisc(dev=link.host_dev)
        assert "tbf" not in qdisc(*link.exec_prefix(), dev=link.ns_dev)
        link.set_rates(None, 0.5)
        assert "tbf" not in qdisc(dev=link.host_dev)
        assert "500Kbit" in qdisc(*link.exec_prefix(), dev=link.ns_dev)


def test_the_lowest_rate_within_ten_percent_is_measured_then_interpolated_in_log_rate():
    def rows(variant, points):
        return [{"rate_mbit": rate, "variant": variant, "e2e_tokens_per_s": tps} for rate, tps in points]

    curve = rows("slicer", [(None, 10.0), (1.0, 9.8), (0.5, 9.5), (0.25, 8.5), (0.125, 6.0)])
    found = bench.lowest_rate_within(curve + rows("fp16", [(None, 10.0), (1.0, 5.0)]), "slicer")
    assert found["lowest_measured_mbit"] == 0.5 and found["first_slower_measured_mbit"] == 0.25
    assert found["floor_tokens_per_s"] == pytest.approx(9.0)
    assert found["estimate_mbit"] == pytest.approx(0.5 * 0.5**0.5)  # 9.0 lies halfway from 9.5 to 8.5
    fast = bench.lowest_rate_within(rows("x", [(None, 10.0), (1.0, 9.5)]), "x")
    assert fast["lowest_measured_mbit"] == fast["estimate_mbit"] == 1.0 and fast["first_slower_measured_mbit"] is None
    slow = bench.lowest_rate_within(rows("y", [(None, 10.0), (1.0, 5.0)]), "y")
    assert slow["lowest_measured_mbit"] is None and slow["estimate_mbit"] is None
    assert "already at 1.0 Mbit/s, the fastest rate measured" in bench.describe_within(slow)
    assert "down to 0.5 Mbit/s measured (next slower 0.25), about 0.354 Mbit/s" in bench.describe_within(found)
    with pytest.raises(ValueError, match="unshaped"):
        bench.lowest_rate_within(rows("z", [(1.0, 5.0)]), "z")


def test_a_suite_stopped_by_sigterm_runs_its_cleanup(tmp_path):
    """What lets a suite stop the servers it started when it is killed (`bench.common.exit_on_sigterm`)."""
    import signal
    import subprocess
    import sys

    marker = tmp_path / "cleaned"
    script = (
        "import time\n"
        "from slicer_hf.bench.common import exit_on_sigterm\n"
        "exit_on_sigterm()\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "finally:\n"
        f"    open({str(marker)!r}, 'w').close()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM  # not the 60 s sleep's end
    assert marker.exists()


def test_the_link_bytes_of_a_generation_leave_out_the_benchmarks_own_stats_calls():
    """Each STATS call (the server's compute time) crosses the link on a connection of its own: 1-2 KB that are not
    the generation's. A link whose counters see the generation's protocol bytes plus 1,000 B up and 1,500 B down per
    STATS call must report the protocol bytes alone."""
    from slicer_hf import SlicerModelForCausalLM

    model = SlicerModelForCausalLM.from_model(tiny_model("llama"), SlicerConfig(codec="identity", split_layer=2))
    stats = {"calls": 0}

    def server_compute_s() -> float:
        stats["calls"] += 1
        return 0.0

    class Counted:
        def byte_counters(self) -> tuple[int, int]:
            wire = model.wire_stats()
            return wire.uplink_bytes + 1000 * stats["calls"], wire.downlink_bytes + 1500 * stats["calls"]

    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    got = bench.measure_generation(model, prompt, 5, Counted(), server_compute_s)
    wire = model.wire_stats()
    assert stats["calls"] == 3  # before, at the first token, after
    assert (got["link_uplink_bytes"], got["link_downlink_bytes"]) == (wire.uplink_bytes, wire.downlink_bytes)
    assert got["decode_link_uplink_bytes_per_token"] == got["decode_uplink_bytes_per_token"]
    assert got["decode_link_downlink_bytes_per_token"] == got["decode_downlink_bytes_per_token"]
