"""CLI conventions shared by every command: one-line errors, progress on stderr, results on stdout."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from enum import Enum
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from ..callbacks import Callbacks
from ..config import ConfigError, load_preset
from ..config_schema import Preset
from ..errors import DavaeError, first_line

# soft wrap: a long message is one line in a log file (where rich would otherwise break it at 80 columns)
err = Console(stderr=True, highlight=False, soft_wrap=True)
STATE = {"debug": os.environ.get("DAVAE_DEBUG") == "1"}

PresetOpt = typer.Option("tiny", "--preset", "-p", help="Bundled preset name (see `davae presets`) or a YAML file.")
SetOpt = typer.Option(None, "--set", help="Override a preset value, e.g. --set loss.align=0 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else there.")
DeviceOpt = typer.Option(None, "--device", help="torch device: cuda, cuda:1, cpu (default: cuda if available, else cpu; "
                                                "under accelerate launch, each process's own GPU).")
VaeOpt = typer.Option(..., "--vae", help="A DA-VAE folder (RUN/final of `davae train-vae`).")
ReportToOpt = typer.Option("none", "--report-to", help="Experiment trackers besides RUN/log.jsonl: tensorboard, wandb, "
                                                      "trackio, all (the installed ones) or none; files in RUN/trackers/. "
                                                      "Each is an extra: pip install \"davae\\[tensorboard]\".")


class Dtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


DtypeOpt = typer.Option(None, "--dtype", case_sensitive=False,
                        help="Precision of the networks (default: bf16 on a GPU, fp32 on a CPU).")


def dtype_name(dtype: Optional[Dtype]) -> Optional[str]:
    return dtype.value if dtype is not None else None


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape  # the message is text: `pip install "davae[wandb]"` keeps its brackets

    err.print(f"[bold red]Error:[/] {escape(message)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Expected failures -> one line on stderr and exit 1; tracebacks only with --debug / DAVAE_DEBUG=1."""
    try:
        yield
    except typer.Exit:
        raise
    except (DavaeError, ConfigError) as e:
        if STATE["debug"]:
            raise
        fail((e.as_flag() if isinstance(e, DavaeError) else str(e)).replace("\n", " "))
    except KeyboardInterrupt:
        err.print("Interrupted.")
        raise typer.Exit(130)
    except BrokenPipeError:  # the reader went away (`davae presets | head`): stop quietly, as `cat` does
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush does not fail
        raise typer.Exit(141)
    except Exception as e:  # a bug or an environment problem: still one line unless debugging
        if STATE["debug"]:
            raise
        msg = first_line(e, 300, empty="")
        fail(f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)")


def resolve_preset(preset: str, sets: Optional[list[str]], extra: Optional[list[str]] = None) -> Preset:
    return load_preset(preset, list(sets or []) + list(extra or []))


def trainer_preset(preset: str, sets: Optional[list[str]], extra: list[str], section: str, steps: Optional[int],
                   data: Optional[list], export_hint: str) -> Preset:
    """A trainer's preset with `--steps` applied to `<section>.steps`; `--data` is required unless it is 0."""
    extra = list(extra) + ([f"{section}.steps={steps}"] if steps is not None else [])
    p = resolve_preset(preset, sets, extra)
    if getattr(p, section).steps > 0 and not data:
        fail(f"--data is required when training (use --steps 0 to {export_hint})")
    return p


def report_finished(result: Any, model: str, json_out: bool) -> bool:
    """`--resume` of a run that had already finished (a trainer's `already_finished`): one line on stdout
    naming its export (or the JSON object), and True; False for a run that trained."""
    if not getattr(result, "already_finished", False):
        return False
    if json_out:
        print_json({"run_dir": result.run_dir, "final": result.final_dir, "steps": result.steps,
                    "already_finished": True})
    else:
        typer.echo(f"{result.run_dir} had already finished its {result.steps} steps: the {model} is in "
                   f"{result.final_dir} (nothing to do; a larger --steps trains it longer)")
    return True


def _finite(obj: Any) -> Any:
    """NaN/inf -> null, so stdout is always valid JSON."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


@contextlib.contextmanager
def lazy_progress(label: str) -> Iterator:
    """`with lazy_progress("generate") as progress:` gives `progress(done, total)`; the bar starts on the first
    call (after the models are loaded, so their messages come first) and stops when the block ends."""
    bar, task = progress_bar(), None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total, completed=done, info="")
        bar.update(task, completed=done)

    try:
        yield progress
    finally:
        if task is not None:
            bar.stop()


def structure_lines(ds: Optional[dict]) -> list[str]:
    """`detail_structure` (metrics.latent_stats) as a small table: is the detail part a generable latent?"""
    if not ds:
        return []
    rows = [("base channels", ds["base"]), ("detail channels", ds["detail"]),
            ("detail not explained by base", ds["detail_unexplained"])]
    out = [f"  latent structure ({ds['latents']} latents)         std  neighbour corr  kurtosis"]
    for name, r in rows:
        out.append(f"    {name:<29} {r['std']:7.4f}  {r['neighbour_corr']:14.3f}  {r['kurtosis']:8.2f}")
    out.append(f"    share of the detail variance not explained by the base channels: "
               f"{100 * ds['detail_unexplained']['variance_share']:.2f}%")
    return out


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_finite(obj), default=float, allow_nan=False) + "\n")
    sys.stdout.flush()


def _clock(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LineProgress:
    """Progress for a log file, a CI job or `nohup`: stderr is not a terminal, so instead of a live bar
    (which rich cannot redraw there) one plain line per task every `interval` seconds and when it ends:
    `encode: 120/500 (24%) 3.10/s elapsed 0:00:38 ETA 0:02:02 | info`. The same methods as rich's
    `Progress` that the commands use."""

    def __init__(self, console: Console, interval: float):
        self.console, self.interval = console, interval
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None: ...

    def stop(self) -> None:
        for task in self._tasks.values():
            if not task["ended"]:
                self._emit(task, final=True)

    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0, **fields) -> int:
        import time

        tid = len(self._tasks)
        now = time.monotonic()
        self._tasks[tid] = {"description": description, "total": total, "completed": completed, "start": now,
                            "start_completed": completed, "last": now, "ended": False,
                            "info": fields.get("info", "")}
        self._emit(self._tasks[tid])
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def reset(self, task_id: int, completed: float = 0, **fields) -> None:
        """As rich's `Progress.reset`: the task's clock and rate start again now, at `completed` (no line)."""
        import time

        task = self._tasks[task_id]
        now = time.monotonic()
        task.update(completed=completed, start=now, start_completed=completed, last=now)
        task.pop("last_done", None)
        if "info" in fields:
            task["info"] = fields["info"]

    def update(self, task_id: int, *, completed: Optional[float] = None, total: Optional[float] = None,
               advance: Optional[float] = None, **fields) -> None:
        import time

        task = self._tasks[task_id]
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = completed
        if advance:
            task["completed"] += advance
        if "info" in fields:
            task["info"] = fields["info"]
        done = task["total"] is not None and task["completed"] >= task["total"]
        if task["ended"]:
            return
        if done or time.monotonic() - task["last"] >= self.interval:
            self._emit(task, final=done)

    def _emit(self, task: dict, final: bool = False) -> None:
        import time

        now = time.monotonic()
        done, total = task["completed"], task["total"]
        # the rate since the previous line; over the whole task (since `reset`: the training bar restarts its
        # clock at the first step, so an evaluation before it does not count) when nothing moved since
        since, at = task.get("last_done", task["start_completed"]), task["last"]
        elapsed = now - task["start"]
        if done > since and now > at:
            rate = (done - since) / (now - at)
        else:
            rate = (done - task["start_completed"]) / elapsed if elapsed > 0 else None
        task["last"], task["last_done"] = now, done
        task["ended"] = task["ended"] or final
        parts = [f"{task['description']}: {int(done)}/{int(total)}" if total else f"{task['description']}: {int(done)}"]
        if total:
            parts.append(f"({100.0 * done / total:.0f}%)")
        if rate:
            parts.append(f"{rate:.3g}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if total and not final:
            parts.append(f"ETA {_clock((total - done) / rate if rate else None)}")
        line = " ".join(parts) + (f" | {task['info']}" if task["info"] else "")
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def progress_bar(transient: bool = False) -> "Progress | LineProgress":
    """A live rich bar on a terminal; `LineProgress` (a line every DAVAE_PROGRESS_INTERVAL seconds, default
    30) when stderr is a file or a pipe."""
    if not err.is_terminal:
        return LineProgress(err, float(os.environ.get("DAVAE_PROGRESS_INTERVAL", "30")))
    # the essentials first, so a narrow terminal truncates the loss read-out rather than the ETA
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=16),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=err, transient=transient)


class RichTrainCallbacks(Callbacks):
    """A progress bar with the main losses, it/s and ETA; messages printed above it."""

    KEYS = ("loss", "l1", "lpips", "align", "g_loss", "d_loss", "w")

    def __init__(self, description: str = "train"):
        self.progress = progress_bar()
        self.description = description
        self.task = None
        self._phases: dict[str, int] = {}  # tasks of the phases before/after the steps (on_progress)
        self._t0 = None
        self._start = 0

    def on_start(self, total_steps: int, start_step: int, info: dict) -> None:
        import time

        if not self._phases:
            self.progress.start()
        self._t0, self._start = time.time(), start_step
        self.task = self.progress.add_task(self.description, total=total_steps, completed=start_step, info="")
        held = f", {info['val_images']} held out" if info.get("val_images") else ""
        err.print(f"training on {info.get('device')} ({info.get('world_size')} process(es)), "
                  + (f"{info['train_shards']} training shard(s){held}, " if "train_shards" in info
                     else f"{info.get('train_images')} training images{held}, ")
                  + f"{info.get('trainable_params'):,} trainable parameters")

    def on_loop_start(self, step: int) -> None:
        """The steps begin: the rate (it/s) and the ETA count from here, not from `on_start` (an evaluation or
        a probe at the start would otherwise count as training time)."""
        import time

        self._t0, self._start = time.time(), step
        if self.task is not None:
            self.progress.reset(self.task, completed=step)

    def on_step(self, step: int, metrics: dict) -> None:
        import time

        if self.task is None:
            return
        rate = (step - self._start) / max(1e-9, time.time() - self._t0)
        shown = " ".join(f"{k} {metrics[k]:.4f}" for k in self.KEYS if k in metrics)
        self.progress.update(self.task, completed=step, info=f"{shown} | {rate:.2f} it/s")

    def on_message(self, text: str) -> None:
        (self.progress.console if self.task is not None else err).print(text, markup=False)

    def on_progress(self, phase: str, done: int, total: Optional[int]) -> None:
        if phase not in self._phases:
            if not self._phases and self.task is None:
                self.progress.start()
            self._phases[phase] = self.progress.add_task(phase, total=total, completed=done, info="")
        self.progress.update(self._phases[phase], completed=done, total=total)

    def on_end(self, summary: dict) -> None:
        if self.task is not None or self._phases:
            self.progress.stop()
