"""Image metrics on images in [-1, 1] (computed on [0, 1]), per image: PSNR, SSIM, and the set of them
(with LPIPS when a model is given) that every reconstruction evaluation reports."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [-1, 1], data range 1 after mapping to [0, 1]."""
    mse = (_to_unit(x) - _to_unit(y)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_1d(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid region),
    averaged over channels, of (B, C, H, W) images in [-1, 1] mapped to [0, 1]. The 2-D Gaussian window is
    applied as its two 1-D factors (the same filter, ~window/2 times fewer operations), in float64."""
    x, y = _to_unit(x).double(), _to_unit(y).double()
    b, c = x.shape[:2]
    g = _gaussian_1d(window, sigma, x.device, x.dtype)
    c1, c2 = 0.01**2, 0.03**2
    # the five local means in one pass: x, y, x², y², xy for every channel, as (B, 5C, H, W)
    stack = torch.cat([x, y, x * x, y * y, x * y], 1)
    k = stack.shape[1]
    stack = F.conv2d(stack, g.view(1, 1, window, 1).expand(k, 1, window, 1), groups=k)
    stack = F.conv2d(stack, g.view(1, 1, 1, window).expand(k, 1, 1, window), groups=k)
    mu_x, mu_y, exx, eyy, exy = stack.split(c, 1)
    sxx = exx - mu_x**2
    syy = eyy - mu_y**2
    sxy = exy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


SHARPNESS_NOTE = ("sharpness: the mean absolute 4-neighbour Laplacian of the luminance (the channel mean of the "
                  "8-bit image in [-1, 1]), per image, averaged: high-frequency energy; a decoder that smooths "
                  "scores below its reference")


def as_8bit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to what an 8-bit PNG holds, still in [-1, 1] (what `sharpness` is defined on)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean |4-neighbour Laplacian| of the channel-mean luminance of (B, 3, H, W) images in [-1, 1]
    (valid region): the high-frequency energy of an image (SHARPNESS_NOTE)."""
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=x.device).view(1, 1, 3, 3)
    return F.conv2d(x.float().mean(1, keepdim=True), lap).abs().flatten(1).mean(1)


def reconstruction_metrics(y: torch.Tensor, x: torch.Tensor, lpips_model=None) -> dict[str, torch.Tensor]:
    """Per-image PSNR, SSIM and (with `lpips_model`) LPIPS of reconstructions `y` against originals `x`,
    both (B, 3, H, W) in [-1, 1]: what train-vae's held-out evaluation and eval-fid --reconstruct report."""
    out = {"psnr": psnr(y, x), "ssim": ssim(y, x)}
    if lpips_model is not None:
        out["lpips"] = lpips_model(y.float(), x.float()).flatten().float()
    return out
