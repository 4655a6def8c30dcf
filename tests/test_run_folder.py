"""A run folder on a shared cluster: one process at a time (a lock a SIGKILL does not leave stuck), a truncated
latest checkpoint falls back to the previous one, a full disk ends in one line with the last checkpoint
resumable, and no temporary file outlives a run."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from davae_cli import DavaeError, load_preset
from davae_cli.train.loop import LOCK_FILE, checkpoint_problem, latest_checkpoint
from conftest import run_cli, write_preset


def _preset(tmp_path, tae_base, **over):
    return write_preset(tmp_path / "p.yaml", tae_base, "residual", **over)


def _weights(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:07d}" / "state.pt", map_location="cpu", weights_only=False)["model"]


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_frees_the_folder(tmp_path, tae_base,
                                                                                            images_dir):
    preset = _preset(tmp_path, tae_base)
    run = tmp_path / "run"
    common = ["train-vae", "--preset", preset, "--data", images_dir, "--out", run]
    run_cli(*common, "--steps", "2")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from davae_cli.train.loop import lock_run; "
                               f"lock_run({str(run)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli(*common, "--resume", check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"is in use by process {holder.pid}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert latest_checkpoint(run).name == "step-0000002"  # untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run_cli(*common, "--resume")  # the kernel released the killed holder's lock
    assert latest_checkpoint(run).name == "step-0000004" and (run / "final").is_dir()


def test_the_lock_is_reentrant_in_one_process_and_released_at_the_end(tmp_path, tae_base, images_dir):
    from davae_cli.train.vae import train_vae

    preset = load_preset(str(_preset(tmp_path, tae_base)), ["train_vae.steps=2"])
    train_vae(preset, [str(images_dir)], tmp_path / "run")
    # released: another process may now take it (and gives it back when it exits)
    subprocess.run([sys.executable, "-c", "from davae_cli.train.loop import lock_run; "
                    f"lock_run({str(tmp_path / 'run')!r})"], check=True)
    assert (tmp_path / "run" / LOCK_FILE).is_file()


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tae_base, images_dir):
    preset = _preset(tmp_path, tae_base)
    common = ["train-vae", "--preset", preset, "--data", images_dir]
    run_cli(*common, "--out", tmp_path / "full", "--steps", "6", "--set", "train_vae.keep_checkpoints=3")
    cut = tmp_path / "cut"
    run_cli(*common, "--out", cut, "--steps", "4", "--set", "train_vae.keep_checkpoints=3")
    bad = cut / "checkpoints" / "step-0000004" / "state.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    assert checkpoint_problem(bad.parent) and checkpoint_problem(cut / "checkpoints" / "step-0000002") is None
    r = run_cli(*common, "--out", cut, "--steps", "6", "--set", "train_vae.keep_checkpoints=3", "--resume")
    assert "skipping an unreadable checkpoint" in r.stderr and str(bad) in r.stderr
    assert "resumed from step-0000002" in r.stderr
    a, b = _weights(tmp_path / "full", 6), _weights(cut, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every checkpoint unreadable: one line
    for p in (cut / "checkpoints").glob("step-*/state.pt"):
        p.write_bytes(b"not a zip")
    r = run_cli(*common, "--out", cut, "--steps", "8", "--set", "train_vae.keep_checkpoints=3", "--resume", check=False)
    assert r.returncode == 1 and "no readable checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(tmp_path, tae_base, images_dir, monkeypatch):
    """torch.save raising ENOSPC at the second checkpoint (as a full disk does): one DavaeError, step 2 intact
    and resumable, no temporary folder left."""
    from davae_cli.train import loop
    from davae_cli.train.vae import train_vae

    preset = load_preset(str(_preset(tmp_path, tae_base)))
    calls = {"n": 0}
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(loop.torch, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(DavaeError, match="No space left on device"):
        train_vae(preset, [str(images_dir)], run)
    loop.unlock_run(run)  # the failed call's lock (a CLI process gives it back when it exits)
    assert latest_checkpoint(run).name == "step-0000002" and not list(run.rglob("*.tmp"))
    monkeypatch.setattr(loop.torch, "save", real_save)
    train_vae(preset, [str(images_dir)], run, resume=True)
    assert latest_checkpoint(run).name == "step-0000004" and (run / "final").is_dir()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def test_a_real_full_disk_ends_in_one_line_and_resumes(tmp_path, tae_base, images_dir):
    """The run folder on a 3 MB tmpfs (room for one ~2 MB checkpoint): the second checkpoint fails with one
    line; after the disk grows, --resume finishes. Needs permission to mount (root in a container)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        preset = _preset(tmp_path, tae_base)
        common = ["train-vae", "--preset", preset, "--data", images_dir, "--out", disk / "run"]
        r = run_cli(*common, check=False)
        assert r.returncode == 1 and "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()[-1:]) == 1 and r.stderr.strip().splitlines()[-1].startswith("Error")
        assert latest_checkpoint(disk / "run").name == "step-0000002" and not list((disk / "run").rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        run_cli(*common, "--resume")
        assert (disk / "run" / "final").is_dir()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_temporaries_of_an_interrupted_write_are_removed(tmp_path, tae_base, images_dir):
    preset = _preset(tmp_path, tae_base)
    run = tmp_path / "run"
    common = ["train-vae", "--preset", preset, "--data", images_dir, "--out", run]
    run_cli(*common, "--steps", "2")
    (run / "checkpoints" / "step-0000004.tmp").mkdir()
    (run / "checkpoints" / "step-0000004.tmp" / "state.pt").write_bytes(b"half")
    (run / "checkpoints" / ".latest.abc.tmp").write_bytes(b"x")
    (run / "final.tmp").mkdir()
    r = run_cli(*common, "--resume")
    assert "removed the temporary files" in r.stderr
    assert not list(run.rglob("*.tmp"))
