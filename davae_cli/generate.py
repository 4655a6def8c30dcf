"""`davae generate`: jobs (prompts or classes x images) sampled with an adapted DiT and its DA-VAE, or with
the unmodified base model (`native`) under the same sampler settings, for side-by-side comparison.

Three parts: the sampling loop (`sampling.py`: latents in, latents out), the model loading the family's
backend does (`models.py`), and images out (`images.py`: decode, PNG with metadata, grid). This module joins
them: settings completed from the model's recipe (steps, guidance, guidance interval, sampler, negative
prompt; from the adapted model, or the preset for `native`) without changing the caller's, the jobs of this
process, resumable (an existing PNG is skipped), and the timings.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import Preset, check_sampling
from .errors import DavaeError
from .images import decode_images, grid_path, write_grid, write_sample
from .models import CondFn, load_adapted, load_native, load_random
from .sampling import SamplingModel, guided_velocity, initial_noise, sample_latents, sampling_grid, timed


RECIPE = "recipe"  # GenerateSettings.guidance_interval: take the recipe's (None means CFG on every step)


@dataclass
class GenerateSettings:
    out_dir: Path
    prompts: list[str] = field(default_factory=list)
    class_ids: list[int] = field(default_factory=list)
    res: Optional[int] = None  # default: the adapted model's resolution
    # None (and RECIPE for the interval): the model's sampling recipe (see the module doc)
    steps: Optional[int] = None
    guidance: Optional[float] = None
    guidance_interval: object = RECIPE  # (lo, hi) sigma range where CFG applies, None = every step
    negative_prompt: Optional[str] = None  # None: the recipe's (usually "")
    seed: int = 0
    num_images: int = 1  # per prompt / class
    batch_size: int = 1
    sampler: Optional[str] = None
    shift: Optional[float] = None
    save_latents: bool = False
    grid: bool = False
    tile: Optional[int] = None  # latent tile side for decoding; None = automatic, 0 = never tile
    device: Optional[str] = None
    dtype: Optional[str] = None
    compile: bool = False  # torch.compile the DiT (static shapes; compiled once per batch shape, then reused)
    compile_mode: str = "default"  # "reduce-overhead" adds CUDA graphs


@dataclass
class Job:
    index: int
    seed: int
    prompt: Optional[str] = None
    class_id: Optional[int] = None

    @property
    def stem(self) -> str:
        return f"{self.index:06d}"


def with_recipe(s, recipe: dict, **more):
    """A copy of the settings `s` (generate's or upscale's) with what was left unset taken from the recipe
    (steps, guidance, guidance_interval, sampler, negative prompt) and `more` set."""
    gi = s.guidance_interval
    if isinstance(gi, str) and gi == RECIPE:
        gi = recipe.get("guidance_interval")
        gi = tuple(float(v) for v in gi) if gi else None
    return dataclasses.replace(
        s, steps=int(recipe["steps"]) if s.steps is None else s.steps,
        guidance=float(recipe["guidance"]) if s.guidance is None else s.guidance, guidance_interval=gi,
        sampler=recipe.get("sampler", "euler") if s.sampler is None else s.sampler,
        negative_prompt=(recipe.get("negative_prompt") or "") if s.negative_prompt is None else s.negative_prompt,
        **more)


def make_jobs(s: GenerateSettings) -> list[Job]:
    conds: list[tuple[Optional[str], Optional[int]]] = [(p, None) for p in s.prompts] + [(None, c) for c in s.class_ids]
    if not conds:
        raise DavaeError("nothing to generate: give --prompt, --prompts FILE or --class-id")
    jobs = []
    for i, (p, c) in enumerate(conds):
        for k in range(s.num_images):
            jobs.append(Job(i * s.num_images + k, s.seed + k, p, c))
    return jobs


def sample_batch(model: SamplingModel, s: GenerateSettings, cond_fn: CondFn, batch: list[Job], sigmas, side: int, *,
                 device=None, dtype=torch.float32, tile: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sample and decode one batch of jobs: (images (B, 3, H, W) in [-1, 1], final latents (B, C+D, h, w),
    {text_s, sample_s, decode_s})."""
    clock = timed(device)
    noise = torch.cat([initial_noise(j.seed, model.base_channels, model.detail_channels, side) for j in batch])
    noise = noise.to(device=device)  # (B, C+D, h, w) float32: the ODE state stays float32, the model runs in `dtype`
    (uncond, cond), text_s = clock(lambda: cond_fn(batch))
    velocity = guided_velocity(model, s.guidance, uncond, cond, len(batch), device, dtype)
    lat, sample_s = clock(lambda: sample_latents(velocity, noise, sigmas, sampler=s.sampler,
                                                 guidance_interval=s.guidance_interval))
    with torch.inference_mode():
        images, decode_s = clock(lambda: decode_images(model, lat, tile))
    return images, lat, {"text_s": text_s, "sample_s": sample_s, "decode_s": decode_s}


def native_base_space(model: SamplingModel) -> Optional[dict]:
    """What a native model's latent is, recorded with its samples so that `upscale` can take them as base
    channels: per channel, latent = (base VAE posterior mean - shift) * scale. A LightningDiT decodes with the
    DA-VAE's base latent transform, a diffusers pipeline with its VAE's shift_factor and scaling_factor. None
    for the DA-VAE model (its latent records the DA-VAE) and random weights."""
    if model.name != "native":
        return None
    davae, vae = model.parts.get("davae"), model.parts.get("vae")
    if davae is not None:
        t = davae.transform
        return {"shift": [float(v) for v in t.shift], "scale": [float(v) for v in t.scale]}
    if vae is not None:
        c = model.base_channels
        return {"shift": [float(getattr(vae.config, "shift_factor", None) or 0.0)] * c,
                "scale": [float(getattr(vae.config, "scaling_factor", None) or 1.0)] * c}
    return None


def run_generation(model: SamplingModel, s: GenerateSettings, cond_fn: CondFn, jobs: list[Job], *, rank: int = 0,
                   world: int = 1, device=None, dtype=torch.float32,
                   progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Sample and write every job of this process (`jobs[rank::world]`) whose PNG does not exist yet."""
    side, shift, sigmas = sampling_grid(model, s.res, s.steps, s.shift)
    out_dir = Path(s.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = jobs[rank::world]
    todo = [j for j in mine if not (out_dir / f"{j.stem}.png").exists()]
    grid = [round(float(v), 8) for v in sigmas]
    space = native_base_space(model)
    written, timings = [], {"text_s": 0.0, "sample_s": 0.0, "decode_s": 0.0}
    batches: list[dict] = []  # per batch: images, text_s, sample_s, decode_s (the first includes warm-up/compile)
    done = len(mine) - len(todo)
    if progress:
        progress(done, len(mine))
    for k in range(0, len(todo), s.batch_size):
        batch = todo[k : k + s.batch_size]
        images, lat, times = sample_batch(model, s, cond_fn, batch, sigmas, side, device=device, dtype=dtype, tile=s.tile)
        for key in timings:
            timings[key] += times[key]
        batches.append({"images": len(batch), **times})
        for j, img, z in zip(batch, images, lat):
            meta = {"prompt": j.prompt, "negative_prompt": s.negative_prompt if j.prompt is not None else None,
                    "class_id": j.class_id, "seed": j.seed, "steps": s.steps, "guidance": s.guidance,
                    "guidance_interval": s.guidance_interval, "sampler": s.sampler,
                    "shift": shift, "sigmas": grid, "res": s.res, "mode": model.name, "base_transform": space,
                    **model.identity}
            written.append(write_sample(out_dir, j.stem, img, z, meta, s.save_latents))
        done += len(batch)
        if progress:
            progress(done, len(mine))
    return {"written": written, "skipped_existing": len(mine) - len(todo), "images": len(mine), "shift": shift,
            "sigmas": grid, "batches": batches, **timings}


def timing_report(report: dict, n: int) -> dict:
    """Per-image times (the names `davae bench` uses: ms_loop the denoising loop, ms_per_image text + loop +
    decode) and the steady state: the batches after the first (which holds warm-up and compilation)."""
    per = (lambda sec: 1000.0 * sec / n) if n else (lambda sec: None)
    total_s = report["text_s"] + report["sample_s"] + report["decode_s"]
    rest = report["batches"][1:]
    n_rest = sum(b["images"] for b in rest)
    rest_s = sum(b["text_s"] + b["sample_s"] + b["decode_s"] for b in rest)
    return {"ms_text": per(report["text_s"]), "ms_loop": per(report["sample_s"]), "ms_decode": per(report["decode_s"]),
            "ms_per_image": per(total_s), "images_per_s": n / total_s if n and total_s > 0 else None,
            "ms_per_image_steady": 1000.0 * rest_s / n_rest if n_rest else None,
            "ms_loop_steady": 1000.0 * sum(b["sample_s"] for b in rest) / n_rest if n_rest else None,
            "images_per_s_steady": n_rest / rest_s if n_rest and rest_s > 0 else None}


def check_res(res: Optional[int], dit_dir: Optional[str]) -> None:
    """Refuse, before any model is loaded, a --res the adapted DiT in `dit_dir` cannot take: not a whole number of
    tokens (its facts' s * f * p pixels), naming the nearest sizes it can. Any such size works for every backend
    (LightningDiT computes its position tables for the grid it is given). Nothing to check without a --res or
    readable facts (the loader then says what is wrong)."""
    import json

    from .dit.backend import FACTS_FILE

    if res is None or not dit_dir:
        return
    try:
        facts = json.loads((Path(dit_dir) / FACTS_FILE).read_text())
        unit = int(facts["granularity"]) * int(facts["patch_size"])
    except (OSError, ValueError, TypeError, KeyError):
        return
    if res <= 0 or res % unit:
        below, above = (res // unit) * unit, (res // unit + 1) * unit
        near = f"{below} or {above}" if below > 0 else f"{above}"
        raise DavaeError(f"{res}: must be a positive multiple of {unit} for this model (pixels per token), e.g. "
                         f"{near}", param="res")


def generate(preset: Preset, s: GenerateSettings, *, vae_dir: Optional[str] = None, dit_dir: Optional[str] = None,
             base_pipeline: Optional[str] = None, native: bool = False, use_t5: bool = True,
             random_weights: bool = False, progress: Optional[Callable[[int, int], None]] = None,
             on_message: Callable[[str], None] = lambda t: None) -> dict:
    """Generate `s`'s jobs into `s.out_dir`; returns what was written and the timings."""
    from accelerate import PartialState

    from .devices import resolve_device, resolve_dtype

    state = PartialState()
    device = resolve_device(s.device, default=state.device)
    dtype = resolve_dtype(s.dtype, device)
    for name in ("num_images", "batch_size"):
        if getattr(s, name) < 1:
            raise DavaeError("must be at least 1", param=name)
    check_sampling(s.steps, s.shift, None if isinstance(s.guidance_interval, str) else s.guidance_interval, s.sampler)
    jobs = make_jobs(s)
    if not (native or random_weights):
        check_res(s.res, dit_dir)
    t0 = time.perf_counter()
    model, cond_fn, s = load_model(preset, s, vae_dir=vae_dir, dit_dir=dit_dir, base_pipeline=base_pipeline,
                                   native=native, use_t5=use_t5, random_weights=random_weights, device=device,
                                   dtype=dtype, on_message=on_message)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if model.conditioning == "prompt" and s.class_ids:
        raise DavaeError("is for class-conditional models; this one takes prompts", param="class_id")
    if model.conditioning == "class" and s.prompts:
        raise DavaeError("this model is class-conditional: use --class-id, not prompts")
    load_s = time.perf_counter() - t0
    report = run_generation(model, s, cond_fn, jobs, rank=state.process_index, world=state.num_processes,
                            device=device, dtype=dtype, progress=progress)
    state.wait_for_everyone()
    out_dir = Path(s.out_dir)
    if s.grid and state.is_main_process:
        write_grid([out_dir / f"{j.stem}.png" for j in jobs if (out_dir / f"{j.stem}.png").exists()], grid_path(out_dir))
        report["grid"] = str(grid_path(out_dir))
    n = len(report["written"])
    report.update(timing_report(report, n))
    report.update(peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                  compile=s.compile and s.compile_mode,
                  compile_included=bool(s.compile and n),  # compilation is inside the first batch's ms_loop
                  mode=model.name, res=s.res, steps=s.steps, guidance=s.guidance,
                  guidance_interval=s.guidance_interval, sampler=s.sampler, device=str(device),
                  dtype=str(dtype).replace("torch.", ""), load_s=load_s,
                  s_per_image=(report["sample_s"] + report["decode_s"]) / n if n else None,
                  tokens=(s.res // model.granularity // model.patch_size) ** 2)
    return report


def load_model(preset: Preset, s: GenerateSettings, *, vae_dir: Optional[str] = None, dit_dir: Optional[str] = None,
               base_pipeline: Optional[str] = None, native: bool = False, use_t5: bool = True,
               random_weights: bool = False, device, dtype,
               on_message: Callable[[str], None] = lambda t: None) -> tuple[SamplingModel, CondFn, GenerateSettings]:
    """(model, cond_fn, settings) for `s`: an adapted DiT with its DA-VAE, the native model, or random weights
    (then `torch.compile`d with `s.compile`); the settings returned are `s` completed from the model's recipe
    and resolution (`s` itself is not changed)."""
    negative = s.negative_prompt if s.negative_prompt is not None else preset.sample.negative_prompt
    res = s.res
    if random_weights:
        for name, given in (("vae", vae_dir), ("dit", dit_dir), ("base_pipeline", base_pipeline)):
            if given:
                raise DavaeError("cannot be combined with --random-weights (which builds every model itself)", param=name)
        model, cond_fn = load_random(preset, native=native, use_t5=use_t5, negative=negative, device=device, dtype=dtype)
        res = res if res is not None else preset.adapt_dit.resolution
    elif native:
        model, cond_fn = load_native(preset, spec=base_pipeline or preset.dit.pretrained, vae_dir=vae_dir, res=res,
                                     shift=s.shift, use_t5=use_t5, negative=negative, device=device, dtype=dtype,
                                     on_message=on_message)
    else:
        model, cond_fn = load_adapted(preset, vae_dir, dit_dir, base_pipeline=base_pipeline, use_t5=use_t5,
                                      negative_prompt=s.negative_prompt, device=device, dtype=dtype)
        res = res if res is not None else int(model.facts["resolution"])
    s = with_recipe(s, model.recipe, res=res)  # --shift with a dynamic-shift scheduler: refused by sampling_grid
    if s.compile:
        model.dit = torch.compile(model.dit, mode=s.compile_mode, dynamic=False)
        on_message("compiling the DiT on its first use: the first batch's time includes the compilation")
    return model, cond_fn, s
