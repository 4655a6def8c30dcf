"""`davae convert`: checkpoints trained with the official DA-VAE code -> davae folders."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .common import JsonOpt, SetOpt, err, print_json, resolve_preset


class Kind(str, Enum):
    imagenet_davae = "imagenet-davae"


EXAMPLES = """
Examples:

  # the official ImageNet DA-VAE (lightningdit/davae, da_mode detail) on the VA-VAE file it was trained on,
  # with the official 128-channel latent statistics: then every davae command takes runs/official-davae
  davae convert imagenet-davae davae_f16d32.ckpt --base-vae vavae-imagenet256-f16d32-dinov2.pt \\
      --stats latents_stats.pt --out runs/official-davae

  davae encode photos/ --vae runs/official-davae --out latents/ --res 512
"""


def convert_cmd(
    kind: Kind = typer.Argument(..., help="What the checkpoint is: imagenet-davae (the official ImageNet DA-VAE tokenizer)."),
    checkpoint: Path = typer.Argument(..., help="The official checkpoint (.ckpt/.pt with a state_dict, or .safetensors)."),
    base_vae: Path = typer.Option(..., "--base-vae", help="The base VAE checkpoint the DA-VAE was trained on (VA-VAE f16d32 .pt)."),
    stats: Path = typer.Option(..., "--stats", help="Latent statistics (mean/std): the official 128-channel latents_stats.pt, or LightningDiT's 32-channel one."),
    out: Path = typer.Option(..., "--out", "-o", help="The davae DA-VAE folder to write (must not exist)."),
    preset: str = typer.Option("imagenet-512", "--preset", "-p", help="The architecture (default: imagenet-512)."),
    sets: Optional[list[str]] = SetOpt,
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load a checkpoint that holds pickled objects (only for files you trust)."),
    json_out: bool = JsonOpt,
) -> None:
    """Convert an official DA-VAE checkpoint into a davae folder that every davae command takes."""
    from ..official import convert_imagenet_davae

    p = resolve_preset(preset, sets)
    report = convert_imagenet_davae(checkpoint, base_vae, stats, out, p, allow_pickle=allow_pickle)
    if json_out:
        print_json(report)
    else:
        typer.echo(report["out"])
        err.print(f"converted {report['weights']} weights; detail statistics: {report['detail_stats']}")
