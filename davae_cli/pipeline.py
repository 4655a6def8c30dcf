"""`DAVAEPipeline`: generate and upscale from Python, in diffusers' conventions, and what the job modules share.

    from davae_cli import DAVAEPipeline
    pipe = DAVAEPipeline.from_pretrained("runs/dit/final").to("cuda")       # finds its DA-VAE
    image = pipe(prompt="a lighthouse at dusk", num_inference_steps=30).images[0]
    bigger = pipe.upscale(image).images[0]                                  # the base held, the detail generated

The pipeline holds one loaded model (an adapted DiT with its DA-VAE, or with `native=True` the base model) and
samples with the same functions `davae generate` / `davae upscale` / `davae synth` call (`sample_batch`,
`upscale_batch`, the settings completed from the model's recipe by `load_model`): one path, so the pipeline's
images equal the commands' for the same seeds. Seeds as in diffusers: a list of CPU generators
`[torch.Generator().manual_seed(S + k) for k in range(n)]` draws exactly the noise of `--seed S --num-images n`.

This module stands below the job modules (generate.py, upscale.py, synth.py import it; it imports none of them).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from . import data as D
from . import flow
from . import latents as L
from .config_schema import Preset
from .errors import DavaeError
from .images import decode_images
from .models import CondFn, find_davae, load_adapted, load_native, load_random  # noqa: F401
from .sampling import (SamplingModel, check_token_grid, guided_velocity, initial_noise, noise_from, sample_latents,
                       timed)


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
    generator: Optional[torch.Generator] = None  # draws the noise instead of a fresh one seeded with `seed`

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


def job_noise(batch: list[Job], c: int, d: int, h: int, w: int) -> torch.Tensor:
    """(B, C + D, h, w) float32 on the CPU: each job's noise from its generator, else from a fresh CPU generator
    seeded with its seed (the same draws: `torch.Generator().manual_seed(S)` gives seed S's noise)."""
    return torch.cat([noise_from(j.generator, c, d, h, w) if j.generator is not None else initial_noise(j.seed, c, d, h, w)
                      for j in batch])


def with_generators(jobs: list[Job], generator) -> list[Job]:
    """`jobs` drawing their noise from `generator` (one per job; a single one for a single job), as diffusers takes
    them; each job's seed becomes its generator's initial seed. None: the jobs as they are."""
    if generator is None:
        return jobs
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if len(gens) != len(jobs):
        raise DavaeError(f"{len(gens)} generators for {len(jobs)} images: give one per image", param="generator")
    return [dataclasses.replace(j, seed=g.initial_seed(), generator=g) for j, g in zip(jobs, gens)]


def encode_base_images(vae, arrays: list, size: tuple[int, int], device) -> torch.Tensor:
    """(H, W, 3) uint8 images -> z_base (B, C, h, w) float32 on `device`: each resized and cropped to the base
    size (`prepare_base_image`, the DA-VAE's own downsampling), then encoded by the frozen base VAE."""
    x_base = torch.stack([prepare_base_image(a, size, vae.config.base_resize) for a in arrays]).to(device)
    with torch.inference_mode():
        return vae.encode_base_image(x_base).float()


def upscale_sigmas(model: SamplingModel, steps: int, shift: Optional[float], size: tuple[int, int],
                   unit: int) -> torch.Tensor:
    """The sigma grid for a base image of `size` (`unit` base pixels per token side): the family's grid at that
    token count, with `shift` or the model's."""
    check_token_grid(model, size[0] // unit, size[1] // unit)
    return model.backend.sigma_grid(steps, shift if shift is not None else model.shift, model.scheduler_config,
                                    (size[0] // unit) * (size[1] // unit))


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
    noise = job_noise(batch, model.base_channels, model.detail_channels, side, side)
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




def load_model(preset: Preset, s: GenerateSettings, *, vae_dir: Optional[str] = None, dit_dir: Optional[str] = None,
               base_pipeline: Optional[str] = None, native: bool = False, use_t5: bool = True,
               random_weights: bool = False, device, dtype, base_vae: Optional[str] = None,
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
                                      negative_prompt=s.negative_prompt, device=device, dtype=dtype,
                                      base_vae=base_vae)
        res = res if res is not None else int(model.facts["resolution"])
    s = with_recipe(s, model.recipe, res=res)  # --shift with a dynamic-shift scheduler: refused by sampling_grid
    if s.compile:
        model.dit = torch.compile(model.dit, mode=s.compile_mode, dynamic=False)
        on_message("compiling the DiT on its first use: the first batch's time includes the compilation")
    return model, cond_fn, s


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




def upscale_batch(model, cond_fn, batch: list[Job], z_base: torch.Tensor, sigmas, s, device,
                  dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """z_base (B, C, h, w) float32 on `device` -> (images (B, 3, H, W), final latents (B, C+D, h, w),
    {text_s, sample_s, decode_s}): the base channels held to z_base until sigma = `s.strength` (`s`: the
    guidance, sampler, guidance_interval, strength and tile to use)."""
    c, d = model.base_channels, model.detail_channels
    clock = timed(device)
    (uncond, cond), text_s = clock(lambda: cond_fn(batch))
    side_h, side_w = z_base.shape[-2:]
    noise = job_noise(batch, c, d, side_h, side_w).to(device)  # (B, C+D, h, w)
    velocity = guided_velocity(model, s.guidance, uncond, cond, len(batch), device, dtype)
    hold = flow.hold_channels(z_base, noise[:, :c], c, until=s.strength)
    lat, sample_s = clock(lambda: sample_latents(velocity, noise, sigmas, sampler=s.sampler,
                                                 guidance_interval=s.guidance_interval, constrain=hold))
    with torch.inference_mode():
        out, decode_s = clock(lambda: decode_images(model, lat, s.tile))
    return out, lat, {"text_s": text_s, "sample_s": sample_s, "decode_s": decode_s}


# ------------------------------------------------------------------------------------------------- the pipeline
@dataclass
class DAVAEPipelineOutput:
    """`images`: PIL images (`output_type="pil"`), a (B, 3, H, W) tensor in [0, 1] ("pt") or a (B, H, W, 3)
    uint8 array ("np"); `latents`: the final latents (B, C + D, h, w) in the DiT's space."""

    images: object
    latents: torch.Tensor


def _facts(path: Path) -> dict:
    from .dit.backend import FACTS_FILE

    for name in (FACTS_FILE, "davae_native.json"):
        if (path / name).is_file():
            try:
                return json.loads((path / name).read_text())
            except ValueError:
                raise DavaeError(f"{path / name}: not valid JSON") from None
    return {}


def _to_images(x: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [-1, 1] -> what `output_type` asks for, quantised exactly as the commands' PNGs."""
    arr = np.stack([D.to_uint8(img) for img in x])  # (B, H, W, 3) uint8, as the PNGs are written
    if output_type == "pt":
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(a) for a in arr]
    raise DavaeError(f"{output_type!r}: must be pil, np or pt", param="output_type")


class DAVAEPipeline:
    """An adapted DiT with its DA-VAE (or, `native=True`, the base model), sampled as `davae generate` and
    `davae upscale` sample it. Build it with `from_pretrained`; see the module doc."""

    def __init__(self, preset: Preset, *, dit: Optional[str], vae: Optional[str], native: bool = False,
                 base_vae: Optional[str] = None, base_pipeline: Optional[str] = None, use_t5: bool = True,
                 torch_dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                 res: Optional[int] = None):
        self.preset, self.dit_dir, self.vae_dir, self.native = preset, dit, vae, native
        self.base_vae, self.base_pipeline, self.use_t5 = base_vae, base_pipeline, use_t5
        self.dtype = torch_dtype or torch.float32
        self.device = torch.device(device)
        self.res = res  # the default resolution (None: the adapted model's)
        self.model: Optional[SamplingModel] = None
        self._cond: Optional[CondFn] = None
        self._settings: Optional[GenerateSettings] = None
        self._load()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, vae=None, base_vae=None, torch_dtype=None, *,
                        native: bool = False, preset: Optional[Union[str, Preset]] = None,
                        base_pipeline: Optional[str] = None, use_t5: bool = True) -> "DAVAEPipeline":
        """An adapted DiT folder (`adapt-dit`'s RUN/final; its DA-VAE found as `find_davae` says unless `vae`
        is given), or with `native=True` the base model (a `train-dit` folder, a pipeline folder or hub id;
        then `vae` is the DA-VAE whose base VAE decodes a LightningDiT). The preset is the one the folder
        records unless given. Loads on the CPU; `.to(device)` moves it."""
        from .config import load_preset

        path = Path(str(pretrained_model_name_or_path))
        facts = _facts(path) if path.is_dir() else {}
        if preset is None:
            if not facts.get("preset"):
                raise DavaeError(f"{path}: records no preset; pass preset=", param="preset")
            preset = facts["preset"]
        preset = load_preset(preset) if isinstance(preset, str) else preset
        if native:  # sampled by default at the resolution it was trained at (a checkpoint file: the preset's base)
            res = facts.get("resolution") or preset.adapt_dit.resolution // preset.vae.scale
            return cls(preset, dit=None, vae=str(vae) if vae else facts.get("davae"), native=True,
                       base_pipeline=str(path), use_t5=use_t5, torch_dtype=torch_dtype, res=int(res))
        vae = Path(str(vae)) if vae is not None else find_davae(path)
        return cls(preset, dit=str(path), vae=str(vae), base_vae=base_vae, base_pipeline=base_pipeline,
                   use_t5=use_t5, torch_dtype=torch_dtype)

    def _load(self) -> None:
        s = GenerateSettings(out_dir=Path("."), res=self.res)
        self.model, self._cond, self._settings = load_model(
            self.preset, s, vae_dir=self.vae_dir, dit_dir=self.dit_dir, base_pipeline=self.base_pipeline,
            native=self.native, use_t5=self.use_t5, device=self.device, dtype=self.dtype, base_vae=self.base_vae)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "DAVAEPipeline":
        """On `device` (and in `dtype`): the folders are loaded again there, text encoders included."""
        device = torch.device(device) if device is not None else self.device
        if device != self.device or (dtype is not None and dtype != self.dtype):
            self.device, self.dtype = device, dtype or self.dtype
            self._load()
        return self

    # ------------------------------------------------------------------------------------------- jobs
    def _jobs(self, n: int, prompts: list, classes: list, generator, seed: int) -> list[Job]:
        s = dataclasses.replace(self._settings, prompts=prompts, class_ids=classes, num_images=n, seed=seed)
        return with_generators(make_jobs(s), generator)

    def _conditions(self, prompt, class_labels) -> tuple[list, list]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        classes = [class_labels] if isinstance(class_labels, int) else list(class_labels or [])
        if self.model.conditioning == "class" and prompts:
            raise DavaeError("this model is class-conditional: pass class_labels, not prompt", param="prompt")
        if self.model.conditioning == "prompt" and classes:
            raise DavaeError("is for class-conditional models; this one takes prompts", param="class_labels")
        if not prompts and not classes:
            raise DavaeError("nothing to generate: pass prompt (or class_labels for a class-conditional model)")
        return prompts, classes

    def _sampler(self, **given) -> GenerateSettings:
        """The settings of one call: the given values, the rest from the model's recipe (as the commands do)."""
        interval = given.pop("guidance_interval", RECIPE)
        s = dataclasses.replace(self._settings, **{k: v for k, v in given.items() if v is not None})
        if not (isinstance(interval, str) and interval == RECIPE):
            s = dataclasses.replace(s, guidance_interval=interval)
        return s

    def __call__(self, prompt=None, class_labels=None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 negative_prompt: Optional[str] = None, generator=None, output_type: str = "pil", *,
                 num_images_per_prompt: int = 1, seed: int = 0, guidance_interval=RECIPE,
                 sampler: Optional[str] = None, shift: Optional[float] = None, tile: Optional[int] = None,
                 batch_size: int = 1) -> DAVAEPipelineOutput:
        """Generate: `num_images_per_prompt` images per prompt (or class label), image k of each with
        `generator[k]` (a list, one per image; one generator for one image) or, without generators, seed
        `seed + k` as `davae generate --seed`. `height`/`width`: square (default: the model's resolution).
        `batch_size`: images per forward pass; 1 (as `davae generate`) gives its pixels exactly, larger batches
        are faster and equal up to float round-off."""
        from .sampling import sampling_grid

        if height is not None and width is not None and height != width:
            raise DavaeError(f"{height}x{width}: generation is square here (height = width); `upscale` takes any shape",
                             param="width")
        res = height or width or self._settings.res
        negative = negative_prompt if negative_prompt is not None else self._settings.negative_prompt
        if negative != self._settings.negative_prompt and self.model.conditioning == "prompt":
            raise DavaeError("is fixed when the pipeline loads (its text encoder's unconditional embedding): "
                             "load it again with the negative prompt in the preset", param="negative_prompt")
        s = self._sampler(res=res, steps=num_inference_steps, guidance=guidance_scale, sampler=sampler, shift=shift,
                          tile=tile, guidance_interval=guidance_interval)
        prompts, classes = self._conditions(prompt, class_labels)
        jobs = self._jobs(num_images_per_prompt, prompts, classes, generator, seed)
        side, _, sigmas = sampling_grid(self.model, s.res, s.steps, s.shift)
        images, lats = [], []
        step = max(1, int(batch_size))
        for k in range(0, len(jobs), step):
            img, lat, _ = sample_batch(self.model, s, self._cond, jobs[k : k + step], sigmas, side,
                                       device=self.device, dtype=self.dtype, tile=s.tile)
            images.append(img.cpu())
            lats.append(lat.cpu())
        return DAVAEPipelineOutput(_to_images(torch.cat(images), output_type), torch.cat(lats))

    def upscale(self, image, strength: float = 0.0, prompt=None, class_labels=None, res: Optional[int] = None,
                num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                generator=None, output_type: str = "pil", *, seed: int = 0, guidance_interval=RECIPE,
                sampler: Optional[str] = None, shift: Optional[float] = None,
                tile: Optional[int] = None) -> DAVAEPipelineOutput:
        """Each image (PIL, an (H, W, 3) uint8 array, or a list of them) to short side `res` (default: the model's
        resolution): its base image encoded and held (to sigma = `strength`), the detail generated, as `davae
        upscale` does; image i with `generator[i]` or seed `seed + i`."""
        from .sampling import check_shift

        if self.native:
            raise DavaeError("needs the adapted model (native=False)", param="upscale")
        if not 0.0 <= strength <= 1.0:
            raise DavaeError(f"{strength} is outside [0, 1]", param="strength")
        images = image if isinstance(image, (list, tuple)) else [image]
        prompts, classes = self._conditions(prompt, class_labels)
        n = len(images)
        conds = (prompts * n if len(prompts) == 1 else prompts) or [None] * n
        labels = (classes * n if len(classes) == 1 else classes) or [None] * n
        if len(conds) != n or len(labels) != n:
            raise DavaeError(f"{n} images: give one prompt/label, or one per image")
        jobs = [Job(i, seed + i, conds[i], labels[i]) for i in range(n)]
        jobs = with_generators(jobs, generator)
        s = self._sampler(steps=num_inference_steps, guidance=guidance_scale, sampler=sampler, shift=shift, tile=tile,
                          guidance_interval=guidance_interval)
        s = _WithStrength(s, float(strength))
        check_shift(self.model, shift)
        vae = self.model.parts["davae"]
        scale, unit = int(vae.config.scale), int(vae.config.downsample) * self.model.patch_size
        res = res or int(self.model.facts["resolution"])
        outs, lats = [], []
        for j, img in zip(jobs, images):
            arr = np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img)
            size = base_size(arr.shape[0], arr.shape[1], res, scale, unit)
            z_base = encode_base_images(vae, [arr], size, self.device)
            sigmas = upscale_sigmas(self.model, s.steps, s.shift, size, unit)
            out, lat, _ = upscale_batch(self.model, self._cond, [j], z_base, sigmas, s, self.device, self.dtype)
            outs.append(out.cpu())
            lats.append(lat.cpu())
        if len({o.shape for o in outs}) == 1:
            return DAVAEPipelineOutput(_to_images(torch.cat(outs), output_type), torch.cat(lats))
        return DAVAEPipelineOutput([_to_images(o, output_type)[0] for o in outs], lats)


@dataclass
class _WithStrength:
    """Sampler settings with the strength `upscale_batch` reads (the generate settings have none)."""

    s: GenerateSettings
    strength: float

    def __getattr__(self, name):
        return getattr(self.s, name)
