"""What `generate`, `upscale` and `synth` sample with, loaded through the family's backend: an adapted DiT
with its DA-VAE (from the facts beside the DiT), the unmodified base model (`Backend.native_model`), or the
preset's architectures with random weights (speed only); and the conditioners that turn jobs (objects with
`.prompt` / `.class_id`) into the model's conditioning: `cond_fn(jobs) -> (uncond, cond)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from .config_schema import Preset
from .dit.backend import backend_class, get_backend, place_frozen, read_facts
from .errors import DavaeError
from .latents import LatentNormalizer
from .sampling import SamplingModel

CondFn = Callable[[list], tuple[dict, dict]]


def recipe_of(preset: Preset) -> dict:
    smp = preset.sample
    return {"steps": smp.steps, "guidance": smp.guidance, "guidance_interval": smp.guidance_interval,
            "sampler": smp.sampler, "negative_prompt": smp.negative_prompt}


# --------------------------------------------------------------------------------------------- conditioners
def prompt_conditioner(encoder, keys: tuple[str, str], negative: str, device, dtype) -> CondFn:
    """Prompts through `encoder` (each distinct text encoded once), the negative prompt as unconditional
    (`model_conditioner` picks the negative for a model)."""
    memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(texts: list[str]) -> dict:
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            a, b = encoder.encode(missing)
            for i, t in enumerate(missing):
                memo[t] = (a[i], b[i])
        return {keys[k]: torch.stack([memo[t][k] for t in texts]).to(device, dtype) for k in (0, 1)}

    def cond_fn(batch: list):
        return get([negative] * len(batch)), get([j.prompt for j in batch])

    return cond_fn


def model_conditioner(model: SamplingModel, encoder, negative: str, device, dtype) -> CondFn:
    """The prompt conditioner of `model`: its family's prompt tensors; the negative prompt only where the
    model runs a negative branch (CFG), else the empty prompt (never encoded for guidance)."""
    return prompt_conditioner(encoder, model.backend.prompt_keys, negative if model.guidance_mode == "cfg" else "",
                              device, dtype)


def class_conditioner(num_classes: int, device) -> CondFn:
    """Labels per job; a job without a class gets the null class (index `num_classes`): unconditional."""
    def cond_fn(batch: list):
        given = [j.class_id for j in batch if j.class_id is not None]
        if any(not 0 <= c < num_classes for c in given):
            raise DavaeError(f"must be in 0..{num_classes - 1}", param="class_id")
        y = torch.tensor([num_classes if j.class_id is None else j.class_id for j in batch], device=device)
        return {"labels": torch.full_like(y, num_classes)}, {"labels": y}

    return cond_fn


# ------------------------------------------------------------------------------------------------- loaders
def find_davae(dit_dir: Path) -> Path:
    """The DA-VAE folder an adapted DiT folder was adapted with: seen from the DiT folder (both moved together),
    where it was, or a DA-VAE folder beside it whose content hash is the recorded one."""
    from .dit.backend import FACTS_FILE
    from .vae.model import DetailAlignedVAE

    try:
        rec = read_facts(dit_dir)["davae"]
    except (DavaeError, OSError, ValueError, KeyError, TypeError):
        raise DavaeError(f"{dit_dir}: not an adapted DiT folder (no {FACTS_FILE} naming its DA-VAE); pass vae=") from None
    tried = []
    for cand in ([dit_dir / rec["relative_path"]] if rec.get("relative_path") else []) + [Path(rec.get("path", ""))]:
        tried.append(str(cand))
        if (cand / "config.json").is_file():
            return cand.resolve()
    for cand in sorted({*dit_dir.resolve().parent.parent.glob("*/final"), *dit_dir.resolve().parent.glob("*")}):
        try:
            if json.loads((cand / "config.json").read_text()).get("_class_name") != "DetailAlignedVAE":
                continue
            if DetailAlignedVAE.from_pretrained(str(cand)).is_recorded(rec):
                return cand
        except (OSError, ValueError, DavaeError):
            continue
    raise DavaeError(f"{dit_dir}: its DA-VAE ({rec.get('identity', '?')[:16]}) is not at {' nor '.join(tried)} nor "
                     f"beside it; pass vae=")


def load_davae_model(vae_dir: Path, dit_dir: Path, device, dtype, base_vae: Optional[str] = None) -> SamplingModel:
    """The adapted DiT in `dit_dir` on the latent of the DA-VAE in `vae_dir` (checked to be the one it was
    adapted for); decodes with the DA-VAE."""
    from .dit.loader import check_fits_cpu, params_of_config
    from .vae.model import DetailAlignedVAE

    facts = read_facts(dit_dir)
    vae = DetailAlignedVAE.from_pretrained(str(vae_dir), base_vae=base_vae)
    c, d = vae.config.base_channels, vae.config.detail_channels
    if (c, d) != (facts["base_channels"], facts["detail_channels"]):
        raise DavaeError(f"the DA-VAE ({vae_dir}) has C+D = {c}+{d} but the DiT ({dit_dir}) was adapted to "
                         f"{facts['base_channels']}+{facts['detail_channels']}: they do not fit together")
    want = facts["davae"]
    if not vae.is_recorded(want):
        raise DavaeError(f"{dit_dir} was adapted for the DA-VAE {want['identity'][:16]} ({want.get('path')}), "
                         f"but --vae {vae_dir} is the DA-VAE {vae.identity[:16]}: other weights or base "
                         f"(base VAE {vae.config.base_vae_hash or '?'}); pass the DA-VAE it was adapted with", param="dit")
    cls = backend_class(facts["backend"])
    cfg_path = Path(dit_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("in_channels") is not None and cls.config_channels(cfg) != c + d:
        raise DavaeError(f"the DiT in {dit_dir} reads {cls.config_channels(cfg)} channels, the DA-VAE gives "
                         f"C+D = {c + d}: they do not fit together")
    check_fits_cpu(params_of_config(cfg_path, cls.model_class()), torch.device(device), f"the DiT in {dit_dir}")
    dit = place_frozen(cls.load_adapted(Path(dit_dir)), device, dtype)
    vae.to(device).eval()
    norm = LatentNormalizer.from_facts(facts)
    return SamplingModel(
        name="davae", backend=cls, dit=dit, base_channels=c, detail_channels=d, granularity=vae.granularity,
        patch_size=int(facts["patch_size"]),
        shift=float(facts.get("sample_shift", facts.get("timestep_shift"))),  # version 1: one shift for both
        decoder=lambda latent: vae.decode(norm.inverse(latent.float())), recipe=facts.get("sampling"),
        conditioning=facts["conditioning"]["type"], scheduler_config=facts.get("scheduler_config"),
        guidance_mode=cls.guidance_mode(dict(dit.config)), facts=facts,
        identity={"davae": vae.identity, "latent_identity": vae.latent_identity, "dit": str(Path(dit_dir).resolve()),
                  "preset": facts.get("preset"),
                  "dit_source": facts.get("dit_source")},
        parts={"davae": vae})


def load_adapted(preset: Preset, vae_dir: Optional[str], dit_dir: Optional[str], *, base_pipeline: Optional[str],
                 use_t5: bool, negative_prompt: Optional[str], device, dtype,
                 base_vae: Optional[str] = None) -> tuple[SamplingModel, CondFn]:
    """(the adapted DiT with its DA-VAE, its conditioner): prompts through the text encoders it was adapted
    with (or `base_pipeline`'s), or class labels with the null class."""
    if not dit_dir:
        raise DavaeError("is required (the adapted model; or --native for the base model)", param="dit")
    if not vae_dir:  # the DA-VAE it was adapted with, where the DiT folder says it is
        vae_dir = str(find_davae(Path(dit_dir)))
    if not (Path(dit_dir) / "config.json").is_file():
        raise DavaeError(f"{dit_dir}: not an adapted DiT folder (RUN/final of `davae adapt-dit`)", param="dit")
    model = load_davae_model(Path(vae_dir), Path(dit_dir), device, dtype, base_vae)
    if model.recipe is None:  # adapted before the recipe was stored: the preset's
        model.recipe = recipe_of(preset)
    cond = model.facts["conditioning"]
    if cond["type"] != "prompt":
        return model, class_conditioner(int(cond["num_classes"]), device)
    cls = model.backend
    negative = negative_prompt if negative_prompt is not None else (model.recipe.get("negative_prompt") or "")
    enc = cls.prompt_encoder(base_pipeline or cond["text_encoders"], device=device, dtype=torch.float32,
                             use_t5=use_t5 and cond.get("use_t5", True), max_sequence_length=cond["max_sequence_length"])
    return model, model_conditioner(model, enc, negative, device, dtype)


def load_native(preset: Preset, *, spec: Optional[str], vae_dir: Optional[str], res: Optional[int],
                shift: Optional[float], use_t5: bool, negative: str, device, dtype,
                on_message: Callable[[str], None] = lambda t: None) -> tuple[SamplingModel, CondFn]:
    """The unmodified base model of the preset's family (`spec`: its pipeline or checkpoint) and its conditioner."""
    backend = get_backend(preset)
    model = backend.native_model(spec, res=res, vae_dir=vae_dir, shift=shift, recipe=recipe_of(preset),
                                 device=device, dtype=dtype, on_message=on_message)
    if backend.conditioning == "class":
        return model, class_conditioner(preset.dit.num_classes, device)
    enc = backend.prompt_encoder(spec, device=device, dtype=torch.float32, use_t5=use_t5,
                                 max_sequence_length=preset.dit.max_sequence_length)
    return model, model_conditioner(model, enc, negative, device, dtype)


def load_random(preset: Preset, *, native: bool, use_t5: bool, negative: str, device,
                dtype) -> tuple[SamplingModel, CondFn]:
    """Speed only (`generate --random-weights`): the preset's text-to-image architecture with random weights,
    nothing downloaded, on either side: native (the transformer, and the base VAE decoding at full
    resolution) or DA-VAE (the same transformer extended by D zero-initialised channels; the DA-VAE decoder
    built on that base VAE). Same sampler, text encoders, decode and PNG writing as a real run."""
    from .vae.base import base_decode

    backend = get_backend(preset)
    if backend.conditioning != "prompt":
        raise DavaeError(f"is for text-to-image presets; {preset.name} is a {backend.label} preset",
                         param="random_weights")
    d = 0 if native else preset.vae.detail_channels
    dit = backend.load("random", seed=0, device=device)
    c = backend.channels(dit)
    if d:
        backend.extend(dit, d)
    davae = random_davae(preset, device, dtype)
    if native:
        def decode(z):
            return base_decode(davae.base.vae, davae.transform.inverse(z.to(dtype)))
    else:
        def decode(z):
            return davae.decode(z.to(dtype))
    cfg, _ = backend.scheduler_config(None)
    model = SamplingModel(
        name="native" if native else "davae", backend=type(backend), dit=place_frozen(dit, device, dtype),
        base_channels=c, detail_channels=d, granularity=preset.vae.downsample if native else preset.granularity,
        patch_size=backend.patch_size(dit), shift=float(preset.sample.shift), decoder=decode, recipe=recipe_of(preset),
        conditioning="prompt", scheduler_config=cfg or {"shift": float(preset.sample.shift)},
        guidance_mode=backend.guidance_mode(dict(dit.config)), identity={"weights": "random", "preset": preset.name})
    enc = backend.random_prompt_encoder(use_t5=use_t5, device=device, dtype=dtype)
    return model, model_conditioner(model, enc, negative, device, dtype)


def random_davae(preset: Preset, device, dtype):
    """A DA-VAE with random weights on a random base VAE of the preset's architectures (frozen); on the meta
    device (FLOP counts) nothing is allocated."""
    import contextlib
    import copy

    from .vae.base import BaseVAE, load_base_vae, random_base_config, vae_from_config
    from .vae.model import DetailAlignedVAE

    meta = torch.device(device).type == "meta"
    if meta:
        with torch.device("meta"):
            vae = vae_from_config(dict(preset.vae.base_vae_arch or random_base_config(preset.vae.base_channels)))
        base = BaseVAE(vae, "random", None, "meta")
    else:
        base = load_base_vae("random", latent_channels=preset.vae.base_channels, arch=preset.vae.base_vae_arch)
    vcfg = copy.deepcopy(preset.vae)
    vcfg.base_latent_transform = "config"  # speed only: the per-channel statistics file is not needed
    with torch.device(device) if meta else contextlib.nullcontext():
        davae = DetailAlignedVAE.from_base(base, vcfg)
    place_frozen(base.vae, device, dtype)
    return place_frozen(davae, device, dtype)
