"""`davae convert`: checkpoints trained with the official DA-VAE code -> davae folders."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .common import JsonOpt, SetOpt, err, print_json, resolve_preset


def _kinds():
    from ..dit.registry import OFFICIAL_KINDS

    return OFFICIAL_KINDS


Kind = Enum("Kind", {k.replace("-", "_"): k for k in _kinds()}, type=str)


EXAMPLES = """
Examples:

  # the official ImageNet DA-VAE (lightningdit/davae, da_mode detail) on the VA-VAE file it was trained on,
  # with the official 128-channel latent statistics: then every davae command takes runs/official-davae
  davae convert imagenet-davae davae_f16d32.ckpt --base-vae vavae-imagenet256-f16d32-dinov2.pt \\
      --stats latents_stats.pt --out runs/official-davae

  # the official LightningDiT-XL trained on those latents (QK-norm, 128 channels): an adapted DiT folder
  davae convert lightningdit lightningdit_xl_davae.pt --vae runs/official-davae --out runs/official-dit \\
      --preset imagenet-512-official

  # the official SD3 DA-VAE tokenizer (sd3/, da_mode diff, detail first) on the SD3.5 Medium VAE
  davae convert sd3-davae pytorch_model.bin --base-vae /models/sd35m --out runs/official-sd3-davae

  # the official SD3.5 Medium adaptation on it: the heads checkpoint + the LoRA folder of the same step
  davae convert sd3-dit checkpoints/step_20000.pt --lora lora_weights/lora_step_20000 \\
      --vae runs/official-sd3-davae --dit /models/sd35m --out runs/official-sd3-dit

  davae encode photos/ --vae runs/official-davae --out latents/ --res 512
  davae generate --preset imagenet-512-official --vae runs/official-davae --dit runs/official-dit \\
      --class-id 207 --out samples/
"""


def convert_cmd(
    kind: Kind = typer.Argument(..., help="What the checkpoint is: " + "; ".join(f"{k} ({v['help']})" for k, v in _kinds().items()) + "."),
    checkpoint: Path = typer.Argument(..., help="The official checkpoint (.ckpt/.pt with a state_dict, or .safetensors)."),
    base_vae: Optional[Path] = typer.Option(None, "--base-vae", help="imagenet-davae: the VA-VAE f16d32 .pt the DA-VAE was trained on; sd3-davae: the SD3(.5) VAE (folder, pipeline folder or hub id)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="imagenet-davae: latent statistics (mean/std), the official 128-channel latents_stats.pt (or LightningDiT's 32-channel one)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="lightningdit, sd3-dit: the converted official DA-VAE folder the DiT was trained on."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="sd3-dit: the LoRA of the same step (lora_step_N folder or its pytorch_lora_weights.safetensors)."),
    dit: Optional[str] = typer.Option(None, "--dit", help="sd3-dit: the pretrained SD3.5 transformer the adaptation started from (pipeline folder or hub id; default: the preset's)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="sd3-dit: LoRA alpha when the file records none (default: its rank, as the official recipe)."),
    out: Path = typer.Option(..., "--out", "-o", help="The davae DA-VAE folder to write (must not exist)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Architecture and recipe (default: " + ", ".join(f"{v['preset']} for {k}" for k, v in _kinds().items()) + ")."),
    sets: Optional[list[str]] = SetOpt,
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load a checkpoint that holds pickled objects (only for files you trust)."),
    json_out: bool = JsonOpt,
) -> None:
    """Convert an official DA-VAE checkpoint into a davae folder that every davae command takes."""
    from ..dit.official import convert_official
    from ..dit.registry import OFFICIAL_KINDS

    p = resolve_preset(preset or OFFICIAL_KINDS[kind.value]["preset"], sets)
    report, summary = convert_official(kind.value, checkpoint, out, p,
                                       {"base_vae": base_vae, "stats": stats, "vae": vae, "lora": lora, "dit": dit,
                                        "lora_alpha": lora_alpha}, allow_pickle=allow_pickle)
    if json_out:
        print_json(report)
    else:
        typer.echo(report["out"])
        err.print(summary)
