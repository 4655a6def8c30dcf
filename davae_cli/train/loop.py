"""Run-folder bookkeeping shared by the trainers: atomic checkpoints with a `latest` pointer, pruning,
resumable JSONL logs, RNG state, and the callback protocol the CLI renders as a progress bar."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import DavaeError
from ..latents import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
KILL_ENV = "DAVAE_KILL_AFTER_STEP"  # tests: hard-kill the process right after this step's checkpoint


class Callbacks:
    """What a trainer reports while it runs. The CLI subclasses this to draw a rich progress bar."""

    def on_start(self, total_steps: int, start_step: int, info: dict) -> None: ...

    def on_step(self, step: int, metrics: dict) -> None: ...

    def on_message(self, text: str) -> None: ...

    def on_end(self, summary: dict) -> None: ...


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint the `latest` pointer names (falls back to the highest step folder)."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    pointer = ckdir / LATEST
    if pointer.is_file():
        cand = ckdir / pointer.read_text().strip()
        if (cand / "state.pt").is_file():
            return cand
    steps = sorted(p for p in ckdir.glob("step-*") if (p / "state.pt").is_file() and not p.name.endswith(".tmp"))
    return steps[-1] if steps else None


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `checkpoints/step-N/state.pt` atomically (temp folder + rename), point `latest` at it,
    and keep only the last `keep` checkpoints."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / step_name(step)
    tmp = ckdir / f"{step_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_bytes(ckdir / LATEST, final.name.encode())
    done = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise DavaeError(f"checkpoint {path} is unreadable: {str(e).splitlines()[0][:160]}") from None


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
