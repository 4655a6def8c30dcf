"""The preset's sections as typed dataclasses: one per YAML section (`vae`, `loss`, `train_vae`, `dit`,
`adapt_dit`, `train_dit`, `sample`, `data`) and `Preset`, which holds them. Defaults only: reading YAML,
`--set` overrides and the validation rules are in `config.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from .dit.registry import DEFAULT_BACKEND


@dataclass
class VAEConfig:
    """Architecture of the DA-VAE built on a base VAE (SPEC §2-4)."""

    base_vae: str = "random"  # hub id, local diffusers folder, or "random" (a small AutoencoderTiny built in code)
    base_vae_subfolder: Optional[str] = None  # e.g. "vae" for a pipeline repository
    # the base VAE's architecture (a diffusers config dict with _class_name), used when a random base VAE
    # is built (`davae bench --weights random`); empty: a small AutoencoderTiny
    base_vae_arch: dict = field(default_factory=dict)
    base_channels: int = 16  # C: channels of the base latent (checked against the base VAE)
    detail_channels: int = 16  # D: new detail channels, a multiple of C
    downsample: int = 8  # f: spatial downsampling of the base VAE
    scale: int = 2  # s: resolution factor between the DA-VAE input and the base input
    base_latent_stats: Optional[str] = None  # .pt/.safetensors with per-channel mean/std (LightningDiT latents)
    # how z_base is normalised: "config" = (mean - shift_factor) * scaling_factor from the VAE config (SD3),
    # "stats" = per-channel statistics from base_latent_stats (LightningDiT), which must then be given
    base_latent_transform: Literal["config", "stats"] = "config"
    # detail encoder input: a copy of the base encoder ("trunk": features before conv_out; "latent": its
    # output) on the full image, or "residual": the pixels of x minus the baseline (base at 1/s + bicubic)
    detail_features: Literal["latent", "trunk", "residual"] = "trunk"
    train_detail_trunk: bool = True  # the copied base encoder trunk trains (ImageNet) or stays frozen (SD3)
    # "base": z_d starts as z_base; "group_mean_moments": the group mean of s²F/2D channels added to mean and
    # logvar (the official SD3 DA-VAE; "group_mean" adds s²F/D-channel means to the mean only)
    detail_shortcut: Literal["zero_conv", "group_mean", "group_mean_moments", "base"] = "zero_conv"
    detail_conv_init: Literal["default", "zero"] = "default"
    logvar_init: float = 0.0  # constant added to the detail logvar channels
    learn_logvar: bool = True  # False: logvar is the constant logvar_init (a fixed posterior width)
    # decoder: the up block feeds a copy of the base decoder after its conv_in ("trunk") or at its latent
    # input ("latent"), or "residual": x_hat = baseline + pixel-shuffled up-block output (no trunk)
    decoder_input: Literal["latent", "trunk", "residual"] = "trunk"
    train_decoder_trunk: bool = True
    up_hidden: int = 0  # 0: one 3x3 conv up block (official); >0: conv-SiLU-conv with this many hidden channels
    down_hidden: int = 0  # 0: one 3x3 conv down block (official); >0: conv-SiLU-conv with this many hidden channels
    down_blocks: int = 0  # >0 (residual design): a deeper detail encoder, this many residual blocks of down_hidden channels
    up_blocks: int = 0  # >0 (residual design): a deeper decoder that also reads the baseline, this many residual
    # blocks of up_hidden channels; its last conv is always zero-initialised (up_conv_init, up_shortcut unused)
    # what the up block reads: the latent as is, or [z_base, z_d - expand(z_base)] (the detail channels'
    # departure from the base they are aligned to; expand repeats each base channel r times)
    up_input: Literal["latent", "detail_residual"] = "latent"
    up_shortcut: Literal["repeat", "none"] = "repeat"
    up_conv_init: Literal["default", "zero"] = "default"  # "zero" with decoder_input=residual: starts as the baseline
    # the base image: "antialias" (bicubic 1/s with antialiasing, clamped; SPEC §3) or "plain" (no antialiasing,
    # no clamp: the official ImageNet DA-VAE, for its converted checkpoints)
    base_resize: Literal["antialias", "plain", "plain_clamp"] = "antialias"  # plain_clamp: the official SD3 DA-VAE
    # what the up block reads for the base channels: the "transformed" z_base (the DiT's space, as the latent
    # holds it) or the "raw" base posterior mean (the official ImageNet DA-VAE's decoder input)
    decoder_base_space: Literal["transformed", "raw"] = "transformed"
    # the channel order the up block reads: "base_first" (the latent's own order) or "detail_first" (the
    # official SD3 DA-VAE's decoder input, for its converted checkpoints; the latent itself stays base first)
    up_input_order: Literal["base_first", "detail_first"] = "base_first"
    # decoder_input = residual: which part of the learned correction is added to the baseline. "full": all of it;
    # "high": only what the base resolution cannot hold (its mean over every s x s pixel block is removed), so
    # the decode's s x s block means are exactly the baseline's: the decoder adds detail on top of the base
    # decoder's image and never repaints it (issue 20: the L1-trained full correction smoothed the base
    # decoder's texture away, which cost FID on generated latents)
    residual_band: Literal["full", "high"] = "full"


@dataclass
class LossConfig:
    """Weights of the DA-VAE losses (SPEC §5)."""

    l1: float = 1.0
    lpips: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"
    kl: float = 1e-6
    adv: float = 0.1
    disc_start: int = 5000
    disc_layers: int = 3
    align: float = 0.5
    align_mode: Literal["fixed", "adaptive"] = "fixed"
    detail_dropout: float = 0.0  # probability of zeroing a sample's whole z_d at the decoder input
    # True: the kept samples' z_d is scaled by 1 / (1 - detail_dropout) (inverted dropout, the official
    # ImageNet trainer); False: kept as is, so the decoder sees the same z_d in training and use
    detail_dropout_rescale: bool = False
    sample_posterior: bool = True  # decode a posterior sample during training (False: the mean)
    # KL reduction: "mean" over all elements (SPEC §5), or "sum" over C x h x w per sample, mean over the batch
    # (LDM's convention, the official SD3 tokenizer recipe; ~C h w times stronger at the same weight)
    kl_reduction: Literal["mean", "sum"] = "mean"
    # what L_align pulls towards z_base: the detail posterior "mean" (default), or the decoded "sample"
    # (the official ImageNet trainer aligns the sampled z)
    align_on: Literal["mean", "sample"] = "mean"
    # the space of z_base that L_align pulls towards: "transformed" (the DiT's, default) or "raw" (the base
    # VAE's own posterior mean: the official ImageNet trainer)
    align_target: Literal["transformed", "raw"] = "transformed"
    # the reconstruction target: the "image", or "base_reconstruction" = the base VAE's own encode-decode of
    # the full-resolution image (the official SD3 tokenizer recipe: the DA-VAE learns to match its base)
    recon_target: Literal["image", "base_reconstruction"] = "image"


@dataclass
class TrainVAEConfig:
    """Optimisation, data and bookkeeping of `davae train-vae`."""

    resolution: int = 256  # target resolution s*H (evaluation, held-out crops, encode default)
    crop_size: Optional[int] = None  # training crop; None = resolution (the networks are convolutional)
    batch_size: int = 4  # per process
    steps: int = 100
    lr: float = 1e-4
    lr_new_blocks: Optional[float] = None  # learning rate of the new down/up blocks (None = lr)
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup: constant, or cosine decay to lr_end
    lr_end: float = 0.0  # the cosine schedule's final learning rate
    grad_clip: float = 1.0
    disc_lr: Optional[float] = None  # None = lr
    ema_decay: float = 0.999
    ema_warmup: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 500
    num_val: int = 8  # images held out from --data when no --val-data is given
    stats_images: int = 64  # images used to measure the detail channels' per-channel statistics at export
    num_workers: int = 0
    # precompute the frozen base's z_base and baseline once per training image and train on aligned crops
    # of them (only with the residual design, whose base path is frozen): many more steps per CPU-minute
    cache_base: bool = False
    # train on a seeded random subset of this many --data images (0 = all of them); with cache_base the
    # cache holds ~2 x 3 x H x W floats per image, so a large folder needs a cap on a small machine
    max_images: int = 0
    max_val: int = 0  # with --val-data: evaluate on a seeded random subset of this many images (0 = all)
    seed: int = 0
    # start from the weights of this DA-VAE folder (the preset's vae section must describe the same
    # architecture on the same base VAE) instead of a fresh build (`train-vae --init`)
    init_from: Optional[str] = None
    # False (`train-vae --decoder-only`, needs init_from): the detail encoder stays frozen and the detail
    # statistics are kept, so the latent space is unchanged and DiTs adapted on the init DA-VAE stay valid
    # (its `latent_identity` is kept); only the decoder learns
    train_encoder: bool = True


@dataclass
class DiTConfig:
    """The pretrained DiT that `davae adapt-dit` warm-starts on DA-VAE latents (SPEC §6)."""

    backend: str = DEFAULT_BACKEND  # the DiT family: a name in davae_cli/dit/registry.py
    # hub id, local folder (a diffusers model or pipeline folder), checkpoint file (LightningDiT .pt /
    # .safetensors), or "random": a randomly initialised model built from `arch` (tests, benchmarks)
    pretrained: str = "random"
    subfolder: Optional[str] = "transformer"  # used when `pretrained` is a pipeline (folder or hub id)
    arch: dict = field(default_factory=dict)  # SD3: SD3Transformer2DModel kwargs; LightningDiT: {size: ..., ...}
    # the training timestep shift in the sigma convention (sigma = 1 is noise), applied to the logit-normal
    # sigmas of adapt-dit: sigma' = shift * sigma / (1 + (shift - 1) * sigma); 1.0 = no shift. Stored with
    # the adapted model. The sampling shift is a separate value, `sample.shift` (SPEC §6).
    train_shift: float = 1.0
    # SD3 text conditioning: a pipeline folder / hub id with text encoders, or "tiny-random" (CPU tests)
    text_encoders: Optional[str] = None
    max_sequence_length: int = 256  # T5 tokens (SD3 pipelines: 256)
    use_t5: bool = True
    num_classes: int = 1000  # LightningDiT: class-conditional with a null class for guidance
    cond_dropout: float = 0.1  # probability of training a sample unconditionally (empty prompt / null class)
    lora_rank: int = 0  # 0: no LoRA, the whole DiT trains (LightningDiT recipe)
    lora_alpha: float = 0.0
    lora_init: Literal["gaussian", "default"] = "gaussian"
    lora_targets: list[str] = field(default_factory=list)  # peft target_modules (suffix match on module names)
    full_train: list[str] = field(default_factory=list)  # modules trained fully next to LoRA (the extended heads)


@dataclass
class FlowTrainingConfig:
    """What both DiT trainers share (`train/flow_trainer.py`): optimisation, the rectified-flow objective,
    encoding and bookkeeping. `adapt_dit` and `train_dit` are this plus their own fields and defaults."""

    resolution: int = 256
    batch_size: int = 4  # per process
    steps: int = 100
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    skip_grad_norm: float = 1000.0  # skip the update when the gradient norm is non-finite or above this
    logit_mean: float = 0.0  # logit-normal timestep sampling (SPEC §6)
    logit_std: float = 1.0
    ema_decay: float = 0.999
    gradient_checkpointing: bool = False
    # weight of the cosine velocity term 1 - cos(u_hat, u) over channels per token (the official LightningDiT
    # recipe's `use_cosine_loss`, weight 1); the detail channels enter it with the same w(n) as the MSE
    cosine_loss: float = 0.0
    # False: the cosine term covers all C + D channels from step 0, without w(n) (the official LightningDiT
    # DA-VAE trainer); True: the detail channels enter it with w(n) like the MSE (the function-preserving start)
    cosine_schedule: bool = True
    # the regression target and its per-sample weight (flow.sample_loss_weight): "velocity" (default; SPEC §6)
    # or "x0" (x0_hat = x_sigma - sigma u_hat, the official SD3 trainer); weighting "none", "snr_ratio" =
    # min((1 - sigma)/sigma, gamma) (the official SD3 trainer), "min_snr" = min(((1 - sigma)/sigma)^2, gamma)
    loss_target: Literal["velocity", "x0"] = "velocity"
    loss_weighting: Literal["none", "snr_ratio", "min_snr"] = "none"
    loss_weight_gamma: float = 5.0
    encode_batch_size: int = 8  # batch size of the one-off latent encoding of --data images
    max_images: int = 0  # encode and train on a seeded random subset of this many --data images (0 = all)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0


@dataclass
class AdaptDiTConfig(FlowTrainingConfig):
    """`davae adapt-dit`: the shared trainer settings plus the detail channels' schedule and statistics.
    `resolution` is the target image resolution s*H; the latent is resolution / (s*f) per side."""

    detail_ramp_steps: int = 10000  # N of the cosine detail-loss weight w(n) (SPEC §6)
    # training latents read to measure the detail channels' per-channel mean/std (SPEC §6); 0 = all
    detail_stats_latents: int = 4096
    # the DiT's view of the detail channels: "raw" standardises z_d per channel (SPEC §6); "residual"
    # standardises z_d - repeat(z_base, D/C), for DA-VAEs whose z_d is z_base plus a small correction
    # (`vae.detail_shortcut: base`, the tiny design), where the detail lies in that difference
    detail_view: Literal["raw", "residual"] = "raw"
    # std of Gaussian noise added to the detail channels of each normalised training latent (standardised
    # units: the detail channels have unit std per channel there) before it is noised along the flow path; the
    # DiT then learns to generate a detail its decoder has to read through that noise. The official ImageNet
    # code adds N(0, 1) to its (unstandardised) detail latents; 0 = off (the default, SPEC §3)
    detail_noise: float = 0.0


@dataclass
class TrainDiTConfig(FlowTrainingConfig):
    """`davae train-dit`: a native class-conditional DiT trained from scratch on the base VAE's latents
    (the model `adapt-dit --dit` warm-starts and `generate --native` samples), with the shared objective on
    the base channels alone. `resolution` is the native image resolution; its latent is resolution / f."""

    batch_size: int = 64
    steps: int = 1000
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    # skip updates whose gradient norm is above this (non-finite ones always). Off by default here: a model
    # trained from scratch has a zero-initialised output head, where the cosine term's gradient is ~1/eps
    # (clipped to grad_clip, as the official LightningDiT trainer does); skipping it would skip every step
    skip_grad_norm: float = float("inf")
    encode_batch_size: int = 32
    # stop (checkpoint and export) once this many minutes of training have passed, counted across resumes
    # (0 = no limit): for comparisons at equal wall-clock
    max_minutes: float = 0.0
    # how the native latents are made: `direct` = the base VAE on the image resized (PIL) to `resolution`;
    # `davae_base` = the DA-VAE's base channels of the image at s x `resolution` (resized as adapt-dit resizes,
    # then the DA-VAE's float antialiased bicubic 1/s): exactly the base channels the adapted model is trained on
    latents_from: Literal["direct", "davae_base"] = "direct"


@dataclass
class SampleConfig:
    """The sampling recipe (`davae generate`, `davae bench`); each flag of those commands overrides it."""

    steps: int = 28  # sampling steps (network evaluations per image: steps, x2 with guidance)
    guidance: float = 4.5  # classifier-free guidance scale (1 = off)
    guidance_interval: Optional[tuple[float, float]] = None  # apply CFG only for sigma in [lo, hi]; None: always
    sampler: Literal["euler", "heun"] = "euler"
    # the sampling timestep shift in the sigma convention; SD3 models sample on the sigma grid of diffusers'
    # FlowMatchEulerDiscreteScheduler with this shift. Stored with the adapted model by adapt-dit. A native
    # SD3 pipeline samples with its own scheduler_config.json instead (SPEC §6).
    shift: float = 3.0
    # the unconditional branch's prompt under CFG (prompt models); `--negative-prompt` overrides it. Stored
    # with the adapted model like the rest of the recipe
    negative_prompt: str = ""


@dataclass
class DataConfig:
    """How streamed training data (WebDataset shards, parquet, saved datasets; `davae_cli.streams`) is read."""

    # the record fields holding the image, the caption and the class label; None: the usual names
    # (jpg/jpeg/png/webp/image/img; txt/caption/prompt/text or a .json's caption/prompt/text; cls/label/class)
    image_key: Optional[str] = None
    caption_key: Optional[str] = None
    label_key: Optional[str] = None
    # visit each shard's samples in a seeded permutation (the shard is held in memory as encoded bytes);
    # false: their stored order (shards written in random order need no more)
    shuffle_within_shard: bool = True
    # adapt-dit / train-dit: latents per cache shard when --data is streamed (encode once, read after)
    latent_shard_size: int = 1024


@dataclass
class Preset:
    name: str = "custom"
    description: str = ""
    vae: VAEConfig = field(default_factory=VAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train_vae: TrainVAEConfig = field(default_factory=TrainVAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    adapt_dit: AdaptDiTConfig = field(default_factory=AdaptDiTConfig)
    train_dit: TrainDiTConfig = field(default_factory=TrainDiTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def granularity(self) -> int:
        """Pixels per latent pixel side of the DA-VAE latent: s * f."""
        return self.vae.scale * self.vae.downsample

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
