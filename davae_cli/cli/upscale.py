"""`davae upscale`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (DeviceOpt, Dtype, DtypeOpt, JsonOpt, PresetOpt, SetOpt, dtype_name, err, lazy_progress, print_json,
                     resolve_preset)

EXAMPLES = """
Examples:

  # a native 1024² SD3.5 image made 2048² at the token cost of 1024² (a "hires fix")
  davae upscale photo_1024.png --preset sd35m-2048 --vae runs/sd35-2048/final --dit runs/sd35-2048-dit/final \\
      --prompt "a lighthouse at dusk, photo" --out up/

  # a folder of class folders (sorted names = class ids, as train-dit labels them), with latents and timings
  davae upscale val/ --preset imagenette --vae runs/vae/final --dit runs/adapt/final --class-from-folders \\
      --save-latents --json --out up/

  # one class for every image
  davae upscale tench/ --preset imagenette --vae runs/vae/final --dit runs/adapt/final --class-id 0 --out up-tench/

  # let the model also refine the composition from sigma 0.3 down (0 keeps the input's base exactly)
  davae upscale photo.png --preset tiny --vae runs/tvae/final --dit runs/tdit/final --strength 0.3 --out up-photo/

  # the latents of a native 112² generation, their base channels as they are (no decode + re-encode):
  # class and seed from each file, detail generated at 224²; then the same bases decoded two more ways
  davae generate --preset imagenette --native --base-pipeline runs/native/final --vae runs/vae/final \\
      --res 112 --class-id 0 --class-id 1 --num-images 8 --save-latents --out nat/
  davae upscale nat/ --from-latents --preset imagenette --vae runs/vae/final --dit runs/adapt/final \\
      --save-latents --out up-nat/
  davae decode up-nat/ --vae runs/vae/final --dit runs/adapt/final --detail-from-base --out up-nat-pred/
  davae decode up-nat/ --vae runs/vae/final --dit runs/adapt/final --base-only --out up-nat-base/
"""


def upscale_cmd(
    inputs: list[str] = typer.Argument(..., help="Images (any size), latent files (.safetensors: generate --native --save-latents, or C+D latents of this DA-VAE), or folders of them (recursive: their images; their latents when they hold no image, or with --from-latents)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <stem>.png per input (existing ones are kept and skipped: resumable)."),
    vae: Path = typer.Option(..., "--vae", help="DA-VAE folder (RUN/final of train-vae)."),
    dit: Path = typer.Option(..., "--dit", help="Adapted DiT folder (RUN/final of adapt-dit), adapted with that DA-VAE."),
    preset: str = PresetOpt,
    from_latents: bool = typer.Option(False, "--from-latents", help="Folders give their latent files (.safetensors), not their images: for a generate --save-latents folder, which holds both."),
    res: Optional[int] = typer.Option(None, "--res", help="Output short side R (default: the adapted model's resolution; any other works on every backend); an image of any shape is resized to R/s, sides rounded down to whole tokens (a note says so when R itself is rounded). A latent is never resized: its output is s x its base resolution."),
    strength: float = typer.Option(0.0, "--strength", help="0 = the input's base channels kept exactly (only the detail channels are generated); > 0 = the base channels are also regenerated below sigma = STRENGTH (up to 1)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt for every input (SD3/FLUX models; \"\" allowed, the default for images; a latent: its own recorded prompt)."),
    class_id: Optional[int] = typer.Option(None, "--class-id", help="Class for every input (class-conditional models; default for images: the null class, unconditional; a latent: its own recorded class_id)."),
    class_from_folders: bool = typer.Option(False, "--class-from-folders", help="Class-conditional models: each image's class is its folder's index among the inputs' sorted folder names (as train-dit labels its data)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt (the unconditional branch; default: the recipe's sample.negative_prompt, usually empty)."),
    steps: Optional[int] = typer.Option(None, "--sampling-steps", "--steps", help="Sampling steps (default: the adapted model's recipe)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale, 1 = off (default: the recipe's)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler or heun (default: the recipe's)."),
    shift: Optional[float] = typer.Option(None, "--shift", help="Sampling timestep shift (default: the adapted model's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the first input; input k uses seed + k (default 0; a latent: its own recorded seed, so the held base starts from the noise it was generated from)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images of the same size sampled together."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    save_latents: bool = typer.Option(False, "--save-latents", help="Also write each final latent (DiT space) as <stem>.safetensors."),
    base_pipeline: Optional[str] = typer.Option(None, "--base-pipeline", help="Text encoders from this SD3/FLUX pipeline folder instead of the recorded ones."),
    no_t5: bool = typer.Option(False, "--no-t5", help="SD3: skip the T5 encoder."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the DiT (the first batch includes the compilation)."),
    compile_mode: str = typer.Option("default", "--compile-mode", help="torch.compile mode."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Decode in latent tiles of this side (default: whole, 64-tiles if the GPU runs out of memory; 0 = never)."),
    dtype: Optional[Dtype] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    sets: Optional[list[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Upscale images (or generated base latents) s x with an adapted DiT, for the token cost of the input's resolution.

    An image, resized to R/s, gives the base channels (exactly the DA-VAE's base channels of that image); a
    latent file gives them as they are (a native model's latent mapped into the DA-VAE's base space). The
    adapted DiT generates the detail channels with the base channels held on their noised path at every step;
    the DA-VAE decodes at R. PNGs carry the source, strength, seed, settings and model identities, and for a
    latent its own metadata (source_meta; class_id and prompt taken from it)."""
    from ..upscale import UpscaleSettings, upscale

    p = resolve_preset(preset, sets)
    s = UpscaleSettings(out_dir=out, res=res, strength=strength, prompt=prompt, class_id=class_id,
                        class_from_folders=class_from_folders,
                        negative_prompt=negative_prompt, steps=steps, guidance=guidance, sampler=sampler, shift=shift,
                        seed=seed, from_latents=from_latents, batch_size=batch_size, overwrite=overwrite,
                        save_latents=save_latents, tile=tile,
                        device=device, dtype=dtype_name(dtype), compile=compile_, compile_mode=compile_mode)
    with lazy_progress("upscale") as progress:
        report = upscale(p, s, inputs, vae_dir=str(vae), dit_dir=str(dit), base_pipeline=base_pipeline,
                         use_t5=not no_t5, progress=progress, on_message=lambda t: err.print(t))
    if json_out:
        print_json(report)
        return
    n = len(report["written"])
    sizes = ", ".join(f"{w}x{h}" for h, w in report["sizes"]) or "-"
    typer.echo(f"{n} input(s) upscaled into {out} ({report['skipped_existing']} already there), output {sizes}, "
               f"strength {report['strength']}")
    if n:
        typer.echo(f"encode {report['encode_s']:.1f} s, text {report['text_s']:.1f} s, sampling {report['sample_s']:.1f} s, "
                   f"decoding {report['decode_s']:.1f} s: {report['ms_per_image'] / 1000:.2f} s per image on {report['device']}")
