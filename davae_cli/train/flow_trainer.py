"""The DiT trainer `train-dit` and `adapt-dit` share: the flow-matching step (`DiTTrainStep`, `flow_step_loss`),
its optimiser and EMA, exact resume of the trainable weights, the probe loss, the export, and the whole loop
(`train_flow_model`). `adapt_dit` (train/dit.py) adds the zero-init extension, prompts and the detail
channels' statistics; `train_dit` (train/native.py) a random LightningDiT on base latents and a time budget."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import flow
from ..config_schema import Preset
from ..errors import DavaeError
from ..exports import export_adapted  # noqa: F401  (re-exported)
from ..latents import atomic_write_bytes
from .loop import Callbacks, RunLoop, load_checkpoint, lr_lambda, restore_training_state, training_state


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
    has_detail = x0.shape[1] > base_channels
    if has_detail and a.detail_noise > 0:  # only adapt-dit latents have detail channels; drawn before the sigmas
        x0 = flow.with_detail_noise(x0, base_channels, a.detail_noise, gen)
    sigma = flow.sample_sigmas(x0.shape[0], mean=a.logit_mean, std=a.logit_std, shift=preset.dit.train_shift,
                               generator=gen, device=x0.device)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    xt, target = flow.noisy(x0, eps, sigma)
    pred = backend.velocity(model, xt, sigma.to(x0.dtype), cond)
    w = flow.detail_weight(step, a.detail_ramp_steps) if has_detail else 1.0  # only adapt-dit has detail channels
    k = flow.sample_loss_weight(sigma, target=a.loss_target, weighting=a.loss_weighting, gamma=a.loss_weight_gamma)
    loss = flow.flow_loss(pred, target, base_channels, w, k)
    with torch.no_grad():
        err = (pred.float() - target.float()).pow(2)
        parts = {"loss_base": err[:, :base_channels].mean().item()}
        if has_detail:
            parts.update(loss_detail=err[:, base_channels:].mean().item(), w=w)
    if a.cosine_loss > 0:
        cos = flow.cosine_loss(pred, target, base_channels, w if a.cosine_schedule else 1.0)
        parts["loss_cos"] = cos.item()
        loss = loss + a.cosine_loss * cos
    return loss, parts



def check_or_record_run(path: Path, info: dict, is_main: bool) -> None:
    """`run.json`: what the run was started with; --resume refuses another DA-VAE or DiT."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("vae_identity") != info["vae_identity"] or saved.get("dit") != info["dit"]:
            raise DavaeError(": the run was started with a different DA-VAE or DiT "
                             f"({saved.get('vae')}, {saved.get('dit')})", param="resume")
    elif is_main:
        atomic_write_bytes(path, json.dumps(info, indent=2).encode())



def optimisation(backend, model, a, device):
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



def resume_trainable(ckpt_path: Path, named, ema, opt, sched, cb) -> int:
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


def train_flow_model(*, acc, preset: Preset, section, backend, model, latents, normalize, conditioner, keys: list,
                     base_channels: int, run_dir: Path, ckpt_path: Optional[Path], resume: bool, cb: Callbacks,
                     info: dict, export: Callable[[object, int, RunLoop], dict],
                     time_limit_s: Optional[float] = None, job: str = "adapt-dit") -> tuple[int, dict, RunLoop]:
    """The loop both DiT trainers run: optimiser and EMA, resume (trainable weights, state, training time), the
    step-indexed latent loader, `RunLoop`, the probe loss at the start and the end (raw and EMA weights), then
    `export(raw model with the EMA weights, final step, loop) -> fields for the log's export record`.
    `section`: the trainer's settings (`preset.adapt_dit` or `preset.train_dit`); `job`: the command, for the
    trackers, which are closed after the export record. Returns (final step, metrics, loop)."""
    device = acc.device
    named, params, opt, sched, ema = optimisation(backend, model, section, device)
    start_step, spent = 0, 0.0
    if ckpt_path is not None:
        start_step = resume_trainable(ckpt_path, named, ema, opt, sched, cb)
        spent = float(load_checkpoint(ckpt_path).get("train_seconds", 0.0))
    elif resume:
        cb.on_message("no checkpoint yet: starting from step 0")
    ema.to(device)
    model, opt = acc.prepare(model, opt)  # the scheduler is not prepared (accelerate steps it per process)
    raw = acc.unwrap_model(model)
    total, world, rank = section.steps, acc.num_processes, acc.process_index
    dataset, loader = latents.loader(section.seed, start_step, total, section.batch_size, rank, world)
    loop: RunLoop
    loop = RunLoop(acc, run_dir, total=total, start_step=start_step, resumed=ckpt_path is not None, seed=section.seed,
                   log_every=section.log_every, checkpoint_every=section.checkpoint_every,
                   keep_checkpoints=section.keep_checkpoints,
                   state_fn=lambda at: training_state(at, ema, opt, sched, preset,
                                                      trainable={n: p.detach().cpu() for n, p in named},
                                                      train_seconds=loop.train_seconds()),
                   callbacks=cb, time_limit_s=time_limit_s, spent_s=spent, config=preset.to_dict(), job=job)
    probe = ProbeLoss(backend, raw, dataset, normalize, conditioner, keys, base_channels, section.seed, acc)
    loop.start({"device": str(device), "world_size": world, "train_images": len(latents.records), "val_images": 0,
                "trainable_params": sum(p.numel() for p in params), "start_step": start_step,
                "backend": backend.name, **info})
    metrics: dict = {}
    if start_step == 0:
        metrics["probe_loss_start"] = probe()
        loop.write({"step": 0, "event": "probe", "probe_loss": metrics["probe_loss_start"]})
    step_fn = DiTTrainStep(preset, backend, model, params, opt, sched, ema, normalize, conditioner, keys,
                           base_channels, acc, section=section)
    raw.train()
    final_step = loop.run(step_fn, iter(loader))
    metrics["probe_loss_end"] = probe()
    ema.store(params)
    ema.copy_to(params)
    metrics["probe_loss_end_ema"] = probe()
    logged = export(raw, final_step, loop)
    loop.write({"step": final_step, "event": "export", **logged, **metrics, "skipped_steps": step_fn.skipped})
    loop.trackers.finish()
    ema.restore(params)
    metrics.update(skipped_steps=step_fn.skipped, last=loop.last, elapsed_s=round(loop.elapsed_s, 1))
    return final_step, metrics, loop
