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
from ..config import ConfigError, Preset, load_preset
from ..errors import DavaeError

err = Console(stderr=True, highlight=False)
STATE = {"debug": os.environ.get("DAVAE_DEBUG") == "1"}

PresetOpt = typer.Option("tiny", "--preset", "-p", help="Bundled preset name (see `davae presets`) or a YAML file.")
SetOpt = typer.Option(None, "--set", help="Override a preset value, e.g. --set loss.align=0 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else there.")
DeviceOpt = typer.Option(None, "--device", help="torch device: cuda, cuda:1, cpu (default: cuda if available, else cpu; "
                                                "under accelerate launch, each process's own GPU).")
VaeOpt = typer.Option(..., "--vae", help="A DA-VAE folder (RUN/final of `davae train-vae`).")


class Dtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


DtypeOpt = typer.Option(None, "--dtype", case_sensitive=False,
                        help="Precision of the networks (default: bf16 on a GPU, fp32 on a CPU).")


def dtype_name(dtype: Optional[Dtype]) -> Optional[str]:
    return dtype.value if dtype is not None else None


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]Error:[/] {message}", markup=True, soft_wrap=True)
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
    except Exception as e:  # a bug or an environment problem: still one line unless debugging
        if STATE["debug"]:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
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


def _finite(obj: Any) -> Any:
    """NaN/inf -> null, so stdout is always valid JSON."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_finite(obj), default=float, allow_nan=False) + "\n")
    sys.stdout.flush()


def progress_bar(transient: bool = False) -> Progress:
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
        self._t0 = None
        self._start = 0

    def on_start(self, total_steps: int, start_step: int, info: dict) -> None:
        import time

        self.progress.start()
        self._t0, self._start = time.time(), start_step
        self.task = self.progress.add_task(self.description, total=total_steps, completed=start_step, info="")
        held = f", {info['val_images']} held out" if info.get("val_images") else ""
        err.print(f"training on {info.get('device')} ({info.get('world_size')} process(es)), "
                  f"{info.get('train_images')} training images{held}, "
                  f"{info.get('trainable_params'):,} trainable parameters")

    def on_step(self, step: int, metrics: dict) -> None:
        import time

        if self.task is None:
            return
        rate = (step - self._start) / max(1e-9, time.time() - self._t0)
        shown = " ".join(f"{k} {metrics[k]:.4f}" for k in self.KEYS if k in metrics)
        self.progress.update(self.task, completed=step, info=f"{shown} | {rate:.2f} it/s")

    def on_message(self, text: str) -> None:
        (self.progress.console if self.task is not None else err).print(text, markup=False)

    def on_end(self, summary: dict) -> None:
        if self.task is not None:
            self.progress.stop()
