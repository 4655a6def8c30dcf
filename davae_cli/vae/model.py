"""DetailAlignedVAE: a frozen pretrained VAE extended with D detail channels (SPEC §2-4).

Latent layout (base first): `latent = concat([z_base, z_detail])`, (B, C+D, H/(s f), W/(s f)) for an
image (B, 3, H, W) in [-1, 1].

- `z_base`: the frozen base VAE's posterior mean of the antialiased bicubic 1/s image, transformed as
  the pretrained DiT expects (SD3: `(mean - shift) * scale`; LightningDiT: per-channel statistics).
- `z_detail`: the mean (or a sample) of the KL posterior of the detail encoder on the full image.
- decoder: an up block into a copy of the base decoder, at full resolution.

The base VAE itself is *not* stored in the artifact: the folder records where it came from and a
content hash, and `from_pretrained` loads it again (or takes `base_vae=`) and refuses a mismatch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
import torch.nn.functional as F
from torch import nn

from ..errors import DavaeError, first_line
from .. import latents as L
from .base import (
    SUPPORTED_CLASSES,
    BaseVAE,
    LatentTransform,
    base_decode,
    base_downsample_factor,
    base_encode_mean,
    configure_transform,
    conv_layout,
    folder_hash,
    is_single_file,
    load_base_vae,
    state_dict_hash,
    vae_from_config,
)
from .blocks import (DecoderTrunk, DetailDownBlock, DetailUpBlock, EncoderTrunk, ResidualDetailDecoder,
                     ResidualDetailEncoder)


@dataclass
class DAEncoding:
    """What `DetailAlignedVAE.encode` returns; all tensors (B, ., h, w)."""

    latent: torch.Tensor  # (B, C+D): base first
    z_base: torch.Tensor  # (B, C), transformed base latent of the downsampled image
    mean: torch.Tensor  # (B, D) detail posterior mean
    logvar: torch.Tensor  # (B, D) detail posterior log-variance, clamped to [-30, 20]
    features: torch.Tensor  # detail encoder input features (B, F, 2h, 2w)

    @property
    def z_detail(self) -> torch.Tensor:
        return self.latent[:, self.z_base.shape[1]:]


def _check_davae_folder(path: Path, class_name: str) -> None:
    """One line when `path` is not a DA-VAE folder: no config.json (a diffusers pipeline folder named as such),
    or the config of another model, a base VAE above all (the folder a DA-VAE is built on, easily passed in its
    place), instead of the loader's complaint about missing constructor arguments."""
    import json

    if not (path / "config.json").is_file():
        pipeline = " but model_index.json: a diffusers pipeline folder" if (path / "model_index.json").is_file() else ""
        raise DavaeError(f"{path} is not a DA-VAE folder (no config.json{pipeline})")
    try:
        found = json.loads((path / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # unreadable or odd: the loader below says why
    if found in (None, class_name):
        return
    if found in SUPPORTED_CLASSES or str(found).startswith("Autoencoder"):
        raise DavaeError(f"{path} is a base VAE ({found}), not a DA-VAE: pass the DA-VAE folder built on it "
                         f"(RUN/final of `davae train-vae --base-vae {path}`)")
    raise DavaeError(f"{path} holds a {found}, not a DA-VAE: pass a DA-VAE folder (RUN/final of `davae train-vae`)")


class DetailAlignedVAE(ModelMixin, ConfigMixin):
    """DA-VAE. Build with `from_base(...)`, load with `from_pretrained(folder)`."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        base_vae_config: dict,
        base_vae_source: str = "random",
        base_vae_subfolder: Optional[str] = None,
        base_vae_hash: str = "",
        base_channels: int = 16,
        detail_channels: int = 16,
        downsample: int = 8,
        scale: int = 2,
        detail_features: str = "trunk",
        detail_shortcut: str = "zero_conv",
        detail_conv_init: str = "default",
        logvar_init: float = 0.0,
        learn_logvar: bool = True,
        decoder_input: str = "trunk",
        up_hidden: int = 0,
        down_hidden: int = 0,
        down_blocks: int = 0,
        up_blocks: int = 0,
        up_shortcut: str = "repeat",
        up_conv_init: str = "default",
        up_input: str = "latent",
        train_detail_trunk: bool = True,
        train_decoder_trunk: bool = True,
        latent_transform: str = "affine",
        base_resize: str = "antialias",
        decoder_base_space: str = "transformed",
        up_input_order: str = "base_first",
        residual_band: str = "full",
    ):
        super().__init__()
        if detail_channels % base_channels:
            raise DavaeError(f"D = {detail_channels} is not a multiple of C = {base_channels}")
        arch = vae_from_config(base_vae_config)  # random weights: only the architecture is used here
        kind = "tiny" if type(arch).__name__ == "AutoencoderTiny" else "kl"
        self.kind = kind
        pixels_per_cell = 3 * downsample * downsample  # channels of a pixel-unshuffle(f) image
        if detail_features == "residual":
            self.detail_trunk = None  # the detail encoder reads pixel_unshuffle(x - baseline, f)
            feat_channels = pixels_per_cell
        else:
            self.detail_trunk = EncoderTrunk(copy.deepcopy(arch.encoder), kind, detail_features, base_channels)
            feat_channels = self.detail_trunk.out_channels
        if down_blocks > 0:
            if detail_features != "residual":
                raise DavaeError("vae.down_blocks > 0 needs vae.detail_features = residual")
            self.down = ResidualDetailEncoder(feat_channels, detail_channels, down_hidden, down_blocks, detail_shortcut,
                                              logvar_init, learn_logvar, factor=scale)
        else:
            self.down = DetailDownBlock(feat_channels, detail_channels, detail_shortcut, detail_conv_init,
                                        logvar_init, learn_logvar, hidden=down_hidden, factor=scale)
        if decoder_input == "residual":
            self.decoder_trunk = None  # x_hat = baseline + pixel_shuffle(up(z), f)
            up_out = pixels_per_cell
        else:
            if up_blocks > 0:
                raise DavaeError("vae.up_blocks > 0 needs vae.decoder_input = residual")
            self.decoder_trunk = DecoderTrunk(copy.deepcopy(arch.decoder), kind, decoder_input)
            up_out = self.decoder_trunk.in_channels
        if up_blocks > 0:  # a deeper decoder that reads the baseline image too (x_hat = baseline + its output)
            self.up = ResidualDetailDecoder(base_channels + detail_channels, downsample, up_hidden, up_blocks,
                                            factor=scale)
        else:
            self.up = DetailUpBlock(base_channels + detail_channels, up_out, base_channels, up_hidden, up_shortcut,
                                    up_conv_init, factor=scale)
        self.transform = LatentTransform(base_channels)
        self.register_buffer("detail_mean", torch.zeros(detail_channels))
        self.register_buffer("detail_std", torch.ones(detail_channels))
        self.register_buffer("detail_stats_images", torch.zeros((), dtype=torch.long))
        self.__dict__["_base"] = None  # the frozen base VAE lives outside the module tree (not saved)
        self.__dict__["_identity"] = None
        self.__dict__["_latent_identity"] = None
        del arch

    # ------------------------------------------------------------------ construction and loading
    @staticmethod
    def _kwargs_from(base: BaseVAE, vcfg) -> dict:
        return dict(
            base_vae_config=base.config,
            base_vae_source=_portable_source(base.source),
            base_vae_subfolder=base.subfolder,
            base_vae_hash=base.content_hash,
            base_channels=vcfg.base_channels,
            detail_channels=vcfg.detail_channels,
            downsample=vcfg.downsample,
            scale=vcfg.scale,
            detail_features=vcfg.detail_features,
            detail_shortcut=vcfg.detail_shortcut,
            detail_conv_init=vcfg.detail_conv_init,
            logvar_init=vcfg.logvar_init,
            learn_logvar=vcfg.learn_logvar,
            decoder_input=vcfg.decoder_input,
            up_hidden=vcfg.up_hidden,
            down_hidden=vcfg.down_hidden,
            down_blocks=vcfg.down_blocks,
            up_blocks=vcfg.up_blocks,
            up_shortcut=vcfg.up_shortcut,
            up_conv_init=vcfg.up_conv_init,
            up_input=vcfg.up_input,
            train_detail_trunk=vcfg.train_detail_trunk,
            train_decoder_trunk=vcfg.train_decoder_trunk,
            latent_transform="per_channel" if vcfg.base_latent_transform == "stats" else "affine",
            base_resize=vcfg.base_resize,
            decoder_base_space=vcfg.decoder_base_space,
            up_input_order=vcfg.up_input_order,
            residual_band=vcfg.residual_band,
        )

    @classmethod
    def from_base(cls, base: BaseVAE, vcfg) -> "DetailAlignedVAE":
        """A freshly initialised DA-VAE on `base`, with trunks copied from its pretrained weights.

        `vcfg` is a `config.VAEConfig`. Shapes are checked against the base VAE.
        """
        vae = base.vae
        c = int(getattr(vae.config, "latent_channels"))
        if c != vcfg.base_channels:
            raise DavaeError(f"vae.base_channels: the preset says C = {vcfg.base_channels}, the base VAE {base.source!r} has {c}")
        f = base_downsample_factor(vae)
        if f != vcfg.downsample:
            raise DavaeError(f"vae.downsample: the preset says f = {vcfg.downsample}, the base VAE {base.source!r} has f = {f}")
        if vcfg.base_latent_transform == "stats" and not vcfg.base_latent_stats:
            raise DavaeError("vae.base_latent_stats is required: this preset normalises z_base with the DiT's "
                             "per-channel latent statistics (e.g. LightningDiT's latents_stats.pt); "
                             "pass --set vae.base_latent_stats=PATH")
        try:
            model = cls(**cls._kwargs_from(base, vcfg))
        except ValueError as e:  # a block's shape constraint (e.g. the repeat shortcut's s²G vs C + D)
            raise DavaeError(f"vae: {e}") from None
        if model.detail_trunk is not None:
            model.detail_trunk.encoder.load_state_dict(vae.encoder.state_dict())
        if model.decoder_trunk is not None:
            model.decoder_trunk.decoder.load_state_dict(vae.decoder.state_dict())
        with torch.no_grad():
            configure_transform(model.transform, vae, vcfg)
        model.attach_base(base)
        model.set_trainable()
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, base_vae: Optional[str | BaseVAE] = None, **kwargs):
        """Load a DA-VAE folder and its base VAE (from the recorded source, or `base_vae` if given).

        Raises `DavaeError` if the base VAE cannot be loaded or its content hash differs.
        """
        path = Path(pretrained_model_name_or_path)
        _check_davae_folder(path, cls.__name__)
        try:
            model = super().from_pretrained(str(path), low_cpu_mem_usage=False, **kwargs)
        except DavaeError:
            raise
        except Exception as e:
            raise DavaeError(f"cannot load DA-VAE from {path}: {first_line(e, 200)}") from None
        if not isinstance(model, DetailAlignedVAE):
            raise DavaeError(f"{path} holds a {type(model).__name__}, not a DetailAlignedVAE")
        cfg = model.config
        if isinstance(base_vae, BaseVAE):
            base = base_vae
        else:
            source = base_vae or cfg.base_vae_source
            try:
                base = load_base_vae(source, cfg.base_vae_subfolder if base_vae is None else None,
                                     latent_channels=cfg.base_channels,
                                     arch=dict(cfg.base_vae_config) if source == "random" or is_single_file(source)
                                     else None)
            except DavaeError as e:
                raise DavaeError(
                    f"DA-VAE {path} needs its base VAE {source!r}, which cannot be loaded ({e}); "
                    f"pass the base VAE's folder with --base-vae"
                ) from None
        if base.content_hash != cfg.base_vae_hash:
            raise DavaeError(
                f"DA-VAE {path} was built on base VAE {cfg.base_vae_source!r} ({cfg.base_vae_hash[:19]}), "
                f"but {base.source!r} is a different model ({base.content_hash[:19]})"
            )
        model.attach_base(base)
        model.eval()
        model.__dict__["_identity"] = folder_hash(path)
        return model

    def attach_base(self, base: BaseVAE) -> None:
        base.vae.eval().requires_grad_(False)
        p = next(self.parameters(), None)
        if p is not None and p.device.type != "meta":
            base.vae.to(device=p.device)
        self.__dict__["_base"] = base

    @property
    def base(self) -> BaseVAE:
        if self._base is None:
            raise DavaeError("this DA-VAE has no base VAE attached (load it with DetailAlignedVAE.from_pretrained)")
        return self._base

    @property
    def identity(self) -> str:
        """Content hash of the DA-VAE weights (of its folder when loaded from disk)."""
        if self._identity is None:
            self.__dict__["_identity"] = state_dict_hash(self)
        return self._identity

    # what fixes the latent of an image besides the weights below: a decoder fine-tune keeps all of these
    LATENT_CONFIG_KEYS = ("base_vae_hash", "base_channels", "detail_channels", "downsample", "scale", "detail_features",
                          "detail_shortcut", "down_hidden", "down_blocks", "latent_transform", "base_resize")
    LATENT_STATE_PREFIXES = ("detail_trunk.", "down.", "transform.", "detail_mean", "detail_std")
    # decoder settings without parameters of their own: a decoder-only fine-tune (`train-vae --init --decoder-only`)
    # may change them, the latent stays the same
    DECODER_SETTINGS = ("residual_band",)

    @property
    def latent_identity(self) -> str:
        """Content hash of what fixes the latent (the encoder side: base VAE hash, the detail encoder's weights
        and settings, the base latent transform, the detail statistics a DiT standardises with). Equal for a
        DA-VAE and its decoder-only fine-tunes (`train-vae --decoder-only`), so a DiT adapted on one decodes
        with the others."""
        import json

        if self.__dict__.get("_latent_identity") is None:
            settings = json.dumps({k: self.config[k] for k in self.LATENT_CONFIG_KEYS}, sort_keys=True)
            self.__dict__["_latent_identity"] = state_dict_hash(self, self.LATENT_STATE_PREFIXES, settings)
        return self.__dict__["_latent_identity"]

    def is_recorded(self, recorded: dict) -> bool:
        """Whether `recorded` (an adapted DiT's `davae` facts: identity, and latent_identity when written by
        this version) names this DA-VAE or one with the same latent (a decoder fine-tune of it)."""
        if recorded.get("identity") == self.identity:
            return True
        return bool(recorded.get("latent_identity")) and recorded["latent_identity"] == self.latent_identity

    def _apply(self, fn, *args, **kwargs):
        # keep the out-of-tree base VAE on the same device/dtype as the DA-VAE
        out = super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("_base") is not None:
            self._base.vae._apply(fn, *args, **kwargs)
        return out

    def set_trainable(self, encoder: bool = True) -> None:
        """requires_grad on exactly the parts the recipe trains (new blocks always; trunks per config);
        `encoder=False` freezes the whole detail encoder (a decoder-only fine-tune)."""
        self.requires_grad_(False)
        for m in (self.down, self.up) if encoder else (self.up,):
            m.requires_grad_(True)
        if encoder and self.detail_trunk is not None and self.config.train_detail_trunk:
            self.detail_trunk.requires_grad_(True)
        if self.decoder_trunk is not None and self.config.train_decoder_trunk:
            self.decoder_trunk.requires_grad_(True)

    def new_block_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new down/up blocks (they may get their own learning rate)."""
        return [p for p in list(self.down.parameters()) + list(self.up.parameters()) if p.requires_grad]

    def decoder_last_layer(self) -> nn.Parameter:
        """The decoder's final trainable weight (where the adaptive GAN weight is measured)."""
        if self.decoder_trunk is not None and self.config.train_decoder_trunk:
            return self.decoder_trunk.last_layer()
        return self.up.last_layer()

    def encoder_last_layer(self) -> nn.Parameter:
        """The detail encoder's last conv weight (where the adaptive alignment weight is measured)."""
        return self.down.last_layer()

    # ------------------------------------------------------------------ the method
    @property
    def granularity(self) -> int:
        """Pixels per latent token side: s * f. Image sides must be multiples of this."""
        return self.config.scale * self.config.downsample

    @property
    def latent_channels(self) -> int:
        return self.config.base_channels + self.config.detail_channels

    def check_image(self, x: torch.Tensor) -> None:
        g = self.granularity
        if x.ndim != 4 or x.shape[1] != 3:
            raise DavaeError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % g or x.shape[-2] % g:
            raise DavaeError(f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of s*f = {g}")

    @torch.no_grad()
    def encode_base(self, x: torch.Tensor) -> torch.Tensor:
        """z_base: the transformed base posterior mean of the downsampled image. x (B, 3, H, W) -> (B, C, h, w)."""
        return self.encode_base_image(L.downsample(x, self.config.scale, self.config.base_resize))

    @torch.no_grad()
    def encode_base_image(self, x_base: torch.Tensor) -> torch.Tensor:
        """z_base of an image already at the base resolution (1/s): (B, 3, H/s, W/s) -> (B, C, h, w).
        `encode_base(x)` is `encode_base_image(downsample(x))`."""
        return self.transform(base_encode_mean(self.base.vae, x_base))

    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None,
               base_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> DAEncoding:
        """x (B, 3, H, W) in [-1, 1] -> DAEncoding with latent (B, C+D, H/(s f), W/(s f)), base first.

        `base_cache`: precomputed (z_base, baseline) of the frozen base for x (training with
        `train_vae.cache_base`), so the base VAE does not run."""
        self.check_image(x)
        z_base, baseline = base_cache if base_cache is not None else (self.encode_base(x), None)
        if self.detail_trunk is None:
            if baseline is None:
                baseline = self.decode_baseline(z_base)
            feats = F.pixel_unshuffle(x - baseline, self.config.downsample)
        else:
            feats = conv_layout(self.detail_trunk, x)
        mean, logvar = self.down(feats, z_base)
        z_detail = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z_detail = mean + torch.exp(0.5 * logvar) * noise
        return DAEncoding(L.join(z_base, z_detail), z_base, mean, logvar, feats)

    def decode(self, latent: torch.Tensor, baseline: Optional[torch.Tensor] = None) -> torch.Tensor:
        """latent (B, C+D, h, w) -> image (B, 3, s f h, s f w), about [-1, 1] (not clamped). `baseline`: the
        precomputed decode_baseline of the latent's base channels (residual design only)."""
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise DavaeError(f"expected a latent (B, {self.latent_channels}, h, w), got {tuple(latent.shape)}")
        c = self.config.base_channels
        up_in = latent
        if self.config.up_input == "detail_residual":
            up_in = torch.cat([latent[:, :c], L.detail_residual(latent, c)], dim=1)
        if self.config.decoder_base_space == "raw":  # the official ImageNet decoder input
            up_in = torch.cat([self.transform.inverse(up_in[:, :c]), up_in[:, c:]], dim=1)
        if self.config.up_input_order == "detail_first":  # the official SD3 decoder input
            up_in = torch.cat([up_in[:, c:], up_in[:, :c]], dim=1)
        if self.decoder_trunk is None and baseline is None:
            baseline = self.decode_baseline(latent[:, :c])
        if isinstance(self.up, ResidualDetailDecoder):
            out = conv_layout(lambda t: self.up(t, baseline), up_in)
        else:
            h = self.up(up_in)  # (B, G, 2h, 2w)
            if self.decoder_trunk is not None:
                return self.decoder_trunk(h)
            out = baseline + F.pixel_shuffle(h, self.config.downsample)
        if self.config.residual_band == "high":
            out = baseline + L.high_band(out - baseline, self.config.scale)
        return out

    def forward(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None,
                detail_dropout: float = 0.0, base_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                dropout_rescale: bool = False) -> dict:
        """Training pass: encode, optionally zero whole z_d of a sample (prob. `detail_dropout`; with
        `dropout_rescale` the kept ones are scaled by 1 / (1 - detail_dropout)), decode.

        Returns a dict (DDP-friendly): x_hat (B, 3, H, W), latent, z_base, mean, logvar.
        """
        enc = self.encode(x, sample=sample, generator=generator, base_cache=base_cache)
        latent = enc.latent
        if detail_dropout > 0:
            keep = (torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device) >= detail_dropout).to(latent.dtype)
            if dropout_rescale:
                keep = keep / (1.0 - detail_dropout)
            c = self.config.base_channels
            latent = torch.cat([latent[:, :c], latent[:, c:] * keep], dim=1)
        baseline = base_cache[1] if base_cache is not None else None
        return {"x_hat": self.decode(latent, baseline), "latent": latent, "z_base": enc.z_base, "mean": enc.mean,
                "logvar": enc.logvar, "z_detail": enc.latent[:, self.config.base_channels:]}

    # ------------------------------------------------------------------ baselines and statistics
    @torch.no_grad()
    def decode_baseline(self, z_base: torch.Tensor) -> torch.Tensor:
        """(a): the base decoder on z_base (half resolution), then bicubic x s. (B, C, h, w) -> (B, 3, H, W)."""
        half = base_decode(self.base.vae, self.transform.inverse(z_base)).clamp(-1, 1)
        return L.upsample(half, self.config.scale)

    @torch.no_grad()
    def reconstruct_base_full(self, x: torch.Tensor) -> torch.Tensor:
        """(c): the base VAE at full resolution (s^2 times the tokens). x (B, 3, H, W) -> same shape. Also the
        reconstruction target of `loss.recon_target: base_reconstruction` (the official SD3 tokenizer recipe)."""
        return base_decode(self.base.vae, base_encode_mean(self.base.vae, x)).clamp(-1, 1)

    @torch.no_grad()
    def set_detail_stats(self, mean: torch.Tensor, std: torch.Tensor, num_images: int) -> None:
        self.detail_mean.copy_(mean)
        self.detail_std.copy_(std.clamp_min(1e-6))
        self.__dict__["_latent_identity"] = None
        self.detail_stats_images.fill_(int(num_images))

    def describe(self) -> dict:
        """Identity facts recorded in latent files and reports."""
        c = self.config
        return {
            "davae": self.identity,
            "latent_identity": self.latent_identity,
            "base_vae": c.base_vae_source,
            "base_vae_hash": c.base_vae_hash,
            "C": c.base_channels,
            "D": c.detail_channels,
            "scale": c.scale,
            "downsample": c.downsample,
        }


def _portable_source(source: str) -> str:
    """Record local folders as absolute paths; hub ids and `random` as given."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source
