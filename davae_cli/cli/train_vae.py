"""`davae train-vae`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (JsonOpt, PresetOpt, ReportToOpt, RichTrainCallbacks, SetOpt, err, print_json, report_finished,
                     structure_lines, trainer_preset)

EXAMPLES = """
Examples:

  davae train-vae --preset tiny --base-vae ../shared/weights/taesd3 --data photos/ --out runs/tiny

  davae train-vae --preset tiny --base-vae random --data skimage --out runs/demo --steps 20

  # the losses, lr, grad norm, steps/s, held-out metrics and reconstructions in TensorBoard too
  davae train-vae --preset tiny --base-vae random --data skimage --out runs/demo-tb --report-to tensorboard
  tensorboard --logdir runs/demo-tb/trackers

  # continue runs/tiny after a stop: the flags of its start (a larger --steps trains it longer)
  davae train-vae --preset tiny --base-vae ../shared/weights/taesd3 --data photos/ --out runs/tiny --resume

  accelerate launch --num_processes 8 -m davae_cli train-vae --preset sd35m-1024 --data /data/hq --out runs/sd35

  # fine-tune only the decoder of a trained DA-VAE (here with the GAN loss): the latent stays the same, so
  # DiTs adapted on runs/tiny/final decode with the result
  davae train-vae --preset tiny --base-vae ../shared/weights/taesd3 --init runs/tiny/final --decoder-only \\
      --data photos/ --out runs/tiny-dec --set loss.adv=0.1 --set loss.disc_start=0
"""


def train_vae_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (created; must be new unless --resume)."),
    data: Optional[list[str]] = typer.Option(None, "--data", "-d", help="Image folder(s), recursive; `skimage` = scikit-image's bundled photos."),
    preset: str = PresetOpt,
    base_vae: Optional[str] = typer.Option(None, "--base-vae", help="Base VAE: hub id, local diffusers folder, or `random`."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (0 exports the freshly initialised model)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    val_data: Optional[list[str]] = typer.Option(None, "--val-data", help="Held-out image folder(s) (default: hold out train_vae.num_val images of --data)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from the weights of this DA-VAE folder (the preset must describe its architecture) instead of a fresh build."),
    decoder_only: bool = typer.Option(False, "--decoder-only", help="With --init: keep the detail encoder and its statistics frozen, so the latent space (and DiTs adapted on it) stays valid; only the decoder trains."),
    sets: Optional[list[str]] = SetOpt,
    report_to: str = ReportToOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train a DA-VAE on a base VAE: losses of the paper, EMA, atomic checkpoints, exact --resume.

    Writes RUN/config.yaml, RUN/checkpoints/, RUN/log.jsonl, RUN/samples/ and the exported model at RUN/final.
    """
    extra = []
    if init is not None:
        extra.append(f"train_vae.init_from={init.expanduser().resolve()}")
    if decoder_only:
        extra.append("train_vae.train_encoder=false")
    if base_vae is not None:
        extra.append(f"vae.base_vae={base_vae}")
        if base_vae == "random" or Path(base_vae).exists():
            extra.append("vae.base_vae_subfolder=null")
    p = trainer_preset(preset, sets, extra, "train_vae", steps, data, "export an untrained model")
    from ..train.vae import train_vae

    cb = RichTrainCallbacks("train-vae")
    try:
        result = train_vae(p, list(data or []), out, resume=resume, val_data=val_data, callbacks=cb,
                           report_to=report_to)
    finally:
        cb.on_end({})
    if report_finished(result, "DA-VAE", json_out):
        return
    m = result.metrics
    if json_out:
        print_json({"run_dir": result.run_dir, "final": result.final_dir, "steps": result.steps,
                    "skipped_images": result.skipped_images, "eval": m})
        return
    if m:
        typer.echo(f"held-out {m['num_images']} images at {p.train_vae.resolution}px:")
        s = p.vae.scale  # the JSON keys keep their s = 2 names (base_half_bicubic: the base at 1/s + bicubic x s)
        typer.echo(f"  (a) base at 1/{s} + bicubic  PSNR {m['base_half_bicubic.psnr']:.2f} dB  SSIM {m['base_half_bicubic.ssim']:.4f}")
        typer.echo(f"  (b) DA-VAE (same tokens)   PSNR {m['davae.psnr']:.2f} dB  SSIM {m['davae.ssim']:.4f}")
        typer.echo(f"  (c) base at full res ({s * s}x) PSNR {m['base_full.psnr']:.2f} dB  SSIM {m['base_full.ssim']:.4f}")
        gap = "n/a (c is not better than a)" if m["gap_closed"] is None else f"{100 * m['gap_closed']:.1f}%"
        typer.echo(f"  PSNR gap (a)->(c) closed by (b): {gap}   MSE(Proj(z_d), z_base) {m['align_mse']:.4f}")
        for line in structure_lines(m.get("detail_structure")):
            typer.echo(line)
    if result.skipped_images:
        err.print(f"{result.skipped_images} unreadable image(s) were skipped")
    typer.echo(f"DA-VAE written to {result.final_dir}")
