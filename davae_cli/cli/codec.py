"""`davae encode` and `davae decode`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DeviceOpt, JsonOpt, VaeOpt, err, print_json, progress_bar

BaseOpt = typer.Option(None, "--base-vae", help="Where the DA-VAE's base VAE is, if not where it was recorded.")
OutOpt = typer.Option(..., "--out", "-o", help="Output folder.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace existing outputs (without it they are kept and counted as skipped).")


def _load(vae: Path, base_vae: Optional[str], device: Optional[str]):
    from ..devices import resolve_device
    from ..vae.model import DetailAlignedVAE

    dev = resolve_device(device)
    model = DetailAlignedVAE.from_pretrained(vae, base_vae=base_vae)
    return model.to(dev).eval()


def _with_progress(label: str, fn, *args, **kwargs):
    """Run a batch function of davae_cli.codec with a progress bar on stderr."""
    with progress_bar() as bar:
        task = bar.add_task(label, total=None, info="")
        return fn(*args, progress=lambda n: bar.advance(task, n), on_total=lambda n: bar.update(task, total=n), **kwargs)


def _finish(report, json_out: bool, what: str) -> None:
    if json_out:
        print_json(report.to_dict())
    else:
        for path in report.written:
            typer.echo(path)
    for item, why in report.failed:
        err.print(f"[bold red]Error:[/] {item}: {why}", markup=True, soft_wrap=True)
    kept = len(report.skipped_existing)
    if not json_out:
        skipped = f", {kept} skipped (already there; --overwrite replaces them)" if kept else ""
        err.print(f"{len(report.written)} {what} written{skipped}, {len(report.failed)} failed")
    if report.failed:
        raise typer.Exit(1)


ENCODE_EXAMPLES = """
Examples:

  davae encode photos/ --vae runs/tiny/final --out latents/ --res 256

  davae encode cat.png dog.jpg --vae runs/tiny/final --out latents/ --json
"""


def encode_cmd(
    inputs: list[str] = typer.Argument(..., help="Images or folders of images (recursive)."),
    vae: Path = VaeOpt,
    out: Path = OutOpt,
    res: Optional[int] = typer.Option(None, "--res", help="Resize the short side to RES, then centre-crop each side down to a multiple of s*f (e.g. 1000 -> 992 for s*f = 16)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per forward pass (same-size images are batched)."),
    sample: bool = typer.Option(False, "--sample", help="Store a posterior sample of z_d instead of its mean."),
    seed: int = typer.Option(0, "--seed", help="Seed for --sample."),
    overwrite: bool = OverwriteOpt,
    base_vae: Optional[str] = BaseOpt,
    device: Optional[str] = DeviceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Encode images to latent files: OUT/<stem>.safetensors, key `latent`, shape (C+D, h, w), base first."""
    from ..codec import encode_images

    model = _load(vae, base_vae, device)
    report = _with_progress("encode", encode_images, model, inputs, out, res=res, batch_size=batch_size,
                            sample=sample, seed=seed, overwrite=overwrite)
    _finish(report, json_out, "latent file(s)")


DECODE_EXAMPLES = """
Examples:

  davae decode latents/ --vae runs/tiny/final --out recon/

  davae decode latents/cat.safetensors --vae runs/tiny/final --out recon/ --overwrite

  # generated latents (DiT space) decoded with and without their detail channels
  davae decode samples/ --vae runs/vae/final --dit runs/adapt/final --out dec/
  davae decode samples/ --vae runs/vae/final --dit runs/adapt/final --base-only --out dec-base/
  # ... and with the detail channels replaced by their linear prediction from the base channels
  davae decode samples/ --vae runs/vae/final --dit runs/adapt/final --detail-from-base --out dec-pred/
"""


def decode_cmd(
    inputs: list[str] = typer.Argument(..., help="Latent files or folders of them (recursive)."),
    vae: Path = VaeOpt,
    out: Path = OutOpt,
    dit: Optional[Path] = typer.Option(None, "--dit", help="The adapted DiT that DiT-space latents (generate --save-latents) were sampled with: undoes its normalisation."),
    base_only: bool = typer.Option(False, "--base-only", help="Decode only the base channels: the base VAE at 1/s + bicubic x s (the same latents without their detail)."),
    detail_from_base: bool = typer.Option(False, "--detail-from-base", help="Decode with the DA-VAE, the detail channels replaced by their least-squares prediction from the base channels (fitted over all the latents given): what the decoder makes of the base channels alone."),
    overwrite: bool = OverwriteOpt,
    base_vae: Optional[str] = BaseOpt,
    device: Optional[str] = DeviceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Decode latent files to PNGs (OUT/<stem>.png) at full resolution; refuses latents of another DA-VAE."""
    from ..codec import check_decode_mode, decode_latents

    check_decode_mode(base_only, detail_from_base)
    model = _load(vae, base_vae, device)
    report = _with_progress("decode", decode_latents, model, inputs, out, overwrite=overwrite,
                            dit_dir=dit, base_only=base_only, detail_from_base=detail_from_base)
    _finish(report, json_out, "image(s)")
