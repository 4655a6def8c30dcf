"""`davae synth`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DeviceOpt, Dtype, DtypeOpt, JsonOpt, PresetOpt, SetOpt, dtype_name, err, lazy_progress, print_json, resolve_preset

EXAMPLES = """
Examples:

  davae synth --preset flux-2048 --base-pipeline /models/FLUX.1-dev --prompts t2i-prompts.parquet \\
      --res 1024 --shard-size 1000 --batch-size 8 --out /data/synth/       # resumable: a rerun continues where it stopped

  accelerate launch --num_processes 8 -m davae_cli synth --preset sd35m-1024 \\
      --base-pipeline /models/stable-diffusion-3.5-large --prompts prompts.jsonl --res 1024 --out /data/synth/

  davae adapt-dit --preset sd35m-1024 --vae runs/sd35/final --data /data/synth/ --out runs/sd35-dit   # reads the shards

  davae synth --preset tiny --random-weights --prompts prompts.txt --res 64 --shard-size 4 --out synth-tiny/   # CPU smoke run
"""


def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder of WebDataset shards (synth-000000.tar, ...) and synth.json."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompt list: .txt (one per line), .jsonl (prompt/caption/text) or .parquet."),
    preset: str = PresetOpt,
    base_pipeline: Optional[str] = typer.Option(None, "--base-pipeline", help="The native SD3 or FLUX.1 pipeline that renders (folder or hub id; default: the preset's dit.pretrained)."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="The prompt field of a .jsonl/.parquet list (default: prompt, caption or text)."),
    res: Optional[int] = typer.Option(None, "--res", help="Image resolution (required with a pipeline; --random-weights: the preset's adapt_dit.resolution)."),
    steps: Optional[int] = typer.Option(None, "--sampling-steps", "--steps", help="Sampling steps (default: the preset's sample.steps)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: the preset's)."),
    seed: int = typer.Option(0, "--seed", help="Prompt i is rendered from seed SEED + i."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Images per shard (written as it is made: a kill loses at most the batch in flight)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images sampled together."),
    image_format: str = typer.Option("png", "--format", help="png (lossless), jpg or webp."),
    quality: int = typer.Option(95, "--quality", help="JPEG/WebP quality."),
    limit: int = typer.Option(0, "--limit", help="Render only the first N prompts (0 = all)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="The preset's architectures with random weights (tests, speed): the images are noise."),
    no_t5: bool = typer.Option(False, "--no-t5", help="SD3: skip the T5 encoder."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the DiT."),
    dtype: Optional[Dtype] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    sets: Optional[list[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Render a prompt list with a native text-to-image pipeline into WebDataset shards (the paper's synthetic data).

    Each sample: the image, its prompt (.txt) and the generation metadata (.json: seed, model, steps, guidance).
    Deterministic per prompt index; each batch is appended to its shard as it is made and a shard appears
    (renamed into place) when whole, so a rerun continues after the last whole batch; synth.json records the
    prompt list's and the settings' sha256 and another list or other settings are refused. Split across
    processes by accelerate launch; train-vae, adapt-dit and train-dit read OUT directly with --data OUT."""
    from ..synth import SynthSettings, read_prompt_list, synth

    p = resolve_preset(preset, sets)
    s = SynthSettings(out_dir=out, prompts=read_prompt_list(prompts, prompt_column), res=res, steps=steps,
                      guidance=guidance, seed=seed, shard_size=shard_size, batch_size=batch_size,
                      image_format=image_format.lower(), jpeg_quality=quality, limit=limit, device=device,
                      dtype=dtype_name(dtype), compile=compile_)
    with lazy_progress("synth") as progress:
        report = synth(p, s, base_pipeline=base_pipeline, random_weights=random_weights, use_t5=not no_t5,
                       progress=progress, on_message=lambda t: err.print(t))
    if json_out:
        print_json(report)
        return
    rate = f", {report['images_per_s']:.3f} images/s" if report["images_per_s"] else ""
    kept = f", {report['images_resumed']} kept from interrupted shards" if report["images_resumed"] else ""
    typer.echo(f"{report['images']} image(s) in {report['shards_written']} new shard(s) of {report['shards']} in {out} "
               f"({report['shards_skipped']} already there{kept}), {report['res']}², {report['steps']} steps{rate}")
