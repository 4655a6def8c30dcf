"""What a new user hit in a fresh clone (issue 24): each test here failed before its fix."""

import json
import os
import re
import stat

import numpy as np
from PIL import Image

from conftest import run_cli, write_preset

run = run_cli


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_version_alone():
    from davae_cli import __version__

    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == __version__


def test_failed_start_does_not_poison_the_run_folder(tmp_path, images_dir, tae_base):
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__steps=2, train_vae__num_val=0)
    common = ["train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "run"]
    bad = run(*common, "--base-vae", tmp_path / "no_such_vae", check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "not found" in bad.stderr
    # the same command with the input fixed succeeds: no "already exists", no "pass --resume"
    ok = run(*common)
    assert "never reached a checkpoint" in ok.stderr
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    # --resume after a failed start is not stuck on the failed start's settings either
    bad = run(*common[:-1], tmp_path / "run2", "--base-vae", tmp_path / "no_such_vae", check=False)
    assert bad.returncode == 1
    run(*common[:-1], tmp_path / "run2", "--resume")
    assert (tmp_path / "run2" / "final" / "config.json").is_file()
    # a run that reached a checkpoint is still protected
    again = run(*common, check=False)
    assert again.returncode == 1 and "--resume" in again.stderr


def test_abandoned_start_is_only_a_folder_without_work(tmp_path):
    from davae_cli.train.loop import abandoned_start, save_checkpoint

    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text("name: x\n")
    (d / "log.jsonl").write_text("")
    assert abandoned_start(d)
    (d / "cache").mkdir()  # encoded latents took work: keep the folder as it is
    assert not abandoned_start(d)
    (d / "cache").rmdir()
    save_checkpoint(d, 1, {"x": 1}, keep=1)
    assert not abandoned_start(d)


def test_failed_encode_and_decode_leave_no_output_folder(tmp_path, davae_dir):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    res = run("encode", tmp_path / "bad.png", "--vae", davae_dir, "--out", tmp_path / "lat", check=False)
    assert res.returncode == 1 and not (tmp_path / "lat").exists()
    assert re.search(r"^Error: .*bad\.png", res.stderr, re.M), res.stderr  # per-file failures say Error: too
    res = run("decode", tmp_path / "missing.safetensors", "--vae", davae_dir, "--out", tmp_path / "png", check=False)
    assert res.returncode == 1 and not (tmp_path / "png").exists()
    assert re.search(r"^Error: .*missing\.safetensors: not found", res.stderr, re.M), res.stderr


def test_outputs_get_the_umask_mode(tmp_path, davae_dir):
    from davae_cli.latents import atomic_write_bytes

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert _mode(tmp_path / "a.bin") == 0o640
    finally:
        os.umask(old)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "x.png")
    # a user's usual umask 022 (the CLI's process inherits it): readable by all, like any other tool's output
    old = os.umask(0o022)
    try:
        run("encode", tmp_path / "x.png", "--vae", davae_dir, "--out", tmp_path / "lat")
        run("decode", tmp_path / "lat", "--vae", davae_dir, "--out", tmp_path / "png")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "lat" / "x.safetensors") == 0o644
    assert _mode(tmp_path / "png" / "x.png") == 0o644


def test_encode_res_any_short_side_and_skipped_apart_from_failed(tmp_path, davae_dir):
    Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(tmp_path / "a.png")
    # --res 40 with s*f = 16: the short side becomes 40, then each side is cropped down to a multiple of 16
    r = json.loads(run("encode", tmp_path / "a.png", "--vae", davae_dir, "--out", tmp_path / "lat", "--res", 40,
                       "--json").stdout)
    assert r["num_written"] == 1
    from davae_cli.latents import load_latent

    lat, meta = load_latent(tmp_path / "lat" / "a.safetensors")
    assert meta["resolution"] == [32, 48] and lat.shape[1:] == (2, 3)  # 40x53 -> 32x48
    res = run("encode", tmp_path / "a.png", "--vae", davae_dir, "--out", tmp_path / "lat", "--res", 8, check=False)
    assert res.returncode == 1 and "smaller than one latent token" in res.stderr
    # an output that is already there is skipped (kept, exit 0), not a failure
    res = run("encode", tmp_path / "a.png", "--vae", davae_dir, "--out", tmp_path / "lat", "--res", 40)
    assert "0 latent file(s) written, 1 skipped" in res.stderr and "0 failed" in res.stderr
    r = json.loads(run("encode", tmp_path / "a.png", "--vae", davae_dir, "--out", tmp_path / "lat", "--json").stdout)
    assert r["num_skipped_existing"] == 1 and r["num_failed"] == 0 and r["num_written"] == 0


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, images_dir, tae_base):
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__steps=3, train_vae__num_val=0,
                          train_vae__cache_base=True)
    res = run("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "run",
              env={"DAVAE_PROGRESS_INTERVAL": "0"})
    err = res.stderr
    # every phase says what it does with done/total, the training bar is whole lines, nothing cut at 80 columns
    assert re.search(r"^caching the frozen base's outputs: 8/8 \(100%\)", err, re.M), err
    assert re.search(r"^train-vae: 3/3 \(100%\) .*elapsed 0:00:\d\d \| loss ", err, re.M), err
    assert re.search(r"^measuring the detail channels' statistics: 4/4 \(100%\)", err, re.M), err
    assert re.search(r"^train-vae: 1/3 \(33%\) .*ETA \d:\d\d:\d\d", err, re.M), err
    assert "…" not in err


def test_line_progress_interval():
    import io

    from rich.console import Console

    from davae_cli.cli.common import LineProgress

    buf = io.StringIO()
    p = LineProgress(Console(file=buf, width=40, soft_wrap=True), interval=3600.0)
    with p:
        t = p.add_task("encode", total=10, info="")
        for _ in range(9):
            p.advance(t)
        u = p.add_task("stats", total=None, info="")
        p.update(u, completed=5)
        p.advance(t)  # the last item: a closing line whatever the interval
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("encode: 0/10 (0%)") and lines[1] == "stats: 0 elapsed 0:00:00"
    assert lines[2].startswith("encode: 10/10 (100%)") and "ETA" not in lines[2]
    assert lines[3].startswith("stats: 5 ") and len(lines) == 4  # the unfinished task ends at stop()
