"""`adapt_dit`: warm-start a pretrained DiT on DA-VAE latents (SPEC §6).

The DiT is extended with zero-initialised channels, so step 0 is exactly the pretrained model; it then
trains with rectified flow (velocity target, logit-normal timesteps shifted by `dit.train_shift`) and the
cosine detail-loss schedule w(n), plus the optional cosine velocity term (`adapt_dit.cosine_loss`). Base
channels keep the DiT's own normalisation (the DA-VAE's latent transform); detail channels are standardised
with per-channel statistics measured on the DiT's own training latents (the DA-VAE's stored statistics
only for a warm start exported without data).

Run folder: `config.yaml`, `run.json` (DA-VAE, DiT and data it was started with), `cache/` (latents and
prompt embeddings, made once), `checkpoints/`, `log.jsonl`, and `final/`: the adapted model (SD3: a plain
diffusers `SD3Transformer2DModel` folder with the LoRA merged, the adapter in `final/lora/`; LightningDiT:
safetensors + config) and `final/davae_dit.json` with what sampling needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import flow
from ..config import Preset
from ..dit.backend import FACTS_FILE, get_backend
from ..errors import DavaeError
from ..latent_data import training_latents
from ..streams import Fields, is_stream, probe_shards
from ..latents import LatentNormalizer, atomic_write_bytes
from ..vae.model import DetailAlignedVAE
from .loop import (Callbacks, RunLoop, load_checkpoint, lr_lambda, open_run, restore_training_state,
                   training_state, unlock_run, write_folder)


@dataclass
class AdaptDiTResult:
    run_dir: str
    final_dir: str
    steps: int
    metrics: dict


def build_adapted_dit(preset: Preset, vae: DetailAlignedVAE, dit_spec: Optional[str] = None, seed: int = 0):
    """(backend, extended model): the pretrained DiT with the zero-init extension for this DA-VAE's D."""
    backend = get_backend(preset)
    model = backend.load(dit_spec or preset.dit.pretrained, seed=seed)
    c, d = vae.config.base_channels, vae.config.detail_channels
    if backend.channels(model) != c:
        raise DavaeError(f"the DiT reads {backend.channels(model)} latent channels but the DA-VAE's base has C = {c}; "
                         f"they do not belong together")
    p = backend.patch_size(model)
    side = preset.adapt_dit.resolution // vae.granularity
    grid = getattr(model.config, "input_size", None) if backend.name == "lightningdit" else None
    if grid is not None and int(grid) != side:
        raise DavaeError(f"the DiT was built for a {grid}x{grid} latent grid, but adapt_dit.resolution "
                         f"{preset.adapt_dit.resolution} with this DA-VAE (s*f = {vae.granularity}) needs {side}x{side}: "
                         f"adapt a DiT trained at {side * vae.config.downsample}² (its base resolution)", param="dit")
    if dit_spec and Path(dit_spec).is_dir():
        from .native import check_native_space, read_native_facts

        check_native_space(read_native_facts(dit_spec), vae, f"--dit {dit_spec}")
    if side % p:
        raise DavaeError(f"adapt_dit.resolution {preset.adapt_dit.resolution}: the latent side is not divisible by "
                         f"the DiT's patch size {p}")
    backend.extend(model, d)
    return backend, model


def sampling_facts(preset: Preset, vae: DetailAlignedVAE, vae_dir: Path, backend, model, dit_spec: str,
                   steps: int, detail_stats: Optional[dict] = None) -> dict:
    """What sampling needs, written beside the adapted model (`davae_dit.json`): both timestep shifts, the
    sampling recipe, SD3's scheduler configuration, and the detail channels' statistics (`detail_stats`:
    measured on the DiT's training latents; None: the DA-VAE's own, from its training crops)."""
    d, smp = preset.dit, preset.sample
    cond: dict[str, Any]
    if backend.conditioning == "prompt":
        cond = {"type": "prompt", "text_encoders": d.text_encoders, "max_sequence_length": d.max_sequence_length,
                "use_t5": d.use_t5}
    else:
        cond = {"type": "class", "num_classes": d.num_classes}
    if detail_stats is None:
        detail_stats = {"mean": [float(v) for v in vae.detail_mean], "std": [float(v) for v in vae.detail_std],
                        "source": "davae"}
    facts = {
        "format": "davae-dit", "version": 2, "backend": backend.name, "preset": preset.name,
        "train_shift": d.train_shift, "sample_shift": smp.shift,
        "sampling": {"steps": smp.steps, "guidance": smp.guidance,
                     "guidance_interval": list(smp.guidance_interval) if smp.guidance_interval else None,
                     "sampler": smp.sampler, "negative_prompt": smp.negative_prompt},
        "base_channels": vae.config.base_channels,
        "detail_channels": vae.config.detail_channels, "patch_size": backend.patch_size(model),
        "resolution": preset.adapt_dit.resolution, "granularity": vae.granularity,
        "detail_mean": detail_stats["mean"], "detail_std": detail_stats["std"],
        "detail_view": detail_stats.get("view", "raw"),
        "detail_stats": {k: v for k, v in detail_stats.items() if k not in ("mean", "std", "view")},
        "base_normalisation": "as encoded by the DA-VAE (its base latent transform), unchanged",
        "davae": {"path": str(Path(vae_dir).resolve()), "identity": vae.identity,
                  "base_vae_hash": vae.config.base_vae_hash},
        "dit_source": dit_spec, "steps": steps, "conditioning": cond,
    }
    if backend.name in ("sd3", "flux"):
        from ..dit.sd3 import scheduler_config_of

        cfg = scheduler_config_of(dit_spec)
        if backend.name == "flux":
            from ..dit.flux import FLUX1_SCHEDULER_CONFIG

            facts["scheduler_config"] = cfg or dict(FLUX1_SCHEDULER_CONFIG)
            facts["scheduler_source"] = "the DiT's pipeline" if cfg else "FLUX.1's scheduler_config"
            facts["guidance_distilled"] = bool(model.config.guidance_embeds)
        else:
            facts["scheduler_config"] = cfg or {}
            facts["scheduler_source"] = "the DiT's pipeline" if cfg else "diffusers' FlowMatchEulerDiscreteScheduler defaults"
    return facts


def export_adapted(backend, model, facts: dict, out_dir: Path, facts_file: str = FACTS_FILE) -> None:
    """Write into a temporary folder, then rename: `out_dir` is complete or absent."""
    def write(tmp: Path) -> None:
        backend.export(model, tmp)
        atomic_write_bytes(tmp / facts_file, json.dumps(facts, indent=2).encode())

    write_folder(out_dir, write, "the adapted DiT")


class PromptConditioner:
    """Prompt embeddings from the run's cache (computed once, text encoders unloaded before training)."""

    def __init__(self, preset: Preset, cache_dir: Path, prompts: list[str], device, is_main: bool, barrier,
                 on_message=lambda s: None):
        from ..text import FluxPromptEncoder, PromptCache, PromptEncoder

        d = preset.dit
        flux = d.backend == "flux"
        if not d.text_encoders:
            raise DavaeError("dit.text_encoders is not set: name an SD3 pipeline folder or hub id with the text "
                             "encoders (--text-encoders)")
        self.cache = PromptCache.for_spec(cache_dir, d.text_encoders, max_sequence_length=d.max_sequence_length,
                                          use_t5=True if flux else d.use_t5, kind="flux" if flux else "sd3")
        wanted = sorted(set(prompts) | {""})
        if is_main:
            missing = self.cache.missing(wanted)
            if missing:
                on_message(f"encoding {len(missing)} prompt(s) with {d.text_encoders} (once; cached in {cache_dir})")
            self.cache.encode_cached(
                (lambda: FluxPromptEncoder.from_spec(d.text_encoders, device=device,
                                                     max_sequence_length=d.max_sequence_length)) if flux else
                (lambda: PromptEncoder.from_spec(d.text_encoders, device=device, use_t5=d.use_t5,
                                                 max_sequence_length=d.max_sequence_length)), wanted)
        barrier()
        self._mem: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.device = device
        # FLUX.1-dev trains with its guidance embedding fed the sampling guidance (as diffusers' FLUX LoRA
        # scripts); flux_velocity drops it for a model without the embedding (FLUX.1-schnell)
        self.guidance = float(preset.sample.guidance) if flux else None

    def _get(self, prompt: str):
        if prompt not in self._mem:
            if len(self._mem) > 4096:
                self._mem.clear()
            self._mem[prompt] = self.cache.load(prompt)
        return self._mem[prompt]

    def batch(self, prompts: list[str], drop: torch.Tensor) -> dict:
        items = [self._get("" if bool(dr) else p) for p, dr in zip(prompts, drop)]
        out = {"embeds": torch.stack([e for e, _ in items]).to(self.device),
               "pooled": torch.stack([p for _, p in items]).to(self.device)}
        if self.guidance is not None:
            out["guidance"] = torch.full((len(items),), self.guidance, device=self.device)
        return out


class ClassConditioner:
    def __init__(self, num_classes: int, device):
        self.null, self.device = num_classes, device

    def batch(self, labels: list[int], drop: torch.Tensor) -> dict:
        y = torch.tensor(labels, dtype=torch.long)
        y = torch.where(drop.cpu(), torch.full_like(y, self.null), y)
        return {"labels": y.to(self.device)}


def flow_step_loss(backend, model, x0: torch.Tensor, cond: dict, step: int, preset: Preset, base_channels: int,
                   gen: torch.Generator, section=None) -> tuple[torch.Tensor, dict]:
    """The training objective at `step` for normalised latents x0 (noise and sigmas from `gen`). `section`:
    the trainer's settings (default `preset.adapt_dit`; `preset.train_dit` for a native model, whose latents
    have no detail channels, so w(n) does not apply)."""
    a = section or preset.adapt_dit
    sigma = flow.sample_sigmas(x0.shape[0], mean=a.logit_mean, std=a.logit_std, shift=preset.dit.train_shift,
                               generator=gen, device=x0.device)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    xt, target = flow.noisy(x0, eps, sigma)
    pred = backend.velocity(model, xt, sigma.to(x0.dtype), cond)
    has_detail = x0.shape[1] > base_channels
    w = flow.detail_weight(step, a.detail_ramp_steps) if has_detail else 1.0
    k = flow.sample_loss_weight(sigma, target=getattr(a, "loss_target", "velocity"),
                                weighting=getattr(a, "loss_weighting", "none"), gamma=getattr(a, "loss_weight_gamma", 5.0))
    loss = flow.flow_loss(pred, target, base_channels, w, k)
    with torch.no_grad():
        err = (pred.float() - target.float()).pow(2)
        parts = {"loss_base": err[:, :base_channels].mean().item()}
        if has_detail:
            parts.update(loss_detail=err[:, base_channels:].mean().item(), w=w)
    if a.cosine_loss > 0:
        cos = flow.cosine_loss(pred, target, base_channels, w if getattr(a, "cosine_schedule", True) else 1.0)
        parts["loss_cos"] = cos.item()
        loss = loss + a.cosine_loss * cos
    return loss, parts


def _check_or_record_run(path: Path, info: dict, is_main: bool) -> None:
    """`run.json`: what the run was started with; --resume refuses another DA-VAE or DiT."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("vae_identity") != info["vae_identity"] or saved.get("dit") != info["dit"]:
            raise DavaeError(": the run was started with a different DA-VAE or DiT "
                             f"({saved.get('vae')}, {saved.get('dit')})", param="resume")
    elif is_main:
        atomic_write_bytes(path, json.dumps(info, indent=2).encode())


def _conditioning(preset: Preset, backend, records, run_dir: Path, acc, cb):
    """(conditioner, the condition key of each record): cached prompt embeddings, or checked class labels."""
    if backend.conditioning == "prompt":
        conditioner = PromptConditioner(preset, run_dir / "cache" / "prompts", [r.prompt for r in records],
                                        acc.device, acc.is_main_process, acc.wait_for_everyone, cb.on_message)
        return conditioner, [r.prompt for r in records]
    bad = [r for r in records if not 0 <= r.label < preset.dit.num_classes]
    if bad:
        raise DavaeError(f"class label {bad[0].label} of {bad[0].source} is outside 0..{preset.dit.num_classes - 1} "
                         f"(dit.num_classes)")
    return ClassConditioner(preset.dit.num_classes, acc.device), [r.label for r in records]


def _optimisation(backend, model, a, device):
    """(named trainable parameters, parameters, AdamW, schedule, EMA) of the adapted model."""
    from diffusers.training_utils import EMAModel

    trainable_names = set(backend.prepare_training(model))
    if a.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    model.to(device)
    named = [(n, p) for n, p in model.named_parameters() if n in trainable_names]
    params = [p for _, p in named]
    for p in params:  # trainable weights (LoRA included) stay fp32 whatever the autocast dtype (SPEC §10.7)
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=a.lr, betas=tuple(a.betas), weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(a.warmup_steps, a.steps, "constant"))
    return named, params, opt, sched, EMAModel(params, decay=a.ema_decay, use_ema_warmup=False)


def _resume(ckpt_path: Path, named, ema, opt, sched, cb) -> int:
    """Load a checkpoint's trainable weights and training state; returns its step."""
    state = load_checkpoint(ckpt_path)
    current = dict(named)
    if set(state["trainable"]) != set(current):
        raise DavaeError(f": checkpoint {ckpt_path.name} holds other trainable weights than this model", param="resume")
    with torch.no_grad():
        for n, t in state["trainable"].items():
            current[n].copy_(t)
    start_step = restore_training_state(state, ema, opt, sched)
    cb.on_message(f"resumed from {ckpt_path.name} (step {start_step})")
    return start_step


class DiTTrainStep:
    """One optimisation step of the adapted DiT (RunLoop's `step_fn`): normalised latents, condition dropout,
    the scheduled flow loss, clipping, skipping of non-finite or huge gradient norms, EMA."""

    ABORT_AFTER = 20  # this many skipped updates in a row from step 0 end the run with an error

    def __init__(self, preset: Preset, backend, model, params, opt, sched, ema, normalize, conditioner, keys,
                 base_channels: int, acc, section=None):
        self.preset, self.a = preset, section or preset.adapt_dit
        self.backend, self.model, self.params, self.opt, self.sched, self.ema = backend, model, params, opt, sched, ema
        self.normalize, self.conditioner, self.keys, self.c, self.acc = normalize, conditioner, keys, base_channels, acc
        self.skipped = 0

    def __call__(self, step: int, batch, gen: torch.Generator) -> dict:
        a, acc, device = self.a, self.acc, self.acc.device
        lat, idx = batch
        x0 = self.normalize(lat.to(device))
        drop = torch.rand(x0.shape[0], generator=gen, device=device) < self.preset.dit.cond_dropout
        cond = self.conditioner.batch([self.keys[int(i)] for i in idx], drop)
        with acc.autocast():
            loss, parts = flow_step_loss(self.backend, self.model, x0, cond, step, self.preset, self.c, gen, self.a)
        self.opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        gnorm = float(acc.clip_grad_norm_(self.params, a.grad_clip if a.grad_clip > 0 else float("inf")))
        parts.update(loss=loss.item(), grad_norm=gnorm, lr=self.sched.get_last_lr()[0])
        if not (math.isfinite(gnorm) and math.isfinite(parts["loss"])) or gnorm > a.skip_grad_norm:
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            parts["skipped"] = 1
            if self.skipped == step + 1 >= self.ABORT_AFTER:  # nothing has been learned: stop, say why
                raise DavaeError(f"every one of the first {self.skipped} updates was skipped (gradient norm "
                                 f"{gnorm:.3g} > skip_grad_norm {a.skip_grad_norm:g}, or not finite); raise "
                                 f"skip_grad_norm or lower the learning rate")
        else:
            self.opt.step()
            self.ema.step(self.params)
        self.sched.step()
        return parts


class ProbeLoss:
    """A fixed-noise flow loss at full detail weight on the first few training latents (sigmas 0.1..0.9):
    comparable across steps and runs, logged at the start and the end."""

    def __init__(self, backend, model, dataset, normalize, conditioner, keys, base_channels: int, seed: int, acc):
        n = min(len(keys), 8)
        self.x = normalize(torch.stack([dataset[i][0] for i in range(n)])).to(acc.device)
        self.keys = [keys[dataset.index(i)] for i in range(n)]
        self.backend, self.model, self.conditioner, self.c, self.seed, self.acc = \
            backend, model, conditioner, base_channels, seed, acc

    @torch.no_grad()
    def __call__(self) -> float:
        device, n = self.acc.device, self.x.shape[0]
        g = torch.Generator(device=device).manual_seed(self.seed + 99991)
        cond = self.conditioner.batch(self.keys, torch.zeros(n, dtype=torch.bool))
        self.model.eval()
        with self.acc.autocast():
            sigma = torch.linspace(0.1, 0.9, n, device=device)
            eps = torch.randn(self.x.shape, generator=g, device=device)
            xt, target = flow.noisy(self.x, eps, sigma)
            pred = self.backend.velocity(self.model, xt, sigma, cond)
        self.model.train()
        return float(flow.flow_loss(pred, target, self.c, 1.0))


def adapt_dit(preset: Preset, vae_dir: str | Path, run_dir: str | Path, *, data: Optional[list[str]] = None,
              dit: Optional[str] = None, captions: Optional[str] = None, resume: bool = False,
              callbacks: Optional[Callbacks] = None) -> AdaptDiTResult:
    """Adapt the preset's DiT (or `dit`) to the DA-VAE in `vae_dir`; see the module doc."""
    cb = callbacks or Callbacks()
    run_dir = Path(run_dir)
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise DavaeError(f"{vae_dir}: not a DA-VAE folder (no config.json; made by `davae train-vae`)", param="vae")
    dit_spec = dit or preset.dit.pretrained
    # the DA-VAE, the DiT and the data are checked before the run folder is made: a bad one writes nothing
    vae = DetailAlignedVAE.from_pretrained(str(vae_dir)).eval()
    backend, model = build_adapted_dit(preset, vae, dit_spec, seed=preset.adapt_dit.seed)
    streamed = bool(data) and any(is_stream(str(d)) for d in data)
    fields = Fields(preset.data.image_key, preset.data.caption_key, preset.data.label_key)
    if streamed and not resume:
        probe_shards([str(d) for d in data], fields, backend.conditioning)
    if data and not resume and backend.conditioning == "class" and not streamed:
        from .native import check_class_data

        check_class_data([str(d) for d in data], captions, latents_ok=True)
    acc, preset, ckpt_path = open_run(run_dir, preset, resume, section="adapt_dit", on_message=cb.on_message)
    a = preset.adapt_dit
    run_info = {"vae": str(vae_dir.resolve()), "dit": dit_spec, "data": [str(d) for d in data or []]}
    device = acc.device
    vae.to(device)
    _check_or_record_run(run_dir / "run.json", {**run_info, "vae_identity": vae.identity}, acc.is_main_process)
    c = vae.config.base_channels
    final_dir = run_dir / "final"

    if a.steps == 0 and not data:  # the warm start itself, with the DA-VAE's own detail statistics
        if acc.is_main_process:
            export_adapted(backend, model, sampling_facts(preset, vae, vae_dir, backend, model, dit_spec, 0), final_dir)
        cb.on_end({"steps": 0})
        unlock_run(run_dir)
        return AdaptDiTResult(str(run_dir), str(final_dir), 0, {})

    if not data:
        raise DavaeError("is required when training (--steps > 0)", param="data")
    latents = training_latents(vae, data, run_dir / "cache", resolution=a.resolution,
                               conditioning=backend.conditioning, encode_batch_size=a.encode_batch_size,
                               captions=captions, stats_limit=a.detail_stats_latents, seed=a.seed, acc=acc,
                               on_message=cb.on_message, max_images=a.max_images,
                               residual=a.detail_view == "residual",
                               progress=lambda done, total: cb.on_progress("encoding the training latents", done, total),
                               fields=fields, shard_size=preset.data.latent_shard_size)
    records, stats = latents.records, latents.detail_stats
    conditioner, keys = _conditioning(preset, backend, records, run_dir, acc, cb)
    normalize = LatentNormalizer(c, stats["mean"], stats["std"], residual=a.detail_view == "residual")
    facts = sampling_facts(preset, vae, vae_dir, backend, model, dit_spec, 0, stats)  # "steps" is set at export
    if a.steps == 0:
        if acc.is_main_process:
            export_adapted(backend, model, facts, final_dir)
        cb.on_end({"steps": 0, "detail_stats": stats})
        unlock_run(run_dir)
        return AdaptDiTResult(str(run_dir), str(final_dir), 0, {})
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()

    named, params, opt, sched, ema = _optimisation(backend, model, a, device)
    start_step = _resume(ckpt_path, named, ema, opt, sched, cb) if ckpt_path is not None else 0
    spent = float(load_checkpoint(ckpt_path).get("train_seconds", 0.0)) if ckpt_path is not None else 0.0
    if ckpt_path is None and resume:
        cb.on_message("no checkpoint yet: starting from step 0")
    ema.to(device)

    model, opt = acc.prepare(model, opt)  # the scheduler is not prepared (accelerate steps it per process)
    raw = acc.unwrap_model(model)
    total, world, rank = a.steps, acc.num_processes, acc.process_index
    dataset, loader = latents.loader(a.seed, start_step, total, a.batch_size, rank, world)
    loop: RunLoop
    loop = RunLoop(acc, run_dir, total=total, start_step=start_step, resumed=ckpt_path is not None, seed=a.seed,
                   log_every=a.log_every, checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints,
                   state_fn=lambda at: training_state(at, ema, opt, sched, preset,
                                                      trainable={n: p.detach().cpu() for n, p in named},
                                                      train_seconds=loop.train_seconds()),
                   callbacks=cb, spent_s=spent)

    probe = ProbeLoss(backend, raw, dataset, normalize, conditioner, keys, c, a.seed, acc)
    info = {"device": str(device), "world_size": world, "train_images": len(records), "val_images": 0,
            "trainable_params": sum(p.numel() for p in params), "start_step": start_step, "backend": backend.name}
    loop.start(info)
    metrics: dict = {}
    if start_step == 0:
        metrics["probe_loss_start"] = probe()
        loop.write({"step": 0, "event": "probe", "probe_loss": metrics["probe_loss_start"]})

    step_fn = DiTTrainStep(preset, backend, model, params, opt, sched, ema, normalize, conditioner, keys, c, acc)
    raw.train()
    loop.run(step_fn, iter(loader))
    skipped = step_fn.skipped

    metrics["probe_loss_end"] = probe()
    ema.store(params)
    ema.copy_to(params)
    metrics["probe_loss_end_ema"] = probe()
    facts["steps"] = total
    facts["train_seconds"] = round(loop.train_seconds(), 1)  # the training loop's time, across resumes
    if acc.is_main_process:
        export_adapted(backend, raw, facts, final_dir)
    loop.write({"step": total, "event": "export", "final": str(final_dir), **metrics, "skipped_steps": skipped})
    ema.restore(params)
    metrics.update(skipped_steps=skipped, last=loop.last, elapsed_s=round(loop.elapsed_s, 1))
    cb.on_end(metrics)
    unlock_run(run_dir)
    return AdaptDiTResult(str(run_dir), str(final_dir), total, metrics)
