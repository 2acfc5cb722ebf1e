"""Numbers in the docs come from the benchmark JSON: the summary cannot drift from it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from slicer_hf.bench import summary

DOCS = Path(__file__).parents[1] / "docs"


def test_the_benchmarks_summary_matches_its_json():
    summary.main(["--doc", str(DOCS / "benchmarks.md"), "--check"])


def test_a_drifted_summary_is_caught(tmp_path):
    shutil.copytree(DOCS / "benchmarks", tmp_path / "benchmarks")
    doc = tmp_path / "benchmarks.md"
    claim = next(line for line in summary.render(DOCS / "benchmarks").splitlines() if "uplink" in line)
    ratio = re.search(r"\d+\.\d+×", claim).group()  # the uplink ratio the summary states
    doc.write_text((DOCS / "benchmarks.md").read_text().replace(ratio, "99.99×"))
    with pytest.raises(SystemExit):
        summary.main(["--doc", str(doc), "--check"])
    summary.main(["--doc", str(doc)])  # regenerating repairs it
    summary.main(["--doc", str(doc), "--check"])
