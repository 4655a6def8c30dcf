"""`davae generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (DeviceOpt, Dtype, DtypeOpt, JsonOpt, PresetOpt, SetOpt, dtype_name, err, fail, lazy_progress,
                     print_json, resolve_preset)

EXAMPLES = """
Examples:

  davae generate --preset sd35m-2048 --vae runs/sd35/final --dit runs/sd35-dit/final \\
      --prompt "a lighthouse at dusk, photo" --res 2048 --out out/

  davae generate --preset sd35m-1024 --native --base-pipeline /models/stable-diffusion-3.5-medium \\
      --prompt "a lighthouse at dusk, photo" --res 1024 --out out-native/      # the unmodified model, sampled as its pipeline

  davae generate --preset tiny --vae runs/tvae/final --dit runs/tdit/final --prompts prompts.txt \\
      --num-images 4 --grid --save-latents --out out/

  davae generate --preset sd35m-1024 --random-weights --prompt "x" --res 1024 --num-images 20 --batch-size 10 \\
      --compile --json --out speed/        # speed only: random SD3.5 Medium weights (add --native for the baseline)

  accelerate launch --num_processes 8 -m davae_cli generate --preset imagenet-512 --vae runs/in512/final \\
      --dit runs/in512-dit/final --class-id 207 --class-id 360 --num-images 25 --out samples/   # resumable
"""


def generate_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (existing images are kept and skipped: resumable)."),
    preset: str = PresetOpt,
    vae: Optional[Path] = typer.Option(None, "--vae", help="DA-VAE folder (RUN/final of train-vae)."),
    dit: Optional[Path] = typer.Option(None, "--dit", help="Adapted DiT folder (RUN/final of adapt-dit)."),
    base_pipeline: Optional[str] = typer.Option(None, "--base-pipeline", help="SD3 pipeline folder or hub id: text encoders (and, with --native, transformer and VAE); LightningDiT --native: the pretrained checkpoint."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Prompt (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="File of prompts: .txt one per line, .jsonl (field prompt, caption or text) or .parquet (column prompt, caption or text), as `davae synth` reads."),
    class_id: Optional[list[int]] = typer.Option(None, "--class-id", help="Class id for class-conditional models (repeatable)."),
    res: Optional[int] = typer.Option(None, "--res", help="Image resolution (default: the adapted model's): any multiple of the model's pixels per token (s*f*p), not only the one it was trained at."),
    steps: Optional[int] = typer.Option(None, "--sampling-steps", "--steps", help="Sampling steps (default: the recipe's; see below)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale, 1 = off (default: the recipe's)."),
    guidance_interval: Optional[str] = typer.Option(None, "--guidance-interval", help="Apply CFG only for sigma in LO,HI, e.g. 0,0.8, or 'all' (default: the recipe's)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt (the unconditional branch; default: the recipe's sample.negative_prompt, usually empty)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image k of each prompt uses seed + k."),
    num_images: int = typer.Option(1, "--num-images", help="Images per prompt / class."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images sampled together."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler or heun (default: the recipe's)."),
    shift: Optional[float] = typer.Option(None, "--shift", help="Sampling timestep shift, sigma convention (default: the adapted model's; --native SD3: the pipeline's scheduler_config.json; --native LightningDiT: the preset's sample.shift)."),
    native: bool = typer.Option(False, "--native", help="Run the unmodified base model at --res with its own sampling settings (SD3: exactly StableDiffusion3Pipeline's sampler)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Speed measurement: the preset's SD3 or FLUX architectures (transformer, VAE, text encoders) with random weights, no download; DA-VAE side, or native with --native. The images are noise."),
    no_t5: bool = typer.Option(False, "--no-t5", help="SD3: skip the T5 encoder (saves memory; zeros in its place)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the DiT (static shapes, once per batch shape; the first batch includes the compilation)."),
    compile_mode: str = typer.Option("default", "--compile-mode", help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Decode in latent tiles of this side (default: whole, falling back to 64-tiles if the GPU runs out of memory; 0 = never tile)."),
    save_latents: bool = typer.Option(False, "--save-latents", help="Also write each final latent (DiT space) as <stem>.safetensors."),
    grid: bool = typer.Option(False, "--grid", help="Also write a grid of all images beside OUT (out/ -> out-grid.png), outside the sample set."),
    dtype: Optional[Dtype] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    sets: Optional[list[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Generate images with an adapted DiT and its DA-VAE, or with the native base model (--native).

    2x the resolution at the base token count. Sampling recipe (steps, guidance, interval, sampler): the one
    stored with the adapted model, or the preset's `sample` section with --native; flags override it. PNGs
    carry prompt, seed, the settings, shift and sigma grid actually used, and the model identities."""
    from ..generate import RECIPE, GenerateSettings, generate
    from ..synth import read_prompt_list

    p = resolve_preset(preset, sets)
    texts = list(prompt or [])
    if prompts is not None:
        texts += read_prompt_list(prompts)
    interval: object = RECIPE
    if guidance_interval is not None and guidance_interval.strip().lower() in ("all", "none", "off"):
        interval = None
    elif guidance_interval is not None:
        try:
            lo, hi = (float(v) for v in guidance_interval.split(","))
        except ValueError:
            fail(f"--guidance-interval {guidance_interval!r}: expected LO,HI (e.g. 0,0.8) or 'all'")
        interval = (lo, hi)
    s = GenerateSettings(out_dir=out, prompts=texts, class_ids=list(class_id or []), res=res, steps=steps,
                         guidance=guidance, guidance_interval=interval, negative_prompt=negative_prompt, seed=seed,
                         num_images=num_images, batch_size=batch_size, sampler=sampler, shift=shift,
                         save_latents=save_latents, grid=grid, tile=tile, device=device, dtype=dtype_name(dtype),
                         compile=compile_, compile_mode=compile_mode)
    with lazy_progress("generate") as progress:
        report = generate(p, s, vae_dir=str(vae) if vae else None, dit_dir=str(dit) if dit else None,
                          base_pipeline=base_pipeline, native=native, use_t5=not no_t5, random_weights=random_weights, progress=progress,
                          on_message=lambda t: err.print(t))
    if json_out:
        print_json(report)
        return
    n = len(report["written"])
    typer.echo(f"{n} image(s) written to {out} ({report['skipped_existing']} already there), "
               f"{report['res']}² with {report['tokens']} image tokens ({report['mode']})")
    if report.get("grid"):
        typer.echo(f"grid: {report['grid']}")
    if n:
        compiled = " (the first batch includes compiling the DiT)" if report["compile_included"] else ""
        typer.echo(f"text {report['text_s']:.1f} s, sampling {report['sample_s']:.1f} s, decoding {report['decode_s']:.1f} s: "
                   f"{report['ms_per_image'] / 1000:.2f} s per image, {report['images_per_s']:.3f} images/s on "
                   f"{report['device']}{compiled}")
        if report["ms_per_image_steady"] is not None:
            typer.echo(f"after the first batch: {report['ms_per_image_steady'] / 1000:.2f} s per image, "
                       f"{report['images_per_s_steady']:.3f} images/s")
