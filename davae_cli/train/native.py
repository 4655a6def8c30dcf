"""`train_dit`: a native class-conditional LightningDiT trained from scratch on the base VAE's latents.

This is the model DA-VAE starts from: `adapt-dit --dit RUN/final` warm-starts it on DA-VAE latents and
`generate --native --base-pipeline RUN/final` samples it. It shares adapt-dit's trainer (the step, EMA,
exact resume, JSONL log, accelerate, progress) with an empty set of detail channels; the latents are the
base VAE's posterior means of the images at `train_dit.resolution`, mapped by the DA-VAE's base latent
transform, exactly the base channels a DA-VAE of that base gives at s times the resolution. The DA-VAE in
`--vae` only lends its base VAE and that transform (the native model does not depend on its detail half).

`train_dit.max_minutes` stops at equal wall-clock (counted across resumes); the model is then exported at
the step reached. `final/` is a LightningDiT folder (`config.json` + safetensors) plus `davae_native.json`
(base VAE identity, latent transform, resolution, recipe, steps and training time), which adapt-dit and
generate check against the DA-VAE they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config_schema import Preset
from ..streams import Fields, is_stream, probe_shards
from ..errors import DavaeError
from ..latent_data import TrainingLatents, _latent_files, prepare_latent_dataset
from ..latents import NATIVE_FILE, LatentNormalizer, base_space
from ..vae.base import base_encode_mean
from ..vae.model import DetailAlignedVAE
from .flow_trainer import ClassConditioner, check_or_record_run, export_adapted, train_flow_model
from .loop import Callbacks, RunFinished, RunLoop, open_run, unlock_run
from .trackers import tracker_names


@dataclass
class TrainDiTResult:
    run_dir: str
    final_dir: str
    steps: int
    metrics: dict
    already_finished: bool = False  # `resume` of a finished run: nothing was done, `final_dir` is its export


@dataclass
class _Encoded:
    latent: torch.Tensor


class BaseLatentEncoder(nn.Module):
    """The native model's latents, mapped by the DA-VAE's base latent transform. Quacks like a DA-VAE for
    `prepare_latent_dataset`. `davae_base=False`: the base VAE on the image as given (prepared at the native
    resolution). `davae_base=True`: the image is prepared at s x the native resolution and the latent is the
    DA-VAE's own base channels of it (`encode_base`: float antialiased bicubic 1/s, then the base VAE), the
    same numbers adapt-dit's latents carry in their base channels."""

    def __init__(self, vae: DetailAlignedVAE, davae_base: bool = False):
        super().__init__()
        self.vae, self.davae_base = vae, bool(davae_base)
        self.granularity = int(vae.config.downsample) * (int(vae.config.scale) if davae_base else 1)
        self.config = vae.config

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> _Encoded:
        if self.davae_base:
            return _Encoded(self.vae.encode_base(x))
        return _Encoded(self.vae.transform(base_encode_mean(self.vae.base.vae, x)))

    def describe(self) -> dict:
        d = self.vae.describe()
        return {"base_vae": d["base_vae"], "base_vae_hash": d["base_vae_hash"], "C": d["C"], "D": 0,
                "downsample": d["downsample"], "space": "native", "transform_of": d["davae"],
                "latents_from": "davae_base" if self.davae_base else "direct"}


def check_class_data(inputs: list[str], captions: Optional[str], latents_ok: bool = False) -> None:
    """Images with class labels (sub-folders or a JSONL), checked before anything is written. `latents_ok`:
    folders of latent files are accepted as they are (adapt-dit checks them when it indexes them)."""
    from .. import data as D
    from ..latent_data import attach_conditions

    for inp in inputs:
        if not Path(inp).exists():
            raise DavaeError(f"{inp}: not found", param="data")
    if _latent_files(inputs):
        if latents_ok:
            return
        raise DavaeError("train-dit encodes images itself; give image folders, not latent files", param="data")
    images = D.list_images(inputs, check=False)
    if not len(images):
        raise DavaeError(f"no images in {', '.join(inputs)}", param="data")
    srcs = [it if isinstance(it, str) else f"{it[0]}:{it[1]}" for it in images.items]
    attach_conditions(srcs, inputs, "class", captions)


def _checked_model(preset: Preset, vae_dir: Path, data: list[str], captions: Optional[str], resume: bool):
    """(backend, DA-VAE, random model, latent side): the family, the DA-VAE, the data (of a new run) and the
    model's grid checked before the run folder is made, so a bad one writes nothing."""
    from ..dit.backend import family_labels, get_backend

    backend = get_backend(preset)
    if backend.conditioning != "class":
        raise DavaeError(f"train-dit trains class-conditional models ({', '.join(family_labels('class'))}) from "
                         f"scratch; preset {preset.name!r} uses the {backend.label} family (adapt it with adapt-dit)")
    if not (vae_dir / "config.json").is_file():
        raise DavaeError(f"{vae_dir}: not a DA-VAE folder (no config.json; made by `davae train-vae`)", param="vae")
    if not data:
        raise DavaeError("is required (image folders with one sub-folder per class)", param="data")
    if not resume and any(is_stream(d) for d in data):
        probe_shards(data, Fields(preset.data.image_key, preset.data.caption_key, preset.data.label_key), "class")
    elif not resume:
        check_class_data(data, captions)
    vae = DetailAlignedVAE.from_pretrained(str(vae_dir)).eval()
    n = preset.train_dit
    side = n.resolution // int(vae.config.downsample)
    model = backend.load("random", seed=n.seed, latent_side=side)
    if backend.channels(model) != vae.config.base_channels:
        raise DavaeError(f"dit.arch reads {backend.channels(model)} channels; the DA-VAE's base VAE has "
                         f"C = {vae.config.base_channels}")
    if side % backend.patch_size(model):
        raise DavaeError(f"train_dit.resolution {n.resolution}: the latent side {side} is not divisible by the "
                         f"patch size {backend.patch_size(model)}")
    return backend, vae, model, side


def train_dit(preset: Preset, vae_dir: str | Path, run_dir: str | Path, *, data: list[str],
              captions: Optional[str] = None, resume: bool = False,
              callbacks: Optional[Callbacks] = None, report_to: Optional[str] = None) -> TrainDiTResult:
    """Train the preset's class-conditional DiT (`dit.arch`, random init) on base latents of `data`; see the module
    doc. `report_to`: experiment trackers besides log.jsonl (train/trackers.py), checked first."""
    cb, trackers = callbacks or Callbacks(), tracker_names(report_to)
    run_dir, vae_dir = Path(run_dir), Path(vae_dir)
    data = [str(d) for d in data or []]
    backend, vae, model, side = _checked_model(preset, vae_dir, data, captions, resume)
    try:
        acc, preset, ckpt_path = open_run(run_dir, preset, resume, section="train_dit", on_message=cb.on_message,
                                          trackers=tuple(trackers))
    except RunFinished as done:
        return TrainDiTResult(str(run_dir), str(done.final_dir), done.steps, {}, already_finished=True)
    n, device = preset.train_dit, acc.device
    check_or_record_run(run_dir / "run.json", {"vae": str(vae_dir.resolve()), "dit": "random", "data": data,
                                                "vae_identity": vae.identity}, acc.is_main_process)
    vae.to(device)
    cb.on_message("preparing the latent dataset (base VAE latents, encoded once, reused by --resume)")
    davae_base = n.latents_from == "davae_base"
    prep_res = n.resolution * (int(vae.config.scale) if davae_base else 1)  # images prepared at s x res for davae_base
    records = prepare_latent_dataset(BaseLatentEncoder(vae, davae_base), data, run_dir / "cache", resolution=prep_res,
                                     conditioning="class", batch_size=n.encode_batch_size, captions=captions,
                                     rank=acc.process_index, world=acc.num_processes, barrier=acc.wait_for_everyone,
                                     max_images=n.max_images, seed=n.seed,
                                     progress=lambda done, total: cb.on_progress("encoding the training latents", done, total),
                                     fields=Fields(preset.data.image_key, preset.data.caption_key, preset.data.label_key),
                                     shard_size=preset.data.latent_shard_size)
    bad = [r for r in records if not 0 <= r.label < preset.dit.num_classes]
    if bad:
        raise DavaeError(f"class label {bad[0].label} of {bad[0].source} is outside 0..{preset.dit.num_classes - 1} "
                         f"(dit.num_classes)")
    latents = TrainingLatents(records, {})
    keys = [r.label for r in records]
    c = int(vae.config.base_channels)
    space = {"base_vae": vae.config.base_vae_source, **base_space(vae)}
    del vae
    normalize = LatentNormalizer(c, [], [])  # base channels as encoded; there are no detail channels

    final_dir = run_dir / "final"

    def export(raw, step: int, loop: RunLoop) -> dict:
        facts = {"format": "davae-native-dit", "version": 1, "backend": backend.name, "preset": preset.name,
                 "resolution": n.resolution, "latent_side": side, "patch_size": backend.patch_size(raw),
                 "num_classes": preset.dit.num_classes, "train_shift": preset.dit.train_shift,
                 "sample_shift": preset.sample.shift, "steps": step, "train_seconds": round(loop.train_seconds(), 1),
                 "stopped_by_time_limit": loop.out_of_time, "davae": str(vae_dir.resolve()), **space}
        if acc.is_main_process:
            export_adapted(backend, raw, facts, final_dir, facts_file=NATIVE_FILE)
        return {"final": str(final_dir), "train_seconds": facts["train_seconds"]}

    info = {"resolution": n.resolution, "tokens": (side // backend.patch_size(model)) ** 2, "max_minutes": n.max_minutes}
    final_step, metrics, loop = train_flow_model(
        acc=acc, preset=preset, section=n, backend=backend, model=model, latents=latents, normalize=normalize,
        conditioner=ClassConditioner(preset.dit.num_classes, device), keys=keys, base_channels=c, run_dir=run_dir,
        ckpt_path=ckpt_path, resume=resume, cb=cb, info=info, export=export,
        time_limit_s=n.max_minutes * 60 if n.max_minutes else None, job="train-dit")
    metrics.update(train_seconds=round(loop.train_seconds(), 1), steps=final_step,
                   stopped_by_time_limit=loop.out_of_time)
    cb.on_end(metrics)
    unlock_run(run_dir)
    return TrainDiTResult(str(run_dir), str(final_dir), final_step, metrics)
