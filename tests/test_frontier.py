"""benchmarks/frontier.py: the frontier plot from the recorded points and a detail.sh results.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import frontier  # noqa: E402


def test_chain_point_and_reference_from_a_results_json(tmp_path):
    res = {"tokenizer": {"gap_closed": 0.42, "residual_share": 0.2, "neighbour_corr": 0.15, "kurtosis": 3.4,
                         "detail_gain_db": 0.9, "num_images": 500,
                         "reference": {"residual_share": 0.25, "neighbour_corr": 0.14, "kurtosis": 3.3}}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    points, ref = frontier.load_points(tmp_path / "results.json")
    mine = [p for p in points if p["name"] == "imagenette-detail"]
    assert len(mine) == 1 and mine[0]["gap_closed"] == 0.42 and "reference" not in mine[0]
    assert ref["residual_share"] == 0.25 and ref["source"] == "detail.sh ceilings stage"
    assert frontier.chain_point({"tokenizer": {"gap_closed": None}}) is None  # the stage has not run
    recorded = json.loads(frontier.POINTS.read_text())["points"]
    assert all(p["source"] for p in recorded)
    # the run's point replaces a recorded one of the same name, every other recorded point stays
    assert {p["name"] for p in points} == {p["name"] for p in recorded} | {"imagenette-detail"}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "f.png"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 600
