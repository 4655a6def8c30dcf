"""`davae generate`: jobs (prompts or classes x images) sampled with an adapted DiT and its DA-VAE, or with
the unmodified base model (`native`) under the same sampler settings, for side-by-side comparison.

Three parts: the sampling loop (`sampling.py`: latents in, latents out), the model loading the family's
backend does (`models.py`), and images out (`images.py`: decode, PNG with metadata, grid). This module joins
them: settings completed from the model's recipe (steps, guidance, guidance interval, sampler, negative
prompt; from the adapted model, or the preset for `native`) without changing the caller's, the jobs of this
process, resumable (an existing PNG is skipped), and the timings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import check_sampling
from .config_schema import Preset
from .errors import DavaeError
from .images import grid_path, write_grid, write_sample
from .models import CondFn
from .pipeline import (RECIPE, GenerateSettings, Job, load_model, make_jobs, native_base_space,  # noqa: F401
                       sample_batch)
from .sampling import SamplingModel, sampling_grid


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
    """Refuse, before any model is loaded, a --res the adapted DiT in `dit_dir` cannot take: larger than its
    family's table of positions reaches (`Backend.max_token_grid`: SD3's pos_embed_max_size, Z-Image's RoPE
    axes), naming the largest size it can make; or not a whole number of tokens (its facts' s * f * p pixels),
    naming the nearest sizes it can. Read from the folder's facts and config.json alone. Nothing to check
    without a --res or readable facts (the loader then says what is wrong)."""
    from .dit.backend import read_facts, read_max_token_grid

    if res is None or not dit_dir:
        return
    try:
        facts = read_facts(Path(dit_dir))
        unit = int(facts["granularity"]) * int(facts["patch_size"])
    except (DavaeError, OSError, ValueError, TypeError, KeyError):
        return
    check_token_limit(res, unit, read_max_token_grid(Path(dit_dir)))
    if res <= 0 or res % unit:
        below, above = (res // unit) * unit, (res // unit + 1) * unit
        near = f"{below} or {above}" if below > 0 else f"{above}"
        raise DavaeError(f"{res}: must be a positive multiple of {unit} for this model (pixels per token), e.g. "
                         f"{near}", param="res")


def check_token_limit(res: int, unit: int, limit: Optional[tuple[int, str]]) -> None:
    """One line when a square `res` (`unit` pixels a token side) has more tokens a side than `limit` allows
    ((tokens, phrase) of `dit.backend.read_max_token_grid`; None: no limit)."""
    if limit is not None and res > limit[0] * unit:
        side, phrase = limit
        raise DavaeError(f"{res}: {phrase}; the largest size it can make is {side * unit} ({side} tokens of "
                         f"{unit} px)", param="res")


def check_native_res(backend: str, res: Optional[int], spec: Optional[str]) -> None:
    """`generate --native` from a local pipeline folder: a --res beyond its transformer's table of positions,
    refused before loading (its transformer/ and vae/ config.json read). A hub id, a single file or a folder
    without those files is not checked here (the forward then says it)."""
    import json

    from .dit.backend import backend_class
    from .vae.base import config_downsample_factor

    if res is None or not spec or not Path(spec).is_dir():
        return
    try:
        cls = backend_class(backend)
        config = json.loads((Path(spec) / "transformer" / "config.json").read_text())
        vae = json.loads((Path(spec) / "vae" / "config.json").read_text())
        side = cls.max_token_grid(config)
        if side is None:
            return
        unit = config_downsample_factor(vae) * cls.config_token_side(config)
    except (DavaeError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return
    check_token_limit(res, unit, (side, cls.grid_limit_phrase(side)))


def generate(preset: Preset, s: GenerateSettings, *, vae_dir: Optional[str] = None, dit_dir: Optional[str] = None,
             base_pipeline: Optional[str] = None, native: bool = False, use_t5: bool = True,
             random_weights: bool = False, progress: Optional[Callable[[int, int], None]] = None,
             on_message: Callable[[str], None] = lambda t: None) -> dict:
    """Generate `s`'s jobs into `s.out_dir`; returns what was written and the timings."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .devices import resolve_device, resolve_dtype

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # a CPU launch: every process its share
    device = resolve_device(s.device, default=state.device)
    dtype = resolve_dtype(s.dtype, device)
    for name in ("num_images", "batch_size"):
        if getattr(s, name) < 1:
            raise DavaeError("must be at least 1", param=name)
    check_sampling(s.steps, s.shift, None if isinstance(s.guidance_interval, str) else s.guidance_interval, s.sampler)
    jobs = make_jobs(s)
    if native and not random_weights:
        check_native_res(preset.dit.backend, s.res, base_pipeline or preset.dit.pretrained)
    elif not (native or random_weights):
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
