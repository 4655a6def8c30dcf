"""What a new user hit in a fresh clone (issue 38, item 9): each test here failed before its fix."""

import io
import json
import re
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli, write_preset
from test_help_examples import example_commands
from davae_cli.errors import DavaeError

run = run_cli


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def _one_line_error(res, fragment: str) -> str:
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], res.stderr
    return lines[0]


# ------------------------------------------------------------------ --resume: steps only grow; a finished run
def test_resume_refuses_fewer_steps_and_a_finished_run_returns_at_once(tmp_path, images_dir, tae_base):
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__steps=4, train_vae__num_val=0,
                          train_vae__cache_base=True)
    run_dir = tmp_path / "run"
    common = ["train-vae", "--preset", preset, "--data", images_dir, "--out", run_dir]
    run(*common)

    def snapshot():
        return ((run_dir / "log.jsonl").read_bytes(), (run_dir / "final" / "config.json").stat().st_mtime_ns,
                sorted(p.name for p in (run_dir / "checkpoints").iterdir()))

    before = snapshot()
    # fewer steps than done: refused in one line, the run as it was
    _one_line_error(run(*common, "--resume", "--steps", "2", check=False),
                    f"--steps 2 is fewer than the 4 steps {run_dir} has already trained")
    assert snapshot() == before
    # the finished run: one line naming its export, nothing recomputed (no base cache, no log, no export)
    t0 = time.time()
    done = run(*common, "--resume")
    assert f"had already finished its 4 steps: the DA-VAE is in {run_dir / 'final'}" in done.stdout, done.stdout
    assert "frozen base" not in done.stderr and "training on" not in done.stderr, done.stderr
    assert snapshot() == before and time.time() - t0 < 30
    r = json.loads(run(*common, "--resume", "--json").stdout)
    assert r == {"run_dir": str(run_dir), "final": str(run_dir / "final"), "steps": 4, "already_finished": True}
    # a larger --steps trains on
    more = run(*common, "--resume", "--steps", "6")
    assert "already finished" not in more.stdout and "DA-VAE written to" in more.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 6


@pytest.mark.parametrize("section", ["train_vae", "adapt_dit", "train_dit"])
def test_every_trainer_shares_the_steps_rule_and_the_finished_check(tmp_path, section):
    """adapt-dit and train-dit open their run folders through the same `open_run` as train-vae."""
    from davae_cli.config import load_preset
    from davae_cli.train import loop
    from davae_cli.train.loop import open_run, prepare_run_dir, save_checkpoint, unlock_run

    def preset(steps):
        return load_preset("tiny", [f"{section}.steps={steps}"])

    d = tmp_path / "run"
    prepare_run_dir(d, preset(4), resume=False, section=section)
    save_checkpoint(d, 4, {"step": 4}, keep=1)
    with pytest.raises(DavaeError, match="fewer than the 4 steps") as e:
        prepare_run_dir(d, preset(3), resume=True, section=section)
    assert e.value.as_flag().startswith("--steps 3 is fewer") and "\n" not in str(e.value)
    # a checkpoint at the last step without its export (killed while exporting): not finished
    _, _, ckpt = open_run(d, preset(4), True, section)
    unlock_run(d)
    assert ckpt.name == "step-0000004"
    (d / "final").mkdir()
    (d / "log.jsonl").write_text(json.dumps({"step": 4, "event": "export", "final": str(d / "final")}) + "\n")
    with pytest.raises(loop.RunFinished) as f:
        open_run(d, preset(4), True, section)
    assert f.value.final_dir == d / "final" and f.value.steps == 4
    _, p, _ = open_run(d, preset(6), True, section)  # more steps: it goes on
    unlock_run(d)
    assert getattr(p, section).steps == 6


# ------------------------------------------------------------------ --help examples run as printed
def _example_commands(text: str) -> list[list[str]]:
    """The argv of a help text's examples (the reader of tests/test_help_examples.py, without the environment)."""
    return [argv for argv, _ in example_commands(text)]


def _examples():
    from davae_cli.cli.app import COMMANDS

    return [(name, text) for name, _, text in COMMANDS if text]


def test_every_help_example_parses():
    """Each example names a command and flags that exist, with every required option."""
    import click
    import typer

    from davae_cli.cli.app import app

    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="davae")
    n = 0
    for name, text in _examples():
        for argv in _example_commands(text):
            sub = group.get_command(ctx, argv[0])
            assert sub is not None, f"{name} --help: unknown command in {argv}"
            sub.make_context(argv[0], list(argv[1:]), parent=ctx)
            n += 1
    assert n > 40


_TRAINERS = {"train-vae": ("davae_cli.train.vae", "train_vae", "train_vae"),
             "adapt-dit": ("davae_cli.train.dit", "adapt_dit", "adapt_dit"),
             "train-dit": ("davae_cli.train.native", "train_dit", "train_dit")}


@pytest.mark.parametrize("command", sorted(_TRAINERS))
def test_resume_examples_continue_their_start_example(command, monkeypatch):
    """A `--resume` example has the settings of the example that started its run (same --out), as `--resume`
    requires: run as printed, it continues instead of stopping with "different settings"."""
    import importlib

    from davae_cli.train.loop import _differences

    module, fn, section = _TRAINERS[command]
    seen = []

    def capture(preset, *a, **k):
        seen.append(preset)
        raise SystemExit(0)

    monkeypatch.setattr(importlib.import_module(module), fn, capture)
    text = dict(_examples())[command]
    examples = [argv for argv in _example_commands(text) if argv[0] == command]
    resumes = [argv for argv in examples if "--resume" in argv]
    assert resumes

    def settings(argv):
        seen.clear()
        run(*argv, check=False)
        assert len(seen) == 1, argv
        return seen[0]

    ignored = {f"{section}.steps", f"{section}.max_minutes", "name", "description"}
    for resume in resumes:
        out = resume[resume.index("--out") + 1]
        starts = [a for a in examples if "--resume" not in a and "--out" in a and a[a.index("--out") + 1] == out]
        assert starts, f"{command} --help: no example starts the run {out} that {resume} resumes"
        a, b = settings(starts[0]), settings(resume)
        diff = [k for k in _differences(a.to_dict(), b.to_dict()) if k not in ignored]
        assert not diff, f"{command} --help: the resume example differs from its start in {diff}"
        assert getattr(b, section).steps >= getattr(a, section).steps


_PRESET_COMMANDS = {"train-vae", "adapt-dit", "train-dit", "generate", "upscale", "synth", "ceilings"}


def test_help_examples_keep_their_lines_and_name_their_preset():
    """A lone `\\` at a line's end in a (non-raw) help string joins two example lines into one; a model command
    without --preset runs the `tiny` preset's recipe on whatever model it is given."""
    problems = []
    for name, text in _examples():
        problems += [f"{name} --help: two example lines joined: {line.strip()}" for line in text.splitlines()
                     if re.search(r"\S {2,}--", line)]
        problems += [f"{name} --help: {' '.join(argv)} names no --preset" for argv in _example_commands(text)
                     if argv[0] in _PRESET_COMMANDS and "--preset" not in argv and "-p" not in argv]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ --vae given a base VAE's folder
@pytest.mark.parametrize("base_fixture, cls", [("tae_base", "AutoencoderTiny"), ("kl_base", "AutoencoderKL")])
def test_a_base_vae_folder_as_vae_says_so_in_one_line(tmp_path, request, base_fixture, cls):
    base = request.getfixturevalue(base_fixture)
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 30, 200)).save(img)
    line = _one_line_error(run("encode", img, "--vae", base, "--out", tmp_path / "lat", check=False),
                           f"{base} is a base VAE ({cls}), not a DA-VAE")
    assert "base_vae_config" not in line and "--base-vae" in line
    _one_line_error(run("adapt-dit", "--vae", base, "--out", tmp_path / "dit", "--steps", "0", check=False),
                    "is a base VAE")
    assert not (tmp_path / "lat").exists() and not (tmp_path / "dit").exists()


# ------------------------------------------------------------------ an unknown --set key
def test_an_unknown_set_key_suggests_the_closest(tmp_path):
    line = _one_line_error(run("train-vae", "--preset", "tiny", "--set", "loss.algn=1", "--out", tmp_path / "r",
                               check=False), "unknown key 'loss.algn'")
    assert "did you mean 'loss.align'?" in line and "known: adv, align" in line
    line = _one_line_error(run("train-vae", "--set", "train_vea.steps=1", "--out", tmp_path / "r", check=False),
                           "unknown key 'train_vea'")
    assert "did you mean 'train_vae'?" in line
    line = _one_line_error(run("train-vae", "--set", "loss.zzzzzz=1", "--out", tmp_path / "r", check=False),
                           "unknown key 'loss.zzzzzz'")
    assert "did you mean" not in line


# ------------------------------------------------------------------ the first ETA
def test_the_first_eta_counts_loop_steps_only(tmp_path, monkeypatch):
    """Ten minutes of evaluation before the first step, then 1 s per step: the first line says 1 it/s and
    9 s to go (it said 0.00 it/s and 1:30:09)."""
    from rich.console import Console

    from davae_cli.cli.common import LineProgress, RichTrainCallbacks
    from davae_cli.train.loop import RunLoop

    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    buf = io.StringIO()
    cb = RichTrainCallbacks("train")
    cb.progress = LineProgress(Console(file=buf, width=200, soft_wrap=True), interval=0)
    acc = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, device=torch.device("cpu"),
                          wait_for_everyone=lambda: None)
    loop = RunLoop(acc, tmp_path, total=10, start_step=0, resumed=False, seed=0, log_every=1, checkpoint_every=100,
                   keep_checkpoints=1, state_fn=lambda step: {"step": step}, callbacks=cb)
    loop.start({"device": "cpu", "world_size": 1, "train_images": 8, "trainable_params": 10})
    clock[0] += 600.0  # the evaluation at the start

    def step_fn(step, batch, generator):
        clock[0] += 1.0
        return {"loss": 0.5}

    loop.run(step_fn, iter(range(100)))
    cb.on_end({})
    lines = buf.getvalue().splitlines()
    first = next(line for line in lines if line.startswith("train: 1/10"))
    assert " 1/s " in first and "ETA 0:00:09" in first and "1.00 it/s" in first, first
