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

Latent inputs (`.safetensors`): instead of steps 1-2, the base channels come from the file as they are (no
decode and re-encode): a base latent of C channels from `generate --native --save-latents` (mapped from the
native model's recorded latent transform into the DA-VAE's z_base space; the identity when it is the
DA-VAE's own, as for a LightningDiT), or a C+D latent of this DA-VAE (`encode`, `generate`, `upscale`:
its first C channels, which the DiT's normalisation leaves as they are). The output is s x the latent's base
resolution (h f x w f); the class or prompt is the file's own (`class_id` / `prompt` in its metadata) unless
given, and the noise seed is the file's own `seed` unless `seed` is given, so the held base channels start
from the very noise the source was generated from. The file's metadata is kept under `source_meta`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import data as D
from .config import check_sampling
from .config_schema import Preset
from .errors import DavaeError
from .pipeline import (RECIPE, Job, base_size, encode_base_images, prepare_base_image,  # noqa: F401
                       upscale_batch, upscale_sigmas, with_recipe)
from .images import write_sample
from .latents import load_latent
from .models import load_adapted
from .sampling import check_shift, timed


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
    # input k uses seed + k; None: 0 + k for images, a latent input's own recorded seed
    seed: Optional[int] = None
    from_latents: bool = False  # folders give their latent files (.safetensors), not their images
    batch_size: int = 1
    overwrite: bool = False
    save_latents: bool = False
    tile: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    compile: bool = False
    compile_mode: str = "default"


LATENT_SUFFIX = ".safetensors"


@dataclass
class Inputs:
    """What to upscale: image items (paths, or bundled photos) and latent files, each with its kind."""

    items: list
    kinds: list  # "image" | "latent", per item

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        it = self.items[i]
        return it[1] if isinstance(it, tuple) else Path(it).stem


def _inputs(inputs: list[str], from_latents: bool = False,
            on_message: Callable[[str], None] = lambda t: None) -> Inputs:
    """The inputs, in the order given (folders recursive, sorted): a `.safetensors` file is a latent input,
    any other file an image. A folder gives its images, or with `from_latents` its latent files; a folder
    with latent files and no image gives its latents (a folder holding both gives its images, with a note)."""
    items, kinds, skipped = [], [], []

    def add(new: list, kind: str) -> None:
        items.extend(new)
        kinds.extend([kind] * len(new))

    for inp in inputs:
        p = Path(inp).expanduser()
        if p.is_dir():
            lat = sorted(str(f) for f in p.rglob(f"*{LATENT_SUFFIX}") if f.is_file())
            if from_latents:
                add(lat, "latent")
                continue
            src = D.list_images([p], missing_ok=True)
            if not src.items and not src.skipped:
                add(lat, "latent")
                continue
            skipped += src.skipped
            add(src.items, "image")
            if lat:
                on_message(f"note: {inp} also holds {len(lat)} latent file(s); its images are upscaled "
                           f"(--from-latents takes the latents instead)")
        elif p.is_file() and p.suffix.lower() == LATENT_SUFFIX:
            add([str(p)], "latent")
        else:
            src = D.list_images([inp], missing_ok=True)
            skipped += src.skipped
            add(src.items, "image")
    if skipped:
        path, why = skipped[0]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise DavaeError(f"{path}: {why if why == 'not found' else 'unreadable image: ' + why}{more}; nothing written")
    if not items:
        what = "latent files (.safetensors)" if from_latents else "images or latent files"
        raise DavaeError(f"no {what} in {', '.join(map(str, inputs))}")
    src = Inputs(items, kinds)
    names = [src.name(i) for i in range(len(src))]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DavaeError(f"two inputs would write the same output {sorted(dup)[0]}.png (same file stem)")
    return src


def to_base_space(latent: torch.Tensor, recorded: Optional[dict], transform) -> torch.Tensor:
    """A native model's base latent (C, h, w) -> the DA-VAE's z_base space (`transform`: its base latent
    transform). `recorded`: the native model's own transform ({"shift", "scale"} per channel, latent = (mean -
    shift) * scale; what `generate --native` records as `base_transform`); None or equal to `transform`: the
    latent is already in that space and is returned as it is (bit for bit)."""
    if recorded is None:
        return latent
    c = latent.shape[0]
    try:
        shift_n = torch.tensor([float(v) for v in recorded["shift"]], dtype=torch.float32)
        scale_n = torch.tensor([float(v) for v in recorded["scale"]], dtype=torch.float32)
    except (KeyError, TypeError, ValueError):
        raise DavaeError('its base_transform metadata is not {"shift": [...], "scale": [...]}') from None
    if shift_n.numel() != c or scale_n.numel() != c or not bool((scale_n != 0).all()):
        raise DavaeError(f"its base_transform does not have {c} channels with non-zero scales")
    shift = transform.shift.detach().float().cpu()
    scale = transform.scale.detach().float().cpu()
    if torch.equal(shift_n, shift) and torch.equal(scale_n, scale):
        return latent
    raw = latent / scale_n[:, None, None] + shift_n[:, None, None]  # the base VAE's posterior mean
    return (raw - shift[:, None, None]) * scale[:, None, None]


def read_base_latent(path: str, vae, dit_davae: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
    """(z_base (C, h, w) float32 in the DA-VAE's base space, which is the adapted DiT's: its normalisation
    keeps the base channels as they are; the file's metadata) of a latent file: a native model's base latent
    (C channels, `generate --native --save-latents`) or a latent of this DA-VAE (C + D channels; `dit_davae`:
    the adapted DiT's `davae` facts, for DiT-space latents). DavaeError naming the file when it is neither."""
    from .codec import check_latent_compatible

    latent, meta = load_latent(Path(path))  # its own errors name the file
    c, d = int(vae.config.base_channels), int(vae.config.detail_channels)
    k = int(latent.shape[0])
    if k == c + d:
        why = check_latent_compatible(vae, latent, meta, dit_space_ok=True, dit_davae=dit_davae)
        if why:
            raise DavaeError(f"{path}: {why}")
        return latent[:c].float(), meta
    if k != c:
        raise DavaeError(f"{path}: latent has {k} channels; upscale takes a base latent of C = {c} channels "
                         f"(generate --native --save-latents) or a latent of this DA-VAE (C+D = {c + d})")
    vae_hash, recorded = meta.get("base_vae_hash"), meta.get("base_transform")
    if vae_hash is None and recorded is None:
        raise DavaeError(f"{path}: no base VAE identity in its metadata (not written by `davae generate --native "
                         f"--save-latents`)")
    mine = vae.config.base_vae_hash
    if vae_hash is not None and mine and vae_hash != mine:
        raise DavaeError(f"{path}: made with another base VAE (hash {str(vae_hash)[:12]}) than this DA-VAE's "
                         f"(hash {str(mine)[:12]})")
    try:
        return to_base_space(latent.float(), recorded, vae.transform), meta
    except DavaeError as e:
        raise DavaeError(f"{path}: {e}") from None


def _check_settings(s: UpscaleSettings) -> None:
    """The settings' bounds, before anything is loaded."""
    if not 0.0 <= s.strength <= 1.0:
        raise DavaeError(f"{s.strength} is outside [0, 1]", param="strength")
    if s.batch_size < 1:
        raise DavaeError("must be at least 1", param="batch_size")
    check_sampling(s.steps, s.shift, None if isinstance(s.guidance_interval, str) else s.guidance_interval, s.sampler)
    if s.class_from_folders and s.class_id is not None:
        raise DavaeError("give either --class-id or --class-from-folders", param="class_id")


def _jobs(model, s: UpscaleSettings, src: Inputs, metas: Optional[dict] = None) -> list[Job]:
    """One job per input: the prompt for a text-to-image model; for a class model the class given, or each
    input's folder (sorted folder names are the classes, as train-dit labels them), or the null class. A
    latent input (`metas`: index -> its file's metadata) takes its own class or prompt unless one is given, and
    its own seed unless `s.seed` is."""
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
    prompts = [s.prompt or ""] * len(src)
    seeds = [(s.seed or 0) + i for i in range(len(src))]
    for i, meta in (metas or {}).items():
        path = src.items[i]
        if prompt and s.prompt is None:
            if not isinstance(meta.get("prompt"), str):
                raise DavaeError(f"{path}: no prompt in its metadata; pass --prompt")
            prompts[i] = meta["prompt"]
        elif not prompt and s.class_id is None and not s.class_from_folders:
            labels[i] = _class_of(meta, path, int(model.facts["conditioning"]["num_classes"]))
        if s.seed is None and isinstance(meta.get("seed"), int) and not isinstance(meta["seed"], bool):
            seeds[i] = meta["seed"]
    return [Job(i, seeds[i], prompts[i] if prompt else None, None if prompt else labels[i])
            for i in range(len(src))]


def _class_of(meta: dict, path, num_classes: int) -> int:
    """A latent file's class (`class_id` in its metadata), checked against the model's classes."""
    c = meta.get("class_id")
    if c is None:
        raise DavaeError(f"{path}: no class_id in its metadata; pass --class-id (or --class-from-folders)")
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
        raise DavaeError(f"{path}: its class_id {c!r} is not a class of this model (0..{num_classes - 1}); "
                         f"pass --class-id")
    return c


@dataclass
class Geometry:
    """The sizes an adapted pair can make: the DA-VAE's scale s and base downsampling f, the DiT's patch p (a
    token is f * p base-image pixels, s * f * p output pixels), and the resolution it was adapted at."""

    scale: int
    downsample: int
    patch: int
    resolution: int
    max_tokens: Optional[int] = None  # the most tokens a side the DiT's positions reach (None: any grid)
    limit_note: str = ""  # how messages name that limit


def read_geometry(vae_dir: str, dit_dir: str) -> Optional[Geometry]:
    """The pair's `Geometry` from its two folders' JSON files, no model loaded (the DA-VAE's config.json, the
    adapted DiT's facts and config.json); None when either is missing or unreadable (loading the pair then says
    why)."""
    import json

    from .dit.backend import read_facts, read_max_token_grid

    try:
        vae = json.loads((Path(vae_dir) / "config.json").read_text())
        facts = read_facts(Path(dit_dir))
        limit = read_max_token_grid(Path(dit_dir)) or (None, "")
        return Geometry(int(vae["scale"]), int(vae["downsample"]), int(facts["patch_size"]), int(facts["resolution"]),
                        *limit)
    except (DavaeError, OSError, ValueError, TypeError, KeyError):
        return None


def loaded_geometry(model, vae) -> Geometry:
    """The loaded pair's `Geometry` (when its folders' files were not plain JSON but the loader took them)."""
    side = model.backend.max_token_grid(dict(getattr(model.dit, "config", None) or {}))
    return Geometry(int(vae.config.scale), int(vae.config.downsample), model.patch_size, int(model.facts["resolution"]),
                    side, "" if side is None else model.backend.grid_limit_phrase(side))


def largest_res(h: int, w: int, g: Geometry) -> int:
    """The largest output short side (a whole number of tokens) at which an h x w input's token grid fits
    `g.max_tokens` on its long side; 0 when none does (an input longer than max_tokens : 1)."""
    unit = g.downsample * g.patch
    for t in range(int(g.max_tokens), 0, -1):  # tokens on the short side
        res = t * unit * g.scale
        if max(base_size(h, w, res, g.scale, unit)) <= g.max_tokens * unit:
            return res
    return 0


def plan_sizes(src: Inputs, todo: list[int], res_given: Optional[int], g: Geometry, latent_shapes: dict,
               on_message: Callable[[str], None] = lambda t: None) -> tuple[int, dict]:
    """(the output short side R, {(kind, base size): [input indices]}) for the inputs to do: an image's base size
    from its header (`base_size`, whole tokens), a latent's from its (h, w) in `latent_shapes` (index -> shape;
    latents are not resized). Sizes no model can take are refused in one line, before any model is loaded: less
    than a token, or a token grid whose long side passes what the DiT's positions reach (`g.max_tokens`; the
    message names the largest --res every input fits at); a --res that is not a whole number of tokens is rounded
    down, with a note saying to what."""
    res = res_given if res_given is not None else g.resolution
    scale, f, p = g.scale, g.downsample, g.patch
    unit = f * p  # base-image pixels per token side
    if res <= 0:
        raise DavaeError(f"{res}: must be positive", param="res")
    groups: dict[tuple[str, tuple[int, int]], list[int]] = {}
    too_big: list[tuple[int, tuple[int, int]]] = []  # images whose grid passes g.max_tokens: (index, (h, w))
    for i in todo:
        if src.kinds[i] == "latent":
            h, w = latent_shapes[i]
            size = (h * f, w * f)  # the base image the latent stands for
            if h % p or w % p:
                raise DavaeError(f"{src.items[i]}: its {h}x{w} latent is not a whole number of DiT tokens "
                                 f"({p}x{p} latent pixels each)")
            if g.max_tokens is not None and max(h, w) // p > g.max_tokens:
                raise DavaeError(f"{src.items[i]}: its {h}x{w} latent is {h // p}x{w // p} DiT tokens; {g.limit_note} "
                                 f"(latents are not resized: upscale its image with a --res instead)")
            if res_given is not None and min(size) * scale != res_given:
                raise DavaeError(f"{res_given} does not fit {src.items[i]}: its {h}x{w} latent gives "
                                 f"{size[1] * scale}x{size[0] * scale} (latents are not resized; leave --res out)",
                                 param="res")
        else:
            hw = _image_size(src.items[i])
            size = base_size(*hw, res, scale, unit)
            if g.max_tokens is not None and max(size) > g.max_tokens * unit:
                too_big.append((i, hw))
        groups.setdefault((src.kinds[i], size), []).append(i)
    if too_big:
        _refuse_grid(src, too_big, res, res_given, g, groups)
    if any(k == "image" for k in src.kinds) and res_given is not None:
        got = (res // scale // unit) * unit * scale
        if got != res and got > 0:
            on_message(f"note: --res {res} is not a whole number of DiT tokens ({unit * scale} px each at the "
                       f"output): images are upscaled to a short side of {got}")
    return res, groups


def _refuse_grid(src: Inputs, too_big: list, res: int, res_given: Optional[int], g: Geometry, groups: dict) -> None:
    """One line for the images whose token grid at `res` passes `g.max_tokens`: the first of them, its output
    size and grid, the limit, and the largest --res at which every input fits (the smallest of theirs: the others
    fit at `res` already)."""
    unit = g.downsample * g.patch
    i, _ = too_big[0]
    size = next(sz for (kind, sz), members in groups.items() if i in members)
    more = f" (and {len(too_big) - 1} more input(s))" if len(too_big) > 1 else ""
    best = min(largest_res(h, w, g) for _, (h, w) in too_big)
    at = f"--res {res}" if res_given is not None else f"the model's resolution {res} (no --res given)"
    fix = (f"the largest --res every input fits at is {best}" if best else
           "no --res fits an input whose sides are that unequal; crop it")
    raise DavaeError(f"{src.items[i] if not isinstance(src.items[i], tuple) else src.name(i)}{more}: at {at} the "
                     f"output would be {size[1] * g.scale}x{size[0] * g.scale}, {size[1] // unit}x{size[0] // unit} "
                     f"DiT tokens; {g.limit_note}; {fix}")


def _latent_shapes(src: Inputs, todo: list[int]) -> dict:
    """index -> (h, w) of each latent input to do (its own errors name the file)."""
    return {i: tuple(load_latent(Path(src.items[i]))[0].shape[-2:]) for i in todo if src.kinds[i] == "latent"}


def _base_latents(src: Inputs, idx: list[int], kind: str, size: tuple[int, int], vae, dit_davae, device):
    """(z_base (B, C, h, w) float32 on `device`, seconds) of the inputs `idx`: a latent file's base channels as
    they are, an image's base image (`size`) encoded; reading and resizing count as encoding."""
    clock = timed(device)
    if kind == "latent":
        return clock(lambda: torch.stack([read_base_latent(src.items[i], vae, dit_davae)[0] for i in idx]).to(device))
    t_read = time.perf_counter()
    arrays = [D.read_image(src.items[i]) for i in idx]
    read_s = time.perf_counter() - t_read
    z_base, encode_s = clock(lambda: encode_base_images(vae, arrays, size, device))
    return z_base, encode_s + read_s


def _source_meta(meta: Optional[dict]) -> dict:
    """A latent input's own generation settings (its file's metadata), kept beside upscale's; {} for an image."""
    if meta is None:
        return {}
    src_meta = {key: v for key, v in meta.items() if key != "space"}
    return {"source_kind": "latent", "source_seed": src_meta.get("seed"), "source_meta": src_meta}


def upscale(preset: Preset, s: UpscaleSettings, inputs: list[str], *, vae_dir: str, dit_dir: str,
            base_pipeline: Optional[str] = None, use_t5: bool = True,
            progress: Optional[Callable[[int, int], None]] = None,
            on_message: Callable[[str], None] = lambda t: None) -> dict:
    """Upscale every image or latent file of `inputs` into `s.out_dir/<stem>.png`; returns what was written and
    the timings. Existing outputs are kept (resumable) unless `s.overwrite`. Every input still to do is
    checked (readable, its size, a latent's channels, base VAE and class) before anything is written."""
    from .devices import resolve_device, resolve_dtype

    _check_settings(s)
    src = _inputs(inputs, s.from_latents, on_message)
    out_dir = Path(s.out_dir)
    todo = [i for i in range(len(src)) if s.overwrite or not (out_dir / f"{src.name(i)}.png").exists()]
    geo = read_geometry(vae_dir, dit_dir)
    if geo is not None:  # sizes checked from the folders' JSON files, before any model is loaded
        _, groups = plan_sizes(src, todo, s.res, geo, _latent_shapes(src, todo), on_message)
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    t0 = time.perf_counter()
    model, cond_fn = load_adapted(preset, vae_dir, dit_dir, base_pipeline=base_pipeline, use_t5=use_t5,
                                  negative_prompt=s.negative_prompt, device=device, dtype=dtype)
    vae = model.parts["davae"]
    dit_davae = model.facts.get("davae")
    metas = {}  # latent inputs to do: their metadata (and their base VAE, channels and class checked)
    for i in todo:
        if src.kinds[i] == "latent":
            metas[i] = read_base_latent(src.items[i], vae, dit_davae)[1]
    if geo is None:  # the folders' files were not plain JSON, but the loader took them: the loaded pair's sizes
        geo = loaded_geometry(model, vae)
        _, groups = plan_sizes(src, todo, s.res, geo, _latent_shapes(src, todo), on_message)
    jobs = _jobs(model, s, src, metas)
    s = with_recipe(s, model.recipe)  # a completed copy: the caller's settings stay as given
    check_shift(model, s.shift)
    shift = s.shift if s.shift is not None else model.shift
    if s.compile:
        model.dit = torch.compile(model.dit, mode=s.compile_mode, dynamic=False)
        on_message("compiling the DiT on its first use: the first batch's time includes the compilation")
    load_s = time.perf_counter() - t0

    timings = {"encode_s": 0.0, "text_s": 0.0, "sample_s": 0.0, "decode_s": 0.0}
    written, sizes, done = [], set(), len(src) - len(todo)
    if progress:
        progress(done, len(src))
    for (kind, size), members in groups.items():
        unit = geo.downsample * geo.patch
        sigmas = upscale_sigmas(model, s.steps, shift, size, unit)
        grid = [round(float(v), 8) for v in sigmas]
        sizes.add((size[0] * geo.scale, size[1] * geo.scale))
        for k in range(0, len(members), s.batch_size):
            idx = members[k : k + s.batch_size]
            batch = [jobs[i] for i in idx]
            z_base, encode_s = _base_latents(src, idx, kind, size, vae, dit_davae, device)  # (B, C, h, w)
            timings["encode_s"] += encode_s
            images, lat, times = upscale_batch(model, cond_fn, batch, z_base, sigmas, s, device, dtype)
            for key, v in times.items():
                timings[key] += v
            for i, j, img, z in zip(idx, batch, images, lat):
                meta = {"source": str(src.items[i]), "strength": s.strength, "prompt": j.prompt,
                        "negative_prompt": s.negative_prompt if j.prompt is not None else None,
                        "class_id": j.class_id, "seed": j.seed, "steps": s.steps, "guidance": s.guidance,
                        "guidance_interval": s.guidance_interval, "sampler": s.sampler, "shift": shift,
                        "sigmas": grid, "res": list(img.shape[-2:]), "base_size": list(size), "mode": "upscale",
                        **model.identity, **_source_meta(metas.get(i))}
                written.append(write_sample(out_dir, src.name(i), img, z, meta, s.save_latents))
            done += len(idx)
            if progress:
                progress(done, len(src))
    n = len(written)
    per = (lambda sec: 1000.0 * sec / n) if n else (lambda sec: None)
    total_s = sum(timings.values())
    return {"written": written, "skipped_existing": len(src) - len(todo), "images": len(src),
            "latent_inputs": sum(k == "latent" for k in src.kinds),
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
