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

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config_schema import Preset
from ..dit.backend import get_backend
from ..errors import DavaeError
from ..exports import sampling_facts  # noqa: F401  (re-exported)
from ..latent_data import training_latents
from ..streams import Fields, is_stream, probe_shards
from ..latents import LatentNormalizer
from ..vae.model import DetailAlignedVAE
from .flow_trainer import ClassConditioner, check_or_record_run, export_adapted, train_flow_model
from .loop import Callbacks, RunFinished, RunLoop, open_run, unlock_run
from .trackers import tracker_names


@dataclass
class AdaptDiTResult:
    run_dir: str
    final_dir: str
    steps: int
    metrics: dict
    already_finished: bool = False  # `resume` of a finished run: nothing was done, `final_dir` is its export


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
    backend.check_grid(model, side, vae.granularity, vae.config.downsample)
    if dit_spec and Path(dit_spec).is_dir():
        from ..latents import check_native_space, read_native_facts

        check_native_space(read_native_facts(dit_spec), vae, f"--dit {dit_spec}")
    if side % p:
        raise DavaeError(f"adapt_dit.resolution {preset.adapt_dit.resolution}: the latent side is not divisible by "
                         f"the DiT's patch size {p}")
    backend.extend(model, d)
    return backend, model


class PromptConditioner:
    """Prompt embeddings from the run's cache (computed once, text encoders unloaded before training)."""

    def __init__(self, backend, cache_dir: Path, prompts: list[str], device, is_main: bool, barrier,
                 on_message=lambda s: None):
        d = backend.preset.dit
        if not d.text_encoders:
            raise DavaeError(f"dit.text_encoders is not set: name a {backend.label} pipeline folder or hub id with "
                             f"the text encoders (--text-encoders)")
        self.cache = backend.prompt_cache(cache_dir)
        wanted = sorted(set(prompts) | {""})
        if is_main:
            missing = self.cache.missing(wanted)
            if missing:
                on_message(f"encoding {len(missing)} prompt(s) with {d.text_encoders} (once; cached in {cache_dir})")
            self.cache.encode_cached(lambda: backend.prompt_encoder(d.text_encoders, device=device, use_t5=backend.use_t5(),
                                                                    max_sequence_length=d.max_sequence_length), wanted)
        barrier()
        self._mem: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.device = device
        self.keys = backend.prompt_keys
        self.extra = backend.training_inputs  # per-sample inputs of a training forward (a distilled guidance)

    def _get(self, prompt: str):
        if prompt not in self._mem:
            if len(self._mem) > 4096:
                self._mem.clear()
            self._mem[prompt] = self.cache.load(prompt)
        return self._mem[prompt]

    def batch(self, prompts: list[str], drop: torch.Tensor) -> dict:
        items = [self._get("" if bool(dr) else p) for p, dr in zip(prompts, drop)]
        out = {self.keys[k]: torch.stack([item[k] for item in items]).to(self.device) for k in (0, 1)}
        return {**out, **self.extra(len(items), self.device)}


def _conditioning(preset: Preset, backend, records, run_dir: Path, acc, cb):
    """(conditioner, the condition key of each record): cached prompt embeddings, or checked class labels."""
    if backend.conditioning == "prompt":
        conditioner = PromptConditioner(backend, run_dir / "cache" / "prompts", [r.prompt for r in records],
                                        acc.device, acc.is_main_process, acc.wait_for_everyone, cb.on_message)
        return conditioner, [r.prompt for r in records]
    bad = [r for r in records if not 0 <= r.label < preset.dit.num_classes]
    if bad:
        raise DavaeError(f"class label {bad[0].label} of {bad[0].source} is outside 0..{preset.dit.num_classes - 1} "
                         f"(dit.num_classes)")
    return ClassConditioner(preset.dit.num_classes, acc.device), [r.label for r in records]


def adapt_dit(preset: Preset, vae_dir: str | Path, run_dir: str | Path, *, data: Optional[list[str]] = None,
              dit: Optional[str] = None, captions: Optional[str] = None, resume: bool = False,
              callbacks: Optional[Callbacks] = None, report_to: Optional[str] = None) -> AdaptDiTResult:
    """Adapt the preset's DiT (or `dit`) to the DA-VAE in `vae_dir`; see the module doc. `report_to`: experiment
    trackers besides log.jsonl (train/trackers.py), checked first."""
    cb, trackers = callbacks or Callbacks(), tracker_names(report_to)
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
    try:
        acc, preset, ckpt_path = open_run(run_dir, preset, resume, section="adapt_dit", on_message=cb.on_message,
                                          trackers=tuple(trackers))
    except RunFinished as done:
        return AdaptDiTResult(str(run_dir), str(done.final_dir), done.steps, {}, already_finished=True)
    a = preset.adapt_dit
    run_info = {"vae": str(vae_dir.resolve()), "dit": dit_spec, "data": [str(d) for d in data or []]}
    device = acc.device
    vae.to(device)
    check_or_record_run(run_dir / "run.json", {**run_info, "vae_identity": vae.identity}, acc.is_main_process)
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

    def export(raw, step: int, loop: RunLoop) -> dict:
        facts.update(steps=step, train_seconds=round(loop.train_seconds(), 1))  # the loop's time, across resumes
        if acc.is_main_process:
            export_adapted(backend, raw, facts, final_dir)
        return {"final": str(final_dir)}

    total, metrics, _ = train_flow_model(acc=acc, preset=preset, section=a, backend=backend, model=model,
                                         latents=latents, normalize=normalize, conditioner=conditioner, keys=keys,
                                         base_channels=c, run_dir=run_dir, ckpt_path=ckpt_path, resume=resume, cb=cb,
                                         info={}, export=export, job="adapt-dit")
    cb.on_end(metrics)
    unlock_run(run_dir)
    return AdaptDiTResult(str(run_dir), str(final_dir), total, metrics)
