"""The machinery every trainer shares: the run folder (created, or reopened and checked, by the main
process first), the accelerator, the learning-rate schedule, atomic checkpoints with a `latest` pointer and
pruning, exact resume (weights, EMA, optimizers, schedulers, RNG), resumable JSONL logs, agreed stops
across processes, and the callback protocol the CLI renders as a progress bar."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..callbacks import Callbacks  # noqa: F401  (re-exported for the trainers)
from ..config import preset_from_dict
from ..config_schema import Preset
from ..errors import DavaeError, first_line
from ..jsonl import read_jsonl
from ..exports import finish_swap, write_folder  # noqa: F401  (re-exported)
from ..latents import atomic_write_bytes
from .trackers import TRACKER_DIR, Trackers, accelerator_options

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
KILL_ENV = "DAVAE_KILL_AFTER_STEP"  # tests: hard-kill the process right after this step's checkpoint


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder `step-N` (its name; the state file need not be read)."""
    return int(Path(path).name.split("-")[1])


class RunFinished(Exception):
    """`open_run` on `--resume` of a run whose export (RUN/final) already holds the steps asked for: nothing is
    left to do, so the trainer returns at once instead of loading its data and models."""

    def __init__(self, run_dir: Path, steps: int):
        self.run_dir, self.steps = Path(run_dir), int(steps)
        self.final_dir = self.run_dir / "final"
        super().__init__(f"{self.run_dir} has already finished its {self.steps} steps: the model is in "
                         f"{self.final_dir} (a larger --steps trains it longer)")


def exported_step(run_dir: Path) -> Optional[int]:
    """The step of the run's export (the log's last `export` record) while RUN/final exists; None without one.
    The record is written after the export is complete, so a kill during the export gives None."""
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not (run_dir / "final").is_dir() or not log.is_file():
        return None
    step = None
    for rec in read_jsonl(log)[0]:  # a line cut short by a kill is skipped
        if rec.get("event") == "export":
            step = rec.get("step")
    return int(step) if isinstance(step, (int, float)) else None


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint the `latest` pointer names (falls back to the highest step folder)."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    pointer = ckdir / LATEST
    if pointer.is_file():
        cand = ckdir / pointer.read_text().strip()
        if (cand / "state.pt").is_file():
            return cand
    steps = sorted(p for p in ckdir.glob("step-*") if (p / "state.pt").is_file() and not _in_progress(p))
    return steps[-1] if steps else None


def _in_progress(p: Path) -> bool:
    """A folder of an unfinished write or swap (`write_folder`), never a result."""
    return p.name.endswith((".tmp", ".old"))


class _WriteErrors:
    """A file wrapper that keeps the OSError of a failed write: torch's zip writer reports a full disk as a
    RuntimeError about positions; the cause is the OSError kept here."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def save_state(state: dict, path: Path) -> None:
    """`torch.save`, with a failed write (a full disk, a quota) raised as its OSError."""
    with open(path, "wb") as f:
        w = _WriteErrors(f)
        try:
            torch.save(state, w)
        except RuntimeError:
            if w.error is not None:
                raise w.error from None
            raise


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `checkpoints/step-N/state.pt` atomically (temp folder + rename), point `latest` at it,
    and keep only the last `keep` checkpoints. A full disk leaves the previous checkpoints as they were."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / step_name(step)
    write_folder(final, lambda tmp: save_state(state, tmp / "state.pt"), f"the checkpoint of step {step}")
    try:
        atomic_write_bytes(ckdir / LATEST, final.name.encode())
    except OSError:
        pass  # the pointer is a hint: `latest_checkpoint` falls back to the highest step folder
    done = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and not _in_progress(p))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a checkpoint cannot be read, or None: `state.pt` must be a whole zip archive (torch's format)
    whose every member passes its CRC check (a truncated or corrupted file does not)."""
    import zipfile

    f = Path(path) / "state.pt"
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
        return None if bad is None else f"{f}: member {bad} is corrupted"
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"{f}: {first_line(e, 100)}"


def intact_checkpoint(run_dir: Path, on_message=lambda text: None) -> Optional[Path]:
    """The newest checkpoint that reads whole; a truncated or unreadable newer one is skipped with a warning
    naming the bad file."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    first = latest_checkpoint(run_dir)
    if first is None:
        return None
    steps = sorted((p for p in ckdir.glob("step-*") if (p / "state.pt").is_file() and not _in_progress(p)),
                   reverse=True)
    for cand in [first] + [p for p in steps if p.name < first.name]:
        why = checkpoint_problem(cand)
        if why is None:
            return cand
        on_message(f"warning: skipping an unreadable checkpoint ({why})")
    raise DavaeError(f"no readable checkpoint in {ckdir} (every state.pt is truncated or corrupted)")


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise DavaeError(f"checkpoint {path} is unreadable: {first_line(e, 160)}") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(step: int, ema, opt, sched, preset, **extra) -> dict:
    """What both trainers checkpoint besides their own weights (`extra`)."""
    return {"step": step, "ema": ema.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "rng": rng_state(), "preset": preset.to_dict(), **extra}


def restore_training_state(state: dict, ema, opt, sched) -> int:
    """The inverse of `training_state` (weights excluded); returns the step to continue from."""
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    set_rng_state(state["rng"])
    return int(state["step"])


class JsonlLog:
    """Append-only JSONL log; on resume, entries after the resumed step are dropped so the log
    describes exactly one run."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()


def maybe_kill(step: int) -> None:
    """Test hook: simulate a crash (no cleanup, no final export) right after `step`."""
    target = os.environ.get(KILL_ENV)
    if target is not None and int(target) == step:
        os._exit(137)


class GracefulInterrupt:
    """Turns the first Ctrl-C (SIGINT/SIGTERM) into a flag checked between steps, so the trainer can
    write a consistent checkpoint and stop; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ------------------------------------------------------------------------------------------ run set-up
def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


# the run-folder lock lives in lock.py (flock, or a lock file where the filesystem has none)
from .lock import _HELD, LOCK_FILE, lock_run, unlock_run  # noqa: E402,F401  (re-exported)


def clear_temporaries(run_dir: Path) -> int:
    """Remove what an interrupted write left in a run folder (`*.tmp` folders and `.*.tmp` files); the run's
    lock is held, so nothing else is writing them. A folder replacement killed half-way (`<name>.old` aside)
    is finished first (`finish_swap`): its complete new folder is kept. Returns how many were removed or
    finished."""
    n = 0
    for old in sorted(Path(run_dir).rglob("*.old"), reverse=True):
        if old.is_dir():
            n += finish_swap(old.with_name(old.name[:-len(".old")]))
    for p in sorted(Path(run_dir).rglob("*.tmp"), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


# what a start writes before its first checkpoint; a folder holding only these never trained
_START_FILES = {"config.yaml", "log.jsonl", "samples", CHECKPOINT_DIR, LOCK_FILE, TRACKER_DIR}


def abandoned_start(run_dir: Path) -> bool:
    """True for a folder left by a start that failed (or was killed) before its first checkpoint: a
    config.yaml, no checkpoint, no export, and nothing else that took work to make (a latent cache keeps
    the folder as it is: `--resume` reuses it)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or latest_checkpoint(run_dir) is not None:
        return False
    return {p.name for p in run_dir.iterdir()} <= _START_FILES


def _clear_abandoned_start(run_dir: Path) -> None:
    for name in _START_FILES - {LOCK_FILE}:  # the lock stays: this process holds it
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def prepare_run_dir(run_dir: Path, preset: Preset, resume: bool, section: str = "train_vae",
                    on_message=lambda text: None, reader: bool = False) -> tuple[Preset, Optional[Path]]:
    """Create or reopen a run folder. Returns the preset to use and the checkpoint to resume from.

    Never overwrites a run: an existing run needs `--resume`; a resumed run must use the same preset
    (only `<section>.steps` may change, and not below the checkpoint's step: to train longer). A folder left by
    a start that never reached its first checkpoint (`abandoned_start`) holds no work: a new start, or
    `--resume`, begins afresh there with the settings given now, so the command that failed succeeds once its
    input is fixed. `reader=True` (the other processes of a launch, after the main one prepared the folder)
    only reads it.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume and ckpt is not None:
        ckpt = intact_checkpoint(run_dir, on_message if not reader else (lambda text: None))
    if not reader and run_dir.is_dir() and abandoned_start(run_dir):
        on_message(f"{run_dir} holds a start that never reached a checkpoint: starting afresh")
        _clear_abandoned_start(run_dir)
        resume = False
    if resume:
        if not cfg_path.is_file():
            raise DavaeError(f": {run_dir} is not a run folder (no config.yaml)", param="resume")
        import yaml

        saved = preset_from_dict(yaml.safe_load(cfg_path.read_text()))
        # what may differ: the length (steps, and a time budget where the section has one), and labels
        ignored = (f"{section}.steps", f"{section}.max_minutes", "name", "description")
        diff = [k for k in _differences(saved.to_dict(), preset.to_dict()) if k not in ignored]
        if diff:
            raise DavaeError(f": the run was made with different settings ({', '.join(diff[:4])}); "
                             f"resume with the same preset and --set values", param="resume")
        steps = getattr(preset, section).steps
        done = checkpoint_step(ckpt) if ckpt is not None else 0
        if done > steps:  # the length only grows: fewer steps would export an earlier model under a later name
            raise DavaeError(f"{steps} is fewer than the {done} steps {run_dir} has already trained; a resumed run "
                             f"only trains longer (pass {done} or more)", param="steps")
        getattr(saved, section).steps = steps
        if hasattr(getattr(preset, section), "max_minutes"):
            getattr(saved, section).max_minutes = getattr(preset, section).max_minutes
        return saved, ckpt
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        hint = "pass --resume to continue it" if ckpt or cfg_path.exists() else "choose an empty or new folder"
        raise DavaeError(f"{run_dir} already exists and is not empty; {hint}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg_path, preset.to_yaml().encode())
    return preset, None


def open_run(run_dir: Path, preset: Preset, resume: bool, section: str = "train_vae", on_message=lambda text: None,
             trackers: tuple = ()):
    """(accelerator, preset, checkpoint): the main process creates or checks the run folder first, the
    others then read what it wrote (no race on a fresh folder under `accelerate launch`). Raises `RunFinished`
    (the lock given back) on `resume` of a run whose checkpoint and export are both at the steps asked for.
    `trackers`: the accelerator reports to these (`trackers.tracker_names`); `RunLoop.start` starts them."""
    acc = _make_accelerator(getattr(preset, section).seed, accelerator_options(list(trackers), Path(run_dir)))
    if acc.is_main_process:
        existed = Path(run_dir).exists()
        lock_run(run_dir, on_message)
        try:
            if existed and clear_temporaries(run_dir):
                on_message(f"removed the temporary files an interrupted write left in {run_dir}")
            preset, ckpt = prepare_run_dir(run_dir, preset, resume, section, on_message)
        except BaseException:
            unlock_run(run_dir)
            if not existed:  # a refused start leaves nothing behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    acc.wait_for_everyone()
    if not acc.is_main_process:
        preset, ckpt = prepare_run_dir(run_dir, preset, True, section, reader=True)
    steps = getattr(preset, section).steps
    if resume and ckpt is not None and checkpoint_step(ckpt) == steps and exported_step(run_dir) == steps:
        unlock_run(run_dir)  # every process reads the same files, so all of them stop here
        raise RunFinished(run_dir, steps)
    return acc, preset, ckpt


def any_process(acc, flag: bool) -> bool:
    """True on every process if `flag` is true on any (so all stop at the same step)."""
    if acc.num_processes == 1:
        return bool(flag)
    return bool(acc.reduce(torch.tensor([int(flag)], device=acc.device), "sum").item() > 0)


def _make_accelerator(seed: int, options: Optional[dict] = None):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    acc = Accelerator(mixed_precision=os.environ.get("DAVAE_MIXED_PRECISION", mp), **(options or {}))
    set_seed(seed)
    return acc


def lr_lambda(warmup: int, total: int, schedule: str, floor: float = 0.0):
    """Linear warmup, then constant or cosine decay to `floor` (a fraction of the peak) at `total` steps."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return f


# ------------------------------------------------------------------------------------------ the step loop
class RunLoop:
    """The step loop every trainer shares. A trainer gives it one function, `step_fn(step, batch,
    generator) -> metrics` (the optimisation step alone), and the loop does the rest: a per-step generator
    seeded by (seed, step, process), the JSONL log (main process only) and the callbacks, a checkpoint
    every `checkpoint_every` steps and at the end, an optional `after_step(step)` (evaluation), and Ctrl-C
    agreed across processes: a consistent checkpoint at the last completed step, then KeyboardInterrupt.

    `state_fn(step) -> dict` builds what a checkpoint holds (`training_state(...)` plus the trainer's own);
    it runs on the main process only; `data_state()` (streamed data), on every process, gives the process's
    position, stored as the list `data_positions` (by process index); `train_seconds()` gives the training time
    so far (across resumes) for it to store. `time_limit_s`: stop early, with a checkpoint, once the training time (the main process's clock, counted
    from `spent_s` already spent before a resume) reaches it; `run` then returns the step reached. `trackers`
    (`open_run(trackers=...)`): `start` starts them with `config` (the preset's dict) as hyperparameters, `write`
    logs every record to them too, and the trainer closes them (`trackers.finish()`) after its last record."""

    def __init__(self, acc, run_dir: Path, *, total: int, start_step: int, resumed: bool, seed: int,
                 log_every: int, checkpoint_every: int, keep_checkpoints: int, state_fn, callbacks: Callbacks,
                 time_limit_s: Optional[float] = None, spent_s: float = 0.0, data_state=None,
                 config: Optional[dict] = None, job: str = "train"):
        self.acc, self.run_dir = acc, Path(run_dir)
        self.total, self.start_step, self.seed, self.resumed = total, start_step, seed, resumed
        self.trackers, self.config, self.job = Trackers(acc, run_dir), config or {}, job
        self.log_every, self.checkpoint_every, self.keep = log_every, checkpoint_every, keep_checkpoints
        self.state_fn, self.cb = state_fn, callbacks
        self.data_state = data_state
        self.log = JsonlLog(self.run_dir / "log.jsonl", resume_step=start_step if resumed else None) \
            if acc.is_main_process else None
        self.last: dict = {}
        self.elapsed_s = 0.0
        self.time_limit_s, self.spent_s = time_limit_s, float(spent_s)
        self.out_of_time = False
        self._t0: Optional[float] = None
        self._t_end: Optional[float] = None  # set when `run` returns: the training time stops there

    def train_seconds(self) -> float:
        """Training time so far, this process's clock, including what was spent before a resume; after `run`
        returns, the loop's time (evaluation and export after it do not count)."""
        import time

        if self._t0 is None:
            return self.spent_s
        return self.spent_s + ((self._t_end if self._t_end is not None else time.time()) - self._t0)

    def write(self, record: dict) -> None:
        """One log record, written by the main process (to log.jsonl and the trackers)."""
        if self.log is not None:
            self.log.write(record)
            self.trackers.log(record)

    def start(self, info: dict) -> None:
        where = self.trackers.start(self.config, self.job, self.start_step, self.resumed)
        if where:
            self.cb.on_message(where)
        self.write({"step": self.start_step, "event": "start", **info})
        self.cb.on_start(self.total, self.start_step, info)

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator(device=self.acc.device).manual_seed(
            int(self.seed * 1_000_003 + step * 7919 + self.acc.process_index))

    def checkpoint(self, step: int) -> None:
        self.acc.wait_for_everyone()
        positions = None
        if self.data_state is not None:  # every process's place in a streamed dataset, gathered to the main one
            from accelerate.utils import gather_object

            mine = self.data_state()
            positions = gather_object([mine]) if self.acc.num_processes > 1 else [mine]
        if self.acc.is_main_process:
            state = self.state_fn(step)
            if positions is not None:
                state["data_positions"] = positions
            save_checkpoint(self.run_dir, step, state, self.keep)

    def run(self, step_fn, batches, after_step=None) -> int:
        """Run from `start_step` to `total`; returns the last step. A stop (Ctrl-C, an error) closes the trackers."""
        try:
            return self._run(step_fn, batches, after_step)
        except BaseException:
            self.trackers.finish()
            raise

    def _run(self, step_fn, batches, after_step) -> int:
        import time

        t0, step = time.time(), self.start_step
        self._t0 = t0
        logged = (step, t0)  # the last train record's (step, time): steps/s between two records
        self.cb.on_loop_start(step)
        with GracefulInterrupt() as interrupt:
            while step < self.total:
                metrics = step_fn(step, next(batches), self.generator(step))
                step += 1
                self.last = metrics
                if step % self.log_every == 0 or step == self.total:
                    now = time.time()
                    rate = (step - logged[0]) / max(now - logged[1], 1e-6)
                    self.write({"step": step, "event": "train", "elapsed_s": round(now - t0, 2),
                                "steps_per_s": round(rate, 4), **metrics})
                    logged = (step, now)
                self.cb.on_step(step, metrics)
                if after_step is not None:
                    after_step(step)
                stop = any_process(self.acc, interrupt.requested)
                if self.time_limit_s and not stop and step < self.total:
                    # every process follows the main process's clock, so all stop at the same step
                    late = self.acc.is_main_process and self.train_seconds() >= self.time_limit_s
                    self.out_of_time = any_process(self.acc, late)
                if self.out_of_time:
                    self.total = step  # the run ends here: log, checkpoint and export as at the last step
                    self.write({"step": step, "event": "time_limit", "train_seconds": round(self.train_seconds(), 1)})
                    self.cb.on_message(f"time limit of {self.time_limit_s / 60:.1f} min reached at step {step}")
                if step % self.checkpoint_every == 0 or step == self.total:
                    self.checkpoint(step)
                    maybe_kill(step)
                elif stop:
                    self.checkpoint(step)  # keep the work: a consistent checkpoint at the last completed step
                if stop:
                    self.cb.on_message(f"interrupted: checkpoint at step {step}; continue with --resume")
                    raise KeyboardInterrupt
        self._t_end = time.time()
        self.elapsed_s = self._t_end - t0
        return step
