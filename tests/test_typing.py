"""The public API as a user's type checker sees it: the package says it is typed, and the README's usage checks."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
USAGE = """
from slicer_hf import SlicerConfig, SlicerModel, SlicerModelForCausalLM, WireStats, build_codec

model = SlicerModelForCausalLM.from_pretrained("m", slicer_config={"split_layer": 24})
out = model.generate(max_new_tokens=20, split_layer=24)
stats: WireStats = model.wire_stats()
model.close_session()
encoder = SlicerModel.from_pretrained("e", slicer_config=SlicerConfig(split_layer=2))
encoder.close_session()
codec = build_codec(SlicerConfig.from_pretrained("smollm2-135m-split24"))
"""


def test_the_package_ships_its_typed_marker():
    assert (ROOT / "slicer_hf" / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()  # in the wheel's package data


@pytest.mark.slow
def test_the_readme_usage_type_checks_and_a_wrong_argument_does_not(tmp_path, monkeypatch):
    api = pytest.importorskip("mypy.api")
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    (tmp_path / "usage.py").write_text(USAGE)
    (tmp_path / "wrong.py").write_text("from slicer_hf import build_codec\n\nbuild_codec(3.5)\n")
    flags = ["--ignore-missing-imports", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache")]
    out, err, status = api.run([*flags, str(tmp_path / "usage.py")])
    assert status == 0, out + err
    out, _, status = api.run([*flags, str(tmp_path / "wrong.py")])
    assert status == 1 and 'incompatible type "float"; expected "SlicerConfig | str"' in out
