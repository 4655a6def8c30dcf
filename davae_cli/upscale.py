"""`upscale`: an image to s x its base resolution with an adapted DiT, for the token cost of the base resolution.

For each input image (any size) and an output short side R:

1. The base image: the input resized (antialiased bicubic in float, the DA-VAE's own downsampling) so that
   it covers R/s on its short side, centre-cropped to a multiple of f*p on each side. An input already at
   that size is used as it is (no resampling), so a native R/2 generation goes in untouched.
2. z_base = the DA-VAE's base channels of that image: `DetailAlignedVAE.encode_base_image` (the frozen
   base VAE's posterior mean, transformed as the DiT expects). For an image X at R whose base image is
   downsample(X), these are exactly the base channels `encode(X)` gives.
3. The adapted DiT samples the full latent (C + D channels) from noise on its own sigma grid while the base
   channels are held on the straight path of z_base: before every velocity evaluation they are replaced by
   (1 - sigma) z_base + sigma eps_base, with the eps_base the noise started from (`flow.hold_channels`).
   This is the "replacement" conditioning of inpainting with flow models; it needs no retraining because
   the adapted DiT was trained on exactly such noised base channels. With `strength` = 0 the base channels
   are held to the end, so the result's base channels equal z_base exactly and only the detail channels are
   generated; with `strength` > 0 the base channels follow the path only down to sigma = strength and are
   regenerated below it (SDEdit-style: the larger, the more the composition may change).
4. The DA-VAE decodes the latent at R.

Noise: per image a CPU generator seeded with `seed + index`, base channels first (as `generate`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import data as D
from . import flow
from . import latents as L
from .config import Preset, check_sampling
from .errors import DavaeError
from .generate import RECIPE, Job, with_recipe
from .images import decode_images, write_sample
from .models import load_adapted
from .sampling import check_shift, guided_velocity, initial_noise, sample_latents, timed


@dataclass
class UpscaleSettings:
    out_dir: Path
    res: Optional[int] = None  # the output's short side; default: the adapted model's resolution
    strength: float = 0.0  # 0: base channels kept exactly; > 0: regenerated below sigma = strength
    prompt: Optional[str] = None  # prompt models: one prompt for every image ("" allowed)
    class_id: Optional[int] = None  # class models: one class for every image (None: the null class)
    # class models: each image's class is its folder's index among the sorted folder names of the inputs
    # (the rule train-dit labels its data by)
    class_from_folders: bool = False
    negative_prompt: Optional[str] = None  # None: the recipe's (usually "")
    # None (RECIPE for the interval): the adapted model's sampling recipe, as `generate`
    steps: Optional[int] = None
    guidance: Optional[float] = None
    guidance_interval: object = RECIPE
    sampler: Optional[str] = None
    shift: Optional[float] = None
    seed: int = 0
    batch_size: int = 1
    overwrite: bool = False
    save_latents: bool = False
    tile: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    compile: bool = False
    compile_mode: str = "default"


def base_size(h: int, w: int, res: int, scale: int, unit: int) -> tuple[int, int]:
    """The base image's (height, width) for an input of h x w and an output short side `res`: the short side
    res / s, the long side in proportion, each rounded down to a multiple of `unit` (= f * p)."""
    short = res // scale
    if short < unit:
        raise DavaeError(f"{res} gives a base image of {short} px, smaller than one DiT token ({unit} px at 1/{scale})",
                         param="res")
    k = short / min(h, w)
    bh, bw = (short, round(w * k)) if h <= w else (round(h * k), short)
    return (bh // unit) * unit, (bw // unit) * unit


def prepare_base_image(arr, size: tuple[int, int], resize: str = "antialias") -> torch.Tensor:
    """(H, W, 3) uint8 -> the base image (3, bh, bw) in [-1, 1]: resized in float with bicubic as the DA-VAE's
    `downsample` does (`resize`: its `vae.base_resize`) to cover `size`, then centre-cropped; an input already
    of `size` is not resampled."""
    x = D.to_tensor(arr)[None]  # (1, 3, H, W)
    h, w = x.shape[-2:]
    bh, bw = size
    if (h, w) != (bh, bw):
        k = max(bh / h, bw / w)
        nh, nw = max(bh, round(h * k)), max(bw, round(w * k))
        if (nh, nw) != (h, w):
            x = L.bicubic(x, resize, size=(nh, nw))
        y0, x0 = (x.shape[-2] - bh) // 2, (x.shape[-1] - bw) // 2
        x = x[:, :, y0 : y0 + bh, x0 : x0 + bw]
    return x[0]


def _inputs(inputs: list[str]) -> D.ImageSource:
    src = D.list_images(inputs, missing_ok=True)
    if src.skipped:
        path, why = src.skipped[0]
        more = f" (and {len(src.skipped) - 1} more)" if len(src.skipped) > 1 else ""
        raise DavaeError(f"{path}: {why if why == 'not found' else 'unreadable image: ' + why}{more}; nothing written")
    if not len(src):
        raise DavaeError(f"no images in {', '.join(map(str, inputs))}")
    names = [src.name(i) for i in range(len(src))]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DavaeError(f"two inputs would write the same output {sorted(dup)[0]}.png (same file stem)")
    return src


def _check_settings(s: UpscaleSettings) -> None:
    """The settings' bounds, before anything is loaded."""
    if not 0.0 <= s.strength <= 1.0:
        raise DavaeError(f"{s.strength} is outside [0, 1]", param="strength")
    if s.batch_size < 1:
        raise DavaeError("must be at least 1", param="batch_size")
    check_sampling(s.steps, s.shift, None if isinstance(s.guidance_interval, str) else s.guidance_interval, s.sampler)
    if s.class_from_folders and s.class_id is not None:
        raise DavaeError("give either --class-id or --class-from-folders", param="class_id")


def _jobs(model, s: UpscaleSettings, src) -> list[Job]:
    """One job per input: the prompt for a text-to-image model; for a class model the class given, or each
    input's folder (sorted folder names are the classes, as train-dit labels them), or the null class."""
    if model.conditioning == "class" and s.prompt is not None:
        raise DavaeError("this model is class-conditional: use --class-id, not --prompt", param="prompt")
    if model.conditioning == "prompt" and (s.class_id is not None or s.class_from_folders):
        raise DavaeError("is for class-conditional models; this one takes a prompt",
                         param="class_from_folders" if s.class_from_folders else "class_id")
    labels = [s.class_id] * len(src)
    if s.class_from_folders:
        folders = sorted({Path(str(it)).parent.name for it in src.items})
        num = int(model.facts["conditioning"]["num_classes"])
        if len(folders) > num:
            raise DavaeError(f"the inputs lie in {len(folders)} folders, the model has {num} classes",
                             param="class_from_folders")
        labels = [folders.index(Path(str(it)).parent.name) for it in src.items]
    prompt = model.conditioning == "prompt"
    return [Job(i, s.seed + i, (s.prompt or "") if prompt else None, None if prompt else labels[i])
            for i in range(len(src))]


def _upscale_batch(model, cond_fn, batch: list[Job], images: torch.Tensor, sigmas, s: UpscaleSettings, device,
                   dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """images (B, 3, H/s, W/s) in [-1, 1] at the base size -> (images (B, 3, H, W), final latents
    (B, C+D, h, w), {encode_s, text_s, sample_s, decode_s}): the base channels held to the encoded input."""
    vae, c, d = model.parts["davae"], model.base_channels, model.detail_channels
    clock = timed(device)
    with torch.inference_mode():
        z_base, encode_s = clock(lambda: vae.encode_base_image(images.to(device)).float())  # (B, C, h, w)
    (uncond, cond), text_s = clock(lambda: cond_fn(batch))
    side_h, side_w = z_base.shape[-2:]
    noise = torch.cat([initial_noise(j.seed, c, d, side_h, side_w) for j in batch]).to(device)  # (B, C+D, h, w)
    velocity = guided_velocity(model, s.guidance, uncond, cond, len(batch), device, dtype)
    hold = flow.hold_channels(z_base, noise[:, :c], c, until=s.strength)
    lat, sample_s = clock(lambda: sample_latents(velocity, noise, sigmas, sampler=s.sampler,
                                                 guidance_interval=s.guidance_interval, constrain=hold))
    with torch.inference_mode():
        out, decode_s = clock(lambda: decode_images(model, lat, s.tile))
    return out, lat, {"encode_s": encode_s, "text_s": text_s, "sample_s": sample_s, "decode_s": decode_s}


def upscale(preset: Preset, s: UpscaleSettings, inputs: list[str], *, vae_dir: str, dit_dir: str,
            base_pipeline: Optional[str] = None, use_t5: bool = True,
            progress: Optional[Callable[[int, int], None]] = None,
            on_message: Callable[[str], None] = lambda t: None) -> dict:
    """Upscale every image of `inputs` into `s.out_dir/<stem>.png`; returns what was written and the timings.
    Existing outputs are kept (resumable) unless `s.overwrite`."""
    from .devices import resolve_device, resolve_dtype

    _check_settings(s)
    src = _inputs(inputs)
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    t0 = time.perf_counter()
    model, cond_fn = load_adapted(preset, vae_dir, dit_dir, base_pipeline=base_pipeline, use_t5=use_t5,
                                  negative_prompt=s.negative_prompt, device=device, dtype=dtype)
    jobs = _jobs(model, s, src)
    s = with_recipe(s, model.recipe)  # a completed copy: the caller's settings stay as given
    check_shift(model, s.shift)
    res = s.res if s.res is not None else int(model.facts["resolution"])
    vae = model.parts["davae"]
    scale, f = int(vae.config.scale), vae.config.downsample
    shift = s.shift if s.shift is not None else model.shift
    if s.compile:
        model.dit = torch.compile(model.dit, mode=s.compile_mode, dynamic=False)
        on_message("compiling the DiT on its first use: the first batch's time includes the compilation")
    load_s = time.perf_counter() - t0

    out_dir = Path(s.out_dir)
    todo = [i for i in range(len(src)) if s.overwrite or not (out_dir / f"{src.name(i)}.png").exists()]
    # group by base size so that each batch is one tensor; sizes come from the headers, images are read per batch
    groups: dict[tuple[int, int], list[int]] = {}
    for i in todo:
        h, w = _image_size(src.items[i])
        groups.setdefault(base_size(h, w, res, scale, f * model.patch_size), []).append(i)
    timings = {"encode_s": 0.0, "text_s": 0.0, "sample_s": 0.0, "decode_s": 0.0}
    written, sizes, done = [], set(), len(src) - len(todo)
    if progress:
        progress(done, len(src))
    for size, members in groups.items():
        tokens = (size[0] // f // model.patch_size) * (size[1] // f // model.patch_size)  # the latent at R
        sigmas = model.backend.sigma_grid(s.steps, shift, model.scheduler_config, tokens)
        grid = [round(float(v), 8) for v in sigmas]
        sizes.add((size[0] * scale, size[1] * scale))
        for k in range(0, len(members), s.batch_size):
            idx = members[k : k + s.batch_size]
            batch = [jobs[i] for i in idx]
            t_read = time.perf_counter()
            x_base = torch.stack([prepare_base_image(D.read_image(src.items[i]), size, vae.config.base_resize)
                                  for i in idx])
            timings["encode_s"] += time.perf_counter() - t_read  # reading and resizing count as encoding
            images, lat, times = _upscale_batch(model, cond_fn, batch, x_base, sigmas, s, device, dtype)
            for key, v in times.items():
                timings[key] += v
            for i, j, img, z in zip(idx, batch, images, lat):
                meta = {"source": str(src.items[i]), "strength": s.strength, "prompt": j.prompt,
                        "negative_prompt": s.negative_prompt if j.prompt is not None else None,
                        "class_id": j.class_id, "seed": j.seed, "steps": s.steps, "guidance": s.guidance,
                        "guidance_interval": s.guidance_interval, "sampler": s.sampler, "shift": shift,
                        "sigmas": grid, "res": list(img.shape[-2:]), "base_size": list(size), "mode": "upscale",
                        **model.identity}
                written.append(write_sample(out_dir, src.name(i), img, z, meta, s.save_latents))
            done += len(idx)
            if progress:
                progress(done, len(src))
    n = len(written)
    per = (lambda sec: 1000.0 * sec / n) if n else (lambda sec: None)
    total_s = sum(timings.values())
    return {"written": written, "skipped_existing": len(src) - len(todo), "images": len(src),
            "sizes": sorted(list(v) for v in sizes), "strength": s.strength, "steps": s.steps, "guidance": s.guidance,
            "guidance_interval": s.guidance_interval, "sampler": s.sampler, "shift": shift, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "load_s": load_s, **timings,
            "ms_encode": per(timings["encode_s"]), "ms_text": per(timings["text_s"]),
            "ms_loop": per(timings["sample_s"]), "ms_decode": per(timings["decode_s"]), "ms_per_image": per(total_s),
            "images_per_s": n / total_s if n and total_s > 0 else None,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def _image_size(item) -> tuple[int, int]:
    """(height, width) from the file's header (a bundled photo is read)."""
    if isinstance(item, tuple):
        return tuple(D.read_image(item).shape[:2])
    from PIL import Image

    with Image.open(item) as im:
        return im.size[1], im.size[0]
