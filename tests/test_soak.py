"""The soak's short mode, as CI runs it: clients, faults and fuzzing against one live server."""

from __future__ import annotations

import pytest

from slicer_hf.bench import soak

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_short_soak_keeps_the_server_up_exact_and_clean(tmp_path):
    result = soak.main(["--short", "--out-json", str(tmp_path / "soak.json")])
    assert result["server_alive"]
    assert result["sessions_active_end"] == 0
    assert result["client_errors"] == []
    assert result["checked_generations"] >= 8 and result["mismatches"] == 0
    staged = [what for _, what in result["faults"]]
    assert not [what for what in staged if "failed" in what]
    for kind in ("restarted", "stream cancelled", "slow reader", "SIGKILL) mid-session"):
        assert any(kind in what for what in staged), kind
    fuzz = result["fuzz"]
    assert fuzz["cases"] == 200 and fuzz["failures"] == []
    assert fuzz["accepted"] > 0 and sum(fuzz["refusals"].values()) > 0
    assert result["rss"]["end_rss_mb"] - result["rss"]["warm_rss_mb"] < 100
    assert (tmp_path / "soak.json").is_file()


def test_the_fuzzer_sends_every_step_flag_of_the_protocol_alone_and_together():
    """HISTORY, BARE, CHAINED and GRID steps reach the server's parsers, not only masks and positions."""
    from hypothesis import given, settings

    from slicer_hf import protocol
    from slicer_hf.bench.fuzz import step_messages
    from slicer_hf.codec.bits import Reader

    named = {protocol.HISTORY, protocol.POSITIONS, protocol.GRID, protocol.BARE, protocol.CHAINED}
    seen: list[int] = []

    @settings(max_examples=400, derandomize=True, database=None, deadline=None)
    @given(step_messages(64))
    def collect(item):
        _, body, kind = item
        r = Reader(body)
        for _ in range(1 if kind == protocol.NEXT else 4):  # seq (and start, batch, tokens) precede the flags
            r.varint()
        seen.append(r.take(1)[0])

    collect()
    assert all(any(f & flag and f != 255 for f in seen) for flag in named)
    assert {f & 3 for f in seen if f != 255} == {0, 1, 2, 3}
    assert any(bin(f & sum(named)).count("1") >= 2 for f in seen if f != 255)  # flags together
