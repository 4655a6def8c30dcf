"""`davae ceilings`: what a tokenizer design can reach at best on held-out images, before any training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import JsonOpt, lazy_progress, print_json, resolve_preset, structure_lines

EXAMPLES = """
Examples:

  # the three ceilings of the imagenette-detail design on 500 seeded val images at 224² (no training)
  davae ceilings data/val/ --preset imagenette-detail --base-vae ../shared/weights/taesd3 --res 224 --max-images 500

  # the same as one JSON object (the Imagenette chain's `ceilings` stage)
  davae ceilings data/val/ --preset imagenette-detail --base-vae ../shared/weights/taesd3 --res 224 --json

Reports (a) PSNR of the base at 1/s + bicubic, of the base at full resolution, and the best a high-band decoder
(vae.residual_band: high) can reach; (b) the reference detail: the base VAE's own full-resolution latent,
pixel-unshuffled to the base grid, with the share of its variance beyond z_base and that part's neighbour
correlation and kurtosis (the target for generable detail); (c) the least alignment MSE a linear detail head can
reach on each feature source (trunk, latent, residual), in closed form.
"""


def ceilings_cmd(
    ref: Path = typer.Argument(..., help="Folder of held-out images (recursive)."),
    preset: str = typer.Option("tiny", "--preset", "-p", help="Preset whose vae section (base, C, f, s) is measured."),
    base_vae: Optional[str] = typer.Option(None, "--base-vae", help="Base VAE: hub id or local folder (default: the preset's)."),
    res: Optional[int] = typer.Option(None, "--res", help="Resize the short side to this, then centre-crop to a multiple of s*f (default: the preset's train_vae.resolution)."),
    max_images: int = typer.Option(0, "--max-images", help="A seeded subset of this many images (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --max-images subset."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per base-VAE pass."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Override a preset value, e.g. --set vae.scale=4 (repeatable)."),
    json_out: bool = JsonOpt,
) -> None:
    from ..errors import DavaeError
    from ..metrics.ceilings import ceilings_for_folder
    from ..vae.base import load_base_vae

    for name, v, lo in (("max-images", max_images, 0), ("batch-size", batch_size, 1)):
        if v < lo:
            raise DavaeError(f"must be >= {lo}, got {v}", param=name)
    p = resolve_preset(preset, sets, [f"vae.base_vae={base_vae}"] if base_vae else None)
    v = p.vae
    base = load_base_vae(v.base_vae, v.base_vae_subfolder, v.base_channels, v.base_vae_arch or None)
    size = res if res is not None else p.train_vae.resolution
    with lazy_progress("ceilings") as progress:
        r = ceilings_for_folder(ref, base, v, res=size, max_images=max_images, seed=seed, batch_size=batch_size,
                                progress=lambda _label, done, total: progress(done, total))
    r.update(preset=p.name, base_vae=v.base_vae)
    if json_out:
        print_json(r)
        return
    ps, rd = r["psnr"], r["reference_detail"]
    gap = ps["high_band_gap_closed"]
    typer.echo(f"{r['num_images']} images at {size}px, base VAE {v.base_vae} (C = {v.base_channels}, s = {v.scale})")
    typer.echo("(a) PSNR")
    typer.echo(f"  base at 1/{v.scale} + bicubic         {ps['base_half_bicubic']:.2f} dB")
    typer.echo(f"  base at full resolution        {ps['base_full']:.2f} dB")
    typer.echo(f"  high-band decoder's ceiling    {ps['high_band_ceiling']:.2f} dB"
               + ("" if gap is None else f"  ({100 * gap:.0f}% of the gap)"))
    typer.echo(f"(b) reference detail: the base VAE's full-resolution latent, unshuffled ({rd['channels']} channels)")
    typer.echo("\n".join(structure_lines({"latents": rd["latents"], "base": rd["z_base"], "detail": rd["detail"],
                                          "detail_unexplained": rd["unexplained"]})))
    typer.echo("(c) alignment floor of a linear head (MSE per element of z_base)")
    for k in ("trunk", "latent", "residual"):
        f = r["align_floor"][k]
        r2 = "n/a" if f["r2"] is None else f"{f['r2']:.3f}"
        typer.echo(f"  {k:<9} {f['features']:5d} features  {f['mse']:.4f}  (R² {r2}; "
                   f"a constant head: {f['var_z_base']:.4f})")
