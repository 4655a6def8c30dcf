"""DA-VAE losses (SPEC §5): L1, KL, PatchGAN hinge with adaptive weight, detail alignment.

LPIPS is built by `metrics.lpips_weights.build_lpips` (metrics stand above vae: they evaluate it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import latents as L

def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)): averaged over all elements ("mean"), or summed over each sample's
    elements and averaged over the batch ("sum", LDM's DiagonalGaussianDistribution.kl convention)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    if reduction == "sum":
        return kl.flatten(1).sum(1).mean()
    return kl.mean()


def align_loss(z_detail: torch.Tensor, z_base: torch.Tensor) -> torch.Tensor:
    """L_align = MSE(Proj(z_d), stopgrad(z_base)), Proj = group average of r = D/C channels."""
    return F.mse_loss(L.project(z_detail, z_base.shape[1]), z_base.detach())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def grad_norm_ratio(numerator: torch.Tensor, denominator: torch.Tensor, param: nn.Parameter,
                    max_value: float = 1e4) -> torch.Tensor:
    """||d numerator / d param|| / (||d denominator / d param|| + 1e-4), clamped to [0, max_value], detached.

    The adaptive weight of LDM/taming (GAN) and of the official ImageNet DA-VAE code (alignment).
    """
    g_num = torch.autograd.grad(numerator, param, retain_graph=True, allow_unused=True)[0]
    g_den = torch.autograd.grad(denominator, param, retain_graph=True, allow_unused=True)[0]
    if g_num is None or g_den is None:
        return torch.zeros((), device=numerator.device)
    return (g_num.norm() / (g_den.norm() + 1e-4)).clamp(0.0, max_value).detach()


class PatchDiscriminator(nn.Module):
    """PatchGAN (NLayerDiscriminator of pix2pix / taming), `n_layers` strided convs, BatchNorm."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(width * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
