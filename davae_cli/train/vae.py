"""`train_vae`: build a DA-VAE on a base VAE and train it with the losses of SPEC §5.

One process or many (launch with `accelerate launch -m davae_cli train-vae ...`). The run folder
holds `config.yaml` (the resolved preset), `checkpoints/` (atomic, last K, `latest` pointer),
`log.jsonl`, `samples/` (image grids), `trackers/` (with `report_to`: train/trackers.py) and, at the end,
`final/` (the exported DA-VAE, EMA weights).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .. import latents as L
from ..config_schema import Preset
from ..data import ImageSource, StepCropDataset, center_crops, list_images, training_images, vae_training_data
from ..errors import DavaeError, first_line
from ..exports import export_davae  # noqa: F401  (re-exported: callers of train.vae keep working)
from ..latents import atomic_write_bytes
from ..metrics import reconstruction_metrics
from ..streams import Fields, ShardStream, StreamBatches, is_stream, resume_position, streamed_training_images
from ..vae.base import load_base_vae
from ..metrics.lpips_weights import build_lpips
from ..vae.losses import PatchDiscriminator, align_loss, grad_norm_ratio, hinge_d_loss, kl_divergence
from ..vae.model import DetailAlignedVAE
from .loop import (Callbacks, RunFinished, RunLoop, load_checkpoint, lr_lambda, open_run, restore_training_state,
                   training_state, unlock_run)
from .trackers import tracker_names


@dataclass
class TrainVAEResult:
    run_dir: str
    final_dir: Optional[str]
    steps: int
    metrics: dict
    skipped_images: int
    already_finished: bool = False  # `resume` of a finished run: nothing was done, `final_dir` is its export


class VAETrainStep:
    """One DA-VAE optimisation step: the generator losses of SPEC §5, then the discriminator."""

    def __init__(self, preset: Preset, model, lpips_model, disc):
        self.p, self.lo = preset, preset.loss
        self.model, self.lpips, self.disc = model, lpips_model, disc

    def generator_losses(self, model, raw, x: torch.Tensor, step: int, generator: torch.Generator,
                         base_cache=None) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """`model` is what accelerate prepared (maybe DDP-wrapped), `raw` the DetailAlignedVAE inside;
        `base_cache`: precomputed (z_base, baseline) of x (train_vae.cache_base)."""
        lo = self.lo
        out = model(x, sample=lo.sample_posterior, generator=generator, detail_dropout=lo.detail_dropout,
                    base_cache=base_cache, dropout_rescale=lo.detail_dropout_rescale)
        x_hat = out["x_hat"]
        if lo.recon_target == "base_reconstruction":
            x = raw.reconstruct_base_full(x)
        l1 = (x_hat - x).abs().mean()
        rec = lo.l1 * l1
        parts = {"l1": l1.item()}
        if self.lpips is not None and lo.lpips > 0:
            lp = self.lpips(x_hat.float().clamp(-1, 1), x.float()).mean()
            rec = rec + lo.lpips * lp
            parts["lpips"] = lp.item()
        kl = kl_divergence(out["mean"], out["logvar"], lo.kl_reduction)
        target = raw.transform.inverse(out["z_base"]) if lo.align_target == "raw" else out["z_base"]
        al = align_loss(out["z_detail"] if lo.align_on == "sample" else out["mean"], target)
        parts.update(kl=kl.item(), align=al.item())
        total = rec + lo.kl * kl
        if lo.align > 0:
            lam = torch.tensor(lo.align, device=x.device)
            if lo.align_mode == "adaptive" and torch.is_grad_enabled():
                lam = lo.align * grad_norm_ratio(rec, al, raw.encoder_last_layer())
            total = total + lam * al
            parts["align_weight"] = float(lam)
        if self.disc is not None and lo.adv > 0 and step >= lo.disc_start:
            g = -self.disc(x_hat).mean()
            w = grad_norm_ratio(rec, g, raw.decoder_last_layer()) if torch.is_grad_enabled() else torch.zeros(())
            total = total + lo.adv * w * g
            parts.update(g_loss=g.item(), adv_weight=float(w))
        parts["loss"] = total.item()
        return total, parts, x_hat


@torch.no_grad()
def base_cache_key(model: DetailAlignedVAE, source: ImageSource) -> str:
    """What the frozen base's outputs of `source` depend on, hashed: the base VAE (content hash), the DA-VAE's
    base-side settings (scale, downsampling, resize, latent transform and its values), and every image (path,
    size, modification time)."""
    import hashlib
    import json

    keys = ("base_vae_hash", "base_channels", "downsample", "scale", "base_resize", "latent_transform")
    parts = {"config": {k: model.config.get(k) for k in keys},
             "transform": [t.tolist() for t in model.transform.state_dict().values()],
             "images": [[str(it), *((os.stat(it).st_size, os.stat(it).st_mtime_ns) if isinstance(it, (str, Path))
                                    and os.path.exists(it) else ())] for it in source.items]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _base_cache(model: DetailAlignedVAE, source: ImageSource, cb: Callbacks, cache_dir: Optional[Path] = None) -> list:
    """(x, baseline, z_base) per training image, each image centre-cropped to a multiple of s*f: the frozen
    base runs once per image instead of once per step. Held on the CPU (float32), and kept in `cache_dir`
    (RUN/cache/base-<key>.pt, key = `base_cache_key`) so that a resume reads it instead of recomputing it."""
    path = Path(cache_dir) / f"base-{base_cache_key(model, source)[:24]}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            out = torch.load(path, weights_only=True)
            cb.on_message(f"read the frozen base's outputs for {len(out)} training images from {path}")
            return out
        except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed
            cb.on_message(f"recomputing the base cache: {path} is unreadable ({first_line(e, 100)})")
    out = _compute_base_cache(model, source, cb)
    if path is not None:
        import io

        buf = io.BytesIO()
        torch.save(out, buf)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    return out


def _compute_base_cache(model: DetailAlignedVAE, source: ImageSource, cb: Callbacks) -> list:
    from ..data import fit_to_multiple, read_image, to_tensor

    device = next(model.parameters()).device
    out, t0 = [], time.time()
    phase = "caching the frozen base's outputs"
    cb.on_progress(phase, 0, len(source.items))
    for i, item in enumerate(source.items):
        cb.on_progress(phase, i, len(source.items))
        try:
            arr = fit_to_multiple(read_image(item), None, model.granularity)
        except Exception as e:  # noqa: BLE001 - an unreadable image is skipped, like StepCropDataset does
            cb.on_message(f"skipped unreadable image {item}: {first_line(e, 100)}")
            continue
        x = to_tensor(arr)[None].to(device)
        z = model.encode_base(x)
        out.append((x[0].cpu(), model.decode_baseline(z)[0].cpu(), z[0].cpu()))
    cb.on_progress(phase, len(source.items), len(source.items))
    cb.on_message(f"cached the frozen base's outputs for {len(out)} training images in {time.time() - t0:.0f} s")
    return out


def _load_init(model: DetailAlignedVAE, folder: str, base, cb: Callbacks, decoder_only: bool = False) -> None:
    """`train_vae.init_from`: the weights (and detail statistics) of the DA-VAE in `folder`, which must be the
    architecture the preset describes, on the same base VAE. A decoder-only fine-tune may change the decoder
    settings that add no parameters (`DetailAlignedVAE.DECODER_SETTINGS`, e.g. `vae.residual_band`)."""
    init = DetailAlignedVAE.from_pretrained(folder, base_vae=base)
    for key, mine in model.config.items():
        if key.startswith("base_vae_") and key != "base_vae_hash":
            continue  # where the base VAE was loaded from, not what it is (the hash is checked)
        if decoder_only and key in DetailAlignedVAE.DECODER_SETTINGS:
            if init.config.get(key) != mine:
                cb.on_message(f"vae {key}: {init.config.get(key)!r} in {folder}, {mine!r} in this fine-tune")
            continue
        if init.config.get(key) != mine:
            raise DavaeError(f"train_vae.init_from: {folder} has vae {key} = {init.config.get(key)!r} where the "
                             f"preset has {mine!r}: pass the preset it was trained with")
    model.load_state_dict(init.state_dict())
    cb.on_message(f"starting from the weights of {folder} (latent {init.latent_identity[7:19]})")


def _optimizer(params_groups, lr: float, betas, wd: float):
    return torch.optim.AdamW(params_groups, lr=lr, betas=tuple(betas), weight_decay=wd)


@torch.no_grad()
def evaluate_held_out(model: DetailAlignedVAE, images: torch.Tensor, batch_size: int = 8,
                            lpips_model=None, baselines: bool = True) -> dict:
    """PSNR/SSIM(/LPIPS) on held-out images (B, 3, H, W) in [-1, 1]:
    (b) the DA-VAE; with `baselines`, (a) the base at 1/s + bicubic (same tokens) and (c) the base at
    full resolution (s^2 times the tokens), and the DA-VAE with z_d replaced by its least-squares prediction
    from z_base (`davae_detail_from_base`; `detail_gain_db` = what z_d's own content adds in PSNR);
    MSE(Proj(mu_d), z_base); and `detail_structure` of the latents (is the detail part generable:
    metrics.latent_stats)."""
    from ..metrics.image import as_8bit, sharpness
    from ..metrics.latent_stats import DetailFromBase, detail_structure

    device = next(model.parameters()).device
    acc: dict[str, list] = {}
    latents = []

    def add(key, val):
        acc.setdefault(key, []).append(val.detach().float().cpu())

    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        enc = model.encode(x)
        latents.append(enc.latent.float().cpu())
        outs = {"davae": model.decode(enc.latent).clamp(-1, 1)}
        add("align_mse", F.mse_loss(L.project(enc.mean, enc.z_base.shape[1]), enc.z_base, reduction="none").flatten(1).mean(1))
        if baselines:
            outs["base_half_bicubic"] = model.decode_baseline(enc.z_base)
            outs["base_full"] = model.reconstruct_base_full(x)
        add("images.sharpness", sharpness(as_8bit(x)))
        for name, y in outs.items():
            for metric, values in reconstruction_metrics(y, x, lpips_model).items():
                add(f"{name}.{metric}", values)
            add(f"{name}.sharpness", sharpness(as_8bit(y)))
    if baselines:  # the decoder on z_base alone: z_d replaced by its linear prediction from z_base
        predictor = DetailFromBase.fit(latents, model.config.base_channels)
        for i, z in enumerate(latents):
            x = images[i * batch_size : (i + 1) * batch_size].to(device)
            y = model.decode(predictor.predict(z.to(device))).clamp(-1, 1)
            for metric, values in reconstruction_metrics(y, x, lpips_model).items():
                add(f"davae_detail_from_base.{metric}", values)
            add("davae_detail_from_base.sharpness", sharpness(as_8bit(y)))
    res = {k: float(torch.cat(v).mean()) for k, v in acc.items()}
    res["num_images"] = int(images.shape[0])
    res["detail_structure"] = detail_structure(latents, model.config.base_channels)
    if baselines:
        # what the detail channels' own content adds over the decoder's upsampling of z_base
        res["detail_gain_db"] = res["davae.psnr"] - res["davae_detail_from_base.psnr"]
        a, b, c = res["base_half_bicubic.psnr"], res["davae.psnr"], res["base_full.psnr"]
        # share of the PSNR gap from the baseline (a) to the full-resolution base (c) that the DA-VAE closes
        res["gap_closed"] = (b - a) / (c - a) if c - a > 0.1 else None
    return res


@torch.no_grad()
def measure_detail_stats(model: DetailAlignedVAE, source, num_images: int, size: int,
                         seed: int, batch_size: int, cb: Optional[Callbacks] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean/std of the detail posterior mean over `num_images` random crops of `source` (an
    `ImageSource`, or `streams.StreamedImages`)."""
    from ..streams import StreamedImages, crops_of_stream

    device = next(model.parameters()).device
    if isinstance(source, StreamedImages):
        crops = crops_of_stream(source, size, seed + 1_000_003, num_images)
    else:
        ds = StepCropDataset(source, size, seed + 1_000_003, num_images)
        crops = (ds[n] for n in range(num_images))
    total, sq, count = None, None, 0
    cb = cb or Callbacks()
    for i in range(0, num_images, batch_size):
        cb.on_progress("measuring the detail channels' statistics", i, num_images)
        x = torch.stack([next(crops) for _ in range(i, min(num_images, i + batch_size))]).to(device)
        mu = model.encode(x).mean.double()
        s1, s2 = mu.sum(dim=(0, 2, 3)), mu.pow(2).sum(dim=(0, 2, 3))
        total = s1 if total is None else total + s1
        sq = s2 if sq is None else sq + s2
        count += mu.shape[0] * mu.shape[2] * mu.shape[3]
    cb.on_progress("measuring the detail channels' statistics", num_images, num_images)
    mean = total / count
    std = (sq / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float().cpu(), std.float().cpu(), num_images


def _save_grid(path: Path, rows: list[torch.Tensor]):
    """Rows of (input | base at 1/s + bicubic | DA-VAE), written atomically as PNG; returns the grid as an
    (H, W, 3) uint8 array."""
    import io

    from torchvision.utils import make_grid
    from PIL import Image

    tiles = torch.stack([t for row in rows for t in row]).float().clamp(-1, 1).add(1).div(2)
    grid = make_grid(tiles, nrow=3, padding=2, pad_value=1.0)
    arr = grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return arr


class VAEOptimStep:
    """One optimisation step of the DA-VAE (RunLoop's `step_fn`): generator losses, clipping, skipping of a
    non-finite loss, EMA, then the discriminator's hinge step once it has started."""

    def __init__(self, losses: "VAETrainStep", acc, model, opt, sched, ema, trainable, opt_d, t):
        self.losses, self.acc, self.model, self.opt, self.sched = losses, acc, model, opt, sched
        self.ema, self.trainable, self.opt_d, self.t = ema, trainable, opt_d, t
        self.raw = acc.unwrap_model(model)

    def __call__(self, step: int, batch, gen: torch.Generator) -> dict:
        acc, t, device = self.acc, self.t, self.acc.device
        base_cache = None
        if isinstance(batch, (list, tuple)):
            x, baseline, z_base = (b.to(device, non_blocking=True) for b in batch)
            base_cache = (z_base, baseline)
        else:
            x = batch.to(device, non_blocking=True)
        with acc.autocast():
            loss, parts, x_hat = self.losses.generator_losses(self.model, self.raw, x, step, gen, base_cache)
        self.opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if acc.sync_gradients and t.grad_clip > 0:
            parts["grad_norm"] = float(acc.clip_grad_norm_(self.trainable, t.grad_clip))
        if not math.isfinite(parts["loss"]):
            self.opt.zero_grad(set_to_none=True)
            parts["skipped"] = 1
        else:
            self.opt.step()
        self.sched.step()
        self.ema.step(self.trainable)
        disc = self.losses.disc
        if disc is not None and step >= self.losses.lo.disc_start:
            with acc.autocast():
                d_loss = hinge_d_loss(disc(x), disc(x_hat.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            acc.backward(d_loss)
            self.opt_d.step()
            parts["d_loss"] = d_loss.item()
        parts["lr"] = self.sched.get_last_lr()[0]
        return parts


class HeldOutEvaluator:
    """`evaluate(step)`: the EMA weights on the held-out crops (`evaluate_held_out`), a sample grid
    (input | baseline | DA-VAE) in `samples/` and, as `eval/reconstructions`, to the trackers (`loop`'s), and
    an `eval` log record; {} without held-out images."""

    def __init__(self, model: DetailAlignedVAE, val_images, ema, trainable, lpips_model, batch_size: int,
                 samples_dir: Path, is_main: bool, loop: RunLoop):
        self.model, self.val, self.ema, self.trainable = model, val_images, ema, trainable
        self.lpips, self.batch_size, self.samples_dir, self.is_main, self.loop = \
            lpips_model, batch_size, Path(samples_dir), is_main, loop

    def __call__(self, step: int) -> dict:
        if self.val is None:
            return {}
        raw = self.model
        self.ema.store(self.trainable)
        self.ema.copy_to(self.trainable)
        raw.eval()
        try:
            res = evaluate_held_out(raw, self.val, self.batch_size, self.lpips)
            n = min(4, self.val.shape[0])
            x = self.val[:n].to(next(raw.parameters()).device)
            enc = raw.encode(x)
            rows = [[x[i].cpu(), raw.decode_baseline(enc.z_base[i : i + 1])[0].cpu(),
                     raw.decode(enc.latent[i : i + 1])[0].clamp(-1, 1).cpu()] for i in range(n)]
            if self.is_main:  # the image first: the eval record's log flushes TensorBoard's writer
                grid = _save_grid(self.samples_dir / f"step-{step:07d}.png", rows)
                self.loop.trackers.log_image("eval/reconstructions", grid, step)
        finally:
            self.ema.restore(self.trainable)
            raw.train()
        self.loop.write({"step": step, "event": "eval", **res})
        return res


def _optimisation(model: DetailAlignedVAE, disc, t):
    """(trainable parameters, AdamW with the new blocks' own rate, schedule, discriminator AdamW, EMA)."""
    from diffusers.training_utils import EMAModel

    new_params = model.new_block_parameters()
    new_ids = {id(p) for p in new_params}
    trunk_params = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
    groups = [{"params": new_params, "lr": t.lr_new_blocks or t.lr}]
    if trunk_params:
        groups.append({"params": trunk_params, "lr": t.lr})
    opt = _optimizer(groups, t.lr, t.betas, t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps, t.lr_schedule,
                                                                  t.lr_end / t.lr if t.lr > 0 else 0.0))
    opt_d = _optimizer(disc.parameters(), t.disc_lr or t.lr, t.betas, t.weight_decay) if disc is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    return trainable, opt, sched, opt_d, EMAModel(trainable, decay=t.ema_decay, use_ema_warmup=t.ema_warmup)


def _resume(ckpt_path: Path, model, disc, opt_d, ema, opt, sched, cb) -> tuple[int, Optional[list]]:
    """Load a checkpoint's weights (the discriminator's too) and training state; returns its step and the
    processes' positions in streamed data (None for folders)."""
    state = load_checkpoint(ckpt_path)
    model.load_state_dict(state["model"])
    if disc is not None:
        disc.load_state_dict(state["disc"])
        opt_d.load_state_dict(state["opt_d"])
    start_step = restore_training_state(state, ema, opt, sched)
    cb.on_message(f"resumed from {ckpt_path.name} (step {start_step})")
    return start_step, state.get("data_positions")


def _list_training_data(t, data: list[str], val_data, streamed: bool, fields: Fields):
    """(streamed images, folder images): what trains, listed and checked before anything is written."""
    if not streamed:
        return None, training_images(data, val_data, t.num_val, t.seed, t.max_images, t.max_val)
    if t.max_images:
        raise DavaeError("train_vae.max_images picks a subset of a folder; with shards, pass fewer shards")
    return streamed_training_images(data, val_data, t.num_val, t.max_val, fields, t.seed), None


def _export_untrained(model, t, data, streamed: bool, fields: Fields, acc, run_dir: Path, cb) -> "TrainVAEResult":
    """`train_vae.steps == 0`: the freshly built DA-VAE, with its detail statistics measured on `data` if
    given, exported to RUN/final."""
    final_dir = run_dir / "final"
    if data and t.train_encoder:
        source = streamed_training_images(data, None, 0, 0, fields, t.seed) if streamed else list_images(data)
        if streamed or len(source):
            mean, std, n = measure_detail_stats(model, source, min(t.stats_images, 4 * len(source)),
                                                t.resolution, t.seed, t.batch_size, cb)
            model.set_detail_stats(mean, std, n)
    if acc.is_main_process:
        export_davae(model, final_dir)
    cb.on_end({"steps": 0, "final": str(final_dir)})
    unlock_run(run_dir)
    return TrainVAEResult(str(run_dir), str(final_dir), 0, {}, 0)


def _training_loader(preset: Preset, raw, images, train_source, streamed: bool, fields: Fields, acc,
                     start_step: int, positions, ckpt_path, cb, cache_dir: Optional[Path] = None):
    """(dataset, loader, held-out images) of this process: streamed shards from the saved position, or the
    folder's exact step-indexed crops (with the frozen base's outputs cached when `train_vae.cache_base`)."""
    t = preset.train_vae
    crop = t.crop_size or t.resolution
    world, rank = acc.num_processes, acc.process_index
    if streamed:
        stream = ShardStream(images.shards, crop=crop, seed=t.seed, rank=rank, world=world, fields=fields,
                             shuffle_within_shard=preset.data.shuffle_within_shard, num_workers=t.num_workers,
                             exclude=images.exclude)
        loader = StreamBatches(stream, t.batch_size, resume_position(positions, ckpt_path, rank, world))
        return stream, loader, center_crops(images.val, t.resolution)[0] if len(images.val) else None
    data_ = vae_training_data(images, crop=crop, resolution=t.resolution, seed=t.seed,
                              length=(t.steps * world + world) * t.batch_size, granularity=raw.granularity,
                              base_cache=_base_cache(raw, train_source, cb, cache_dir) if t.cache_base else None)
    return data_.dataset, data_.loader(start_step, t.steps, t.batch_size, rank, world, t.num_workers), data_.val_images


def _evaluate_and_export(raw, evaluate, val_images, ema, trainable, train_source, t, acc, loop, final_dir: Path,
                         cb) -> dict:
    """The last held-out evaluation, then the EMA weights exported with the detail channels' statistics
    measured on the training images; returns the evaluation."""
    if val_images is not None:
        cb.on_message(f"evaluating on {int(val_images.shape[0])} held-out image(s)")
    final_eval = evaluate(t.steps)
    ema.copy_to(trainable)
    raw.eval()
    n = int(raw.detail_stats_images)
    if t.train_encoder:  # a decoder-only fine-tune keeps its init's statistics: the latent is unchanged
        mean, std, n = measure_detail_stats(raw, train_source, t.stats_images, t.resolution, t.seed, t.batch_size, cb)
        raw.set_detail_stats(mean, std, n)
    if acc.is_main_process:
        export_davae(raw, final_dir)
    loop.write({"step": t.steps, "event": "export", "final": str(final_dir), "detail_stats_images": n})
    return final_eval


def _without_cache_for_streams(preset: Preset, streamed: bool, cb) -> Preset:
    """`preset` with `train_vae.cache_base` turned off, with a note, when the data is streamed: the cache keeps
    every image's base outputs in memory, which a stream cannot (the `tiny` presets cache by default; an explicit
    `--set train_vae.cache_base=true` is turned off the same way)."""
    if not (streamed and preset.train_vae.cache_base):
        return preset
    cb.on_message("train_vae.cache_base turned off: it keeps every image's base outputs in memory, which needs "
                  "a folder of images, not streamed shards")
    return replace(preset, train_vae=replace(preset.train_vae, cache_base=False))


def _open_listed(preset: Preset, data, val_data, run_dir: Path, resume: bool, streamed: bool, fields: Fields, cb,
                 trackers: list):
    """(accelerator, preset, checkpoint, streamed images, folder images): the run folder opened (`open_run`, the
    accelerator reporting to `trackers`) and the training data listed. A new run's data is listed (a stream's
    first record read) before its folder is made; a resumed run's folder exists and is checked first, so a
    finished one (`RunFinished`) lists nothing."""
    preset = _without_cache_for_streams(preset, streamed, cb)

    def listed(t):
        return _list_training_data(t, data, val_data, streamed, fields) if t.steps and data else (None, None)

    simages, images = listed(preset.train_vae) if not resume else (None, None)
    acc, preset, ckpt_path = open_run(run_dir, preset, resume, on_message=cb.on_message, trackers=tuple(trackers))
    if resume:
        simages, images = listed(preset.train_vae)
    return acc, preset, ckpt_path, simages, images


def _build_model(preset: Preset, ckpt_path: Optional[Path], device, cb) -> DetailAlignedVAE:
    """The DA-VAE the preset describes, on its base VAE, on `device`: a new run starts from the weights of
    `train_vae.init_from` when set; a decoder-only fine-tune freezes the encoder."""
    t = preset.train_vae
    base = load_base_vae(preset.vae.base_vae, preset.vae.base_vae_subfolder, preset.vae.base_channels,
                         arch=preset.vae.base_vae_arch)
    model = DetailAlignedVAE.from_base(base, preset.vae).to(device)
    if t.init_from and ckpt_path is None:  # a resumed run has the weights in its checkpoint
        _load_init(model, t.init_from, base, cb, decoder_only=not t.train_encoder)
    if not t.train_encoder:
        model.set_trainable(encoder=False)
    return model


def _prepared(acc, model, opt, disc, opt_d):
    """accelerate's `prepare` of the model and its optimiser, and of the discriminator and its optimiser when
    there is one (the scheduler is not prepared: accelerate would step it once per process per call)."""
    if disc is None:
        return (*acc.prepare(model, opt), None, None)
    return acc.prepare(model, opt, disc, opt_d)


def _evaluate_every(evaluate, every: int, total: int, cb):
    """RunLoop's `after_step`: a held-out evaluation every `every` steps (the last step's is the final one)."""

    def after_step(step: int) -> None:
        if step % every == 0 and step != total:
            res = evaluate(step)
            if res:
                cb.on_message(f"step {step}: held-out PSNR {res['davae.psnr']:.2f} dB "
                              f"(baseline {res['base_half_bicubic.psnr']:.2f}, full-res base {res['base_full.psnr']:.2f})")

    return after_step


def train_vae(preset: Preset, data: list[str], run_dir: str | Path, *, resume: bool = False,
              val_data: Optional[list[str]] = None, callbacks: Optional[Callbacks] = None,
              report_to: Optional[str] = None) -> TrainVAEResult:
    """Train (or, with `preset.train_vae.steps == 0`, just build and export) a DA-VAE. See the module doc.
    `report_to`: experiment trackers besides log.jsonl ("tensorboard", "wandb", "trackio", "all"; None or
    "none": none), checked before anything is loaded or written (train/trackers.py)."""
    cb = callbacks or Callbacks()
    trackers = tracker_names(report_to)
    run_dir = Path(run_dir)
    streamed = bool(data) and any(is_stream(d) for d in data)
    fields = Fields(preset.data.image_key, preset.data.caption_key, preset.data.label_key)
    try:
        acc, preset, ckpt_path, simages, images = _open_listed(preset, data, val_data, run_dir, resume, streamed,
                                                               fields, cb, trackers)
    except RunFinished as done:
        return TrainVAEResult(str(run_dir), str(done.final_dir), done.steps, {}, 0, already_finished=True)
    t, lo = preset.train_vae, preset.loss
    device = acc.device
    model = _build_model(preset, ckpt_path, device, cb)
    final_dir = run_dir / "final"
    if t.steps == 0:
        return _export_untrained(model, t, data, streamed, fields, acc, run_dir, cb)
    if not data:
        raise DavaeError("is required when training (--steps > 0)", param="data")
    if not streamed:
        source, train_source = images.all, images.train
        for path, why in source.skipped:
            cb.on_message(f"skipped unreadable image {path}: {why}")

    lpips_model = build_lpips(lo.lpips_net).to(device) if lo.lpips > 0 else None
    disc = PatchDiscriminator(n_layers=lo.disc_layers).to(device) if lo.adv > 0 else None
    trainable, opt, sched, opt_d, ema = _optimisation(model, disc, t)
    start_step, positions = _resume(ckpt_path, model, disc, opt_d, ema, opt, sched, cb) if ckpt_path is not None \
        else (0, None)
    if ckpt_path is None and resume:
        cb.on_message("no checkpoint yet: starting from step 0")
    ema.to(device)
    model, opt, disc, opt_d = _prepared(acc, model, opt, disc, opt_d)
    raw: DetailAlignedVAE = acc.unwrap_model(model)

    if streamed:
        train_source = simages
    dataset, loader, val_images = _training_loader(preset, raw, simages if streamed else images,
                                                   None if streamed else train_source, streamed, fields, acc,
                                                   start_step, positions, ckpt_path, cb, cache_dir=run_dir / "cache")
    stepper = VAETrainStep(preset, raw, lpips_model, disc)

    def state_fn(at: int) -> dict:
        state = training_state(at, ema, opt, sched, preset, model=raw.state_dict())
        if disc is not None:
            state.update(disc=acc.unwrap_model(disc).state_dict(), opt_d=opt_d.state_dict())
        return state

    loop = RunLoop(acc, run_dir, total=t.steps, start_step=start_step, resumed=ckpt_path is not None, seed=t.seed,
                   log_every=t.log_every, checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                   state_fn=state_fn, callbacks=cb, data_state=loader.state if streamed else None,
                   config=preset.to_dict(), job="train-vae")
    evaluate = HeldOutEvaluator(raw, val_images, ema, trainable, lpips_model, t.batch_size, run_dir / "samples",
                                acc.is_main_process, loop)
    loop.start({"device": str(device), "world_size": acc.num_processes,
                **({"train_shards": len(simages.shards)} if streamed else {"train_images": len(train_source)}),
                "val_images": 0 if val_images is None else int(val_images.shape[0]), "crop": t.crop_size or t.resolution,
                "trainable_params": sum(p.numel() for p in trainable), "start_step": start_step})
    if start_step == 0 and val_images is not None:
        cb.on_message(f"evaluating the start on {int(val_images.shape[0])} held-out image(s)")
        evaluate(0)
    raw.train()
    loop.run(VAEOptimStep(stepper, acc, model, opt, sched, ema, trainable, opt_d, t), iter(loader),
             _evaluate_every(evaluate, t.eval_every, t.steps, cb))

    final_eval = _evaluate_and_export(raw, evaluate, val_images, ema, trainable, train_source, t, acc, loop,
                                      final_dir, cb)
    loop.trackers.finish()
    skipped = (0 if streamed else len(source.skipped)) + dataset.read_failures
    cb.on_end({"steps": t.steps, "final": str(final_dir), "eval": final_eval, "last": loop.last,
               "skipped_images": skipped, "elapsed_s": round(loop.elapsed_s, 1)})
    unlock_run(run_dir)
    return TrainVAEResult(str(run_dir), str(final_dir), t.steps, final_eval, skipped)
