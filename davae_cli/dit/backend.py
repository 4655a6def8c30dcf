"""One interface over the DiT backends, so training, sampling and benchmarking are backend-agnostic.

`velocity(model, x, sigma, cond)` always returns the rectified-flow velocity eps - x0 in the sigma
convention of `davae_cli.flow` (sigma = 1 is noise); each backend converts its own timestep convention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..config import Preset
from ..errors import DavaeError

FACTS_FILE = "davae_dit.json"  # the sampling facts written beside an adapted model


def sd3_velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """SD3 already uses the sigma convention; its timestep is sigma * 1000.

    x (N, C[+D], h, w) -> velocity of the same shape; embeds (N, 77 + T5 tokens, joint_attention_dim),
    pooled (N, pooled_projection_dim), sigma (N,). Inside diffusers' SD3Transformer2DModel: patchify to
    (N, h w / p^2, hidden), joint attention with the text tokens, proj_out to (N, h w / p^2, p p (C[+D])),
    unpatchify back to (N, C[+D], h, w)."""
    return model(hidden_states=x, encoder_hidden_states=cond["embeds"], pooled_projections=cond["pooled"],
                 timestep=sigma * 1000.0, return_dict=False)[0]


def lightningdit_velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """LightningDiT: t = 1 - sigma (t = 1 is data) and it predicts x0 - eps (see lightningdit.py). Labels
    arrive already dropped to the null class by the caller, so the model's own dropout is disabled."""
    y = cond["labels"]
    return -model(x, 1.0 - sigma, y, force_drop_ids=torch.zeros_like(y))


def place_frozen(module: nn.Module, device, dtype) -> nn.Module:
    """Move an inference-only module to `device`, cast it unless float32 (diffusers warns on a no-op cast),
    and freeze it."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype)
    return module.eval().requires_grad_(False)


class _Backend:
    """What both backends share; subclasses set `name`, `conditioning` and `velocity`."""

    name: str
    conditioning: str

    def __init__(self, preset: Preset):
        self.preset = preset

    def channels(self, model) -> int:
        return int(model.config.in_channels)

    def patch_size(self, model) -> int:
        return int(model.config.patch_size)


class SD3Backend(_Backend):
    name = "sd3"
    conditioning = "prompt"
    velocity = staticmethod(sd3_velocity)

    def load(self, spec: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
        from .sd3 import load_sd3_transformer

        return load_sd3_transformer(spec, self.preset.dit.subfolder, self.preset.dit.arch, seed=seed, dtype=dtype)

    def extend(self, model, detail_channels: int):
        from .sd3 import extend_sd3

        return extend_sd3(model, detail_channels)

    def prepare_training(self, model) -> list[str]:
        """LoRA on the preset's targets (if any) + the fully trained modules; returns trainable names."""
        from .sd3 import add_lora, set_trainable

        d = self.preset.dit
        if d.lora_rank:
            add_lora(model, d.lora_rank, d.lora_alpha, d.lora_targets, d.lora_init)
            return set_trainable(model, d.full_train)
        model.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]

    def export(self, model, folder: Path) -> None:
        """A plain diffusers SD3Transformer2DModel folder (LoRA merged) + the adapter in `lora/`."""
        from .sd3 import merged_copy, save_lora

        plain = merged_copy(model) if hasattr(model, "peft_config") else model
        plain.save_pretrained(str(folder), safe_serialization=True)
        if hasattr(model, "peft_config"):
            save_lora(model, folder / "lora")

    @staticmethod
    def load_adapted(folder: Path, dtype=torch.float32):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(str(folder), torch_dtype=dtype)


class FluxBackend(SD3Backend):
    """FLUX.1: the SD3 backend's LoRA, training and export on a `FluxTransformer2DModel`, with the packed
    layout's extension (`dit/flux.py`); C is in_channels / 4 and a token covers 2x2 latent pixels."""

    name = "flux"

    @staticmethod
    def velocity(model, x, sigma, cond):
        from .flux import flux_velocity

        return flux_velocity(model, x, sigma, cond)

    def load(self, spec: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
        from .flux import load_flux_transformer

        return load_flux_transformer(spec, self.preset.dit.subfolder, self.preset.dit.arch, seed=seed, dtype=dtype)

    def extend(self, model, detail_channels: int):
        from .flux import extend_flux

        return extend_flux(model, detail_channels)

    def channels(self, model) -> int:
        from .flux import latent_channels

        return latent_channels(model)

    def patch_size(self, model) -> int:
        from .flux import PACK

        return PACK * int(model.config.patch_size)

    @staticmethod
    def load_adapted(folder: Path, dtype=torch.float32):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype)


class LightningDiTBackend(_Backend):
    name = "lightningdit"
    conditioning = "class"
    velocity = staticmethod(lightningdit_velocity)

    def load(self, spec: str, seed: int = 0, dtype=torch.float32, latent_side: int | None = None) -> nn.Module:
        """`latent_side`: the token grid's side (p = 1) when it is not the DA-VAE latent of
        adapt_dit.resolution (the native model at the base resolution, benchmarks)."""
        from . import lightningdit as L

        arch = dict(self.preset.dit.arch)
        size = arch.pop("size", "XL/1")
        # the token grid follows the recipe's resolution; the class count and the null class follow dit.*
        # (class_dropout_prob > 0 keeps the null-class row; the trainer drops labels itself)
        arch.setdefault("input_size", latent_side or self.preset.adapt_dit.resolution // self.preset.granularity)
        arch.setdefault("num_classes", self.preset.dit.num_classes)
        arch.setdefault("class_dropout_prob", self.preset.dit.cond_dropout)
        p = Path(spec).expanduser()
        if p.is_dir() and (p / "config.json").is_file():
            return L.LightningDiT.from_pretrained(str(p), torch_dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = L.build_lightningdit(size, **arch)
            except TypeError as e:
                raise DavaeError(f"dit.arch: not a valid LightningDiT config ({e})") from None
        if spec != "random":
            if not p.is_file():
                raise DavaeError(f"{spec}: no such checkpoint file or folder (LightningDiT loads local files)", param="dit")
            L.load_lightningdit_weights(model, str(p))
        return model.to(dtype)

    def extend(self, model, detail_channels: int):
        from .lightningdit import extend_lightningdit

        return extend_lightningdit(model, detail_channels)

    def prepare_training(self, model) -> list[str]:
        """Everything trains (SPEC §6) except the fixed sin-cos position table."""
        model.requires_grad_(True)
        if isinstance(getattr(model, "pos_embed", None), nn.Parameter):
            model.pos_embed.requires_grad_(False)
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def export(self, model, folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)

    @staticmethod
    def load_adapted(folder: Path, dtype=torch.float32):
        from .lightningdit import LightningDiT

        return LightningDiT.from_pretrained(str(folder), torch_dtype=dtype)


def get_backend(preset: Preset):
    return {"sd3": SD3Backend, "lightningdit": LightningDiTBackend, "flux": FluxBackend}[preset.dit.backend](preset)


def backend_class(name: str):
    """The backend class of an adapted model's facts (`davae_dit.json` "backend")."""
    try:
        return {"sd3": SD3Backend, "lightningdit": LightningDiTBackend, "flux": FluxBackend}[name]
    except KeyError:
        raise DavaeError(f"{FACTS_FILE}: unknown backend {name!r} (sd3, lightningdit or flux)") from None


def sigma_grid(backend: str, steps: int, shift: float, scheduler_config: Optional[dict] = None,
               image_tokens: Optional[int] = None) -> torch.Tensor:
    """The sampling grid, `steps + 1` sigmas from noise to 0 (SPEC §6). SD3: the grid of diffusers'
    FlowMatchEulerDiscreteScheduler as StableDiffusion3Pipeline runs it (its scheduler_config with `shift`);
    LightningDiT: its official integrator's grid, uniform in time then shifted; FLUX: FluxPipeline's grid
    (dynamic shift from `image_tokens`)."""
    if backend == "sd3":
        from .sd3 import pipeline_sigmas

        return pipeline_sigmas(steps, shift, scheduler_config, image_tokens)
    if backend == "flux":
        from .flux import flux_sigmas

        return flux_sigmas(steps, scheduler_config or None, image_tokens, shift)
    from ..flow import sampling_sigmas

    return sampling_sigmas(steps, shift).float()


def read_facts(folder: Path) -> dict:
    f = Path(folder) / FACTS_FILE
    if not f.is_file():
        raise DavaeError(f"{folder}: not an adapted DiT (no {FACTS_FILE}; made by `davae adapt-dit`)")
    return json.loads(f.read_text())
