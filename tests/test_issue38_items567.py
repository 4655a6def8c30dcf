"""Issue 38, items 5-7: exports replaced atomically (a kill between any two steps leaves a complete `final`
after the next start's recovery), the official ImageNet sampling grid, and streams with a preset that caches
the frozen base (the cache turned off with a note). Each test here failed before its fix."""

import io
import tarfile
from pathlib import Path

import pytest

from conftest import run_cli, write_preset
from davae_cli.data import list_images


def _write_shard(path: Path, files: list) -> Path:
    with tarfile.open(path, "w") as t:
        for f in files:
            data = Path(f).read_bytes()
            ti = tarfile.TarInfo(f"{Path(f).stem}{Path(f).suffix}")
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


# ------------------------------------------------------------------ item 7: streams and a preset that caches
def test_streamed_data_turns_a_presets_base_cache_off_with_a_note(tmp_path, images_dir, tae_base):
    """A preset with `train_vae.cache_base: true` (as `tiny`) trains on shards: the cache is turned off with
    one note instead of the run failing."""
    items = list_images([images_dir]).items
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, (a, b) in enumerate([(0, 3), (3, 5), (5, 8)]):
        _write_shard(shards / f"s-{k:03d}.tar", items[a:b])
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__cache_base=True,
                          train_vae__num_val=0)
    res = run_cli("train-vae", "--preset", preset, "--data", str(shards) + "/s-{000..002}.tar",
                  "--out", tmp_path / "run", check=False)
    assert res.returncode == 0, res.stderr
    assert "Error" not in res.stderr
    notes = [line for line in res.stderr.splitlines() if "cache_base" in line]
    assert len(notes) == 1 and "turned off" in notes[0], res.stderr
    assert (tmp_path / "run" / "final").is_dir()
    assert "cache_base: false" in (tmp_path / "run" / "config.yaml").read_text()


# ------------------------------------------------------------------ item 6: the official ImageNet sampling grid
def test_imagenet_512_official_samples_on_the_official_lightningdit_grid():
    """The official sampler (LightningDiT transport/integrators.py `ode`): t = linspace(0, 1, num_sampling_steps =
    250) (t0 = 0, t1 = 1 for a velocity model's ODE), shifted by s t / (1 + (s - 1) t) with s = 0.3, integrated by torchdiffeq's Euler over that grid: 250 points, 249 Euler
    steps (network evaluations), ending at t = 1 (sigma 0). The official preset samples on exactly that grid."""
    import torch

    from davae_cli.config import load_preset
    from davae_cli.dit.backend import backend_class

    p = load_preset("imagenet-512-official")
    assert p.sample.steps == 249 and p.sample.sampler == "euler"
    t = torch.linspace(0.0, 1.0, 250, dtype=torch.float64)
    s = 0.3
    official_sigmas = 1.0 - s * t / (1 + (s - 1) * t)  # LightningDiT's t (0 = noise) in the sigma convention
    grid = backend_class(p.dit.backend).sigma_grid(p.sample.steps, p.sample.shift, None, None)
    assert grid.shape == (250,)
    torch.testing.assert_close(grid.double(), official_sigmas, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ item 5: exports replaced atomically
class _Killed(BaseException):
    """A simulated kill: nothing after it runs (not an Exception, so no handler cleans up)."""


def _kill_at(monkeypatch, name: str, n: int):
    """Make the n-th call (1-based) of `os.replace` or `shutil.rmtree` raise `_Killed` before doing anything."""
    import os
    import shutil

    mod = os if name == "replace" else shutil
    real = getattr(mod, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed(f"{name} #{n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, wrapped)


def _write(version: str):
    def write(folder: Path):
        for name in ("a.bin", "b.json"):  # a complete export has both files with one version
            (folder / name).write_text(version)
    return write


def _export_version(folder: Path) -> str:
    texts = {(folder / name).read_text() for name in ("a.bin", "b.json")}
    assert len(texts) == 1, f"{folder} mixes versions {texts}"
    return texts.pop()


@pytest.mark.parametrize("kill", [("replace", 1), ("replace", 2), ("rmtree", 1), None])
def test_an_export_replaced_by_a_killed_write_is_whole_after_the_next_start(tmp_path, monkeypatch, kill):
    """`write_folder` over an existing export, killed at each step of the swap (new folder complete → old renamed
    aside → new renamed in → old removed); the next start's clean-up (`clear_temporaries`, run by `open_run`)
    leaves one complete `final` — the old one or the new one — and no `.tmp`/`.old` folder."""
    from davae_cli.train.loop import clear_temporaries, write_folder

    run_dir = tmp_path / "run"
    final = run_dir / "final"
    final.mkdir(parents=True)
    _write("old")(final)
    if kill is not None:
        _kill_at(monkeypatch, *kill)
        with pytest.raises(_Killed):
            write_folder(final, _write("new"), "the export")
        monkeypatch.undo()
    else:
        write_folder(final, _write("new"), "the export")
    clear_temporaries(run_dir)
    assert final.is_dir(), sorted(p.name for p in run_dir.iterdir())
    version = _export_version(final)
    # once the old export is aside, the new (complete) one is what the start keeps
    assert version == ("old" if kill == ("replace", 1) else "new")
    assert sorted(p.name for p in run_dir.iterdir()) == ["final"]
    # and a second export over it still works
    write_folder(final, _write("newer"), "the export")
    assert _export_version(final) == "newer" and sorted(p.name for p in run_dir.iterdir()) == ["final"]


def test_a_killed_recovery_is_finished_by_the_next_one(tmp_path, monkeypatch):
    """The start's recovery is itself safe to kill: killed at its rename, the next start completes it."""
    from davae_cli.train.loop import clear_temporaries, write_folder

    run_dir = tmp_path / "run"
    final = run_dir / "final"
    final.mkdir(parents=True)
    _write("old")(final)
    _kill_at(monkeypatch, "replace", 2)  # old aside, new not yet in
    with pytest.raises(_Killed):
        write_folder(final, _write("new"), "the export")
    monkeypatch.undo()
    _kill_at(monkeypatch, "rmtree", 1)
    try:
        clear_temporaries(run_dir)
    except _Killed:
        pass
    monkeypatch.undo()
    clear_temporaries(run_dir)
    assert _export_version(final) == "new" and sorted(p.name for p in run_dir.iterdir()) == ["final"]


def test_a_resume_finishes_a_half_done_export_swap(tmp_path, tae_base, images_dir):
    """The start of `--resume` (`open_run`) finishes a swap killed after the old export was set aside: the
    complete new export is renamed in and the run is found finished."""
    import shutil

    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__num_val=0)
    run_dir = tmp_path / "run"
    common = ["train-vae", "--preset", preset, "--data", images_dir, "--out", run_dir]
    run_cli(*common, "--steps", "2")
    final = run_dir / "final"
    shutil.copytree(final, run_dir / "final.tmp")  # the new export, complete
    final.rename(run_dir / "final.old")  # the old one set aside; killed here
    r = run_cli(*common, "--steps", "2", "--resume")
    assert "already finished" in r.stdout, r.stdout + r.stderr
    assert final.is_dir() and (final / "config.json").is_file()
    assert not (run_dir / "final.old").exists() and not (run_dir / "final.tmp").exists()
