"""Numbers in the docs come from the benchmark JSON: the summary cannot drift from it."""

from __future__ import annotations

import json
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


def test_figures_measured_with_another_codec_than_the_shipped_preset_are_refused(tmp_path):
    shutil.copytree(DOCS / "benchmarks", tmp_path / "benchmarks")
    stale = json.loads((tmp_path / "benchmarks" / "server_compute.json").read_text())
    stale["uplink_codec"]["step"] = 0.3  # the preset's step before it was recalibrated
    (tmp_path / "benchmarks" / "server_compute.json").write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match=r"server_compute.json was measured with another uplink codec .*\(its step"):
        summary.render(tmp_path / "benchmarks")


def test_every_command_and_option_of_the_cli_is_in_its_reference():
    """docs/cli.md has a section per command naming each of its options (`slicer-hf COMMAND --help` the same)."""
    import typer

    from slicer_hf.cli import app

    reference = (DOCS / "cli.md").read_text()
    sections = dict(re.findall(r"^## `slicer-hf (\S+)`\n(.*?)(?=^## |\Z)", reference, re.S | re.M))
    commands = typer.main.get_command(app).commands
    assert sorted(sections) == sorted(commands)
    for name, command in commands.items():
        for param in command.params:
            for option in [*param.opts, *param.secondary_opts]:
                if option.startswith("--"):
                    assert f"`{option}`" in sections[name], f"slicer-hf {name} {option} is not in docs/cli.md"
