"""`davae convert`: checkpoints trained with the official DA-VAE code -> davae folders."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .common import JsonOpt, SetOpt, err, print_json, resolve_preset


class Kind(str, Enum):
    imagenet_davae = "imagenet-davae"
    lightningdit = "lightningdit"
    sd3_davae = "sd3-davae"
    sd3_dit = "sd3-dit"


EXAMPLES = """
Examples:

  # the official ImageNet DA-VAE (lightningdit/davae, da_mode detail) on the VA-VAE file it was trained on,
  # with the official 128-channel latent statistics: then every davae command takes runs/official-davae
  davae convert imagenet-davae davae_f16d32.ckpt --base-vae vavae-imagenet256-f16d32-dinov2.pt \\
      --stats latents_stats.pt --out runs/official-davae

  # the official LightningDiT-XL trained on those latents (QK-norm, 128 channels): an adapted DiT folder
  davae convert lightningdit lightningdit_xl_davae.pt --vae runs/official-davae --out runs/official-dit \
      --preset imagenet-512-official

  # the official SD3 DA-VAE tokenizer (sd3/, da_mode diff, detail first) on the SD3.5 Medium VAE
  davae convert sd3-davae pytorch_model.bin --base-vae /models/sd35m --out runs/official-sd3-davae

  # the official SD3.5 Medium adaptation on it: the heads checkpoint + the LoRA folder of the same step
  davae convert sd3-dit checkpoints/step_20000.pt --lora lora_weights/lora_step_20000 \
      --vae runs/official-sd3-davae --dit /models/sd35m --out runs/official-sd3-dit

  davae encode photos/ --vae runs/official-davae --out latents/ --res 512
  davae generate --vae runs/official-davae --dit runs/official-dit --class-id 207 --out samples/
"""


def convert_cmd(
    kind: Kind = typer.Argument(..., help="What the checkpoint is: imagenet-davae (the official ImageNet DA-VAE tokenizer), lightningdit (the official LightningDiT-XL trained on its latents) sd3-davae (the official SD3 DA-VAE tokenizer) or sd3-dit (the official SD3.5 adaptation: step_N.pt heads + --lora)."),
    checkpoint: Path = typer.Argument(..., help="The official checkpoint (.ckpt/.pt with a state_dict, or .safetensors)."),
    base_vae: Optional[Path] = typer.Option(None, "--base-vae", help="imagenet-davae: the VA-VAE f16d32 .pt the DA-VAE was trained on; sd3-davae: the SD3(.5) VAE (folder, pipeline folder or hub id)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="imagenet-davae: latent statistics (mean/std), the official 128-channel latents_stats.pt (or LightningDiT's 32-channel one)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="lightningdit, sd3-dit: the converted official DA-VAE folder the DiT was trained on."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="sd3-dit: the LoRA of the same step (lora_step_N folder or its pytorch_lora_weights.safetensors)."),
    dit: Optional[str] = typer.Option(None, "--dit", help="sd3-dit: the pretrained SD3.5 transformer the adaptation started from (pipeline folder or hub id; default: the preset's)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="sd3-dit: LoRA alpha when the file records none (default: its rank, as the official recipe)."),
    out: Path = typer.Option(..., "--out", "-o", help="The davae DA-VAE folder to write (must not exist)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Architecture and recipe (default: imagenet-512 for imagenet-davae, imagenet-512-official for lightningdit, sd35m-1024-official for sd3-davae)."),
    sets: Optional[list[str]] = SetOpt,
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load a checkpoint that holds pickled objects (only for files you trust)."),
    json_out: bool = JsonOpt,
) -> None:
    """Convert an official DA-VAE checkpoint into a davae folder that every davae command takes."""
    from ..errors import DavaeError
    from ..official import convert_imagenet_davae, convert_lightningdit, convert_sd3_davae, convert_sd3_dit

    need = {"imagenet-davae": (("base_vae", base_vae), ("stats", stats)), "lightningdit": (("vae", vae),),
            "sd3-davae": (("base_vae", base_vae),), "sd3-dit": (("lora", lora), ("vae", vae))}[kind.value]
    allowed = {name for name, _ in need} | ({"dit", "lora_alpha"} if kind is Kind.sd3_dit else set())
    for name, given in (("base_vae", base_vae), ("stats", stats), ("vae", vae), ("lora", lora), ("dit", dit),
                        ("lora_alpha", lora_alpha)):
        if given is not None and name not in allowed:
            raise DavaeError(f"does not apply to `convert {kind.value}`", param=name)
    for name, given in need:
        if given is None:
            raise DavaeError(f"is required to convert {kind.value}", param=name)
    if kind is Kind.imagenet_davae:
        p = resolve_preset(preset or "imagenet-512", sets)
        report = convert_imagenet_davae(checkpoint, base_vae, stats, out, p, allow_pickle=allow_pickle)
        summary = f"converted {report['weights']} weights; detail statistics: {report['detail_stats']}"
    elif kind is Kind.sd3_davae:
        p = resolve_preset(preset or "sd35m-1024-official", sets)
        report = convert_sd3_davae(checkpoint, base_vae, out, p, allow_pickle=allow_pickle)
        summary = f"converted {report['weights']} weights; detail statistics: {report['detail_stats']}"
    elif kind is Kind.sd3_dit:
        p = resolve_preset(preset or "sd35m-1024-official", sets)
        report = convert_sd3_dit(checkpoint, lora, vae, out, p, dit=dit, lora_alpha=lora_alpha, allow_pickle=allow_pickle)
        summary = (f"merged a rank-{report['lora_rank']} LoRA (alpha {report['lora_alpha']:g}) on "
                   f"{report['lora_targets']} modules into {report['base_transformer']}")
    else:
        p = resolve_preset(preset or "imagenet-512-official", sets)
        report = convert_lightningdit(checkpoint, vae, out, p, allow_pickle=allow_pickle)
        summary = f"converted {report['parameters']:,} parameters ({report['channels']} channels, QK-norm {report['use_qknorm']})"
    if json_out:
        print_json(report)
    else:
        typer.echo(report["out"])
        err.print(summary)
