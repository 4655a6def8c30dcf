"""`davae adapt-dit`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (JsonOpt, PresetOpt, ReportToOpt, RichTrainCallbacks, SetOpt, VaeOpt, print_json, report_finished,
                     trainer_preset)

EXAMPLES = """
Examples:

  # photos/: images with a caption each (photo1.txt beside photo1.jpg, or a captions.jsonl)
  davae adapt-dit --preset tiny --vae runs/tiny/final --data photos/ --out runs/tiny-dit --steps 50

  davae adapt-dit --preset tiny --vae runs/tiny/final --out runs/tiny-dit0 --steps 0     # export the warm start only

  davae adapt-dit --preset tiny --vae runs/tiny/final --data photos/ --out runs/tiny-dit --steps 50 --resume

  davae adapt-dit --preset tiny --vae runs/tiny/final --data photos/ --out runs/tiny-dit-wandb --report-to wandb

  accelerate launch --num_processes 8 -m davae_cli adapt-dit --preset sd35m-1024 --vae runs/sd35/final \\
      --data /data/synthetic --out runs/sd35-dit --dit /models/stable-diffusion-3.5-medium

  accelerate launch --num_processes 8 -m davae_cli adapt-dit --preset imagenet-512 --vae runs/in512/final \\
      --data /data/imagenet/train --out runs/in512-dit --dit lightningdit-xl-imagenet256-800ep.pt
"""


def adapt_dit_cmd(
    vae: Path = VaeOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (created; must be new unless --resume)."),
    data: Optional[list[str]] = typer.Option(None, "--data", "-d", help="Image folder(s) with captions (sidecar .txt or captions.jsonl) or class sub-folders; or latent folders from `davae encode`."),
    preset: str = PresetOpt,
    dit: Optional[str] = typer.Option(None, "--dit", help="Pretrained DiT: hub id, local folder, checkpoint file, or `random` (default: the preset's)."),
    text_encoders: Optional[str] = typer.Option(None, "--text-encoders", help="SD3: pipeline folder or hub id with the text encoders (default: the preset's)."),
    captions: Optional[str] = typer.Option(None, "--captions", help="JSONL with {\"image\": ..., \"prompt\": ...} (or \"label\") per line."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (0 exports the warm-started model)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    sets: Optional[list[str]] = SetOpt,
    report_to: str = ReportToOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Warm-start a pretrained DiT on DA-VAE latents (zero-init extension, rectified flow, LoRA for SD3).

    Cosine detail-loss schedule, EMA, atomic checkpoints, exact --resume.

    Writes RUN/config.yaml, RUN/cache/ (latents and prompt embeddings, made once), RUN/checkpoints/,
    RUN/log.jsonl and the adapted model at RUN/final (with davae_dit.json: shift, channels, statistics).
    """
    extra = [f"dit.text_encoders={text_encoders}"] if text_encoders is not None else []
    p = trainer_preset(preset, sets, extra, "adapt_dit", steps, data, "export the warm-started model")
    from ..train.dit import adapt_dit

    cb = RichTrainCallbacks("adapt-dit")
    try:
        result = adapt_dit(p, vae, out, data=list(data or []), dit=dit, captions=captions, resume=resume,
                           callbacks=cb, report_to=report_to)
    finally:
        cb.on_end({})
    if report_finished(result, "adapted DiT", json_out):
        return
    m = result.metrics
    if json_out:
        print_json({"run_dir": result.run_dir, "final": result.final_dir, "steps": result.steps, **m})
        return
    if "probe_loss_end" in m:
        start = m.get("probe_loss_start")
        s = f"{start:.4f} -> " if start is not None else ""
        typer.echo(f"fixed-noise loss on training latents: {s}{m['probe_loss_end']:.4f} "
                   f"(EMA {m['probe_loss_end_ema']:.4f}); skipped steps: {m['skipped_steps']}")
    typer.echo(f"adapted DiT written to {result.final_dir}")
