"""--report-to: a tracker gets what log.jsonl gets (read back with TensorBoard's own reader, and wandb's offline
files where wandb is installed), the held-out reconstructions as images and the run's config as hyperparameters;
a resume continues the same tracker run without duplicating the steps it trains again; a missing tracker package
or an unknown name is one line; and `--report-to none` (the default) imports no tracker package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from davae_cli import DavaeError
from davae_cli.train.trackers import tracker_names

from conftest import run_cli, write_preset

TRACKER_MODULES = ("tensorboard", "torch.utils.tensorboard", "tensorboardX", "wandb", "trackio")


def _expected(run_dir, events=("train", "eval")) -> dict:
    """{"<event>/<field>": [(step, value), ...]}: the numeric top-level fields of log.jsonl's records."""
    out: dict = {}
    for rec in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()):
        if rec.get("event") not in events:
            continue
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(f"{rec['event']}/{key}", []).append((rec["step"], value))
    return out


def _tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "trackers" / "davae"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _tensorboard_hparams(run_dir) -> dict:
    """The hyperparameters of the run (TensorBoard's hparams plugin data, in a sub-folder of the log folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = {}
    for sub in (run_dir / "trackers" / "davae").iterdir():
        if sub.is_dir():
            acc = EventAccumulator(str(sub))
            acc.Reload()
            try:
                content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
            except KeyError:  # accelerate's folder of hparams.yml alone
                continue
            for key, value in plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams.items():
                out[key] = getattr(value, value.WhichOneof("kind"))
    return out


def _assert_tensorboard_equals_the_log(run_dir, steps: list[int]) -> None:
    expected, tb = _expected(run_dir), _tensorboard(run_dir)
    assert {"train/loss", "train/l1", "train/align", "train/lr", "train/grad_norm", "train/steps_per_s",
            "eval/davae.psnr", "eval/base_half_bicubic.psnr", "eval/align_mse"} <= set(expected)
    assert [s for s, _ in expected["train/loss"]] == steps
    for tag, series in expected.items():
        # TensorBoard stores float32: each value is the log's, rounded to float32, once per step
        got = [(e.step, np.float32(e.value)) for e in tb.Scalars(tag)]
        assert got == [(s, np.float32(v)) for s, v in series], tag
    eval_steps = [s for s, _ in expected["eval/davae.psnr"]]
    assert [e.step for e in tb.Images("eval/reconstructions")] == eval_steps
    assert "start/world_size" not in tb.Tags()["scalars"]  # the set-up record is not a metric


def test_tensorboard_gets_what_the_log_gets_and_a_resume_continues_the_same_run(tmp_path, images_dir, tae_base):
    pytest.importorskip("tensorboard")
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__steps=3,
                          train_vae__checkpoint_every=1, train_vae__keep_checkpoints=3, train_vae__stats_images=2)
    run = tmp_path / "run"
    cmd = ["train-vae", "--preset", preset, "--data", images_dir, "--out", run, "--report-to", "tensorboard"]
    res = run_cli(*cmd)
    assert f"tensorboard --logdir {run / 'trackers'}" in res.stderr
    _assert_tensorboard_equals_the_log(run, [1, 2, 3])
    hp = _tensorboard_hparams(run)  # the run folder's config, flattened; a list as its text
    assert hp["train_vae.lr"] == pytest.approx(1e-3) and hp["train_vae.betas"] == "[0.9, 0.999]"
    assert hp["vae.detail_channels"] == 4 and hp["name"] == "test-residual"
    run_id = (run / "trackers" / "run_id").read_text()

    # a kill after step 3 whose last two checkpoints were lost: the resume trains steps 2 and 3 again, and
    # TensorBoard, like log.jsonl, keeps only the second take of them (one value per step, not two)
    for gone in ("final", "checkpoints/step-0000002", "checkpoints/step-0000003", "checkpoints/latest"):
        path = run / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_cli(*cmd, "--resume")
    _assert_tensorboard_equals_the_log(run, [1, 2, 3])
    assert (run / "trackers" / "run_id").read_text() == run_id


def _wandb_history(run_dir) -> tuple[dict, dict]:
    """({tag: {step: value}}, config) of the offline wandb run in RUN/trackers, read from its transaction log
    (wandb's LevelDB-style record log of `Record` protobufs)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, block, chunk, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    history: dict = {}
    config: dict = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, {})[rec.history.step.num] = json.loads(item.value_json)
        elif kind in ("config", "run"):
            updates = rec.config.update if kind == "config" else rec.run.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates})
    return history, config


def test_wandb_offline_gets_what_the_log_gets(tmp_path, images_dir, tae_base, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__steps=2,
                          train_vae__stats_images=2)
    run = tmp_path / "run"
    run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", run, "--report-to", "wandb")
    history, config = _wandb_history(run)
    expected = _expected(run)
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/davae.psnr"} <= set(expected)
    for tag, series in expected.items():
        assert history[tag] == dict(series), tag  # JSON both ways: the same float64
    assert set(history["eval/reconstructions/_type"].values()) == {"images/separated"}
    assert config["train_vae.lr"] == pytest.approx(1e-3)
    run_id = (run / "trackers" / "run_id").read_text()
    assert any((run / "trackers" / "wandb").glob(f"offline-run-*-{run_id}"))  # the stable id a resume reopens


def test_a_missing_tracker_package_or_an_unknown_name_is_one_line(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_trackio_available", lambda: False)
    vae = tmp_path / "no-vae"
    out = tmp_path / "run"
    for cmd in (["train-vae", "--data", "skimage"], ["adapt-dit", "--vae", vae, "--data", "x"],
                ["train-dit", "--vae", vae, "--data", "x"]):
        res = run_cli(*cmd, "--out", out, "--report-to", "wandb", check=False)
        assert res.returncode == 1, res.stderr
        # checked first: before the DA-VAE (here missing) is read or the run folder made
        assert res.stderr.strip() == 'Error: --report-to wandb needs the wandb package: pip install "davae[wandb]"'
        assert not out.exists()
    res = run_cli("train-vae", "--data", "skimage", "--out", out, "--report-to", "tensorbored", check=False)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "'tensorbored' is not a tracker" in res.stderr
    with pytest.raises(DavaeError, match=r'davae\[tensorboard\]'):
        tracker_names("all")  # none of them installed
    assert tracker_names(None) == tracker_names("none") == tracker_names("") == []


def test_tracker_names_read_a_list_and_all_is_what_is_installed():
    with pytest.raises(DavaeError, match="'mlflow' is not a tracker"):
        tracker_names("tensorboard,mlflow")
    pytest.importorskip("tensorboard")
    assert tracker_names("tensorboard") == tracker_names(" TensorBoard, none,tensorboard") == ["tensorboard"]
    assert "tensorboard" in tracker_names("all")


_NO_TRACKER = """
import json
import sys
from pathlib import Path
from davae_cli.cli import app  # noqa: F401  (every command module)
from davae_cli.config import load_preset
from davae_cli.train import dit, native, vae  # noqa: F401
from davae_cli.train.loop import RunLoop, open_run
from davae_cli.train.trackers import tracker_names

TRACKERS = {TRACKER_MODULES!r}
run = Path(sys.argv[1])
acc, preset, _ = open_run(run, load_preset("tiny"), False, trackers=tuple(tracker_names(sys.argv[2])))
loop = RunLoop(acc, run, total=1, start_step=0, resumed=False, seed=0, log_every=1, checkpoint_every=1,
               keep_checkpoints=1, state_fn=lambda step: {{}}, callbacks=vae.Callbacks(), config=preset.to_dict())
loop.start({{}})
loop.write({{"step": 1, "event": "train", "loss": 0.5}})
loop.trackers.finish()
print(json.dumps(sorted(m for m in sys.modules if any(m == t or m.startswith(t + ".") for t in TRACKERS))))
"""


def test_report_to_none_imports_no_tracker(tmp_path):
    """The default starts, logs and finishes a run's trackers without importing any tracker package; the same
    script with tensorboard (where installed) imports it, so the check can see an import."""
    script = _NO_TRACKER.format(TRACKER_MODULES=TRACKER_MODULES)

    def imported(report_to: str) -> list:
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / report_to), report_to],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    assert imported("none") == []
    assert not (tmp_path / "none" / "trackers").exists()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert "torch.utils.tensorboard" in imported("tensorboard")
