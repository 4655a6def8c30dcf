"""`davae train-dit`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (JsonOpt, PresetOpt, ReportToOpt, RichTrainCallbacks, SetOpt, VaeOpt, fail, print_json,
                     report_finished, trainer_preset)

EXAMPLES = """
Examples:

  davae train-dit --preset imagenette --vae runs/inette-vae/final --data imagenette224/train --res 112 \\
      --out runs/native-112 --steps 2000

  davae train-dit --preset imagenette --vae runs/inette-vae/final --data imagenette224/train --res 224 \\
      --out runs/native-224 --max-minutes 30     # the same wall-clock as another run

  davae train-dit --preset imagenette --vae runs/inette-vae/final --data imagenette224/train --res 112 \\
      --out runs/native-112 --steps 2000 --resume

  accelerate launch --num_processes 8 -m davae_cli train-dit --preset imagenette --vae runs/v/final \\
      --data /data/imagenet/train --res 256 --out runs/native-256
"""


def train_dit_cmd(
    vae: Path = VaeOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (created; must be new unless --resume)."),
    data: Optional[list[str]] = typer.Option(None, "--data", "-d", help="Image folder(s) with one sub-folder per class (sorted names -> 0..K-1), or a labels JSONL via --captions."),
    preset: str = PresetOpt,
    res: Optional[int] = typer.Option(None, "--res", help="Training resolution of the native model (default: the preset's train_dit.resolution)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (an upper bound with --max-minutes)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop and export after this many minutes of training (counted across --resume)."),
    captions: Optional[str] = typer.Option(None, "--captions", help="JSONL with {\"image\": ..., \"label\": N} per line."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    sets: Optional[list[str]] = SetOpt,
    report_to: str = ReportToOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train a native class-conditional DiT (LightningDiT) from scratch on the base VAE's latents.

    The model that adapt-dit warm-starts (`--dit RUN/final`) and `generate --native --base-pipeline RUN/final`
    samples. --vae is a DA-VAE folder: its base VAE and base latent transform define the latent space.
    Same trainer as adapt-dit: EMA, atomic checkpoints, exact --resume, RUN/log.jsonl, accelerate.

    Writes RUN/config.yaml, RUN/cache/ (latents, made once), RUN/checkpoints/, RUN/log.jsonl and the model at
    RUN/final (a LightningDiT folder with davae_native.json).
    """
    extra = [f"train_dit.resolution={res}"] if res is not None else []
    if max_minutes is not None:
        if max_minutes < 0:
            fail("--max-minutes must be >= 0")
        extra.append(f"train_dit.max_minutes={max_minutes}")
    if steps is not None and steps < 1:
        fail("--steps must be at least 1")
    if not data:
        fail("--data is required (image folders with one sub-folder per class)")
    p = trainer_preset(preset, sets, extra, "train_dit", steps, data, "")
    from ..train.native import train_dit

    cb = RichTrainCallbacks("train-dit")
    try:
        result = train_dit(p, vae, out, data=list(data), captions=captions, resume=resume, callbacks=cb,
                           report_to=report_to)
    finally:
        cb.on_end({})
    if report_finished(result, "native DiT", json_out):
        return
    m = result.metrics
    if json_out:
        print_json({"run_dir": result.run_dir, "final": result.final_dir, "steps": result.steps, **m})
        return
    why = " (time limit)" if m.get("stopped_by_time_limit") else ""
    typer.echo(f"{result.steps} steps{why} in {m['train_seconds'] / 60:.1f} min; fixed-noise loss on training latents: "
               f"{m.get('probe_loss_start', float('nan')):.4f} -> {m['probe_loss_end']:.4f} "
               f"(EMA {m['probe_loss_end_ema']:.4f})")
    typer.echo(f"native DiT written to {result.final_dir}")
