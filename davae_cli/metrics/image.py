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


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid region),
    averaged over channels, of (B, C, H, W) images in [-1, 1] mapped to [0, 1]."""
    x, y = _to_unit(x).double(), _to_unit(y).double()
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c, x.device, x.dtype)
    c1, c2 = 0.01**2, 0.03**2

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def reconstruction_metrics(y: torch.Tensor, x: torch.Tensor, lpips_model=None) -> dict[str, torch.Tensor]:
    """Per-image PSNR, SSIM and (with `lpips_model`) LPIPS of reconstructions `y` against originals `x`,
    both (B, 3, H, W) in [-1, 1]: what train-vae's held-out evaluation and eval-fid --reconstruct report."""
    out = {"psnr": psnr(y, x), "ssim": ssim(y, x)}
    if lpips_model is not None:
        out["lpips"] = lpips_model(y.float(), x.float()).flatten().float()
    return out
