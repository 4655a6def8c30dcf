"""davae report: the page parses, every image is an inline PNG, every logged loss and metric is named, the
settings are escaped; a run with nothing logged still gets a page; outputs are never replaced by accident."""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser

import pytest
import yaml

from conftest import run_cli, write_preset

pytest.importorskip("matplotlib")

TRAIN_KEYS = ["l1", "kl", "align", "loss", "grad_norm", "lr"]


class Page(HTMLParser):
    """The tags, <img> sources and visible text of a page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)

    @property
    def words(self) -> str:
        return " ".join(self.text)


def _png(src: str) -> bytes:
    from PIL import Image

    assert src.startswith("data:image/png;base64,"), src[:40]
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        im.load()
    return data


def _sample(path, color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as train-vae leaves it: resumed once, two evaluations, a torn last log line, two sample
    grids, two checkpoints and final/; its description holds HTML that must come out as text."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "synthetic", "description": "a <script>alert(1)</script> & co",
                                                     "train_vae": {"steps": 6, "lr": 1e-3}}))
    recs = [{"step": 0, "event": "start", "device": "cpu", "world_size": 1, "start_step": 0},
            {"step": 0, "event": "eval", "davae.psnr": 20.0, "base_full.psnr": 25.0, "gap_closed": 0.0,
             "detail_structure": {"detail": {"std": 0.3}}}]
    for step in range(1, 7):
        recs.append({"step": step, "event": "train", "elapsed_s": step * 0.5, "l1": 1.0 / step, "kl": 0.1 * step,
                     "align": 0.5, "loss": 1.0 / step + 0.01, "grad_norm": 0.2, "lr": 1e-3 * step / 6})
        if step == 4:  # killed after step 4, resumed from the checkpoint at step 3: steps 4.. logged again
            recs += [{"step": 3, "event": "start", "device": "cpu", "world_size": 1, "start_step": 3},
                     {"step": 4, "event": "train", "l1": 0.05, "kl": 0.4, "align": 0.5, "loss": 0.21,
                      "grad_norm": 0.2, "lr": 1e-3 * 4 / 6}]
    recs += [{"step": 6, "event": "eval", "davae.psnr": 22.5, "base_full.psnr": 25.0, "gap_closed": 0.5,
              "detail_structure": {"detail": {"std": 0.8}}},
             {"step": 6, "event": "export", "final": str(run / "final")}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + '\n{"step": 7, "event": "tr')
    _sample(run / "samples" / "step-0000000.png", (200, 0, 0))
    latest = _sample(run / "samples" / "step-0000006.png", (0, 0, 200))
    for step in (3, 6):
        (run / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:07d}" / "state.pt").write_bytes(b"0" * 4096)
    (run / "checkpoints" / "latest").write_text("step-0000006")
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    return run, latest


def test_report_page_parses_embeds_its_images_and_names_every_loss(run_dir, tmp_path):
    run, latest_sample = run_dir
    out = tmp_path / "report.html"
    r = json.loads(run_cli("report", run, "--out", out, "--json").stdout)
    assert r["report"] == str(out) and r["train_records"] == 7 and r["eval_records"] == 2
    text = out.read_text()
    page = Page(text)
    assert page.tags[0] == "html" and "script" not in page.tags and "<script>" not in text  # the config is text
    assert "a <script>alert(1)</script> & co" in page.words
    pngs = [_png(src) for src in page.images]  # every image is an inline PNG: the page needs no other file
    assert len(pngs) == r["images"] == 4  # the losses, the learning rate, the evaluations, the latest sample
    assert pngs[-1] == latest_sample  # the latest grid, not the first
    for key in TRAIN_KEYS + ["davae.psnr", "base_full.psnr", "gap_closed", "detail_structure.detail.std"]:
        assert key in page.words, key
    for name in ("step-0000003", "step-0000006", "latest", "config.json", "export", "1 line(s) of log.jsonl"):
        assert name in page.words, name
    assert "0.05 (step 4)" in page.words  # l1's lowest: the resumed step 4 replaced the first (0.25)


def test_report_of_a_real_tiny_training_run(tmp_path, images_dir, tae_base):
    """What train-vae writes, as it writes it: every number of its train records is named on the page."""
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual")
    run = tmp_path / "run"
    run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", run)
    out = tmp_path / "r.html"
    run_cli("report", run, "--out", out)
    page = Page(out.read_text())
    logged = {k for line in (run / "log.jsonl").read_text().splitlines() for k, v in json.loads(line).items()
              if json.loads(line)["event"] == "train" and isinstance(v, (int, float)) and k not in ("step", "elapsed_s")}
    assert {"loss", "lr"} <= logged
    for key in logged:
        assert key in page.words, key
    assert len(page.images) == 4 and all(_png(src) for src in page.images)


def test_a_run_with_nothing_logged_still_gets_a_page(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text("name: fresh\n")
    out = tmp_path / "fresh.html"
    run_cli("report", run, "--out", out)
    page = Page(out.read_text())
    assert page.images == []
    for says in ("No train records", "No eval records", "No sample images", "No checkpoints", "No final/"):
        assert says in page.words, says


def test_outputs_are_kept_and_errors_are_one_line(run_dir, tmp_path, monkeypatch):
    run, _ = run_dir
    out = tmp_path / "r.html"
    out.write_text("mine")
    bad = run_cli("report", run, "--out", out, check=False)
    assert bad.returncode == 1 and "exists" in bad.stderr and "--overwrite" in bad.stderr
    assert out.read_text() == "mine"
    run_cli("report", run, "--out", out, "--overwrite")
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.html")]  # no temporary file left
    for args, msg in [([tmp_path / "nope"], "no such folder"), ([tmp_path], "not a run folder")]:
        bad = run_cli("report", *args, "--out", tmp_path / "x.html", check=False)
        assert bad.returncode == 1 and msg in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the `plot` extra were not installed
    bad = run_cli("report", run, "--out", tmp_path / "y.html", check=False)
    assert bad.returncode == 1 and 'pip install "davae[plot]"' in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "y.html").exists()
