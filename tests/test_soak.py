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
