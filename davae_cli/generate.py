"""Text-to-image (SD3) and class-conditional (LightningDiT) generation with an adapted DiT and its DA-VAE,
or with the unmodified base model (`native`) under the same sampler settings for side-by-side comparison.

Noise: for each image, a CPU `torch.Generator` seeded with the image's seed draws the base channels first,
with exactly the shape the native model uses at half the resolution (so the native pipeline at R/2 and
the DA-VAE model at R start from the same base noise), then the detail channels. Seeds are therefore
independent of the device and of the batch size.

Sampling: Euler (or Heun) on the rectified-flow ODE (`davae_cli.flow`). SD3 models step through the sigma
grid of diffusers' FlowMatchEulerDiscreteScheduler exactly as StableDiffusion3Pipeline does (so `native`
reproduces the pipeline's own `__call__`); LightningDiT models through their official integrator's grid.
The recipe (steps, guidance, guidance interval, sampler) comes from the adapted model (the preset it was
adapted with) or, for `native`, from the preset; the shift from the adapted model, the native pipeline's
scheduler_config.json, or the preset (native LightningDiT). Every setting given in `GenerateSettings`
overrides its recipe value.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import flow
from .config import Preset, check_sampling
from .errors import DavaeError
from .latents import LatentNormalizer, atomic_write_bytes, save_latent


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


def apply_recipe(s: GenerateSettings, recipe: dict) -> None:
    """Fill the settings left unset with the recipe's values (steps, guidance, guidance_interval, sampler,
    negative prompt)."""
    if s.steps is None:
        s.steps = int(recipe["steps"])
    if s.guidance is None:
        s.guidance = float(recipe["guidance"])
    if isinstance(s.guidance_interval, str) and s.guidance_interval == RECIPE:
        gi = recipe.get("guidance_interval")
        s.guidance_interval = tuple(float(v) for v in gi) if gi else None
    if s.sampler is None:
        s.sampler = recipe.get("sampler", "euler")
    if s.negative_prompt is None:
        s.negative_prompt = recipe.get("negative_prompt") or ""


def recipe_of(preset: Preset) -> dict:
    smp = preset.sample
    return {"steps": smp.steps, "guidance": smp.guidance, "guidance_interval": smp.guidance_interval,
            "sampler": smp.sampler, "negative_prompt": smp.negative_prompt}


def make_jobs(s: GenerateSettings) -> list[Job]:
    conds: list[tuple[Optional[str], Optional[int]]] = [(p, None) for p in s.prompts] + [(None, c) for c in s.class_ids]
    if not conds:
        raise DavaeError("nothing to generate: give --prompt, --prompts FILE or --class-id")
    jobs = []
    for i, (p, c) in enumerate(conds):
        for k in range(s.num_images):
            jobs.append(Job(i * s.num_images + k, s.seed + k, p, c))
    return jobs


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped), or a JSONL with a "prompt" field per line."""
    p = Path(path)
    if not p.is_file():
        raise DavaeError(f"{path}: file not found", param="prompts")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                out.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DavaeError(f"{path}:{i}: expected a JSON object with a \"prompt\" field") from None
        else:
            out.append(line.strip())
    if not out:
        raise DavaeError(f"{path}: no prompts in the file", param="prompts")
    return out


def initial_noise(seed: int, base_channels: int, detail_channels: int, side: int,
                  width: Optional[int] = None) -> torch.Tensor:
    """(1, C + D, side, width or side) float32 on the CPU: base channels first, as the native pipeline draws them."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    w = side if width is None else width
    base = torch.randn((1, base_channels, side, w), generator=g)
    if detail_channels == 0:
        return base
    return torch.cat([base, torch.randn((1, detail_channels, side, w), generator=g)], 1)


def _blend_window(n: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    w = torch.ones(n)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if not first:
            w[:overlap] = ramp
        if not last:
            w[-overlap:] = ramp.flip(0)
    return w


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, tile: int, overlap: int,
                 scale: int) -> torch.Tensor:
    """Decode overlapping latent tiles and blend them with linear ramps over the overlap: memory bounded by
    one tile, seams hidden by the blending (the decoder's receptive field must fit the overlap to be exact)."""
    _, _, h, w = latent.shape
    if h <= tile and w <= tile:
        return decode(latent)
    stride = tile - overlap
    if stride <= 0:
        raise DavaeError(f"tile {tile} must be larger than the overlap {overlap}")

    def starts(n):
        s = list(range(0, max(n - tile, 0) + 1, stride))
        if s[-1] + tile < n:
            s.append(n - tile)
        return s

    ys, xs = starts(h), starts(w)
    out = weight = None
    for yi, y in enumerate(ys):
        for xi, x in enumerate(xs):
            th, tw = min(tile, h - y), min(tile, w - x)
            img = decode(latent[:, :, y : y + th, x : x + tw]).float()
            if out is None:
                out = torch.zeros(img.shape[0], img.shape[1], h * scale, w * scale, device=img.device)
                weight = torch.zeros(1, 1, h * scale, w * scale, device=img.device)
            wy = _blend_window(th * scale, overlap * scale, yi == 0, yi == len(ys) - 1).to(img.device)
            wx = _blend_window(tw * scale, overlap * scale, xi == 0, xi == len(xs) - 1).to(img.device)
            win = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += img * win
            weight[:, :, y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += win
    return out / weight


def _png_bytes(img: torch.Tensor, meta: dict) -> bytes:
    import io

    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    info = PngInfo()
    for k, v in meta.items():
        info.add_text(f"davae:{k}", v if isinstance(v, str) else json.dumps(v))
    info.add_text("parameters", json.dumps(meta))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_sample(out_dir: Path, stem: str, img: torch.Tensor, latent: torch.Tensor, meta: dict,
                 save_latents: bool) -> str:
    """OUT/<stem>.png with `meta` (None values dropped) as PNG text, and with `save_latents` the final latent
    (DiT space) as OUT/<stem>.safetensors; both atomic. Returns the PNG's path."""
    meta = {k: v for k, v in meta.items() if v is not None}
    if save_latents:
        save_latent(out_dir / f"{stem}.safetensors", latent.float(), {**meta, "space": "dit"})
    atomic_write_bytes(out_dir / f"{stem}.png", _png_bytes(img, meta))
    return str(out_dir / f"{stem}.png")


def grid_path(out_dir: str | Path) -> Path:
    """Where `--grid` writes: beside the sample folder (`samples/` -> `samples-grid.png`), never inside it, so
    the folder holds exactly the samples (what `eval-fid` counts)."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(f"{out_dir.name}-grid.png")


def write_grid(paths: list[Path], out: Path) -> None:
    from PIL import Image

    if not paths:
        return
    ims = [Image.open(p).convert("RGB") for p in paths]
    w, h = ims[0].size
    cols = math.ceil(math.sqrt(len(ims)))
    rows = math.ceil(len(ims) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(ims):
        grid.paste(im.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    import io

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:40]


class Model:
    """What the sampler needs from one configuration (DA-VAE or native)."""

    name: str
    base_channels: int
    detail_channels: int
    granularity: int  # pixels per latent pixel
    patch_size: int
    shift: float  # the default sampling shift (sigma convention)
    backend: str  # sd3 | lightningdit | flux: which sigma grid (dit.backend.sigma_grid)
    guidance_distilled: Optional[bool] = None  # FLUX: True = guidance is a model input (FLUX.1-dev), False = none;
    # None = classifier-free guidance with a negative branch (SD3, LightningDiT)
    scheduler_config: Optional[dict] = None  # SD3: the FlowMatchEulerDiscreteScheduler config to sample with
    recipe: dict  # steps, guidance, guidance_interval, sampler
    conditioning: str  # prompt | class
    identity: dict
    dit: torch.nn.Module
    dit_velocity: Callable  # the backend's convention: (model, x, sigma, cond) -> eps - x0

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.dit_velocity(self.dit, x, sigma, cond)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


AUTO_TILE = 64  # latent tile side used when a whole decode does not fit


def tile_overlap(tile: int) -> int:
    """The latent overlap `generate` blends adjacent tiles over: a quarter of the tile, at least 4."""
    return max(4, tile // 4)


def _decode(model: "Model", lat: torch.Tensor, tile: Optional[int]) -> torch.Tensor:
    def tiled(t):
        return torch.cat([tiled_decode(model.decode, lat[i : i + 1], t, tile_overlap(t), model.granularity)
                          for i in range(lat.shape[0])])

    if tile:
        return tiled(tile)
    try:
        return model.decode(lat)
    except torch.cuda.OutOfMemoryError:
        if tile == 0:
            raise DavaeError("the decode ran out of GPU memory; pass --tile 64 (or smaller) to decode in tiles") from None
        torch.cuda.empty_cache()
        return tiled(AUTO_TILE)


def guided_velocity(model: Model, guidance: float, uncond: dict, cond: dict, batch: int, device,
                    dtype) -> flow.Velocity:
    """The velocity the sampler integrates, in float32: classifier-free guidance v_u + g (v_c - v_u) over
    one doubled batch where guided (SD3, LightningDiT; none at g = 1), the guidance scale as a model input
    for guidance-distilled FLUX.1-dev, a single conditional forward for other FLUX models."""
    distilled = model.guidance_distilled
    if distilled is not None:  # FLUX: one forward per step, no negative branch
        use_cfg = False
        if distilled:  # FLUX.1-dev: the guidance scale is an input of the model
            cond = {**cond, "guidance": torch.full((batch,), float(guidance), device=device)}
    else:
        use_cfg = guidance != 1.0

    def velocity(x, sigma, guided):
        if use_cfg and guided:
            both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
            v_u, v_c = model.velocity(torch.cat([x, x]).to(dtype), torch.cat([sigma, sigma]), both).float().chunk(2)
            return v_u + guidance * (v_c - v_u)
        return model.velocity(x.to(dtype), sigma, cond).float()

    return velocity


def sample_batch(model: Model, s: GenerateSettings, cond_fn: Callable[[list[Job]], tuple[dict, dict]],
                 batch: list[Job], sigmas, side: int, *, device=None, dtype=torch.float32,
                 tile: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sample and decode one batch of jobs: (images (B, 3, H, W) in [-1, 1], final latents (B, C+D, h, w),
    {text_s, sample_s, decode_s})."""
    sync = torch.cuda.synchronize if torch.device(device or "cpu").type == "cuda" else (lambda: None)
    noise = torch.cat([initial_noise(j.seed, model.base_channels, model.detail_channels, side) for j in batch])
    noise = noise.to(device=device)  # the ODE state stays float32; the model runs in `dtype`
    t_text = time.perf_counter()
    uncond, cond = cond_fn(batch)
    sync()
    text_s = time.perf_counter() - t_text
    velocity = guided_velocity(model, s.guidance, uncond, cond, len(batch), device, dtype)
    t0 = time.perf_counter()
    with torch.inference_mode():
        lat = flow.sample(velocity, noise, sigmas, method=s.sampler, guidance_interval=s.guidance_interval)
        sync()
        t1 = time.perf_counter()
        images = _decode(model, lat, tile)
        sync()
    t2 = time.perf_counter()
    return images, lat, {"text_s": text_s, "sample_s": t1 - t0, "decode_s": t2 - t1}


def sampling_grid(model: Model, s: GenerateSettings) -> tuple[int, float, object]:
    """(latent side, shift, sigma grid) for `s.res` and `s.steps`: the resolution must be a whole number of
    tokens; the shift is `s.shift`, else the model's."""
    from .dit.backend import sigma_grid

    g = model.granularity * model.patch_size
    if s.res is None or s.res <= 0 or s.res % g:
        raise DavaeError(f"{s.res}: must be a positive multiple of {g} for this model (pixels per token)", param="res")
    side = s.res // model.granularity
    shift = s.shift if s.shift is not None else model.shift
    return side, shift, sigma_grid(model.backend, s.steps, shift, model.scheduler_config, (side // model.patch_size) ** 2)


def run_generation(model: Model, s: GenerateSettings, cond_fn: Callable[[list[Job]], tuple[dict, dict]],
                   jobs: list[Job], *, rank: int = 0, world: int = 1, device=None, dtype=torch.float32,
                   progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Sample and write every job of this process (`jobs[rank::world]`) whose PNG does not exist yet."""
    res = s.res
    side, shift, sigmas = sampling_grid(model, s)
    out_dir = Path(s.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = [j for j in jobs[rank::world]]
    todo = [j for j in mine if not (out_dir / f"{j.stem}.png").exists()]
    grid = [round(float(v), 8) for v in sigmas]
    written, timings = [], {"text_s": 0.0, "sample_s": 0.0, "decode_s": 0.0}
    batches: list[dict] = []  # per batch: images, text_s, sample_s, decode_s (the first includes warm-up/compile)
    tile = s.tile  # None: decode whole, and fall back to tiles if the GPU runs out of memory
    done = len(mine) - len(todo)
    if progress:
        progress(done, len(mine))
    for k in range(0, len(todo), s.batch_size):
        batch = todo[k : k + s.batch_size]
        images, lat, times = sample_batch(model, s, cond_fn, batch, sigmas, side, device=device, dtype=dtype, tile=tile)
        for key in timings:
            timings[key] += times[key]
        batches.append({"images": len(batch), **times})
        for j, img, z in zip(batch, images, lat):
            meta = {"prompt": j.prompt, "negative_prompt": s.negative_prompt if j.prompt is not None else None,
                    "class_id": j.class_id, "seed": j.seed, "steps": s.steps, "guidance": s.guidance,
                    "guidance_interval": s.guidance_interval, "sampler": s.sampler,
                    "shift": shift, "sigmas": grid, "res": res, "mode": model.name,
                    **model.identity}
            written.append(write_sample(out_dir, j.stem, img, z, meta, s.save_latents))
        done += len(batch)
        if progress:
            progress(done, len(mine))
    return {"written": written, "skipped_existing": len(mine) - len(todo), "images": len(mine), "shift": shift,
            "sigmas": grid, "batches": batches, **timings}


# ---------------------------------------------------------------------------------------------- models
def _check_fits_cpu(n_params: int, device: torch.device, what: str) -> None:
    import os

    if device.type != "cpu":
        return
    need = n_params * 4
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > 0.9 * free:
        raise DavaeError(f"{what} needs about {need / 2**30:.0f} GB in fp32 but this machine has no GPU and only "
                         f"{free / 2**30:.0f} GB free; run on a GPU")


def _params_of_config(config_file: Path, backend: str) -> int:
    """Parameter count of a model folder's architecture, built on the meta device (no memory used)."""
    cfg = {k: v for k, v in json.loads(Path(config_file).read_text()).items() if not k.startswith("_")}
    if backend == "sd3":
        from diffusers import SD3Transformer2DModel as cls
    elif backend == "flux":
        from diffusers import FluxTransformer2DModel as cls
    else:
        from .dit.lightningdit import LightningDiT as cls
    try:
        with torch.device("meta"):
            model = cls.from_config(cfg)
    except Exception:  # noqa: BLE001 - an unknown config: no estimate
        return 0
    return sum(p.numel() for p in model.parameters())


class DAVAEModel(Model):
    """The adapted DiT on the DA-VAE latent; decodes with the DA-VAE."""

    def __init__(self, vae_dir: Path, dit_dir: Path, device, dtype):
        from .dit.backend import backend_class, place_frozen, read_facts
        from .vae.model import DetailAlignedVAE

        self.facts = facts = read_facts(dit_dir)
        self.vae = DetailAlignedVAE.from_pretrained(str(vae_dir))
        c, d = self.vae.config.base_channels, self.vae.config.detail_channels
        if (c, d) != (facts["base_channels"], facts["detail_channels"]):
            raise DavaeError(f"the DA-VAE ({vae_dir}) has C+D = {c}+{d} but the DiT ({dit_dir}) was adapted to "
                             f"{facts['base_channels']}+{facts['detail_channels']}: they do not fit together")
        want = facts["davae"]
        if want["identity"] != self.vae.identity:
            raise DavaeError(f"{dit_dir} was adapted for the DA-VAE {want['identity'][:16]} ({want.get('path')}), "
                             f"but --vae {vae_dir} is the DA-VAE {self.vae.identity[:16]}: other weights or base "
                             f"(base VAE {self.vae.config.base_vae_hash or '?'}); pass the DA-VAE it was adapted with", param="dit")
        cls = backend_class(facts["backend"])
        self.dit_velocity = cls.velocity
        cfg_path = Path(dit_dir) / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            packed = 4 if facts["backend"] == "flux" else 1  # FLUX's in_channels count the 2x2-packed features
            if cfg.get("in_channels") not in (None, packed * (c + d)):
                raise DavaeError(f"the DiT in {dit_dir} reads {cfg.get('in_channels') // packed} channels, the DA-VAE "
                                 f"gives C+D = {c + d}: they do not fit together")
            _check_fits_cpu(_params_of_config(cfg_path, cls.name), torch.device(device), f"the DiT in {dit_dir}")
        self.dit = place_frozen(cls.load_adapted(Path(dit_dir)), device, dtype)
        self.vae.to(device).eval()
        self.norm = LatentNormalizer.from_facts(facts)
        self.name = "davae"
        self.base_channels, self.detail_channels = c, d
        self.granularity, self.patch_size = self.vae.granularity, int(facts["patch_size"])
        # version 1 facts had one shift for both training and sampling
        self.shift = float(facts.get("sample_shift", facts.get("timestep_shift")))
        self.backend = facts["backend"]
        if self.backend == "flux":
            self.guidance_distilled = bool(facts.get("guidance_distilled"))
        self.scheduler_config = facts.get("scheduler_config")
        self.recipe = facts.get("sampling")
        self.conditioning = facts["conditioning"]["type"]
        self.identity = {"davae": self.vae.identity, "dit": str(Path(dit_dir).resolve()), "preset": facts.get("preset"),
                         "dit_source": facts.get("dit_source")}

    def decode(self, latent):
        return self.vae.decode(self.norm.inverse(latent.float()))


class NativeSD3Model(Model):
    """The unmodified SD3 transformer and VAE of a pipeline folder / hub id."""

    backend = "sd3"
    default_scheduler_name = "diffusers' FlowMatchEulerDiscreteScheduler defaults"

    def __init__(self, pipeline: str, shift: Optional[float], device, dtype, recipe: dict,
                 on_message: Callable[[str], None] = lambda t: None):
        """`shift` None: the pipeline's own scheduler shift (scheduler/scheduler_config.json), as its `__call__`."""
        from .dit.backend import place_frozen
        from .dit.sd3 import scheduler_config_of
        from .vae.base import base_downsample_factor, load_base_vae

        for cand in (Path(pipeline) / "transformer" / "config.json", Path(pipeline) / "config.json"):
            if cand.is_file():
                _check_fits_cpu(_params_of_config(cand, self.backend), torch.device(device),
                                f"the transformer of {pipeline}")
                break
        self.dit = place_frozen(self._load(pipeline), device, dtype)
        base = load_base_vae(pipeline, "vae")
        self.vae = base.vae.to(device)
        self.name = "native"
        self.base_channels, self.detail_channels = self._channels(), 0
        self.granularity, self.patch_size = base_downsample_factor(self.vae), self._token_patch()
        cfg = scheduler_config_of(pipeline)
        if cfg is None:
            on_message(f"warning: {pipeline} has no scheduler/scheduler_config.json: sampling with "
                       f"{self.default_scheduler_name}")
        self.scheduler_config = cfg or self._default_scheduler()
        self.shift = float(shift if shift is not None else self.scheduler_config.get("shift", 1.0))
        self.recipe, self.conditioning = recipe, "prompt"
        self.scale = float(getattr(self.vae.config, "scaling_factor", None) or 1.0)
        self.offset = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.identity = {"base_pipeline": pipeline, "base_vae_hash": base.content_hash}

    # what differs between the SD3 and FLUX pipelines
    def _load(self, pipeline: str):
        from .dit.backend import sd3_velocity
        from .dit.sd3 import load_sd3_transformer

        self.dit_velocity = sd3_velocity
        return load_sd3_transformer(pipeline, "transformer")

    def _channels(self) -> int:
        return int(self.dit.config.in_channels)

    def _token_patch(self) -> int:
        return int(self.dit.config.patch_size)

    def _default_scheduler(self) -> dict:
        return {}

    def decode(self, latent):
        from .vae.base import base_decode

        return base_decode(self.vae, latent.to(next(self.vae.parameters()).dtype) / self.scale + self.offset)


class NativeFluxModel(NativeSD3Model):
    """The unmodified FLUX.1 transformer and VAE of a pipeline folder / hub id, sampled as `FluxPipeline`:
    its sigma grid (dynamic shift from the token count), the guidance embedding, one forward per step."""

    backend = "flux"
    default_scheduler_name = "FLUX.1's"

    def _load(self, pipeline: str):
        from .dit.flux import flux_velocity, load_flux_transformer

        self.dit_velocity = flux_velocity
        dit = load_flux_transformer(pipeline, "transformer")
        self.guidance_distilled = bool(dit.config.guidance_embeds)
        return dit

    def _channels(self) -> int:
        from .dit.flux import latent_channels

        return latent_channels(self.dit)

    def _token_patch(self) -> int:
        from .dit.flux import PACK

        return PACK * int(self.dit.config.patch_size)

    def _default_scheduler(self) -> dict:
        from .dit.flux import FLUX1_SCHEDULER_CONFIG

        return dict(FLUX1_SCHEDULER_CONFIG)


class NativeLightningDiTModel(Model):
    """The pretrained LightningDiT (checkpoint, folder or `random` from the preset) at the base resolution;
    decodes with the base VAE of the DA-VAE in `vae_dir` (its latent transform inverted)."""

    def __init__(self, preset: Preset, spec: str, vae_dir: Path, res: int, shift: float, device, dtype):
        from .dit.backend import LightningDiTBackend, lightningdit_velocity, place_frozen
        from .vae.model import DetailAlignedVAE

        dit = LightningDiTBackend(preset).load(spec, seed=preset.adapt_dit.seed, latent_side=res // preset.vae.downsample)
        self.dit = place_frozen(dit, device, dtype)
        self.dit_velocity = lightningdit_velocity
        self.davae = DetailAlignedVAE.from_pretrained(str(vae_dir)).to(device).eval()
        side = res // preset.vae.downsample
        if int(self.dit.config.input_size) != side or res % preset.vae.downsample:
            raise DavaeError(f"{res}: the native DiT was built for {int(self.dit.config.input_size) * preset.vae.downsample}² "
                             f"({self.dit.config.input_size}x{self.dit.config.input_size} latents)", param="res")
        if Path(spec).is_dir():
            from .train.native import check_native_space, read_native_facts

            check_native_space(read_native_facts(spec), self.davae, f"the native DiT {spec}")
        self.name = "native"
        self.base_channels, self.detail_channels = int(self.dit.config.in_channels), 0
        self.granularity, self.patch_size = preset.vae.downsample, int(self.dit.config.patch_size)
        self.shift, self.conditioning = shift, "class"
        self.backend, self.recipe = "lightningdit", recipe_of(preset)
        self.identity = {"dit_source": spec, "base_vae_hash": self.davae.config.base_vae_hash}

    def decode(self, latent):
        from .vae.base import base_decode

        return base_decode(self.davae.base.vae, self.davae.transform.inverse(latent.float()))


class RandomModel(Model):
    """Speed only (`generate --random-weights`): the preset's SD3 or FLUX architecture with random weights,
    nothing downloaded, on either side: native (the transformer, and the base VAE decoding at full
    resolution) or DA-VAE (the same transformer extended by D zero-initialised channels; the DA-VAE decoder
    built on that base VAE). Same sampler, text encoders, decode and PNG writing as a real run; the images
    are noise."""

    def __init__(self, preset: Preset, native: bool, device, dtype):
        from .bench import _build_decoders
        from .dit.backend import place_frozen, sd3_velocity

        d = 0 if native else preset.vae.detail_channels
        if preset.dit.backend == "flux":
            from .dit.flux import FLUX1_SCHEDULER_CONFIG, extend_flux, flux_velocity, latent_channels, load_flux_transformer

            dit = load_flux_transformer("random", preset.dit.subfolder, preset.dit.arch, seed=0, device=device)
            c = latent_channels(dit)
            if d:
                extend_flux(dit, d)
            self.dit_velocity, self.patch_size = flux_velocity, 2
            self.guidance_distilled = bool(dit.config.guidance_embeds)
            self.scheduler_config = dict(FLUX1_SCHEDULER_CONFIG)
        else:
            from .dit.sd3 import extend_sd3, load_sd3_transformer

            dit = load_sd3_transformer("random", preset.dit.subfolder, preset.dit.arch, seed=0, device=device)
            c = int(dit.config.in_channels)
            if d:
                extend_sd3(dit, d)
            self.dit_velocity, self.patch_size = sd3_velocity, int(dit.config.patch_size)
            self.scheduler_config = {"shift": float(preset.sample.shift)}
        self.dit = place_frozen(dit, device, dtype)
        decode_native, decode_davae = _build_decoders(preset, device, dtype)
        self._decode = decode_native if native else decode_davae
        self.name = "native" if native else "davae"
        self.base_channels, self.detail_channels = c, d
        self.granularity = preset.vae.downsample if native else preset.granularity
        self.shift = float(preset.sample.shift)
        self.backend = preset.dit.backend
        self.recipe, self.conditioning = recipe_of(preset), "prompt"
        self.identity = {"weights": "random", "preset": preset.name}

    def decode(self, latent):
        return self._decode(latent.to(next(iter(self.dit.parameters())).dtype))


def _random_prompt_conditioner(preset: Preset, use_t5: bool, negative: str, device, dtype):
    """The preset's text encoders with random weights (SD3's CLIP-L, CLIP-G, T5-XXL architectures, FLUX.1's
    CLIP-L and T5-XXL, or the tiny sets) behind locally built tokenizers: the real encoding work at the
    pipeline's sequence lengths."""
    from .text import TINY_SPEC, PromptEncoder, build_sd3_text_encoders, build_tiny_sd3_text_components

    tiny = preset.dit.text_encoders == TINY_SPEC
    if preset.dit.backend == "flux":
        from .text import FluxPromptEncoder, build_tiny_flux_text_components

        a = preset.dit.arch
        comps = build_tiny_flux_text_components(int(a.get("joint_attention_dim", 32)), int(a.get("pooled_projection_dim", 16)))
        if not tiny:
            real = build_sd3_text_encoders("flux", device, dtype)
            comps.update(text_encoder=real["text_encoder"], text_encoder_2=real["text_encoder_3"])
        enc = FluxPromptEncoder(comps, identity="random", device=device, dtype=dtype,
                                max_sequence_length=preset.dit.max_sequence_length)
        return _conditioner_from(enc, negative, device, dtype)
    comps = build_tiny_sd3_text_components()
    if not tiny:
        comps.update(build_sd3_text_encoders("sd3", device, dtype))
    joint = int(comps["text_encoder_3"].config.d_model)
    if not use_t5:
        comps["text_encoder_3"] = comps["tokenizer_3"] = None
    enc = PromptEncoder(comps, identity="random", device=device, dtype=dtype,
                        max_sequence_length=preset.dit.max_sequence_length, joint_attention_dim=joint)
    return _conditioner_from(enc, negative, device, dtype)


# ---------------------------------------------------------------------------------------------- top level
def _prompt_conditioner(spec: str, use_t5: bool, max_len: int, negative: str, device, dtype):
    from .text import PromptEncoder

    enc = PromptEncoder.from_spec(spec, device=device, use_t5=use_t5, max_sequence_length=max_len)
    return _conditioner_from(enc, negative, device, dtype)


def _conditioner_from(enc, negative: str, device, dtype):
    memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(texts: list[str]):
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            e, p = enc.encode(missing)
            for i, t in enumerate(missing):
                memo[t] = (e[i], p[i])
        return {"embeds": torch.stack([memo[t][0] for t in texts]).to(device, dtype),
                "pooled": torch.stack([memo[t][1] for t in texts]).to(device, dtype)}

    def cond_fn(batch: list[Job]):
        return get([negative] * len(batch)), get([j.prompt for j in batch])

    return cond_fn


def _flux_conditioner(spec: str, max_len: int, device, dtype):
    from .text import FluxPromptEncoder

    return _conditioner_from(FluxPromptEncoder.from_spec(spec, device=device, max_sequence_length=max_len), "", device, dtype)


def _class_conditioner(num_classes: int, device):
    """Labels per job; a job without a class gets the null class (index `num_classes`): unconditional."""
    def cond_fn(batch: list[Job]):
        given = [j.class_id for j in batch if j.class_id is not None]
        if any(not 0 <= c < num_classes for c in given):
            raise DavaeError(f"must be in 0..{num_classes - 1}", param="class_id")
        y = torch.tensor([num_classes if j.class_id is None else j.class_id for j in batch], device=device)
        return {"labels": torch.full_like(y, num_classes)}, {"labels": y}

    return cond_fn


def load_adapted(preset: Preset, vae_dir: Optional[str], dit_dir: Optional[str], *, base_pipeline: Optional[str],
                 use_t5: bool, negative_prompt: Optional[str], device, dtype) -> tuple["DAVAEModel", Callable]:
    """(the adapted DiT with its DA-VAE, its conditioner `cond_fn(jobs) -> (uncond, cond)`): prompts through
    the text encoders it was adapted with (or `base_pipeline`'s), or class labels with the null class."""
    for name, given in (("vae", vae_dir), ("dit", dit_dir)):
        if not given:
            raise DavaeError("is required (the adapted model and its DA-VAE; or --native for the base model)",
                             param=name)
    if not (Path(dit_dir) / "config.json").is_file():
        raise DavaeError(f"{dit_dir}: not an adapted DiT folder (RUN/final of `davae adapt-dit`)", param="dit")
    model = DAVAEModel(Path(vae_dir), Path(dit_dir), device, dtype)
    if model.recipe is None:  # adapted before the recipe was stored: the preset's
        model.recipe = recipe_of(preset)
    cond = model.facts["conditioning"]
    if model.backend == "flux":
        cond_fn = _flux_conditioner(base_pipeline or cond["text_encoders"], cond["max_sequence_length"], device, dtype)
    elif cond["type"] == "prompt":
        spec = base_pipeline or cond["text_encoders"]
        negative = negative_prompt if negative_prompt is not None else (model.recipe.get("negative_prompt") or "")
        cond_fn = _prompt_conditioner(spec, use_t5 and cond.get("use_t5", True), cond["max_sequence_length"],
                                      negative, device, dtype)
    else:
        cond_fn = _class_conditioner(int(cond["num_classes"]), device)
    return model, cond_fn


def generate(preset: Preset, s: GenerateSettings, *, vae_dir: Optional[str] = None, dit_dir: Optional[str] = None,
             base_pipeline: Optional[str] = None, native: bool = False, use_t5: bool = True,
             random_weights: bool = False,
             progress: Optional[Callable[[int, int], None]] = None, on_message: Callable[[str], None] = lambda t: None) -> dict:
    """Generate `s`'s jobs into `s.out_dir`; returns what was written and the timings."""
    from accelerate import PartialState

    state = PartialState()
    from .devices import resolve_device, resolve_dtype

    device = resolve_device(s.device, default=state.device)
    dtype = resolve_dtype(s.dtype, device)
    for name in ("num_images", "batch_size"):
        if getattr(s, name) < 1:
            raise DavaeError("must be at least 1", param=name)
    interval = None if isinstance(s.guidance_interval, str) else s.guidance_interval
    check_sampling(s.steps, s.shift, interval, s.sampler)
    jobs = make_jobs(s)
    t0 = time.perf_counter()
    model, cond_fn = load_model(preset, s, vae_dir=vae_dir, dit_dir=dit_dir, base_pipeline=base_pipeline,
                                native=native, use_t5=use_t5, random_weights=random_weights, device=device,
                                dtype=dtype, on_message=on_message)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if model.conditioning == "prompt" and s.class_ids:
        raise DavaeError("is for class-conditional (LightningDiT) models; this one takes prompts", param="class_id")
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
    per = (lambda sec: 1000.0 * sec / n) if n else (lambda sec: None)
    total_s = report["text_s"] + report["sample_s"] + report["decode_s"]
    # the names `davae bench` uses, per image (ms_loop: the denoising loop; ms_per_image: text + loop + decode)
    report.update(ms_text=per(report["text_s"]), ms_loop=per(report["sample_s"]), ms_decode=per(report["decode_s"]),
                  ms_per_image=per(total_s), images_per_s=n / total_s if n and total_s > 0 else None,
                  peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                  compile=s.compile and s.compile_mode,
                  compile_included=bool(s.compile and n))  # compilation is inside the first batch's ms_loop
    # steady state: the batches after the first (which includes warm-up and, with --compile, compilation)
    rest = report["batches"][1:]
    n_rest = sum(b["images"] for b in rest)
    rest_s = sum(b["text_s"] + b["sample_s"] + b["decode_s"] for b in rest)
    report.update(ms_per_image_steady=1000.0 * rest_s / n_rest if n_rest else None,
                  ms_loop_steady=1000.0 * sum(b["sample_s"] for b in rest) / n_rest if n_rest else None,
                  images_per_s_steady=n_rest / rest_s if n_rest and rest_s > 0 else None)
    report.update(mode=model.name, res=s.res, steps=s.steps, guidance=s.guidance,
                  guidance_interval=s.guidance_interval, sampler=s.sampler, device=str(device),
                  dtype=str(dtype).replace("torch.", ""), load_s=load_s,
                  s_per_image=(report["sample_s"] + report["decode_s"]) / n if n else None,
                  tokens=(s.res // model.granularity // model.patch_size) ** 2)
    return report


def load_model(preset: Preset, s: GenerateSettings, *, vae_dir: Optional[str] = None, dit_dir: Optional[str] = None,
               base_pipeline: Optional[str] = None, native: bool = False, use_t5: bool = True,
               random_weights: bool = False, device, dtype, on_message: Callable[[str], None] = lambda t: None):
    """(model, cond_fn) for `s`: an adapted DiT with its DA-VAE, the native pipeline, or random weights (then
    `torch.compile`d with `s.compile`). The recipe fills the settings left unset (`s` is completed in place:
    res, steps, guidance, interval, sampler, negative prompt)."""
    negative = s.negative_prompt if s.negative_prompt is not None else preset.sample.negative_prompt
    if random_weights:
        if preset.dit.backend not in ("sd3", "flux"):
            raise DavaeError(f"is for SD3 and FLUX presets; {preset.name} is a {preset.dit.backend} preset",
                             param="random_weights")
        for name, given in (("vae", vae_dir), ("dit", dit_dir), ("base_pipeline", base_pipeline)):
            if given:
                raise DavaeError("cannot be combined with --random-weights (which builds every model itself)", param=name)
        if s.res is None:
            s.res = preset.adapt_dit.resolution
        model = RandomModel(preset, native, device, dtype)
        cond_fn = _random_prompt_conditioner(preset, use_t5, negative, device, dtype)
    elif native:
        if preset.dit.backend in ("sd3", "flux"):
            flux = preset.dit.backend == "flux"
            spec = base_pipeline or preset.dit.pretrained
            if spec == "random":
                raise DavaeError(f"needs --base-pipeline (a{' FLUX.1' if flux else 'n SD3'} pipeline folder or hub id)",
                                 param="native")
            if s.res is None:
                raise DavaeError("needs --res", param="native")
            model: Model = (NativeFluxModel if flux else NativeSD3Model)(spec, s.shift, device, dtype,
                                                                          recipe_of(preset), on_message)
            cond_fn = (_flux_conditioner(spec, preset.dit.max_sequence_length, device, dtype) if flux else
                       _prompt_conditioner(spec, use_t5, preset.dit.max_sequence_length, negative, device, dtype))
        else:
            if not vae_dir or s.res is None:
                raise DavaeError("with a LightningDiT preset needs --vae (for its base VAE) and --res", param="native")
            model = NativeLightningDiTModel(preset, base_pipeline or preset.dit.pretrained, Path(vae_dir), s.res,
                                            preset.sample.shift, device, dtype)
            cond_fn = _class_conditioner(preset.dit.num_classes, device)
    else:
        model, cond_fn = load_adapted(preset, vae_dir, dit_dir, base_pipeline=base_pipeline, use_t5=use_t5,
                                      negative_prompt=s.negative_prompt, device=device, dtype=dtype)
        if s.res is None:
            s.res = int(model.facts["resolution"])
    apply_recipe(s, model.recipe)
    if model.backend == "flux" and s.shift is not None and (model.scheduler_config or {}).get("use_dynamic_shifting"):
        raise DavaeError("FLUX samples with its scheduler's dynamic shift (mu from the image-token count), as "
                         "FluxPipeline; a fixed shift does not apply", param="shift")
    if s.compile:
        model.dit = torch.compile(model.dit, mode=s.compile_mode, dynamic=False)
        on_message("compiling the DiT on its first use: the first batch's time includes the compilation")
    return model, cond_fn
