"""The sampling loop: latents in, latents out. No files, no model loading, no family names.

Noise: for each image a CPU `torch.Generator` seeded with the image's seed draws the base channels first,
with exactly the shape the native model uses at half the resolution (so the native pipeline at R/2 and the
DA-VAE model at R start from the same base noise), then the detail channels: seeds are independent of the
device and of the batch size.

The ODE (`davae_cli.flow.sample`, Euler or Heun) steps through the family's pipeline grid
(`Backend.sigma_grid`); guidance follows the family's mode: classifier-free guidance over one doubled batch
("cfg", none at w = 1), the scale as a model input ("distilled"), or a single forward ("none").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import flow
from .errors import DavaeError


@dataclass
class SamplingModel:
    """What the sampler needs from one configuration (the DA-VAE model or the native one)."""

    name: str  # "davae" | "native"
    backend: Any  # the family's Backend class: velocity, sigma grid, guidance weight and inputs
    dit: torch.nn.Module
    base_channels: int
    detail_channels: int
    granularity: int  # pixels per latent pixel
    patch_size: int  # latent pixels per token side
    shift: float  # the default sampling shift (sigma convention)
    decoder: Callable[[torch.Tensor], torch.Tensor]  # final latent (B, C+D, h, w) -> images (B, 3, H, W) in [-1, 1]
    recipe: Optional[dict] = None  # steps, guidance, guidance_interval, sampler, negative_prompt
    conditioning: str = "prompt"  # "prompt" | "class"
    scheduler_config: Optional[dict] = None
    guidance_mode: str = "cfg"  # "cfg" | "distilled" | "none"
    identity: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)  # an adapted model's davae_dit.json
    parts: dict = field(default_factory=dict)  # what else the loader keeps (the DA-VAE, the base VAE)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.backend.velocity(self.dit, x, sigma, cond)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)

    @property
    def dynamic_shift(self) -> bool:
        return bool((self.scheduler_config or {}).get("use_dynamic_shifting"))


def initial_noise(seed: int, base_channels: int, detail_channels: int, side: int,
                  width: Optional[int] = None) -> torch.Tensor:
    """(1, C + D, side, width or side) float32 on the CPU: base channels first, as the native pipeline draws them."""
    return noise_from(torch.Generator("cpu").manual_seed(int(seed)), base_channels, detail_channels, side, width)


def noise_from(g: torch.Generator, base_channels: int, detail_channels: int, side: int,
               width: Optional[int] = None) -> torch.Tensor:
    """`initial_noise` drawn from the CPU generator `g` (advancing it): base channels first, then the detail."""
    w = side if width is None else width
    base = torch.randn((1, base_channels, side, w), generator=g)  # (1, C, h, w)
    if detail_channels == 0:
        return base
    return torch.cat([base, torch.randn((1, detail_channels, side, w), generator=g)], 1)  # (1, C + D, h, w)


def join_conditions(a: dict, b: dict) -> dict:
    """Two condition dicts of batch N each -> one of batch 2N (unconditional first)."""
    return {key: torch.cat([a[key], b[key]]) for key in b}


def guided_velocity(model: SamplingModel, guidance: float, uncond: dict, cond: dict, batch: int, device,
                    dtype) -> flow.Velocity:
    """The velocity the sampler integrates, in float32, under the model's guidance mode (module doc)."""
    if model.guidance_mode == "distilled":
        cond = {**cond, **model.backend.guidance_inputs(guidance, batch, device)}
    w = model.backend.cfg_weight(guidance) if model.guidance_mode == "cfg" else 1.0
    both = join_conditions(uncond, cond) if w != 1.0 else None  # batch 2N: unconditional first

    def pair(x, sigma):  # x (N, C+D, h, w) float32, sigma (N,) -> (v_u, v_c), each (N, C+D, h, w) float32
        return model.velocity(torch.cat([x, x]).to(dtype), torch.cat([sigma, sigma]), both).float().chunk(2)

    cfg = flow.guided_velocity(pair, w)  # v_u + w (v_c - v_u)

    def velocity(x, sigma, guided):  # x (N, C+D, h, w) float32, sigma (N,) -> (N, C+D, h, w) float32
        if both is not None and guided:
            return cfg(x, sigma, True)
        return model.velocity(x.to(dtype), sigma, cond).float()

    return velocity


def check_shift(model: SamplingModel, shift: Optional[float]) -> None:
    """A fixed shift given for a model whose scheduler shifts dynamically is one line."""
    if shift is not None and model.dynamic_shift:
        raise DavaeError("this model samples with its scheduler's dynamic shift (mu from the image-token count), "
                         "as its pipeline does; a fixed shift does not apply", param="shift")


def sampling_grid(model: SamplingModel, res: Optional[int], steps: int,
                  shift: Optional[float]) -> tuple[int, float, torch.Tensor]:
    """(latent side, shift, sigma grid of steps + 1 values) at `res`: the resolution must be a whole number of
    tokens; the shift is `shift`, else the model's."""
    g = model.granularity * model.patch_size
    if res is None or res <= 0 or res % g:
        raise DavaeError(f"{res}: must be a positive multiple of {g} for this model (pixels per token)", param="res")
    check_shift(model, shift)
    side = res // model.granularity
    check_token_grid(model, side // model.patch_size, side // model.patch_size)
    shift = shift if shift is not None else model.shift
    tokens = (side // model.patch_size) ** 2
    return side, shift, model.backend.sigma_grid(steps, shift, model.scheduler_config, tokens)


def check_token_grid(model: SamplingModel, rows: int, cols: int) -> None:
    """One line when a loaded model cannot read a rows x cols token grid: more tokens a side than its table of
    positions reaches (`Backend.max_token_grid`: SD3's pos_embed_max_size, Z-Image's RoPE axes), where the
    forward would fail deep inside the family's code. The CLI checks the same from the folders before loading."""
    side = model.backend.max_token_grid(dict(getattr(model.dit, "config", None) or {}))
    if side is not None and max(rows, cols) > side:
        unit = model.granularity * model.patch_size
        raise DavaeError(f"{cols * unit}x{rows * unit} ({cols}x{rows} tokens, width x height): "
                         f"{model.backend.grid_limit_phrase(side)}; the largest square it can make is {side * unit}")


def sample_latents(velocity: flow.Velocity, noise: torch.Tensor, sigmas: torch.Tensor, *, sampler: str = "euler",
                   guidance_interval=None, constrain=None) -> torch.Tensor:
    """noise (B, C+D, h, w) float32 on the device -> final latents (B, C+D, h, w) float32: the ODE from
    sigmas[0] to sigmas[-1] = 0 (`constrain`: e.g. base channels held to an encoded image, `upscale`)."""
    with torch.inference_mode():
        return flow.sample(velocity, noise, sigmas, method=sampler, guidance_interval=guidance_interval,
                           constrain=constrain)


def timed(device) -> Callable[[Callable[[], Any]], tuple[Any, float]]:
    """`clock(fn) -> (fn(), seconds)`, synchronising CUDA around it."""
    sync = torch.cuda.synchronize if torch.device(device or "cpu").type == "cuda" else (lambda: None)

    def clock(fn):
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    return clock
