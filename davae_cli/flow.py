"""Rectified flow as pure functions (SPEC §6): timestep sampling and shift, the detail-loss schedule and
its normalisation, the Euler/Heun samplers and classifier-free guidance.

Convention: sigma = 1 is pure noise, sigma = 0 is data; x_sigma = (1 - sigma) x0 + sigma * eps, and the
model predicts the velocity u = eps - x0 (SD3's convention). Backends with another time convention
(LightningDiT) convert at their boundary.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def shift_sigma(sigma: torch.Tensor | float, shift: float):
    """The timestep shift: sigma' = s sigma / (1 + (s - 1) sigma) (s > 1 spends more time near noise)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                  generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Training sigmas: logit-normal(mean, std), then shifted."""
    u = torch.randn(n, generator=generator, device=device) * std + mean
    return shift_sigma(torch.sigmoid(u), shift)


def noisy(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, velocity target eps - x0) for per-sample sigmas."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps, eps - x0


def detail_weight(step: int, ramp_steps: int) -> float:
    """w(n) = (1 - cos(pi * min(n, N) / N)) / 2: 0 at the warm start, 1 from step N on."""
    n = min(max(step, 0), ramp_steps)
    return (1.0 - math.cos(math.pi * n / ramp_steps)) / 2.0


def with_detail_noise(x0: torch.Tensor, base_channels: int, std: float,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x0 with N(0, std²) added to its detail channels (those after the first `base_channels`); the base
    channels are returned unchanged. x0 is not modified in place."""
    noise = torch.randn(x0[:, base_channels:].shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return torch.cat([x0[:, :base_channels], x0[:, base_channels:] + std * noise], 1)


LOSS_WEIGHTINGS = ("none", "snr_ratio", "min_snr")


def sample_loss_weight(sigma: torch.Tensor, *, target: str = "velocity", weighting: str = "none",
                       gamma: float = 5.0) -> torch.Tensor:
    """Per-sample factor on the squared velocity error that gives the requested objective.

    target "x0": the error of x0_hat = x_sigma - sigma u_hat, i.e. sigma^2 ||u_hat - u||^2 (the official SD3
    DA-VAE trainer); "velocity": ||u_hat - u||^2. Then weighting, with SNR = ((1 - sigma) / sigma)^2 on this
    path: "snr_ratio" = min((1 - sigma) / sigma, gamma) (the official SD3 trainer's "min-SNR", which takes the
    ratio where min-SNR takes its square), "min_snr" = min(SNR, gamma) (Hang et al.), "none" = 1."""
    s = sigma.float().clamp_min(1e-6)
    k = s.pow(2) if target == "x0" else torch.ones_like(s)
    if weighting == "snr_ratio":
        k = k * ((1 - s) / s).clamp_max(gamma)
    elif weighting == "min_snr":
        k = k * ((1 - s) / s).pow(2).clamp_max(gamma)
    elif weighting != "none":
        raise ValueError(f"unknown loss weighting {weighting!r} ({', '.join(LOSS_WEIGHTINGS)})")
    if target not in ("velocity", "x0"):
        raise ValueError(f"unknown loss target {target!r} (velocity, x0)")
    return k


def flow_loss(pred: torch.Tensor, target: torch.Tensor, base_channels: int, w: float,
              sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L = (||u_hat_B - u_B||^2 + w ||u_hat_D - u_D||^2) / (|B| + w |R|), sums over the batch: the base
    channels' plain MSE at w = 0 (the pretrained objective), the MSE over all channels at w = 1.
    `sample_weight` (batch,) scales each sample's squared error (`sample_loss_weight`); the normaliser stays
    the element count, so weight 1 everywhere is the plain objective."""
    err = (pred.float() - target.float()).pow(2)
    if sample_weight is not None:
        err = err * sample_weight.float().view(-1, *([1] * (err.dim() - 1)))
    eb, ed = err[:, :base_channels], err[:, base_channels:]
    return (eb.sum() + w * ed.sum()) / (eb.numel() + w * ed.numel())


def cosine_loss(pred: torch.Tensor, target: torch.Tensor, base_channels: int, w: float, eps: float = 1e-8) -> torch.Tensor:
    """The official LightningDiT recipe's cosine velocity term, mean over tokens of 1 - cos(u_hat, u) along
    the channel axis, with the detail channels scaled by sqrt(w) inside both vectors: at w = 0 it is the
    base channels' term (the pretrained objective), at w = 1 the term over all C + D channels."""
    p, t = pred.float(), target.float()
    if p.shape[1] > base_channels:
        scale = torch.ones(p.shape[1], device=p.device, dtype=p.dtype)
        scale[base_channels:] = math.sqrt(max(w, 0.0))
        scale = scale.view(1, -1, *([1] * (p.dim() - 2)))
        p, t = p * scale, t * scale
    cos = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1)).clamp_min(eps)
    return (1.0 - cos).mean()


def sampling_sigmas(steps: int, shift: float, device=None) -> torch.Tensor:
    """steps + 1 sigmas from 1 to 0, uniform in time then shifted: LightningDiT's official integrator grid
    (SD3 models sample on diffusers' scheduler grid instead, `dit.backend.sigma_grid`)."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift)


Velocity = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""velocity(x, sigma (batch,), guided) -> the (guided when asked) velocity at x."""


def guided_velocity(model_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    guidance: float) -> Velocity:
    """Wrap `model_fn(x, sigma) -> (v_uncond, v_cond)` into classifier-free guidance:
    v = v_u + g (v_c - v_u) when guided, else v_c."""
    def velocity(x, sigma, guided):
        v_u, v_c = model_fn(x, sigma)
        return v_u + guidance * (v_c - v_u) if guided else v_c
    return velocity


def in_interval(sigma: float, interval: Optional[tuple[float, float]]) -> bool:
    """Guidance interval in sigma: apply CFG only for lo <= sigma <= hi (None: always)."""
    return interval is None or interval[0] <= sigma <= interval[1]


Constraint = Callable[[torch.Tensor, float], torch.Tensor]
"""constrain(x, sigma) -> x with some channels put back on a known path at sigma (e.g. `hold_channels`)."""


def hold_channels(x0: torch.Tensor, eps: torch.Tensor, channels: int, until: float = 0.0) -> Constraint:
    """Keep the first `channels` channels on the straight path of a known clean value: at sigma they are
    replaced by (1 - sigma) x0 + sigma eps (the same eps all along, the path the noise started on). Applied
    for sigma >= `until`: `until` = 0 holds them to the end (the result's channels equal x0 exactly); a larger
    `until` lets the model move them freely below it (SDEdit-style regeneration from that sigma)."""
    def constrain(x: torch.Tensor, sigma: float) -> torch.Tensor:
        if sigma < until and until > 0:
            return x
        held = ((1.0 - sigma) * x0.float() + sigma * eps.float()).to(x.dtype)
        return torch.cat([held, x[:, channels:]], 1)
    return constrain


@torch.no_grad()
def sample(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, *, method: str = "euler",
           guidance_interval: Optional[tuple[float, float]] = None,
           callback: Optional[Callable[[int], None]] = None, constrain: Optional[Constraint] = None) -> torch.Tensor:
    """Integrate the flow ODE from sigma = sigmas[0] (noise) to sigmas[-1] (data); Euler or Heun
    (Heun's correction is skipped on the last step, which ends at sigma = 0). `constrain(x, sigma)`, when
    given, is applied to the state before every velocity evaluation and to the result at sigmas[-1]."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampler {method!r}")
    keep = constrain or (lambda x, sigma: x)
    x = noise  # (N, C, h, w): the state, in the noise's dtype
    n = noise.shape[0]
    # sigmas stay float32 whatever the state's dtype (a bf16 timestep is off by up to ~4/1000 near noise)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])  # scalars, s > s_next
        guided = in_interval(s, guidance_interval)
        x = keep(x, s)  # (N, C, h, w), held channels put back on their path
        v = velocity(x, torch.full((n,), s, device=x.device, dtype=torch.float32), guided)  # (N, C, h, w)
        x_next = x + (s_next - s) * v  # (N, C, h, w): the Euler step
        if method == "heun" and s_next > 0:
            x_next = keep(x_next, s_next)  # (N, C, h, w)
            v2 = velocity(x_next, torch.full((n,), s_next, device=x.device, dtype=torch.float32),
                          in_interval(s_next, guidance_interval))  # (N, C, h, w)
            x_next = x + (s_next - s) * 0.5 * (v + v2)  # (N, C, h, w): Heun's correction
        x = x_next
        if callback:
            callback(i)
    return keep(x, float(sigmas[-1]))  # (N, C, h, w) at sigmas[-1]
