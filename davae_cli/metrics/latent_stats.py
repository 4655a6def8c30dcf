"""Is the detail part of a DA-VAE latent something a DiT can generate? Statistics of the detail channels
against the base channels (issue 20, SPEC §12).

For latents (B, C + D, h, w), base first:

- `detail_unexplained.variance_share`: the share of the detail channels' variance that the base channels do
  not explain: the residual of the least-squares fit z_d ~ A z_base + b (per detail channel, over all
  positions; A is C x D), sum of residual variances / sum of variances. Near 0: z_d is a function of z_base
  (all information lies in a small correction); near 1: z_d carries its own content.
- `neighbour_corr`: the correlation of each channel with itself one token to the right and one below,
  averaged over both directions and over channels. A natural latent is smooth (~0.7 for TAESD3 on
  photos); a white-noise-like detail part (~0) is hard for a DiT to generate.
- `kurtosis`: Pearson's kurtosis E[(x - mu)^4] / sigma^4 per channel, averaged (3 for a Gaussian; heavy
  tails above).
- `std`: the channels' standard deviation, averaged.

Each for the base channels, the detail channels and the unexplained part of the detail channels.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _channel_stats(v: list[torch.Tensor]) -> dict:
    """std, neighbour correlation and kurtosis of the channels of latents v[i] (K, h, w), averaged over channels."""
    flat = torch.cat([t.flatten(1) for t in v], 1).double()  # (K, positions)
    mu = flat.mean(1, keepdim=True)
    cen = flat - mu
    var = cen.pow(2).mean(1)
    kurt = cen.pow(4).mean(1) / var.pow(2).clamp_min(1e-30)

    def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (K, n) pairs -> (K,) Pearson
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).mean(1) / (a.pow(2).mean(1) * b.pow(2).mean(1)).sqrt().clamp_min(1e-30)

    pairs = {"right": ([], []), "below": ([], [])}
    for t in v:
        t = t.double()
        if t.shape[-1] > 1:
            pairs["right"][0].append(t[:, :, :-1].flatten(1))
            pairs["right"][1].append(t[:, :, 1:].flatten(1))
        if t.shape[-2] > 1:
            pairs["below"][0].append(t[:, :-1, :].flatten(1))
            pairs["below"][1].append(t[:, 1:, :].flatten(1))
    cs = [corr(torch.cat(a, 1), torch.cat(b, 1)) for a, b in pairs.values() if a]
    nc = torch.stack(cs).mean(0) if cs else torch.full_like(var, float("nan"))
    return {"std": float(var.sqrt().mean()), "neighbour_corr": float(nc.mean()), "kurtosis": float(kurt.mean())}


def detail_structure(latents: Iterable[torch.Tensor], base_channels: int) -> dict:
    """The statistics above for latents, each (B, C + D, h, w) or (C + D, h, w); sizes may differ between
    items. Returns {latents, base, detail, detail_unexplained: {variance_share, std, neighbour_corr, kurtosis}}."""
    c = int(base_channels)
    items = [t.detach().cpu() for t in latents]
    items = [t for x in items for t in (x if x.dim() == 4 else x[None])]
    if not items:
        raise ValueError("no latents")
    if items[0].shape[0] <= c:
        raise ValueError(f"latents have {items[0].shape[0]} channels: no detail channels after C = {c}")
    base = [t[:c] for t in items]
    det = [t[c:] for t in items]
    # least squares z_d ~ A z_base + b over all positions (normal equations in float64)
    x = torch.cat([torch.cat([b.flatten(1), torch.ones(1, b[0].numel())], 0) for b in base], 1).double()  # (C+1, N)
    y = torch.cat([d.flatten(1) for d in det], 1).double()  # (D, N)
    xtx, xty = x @ x.T, x @ y.T
    coef = torch.linalg.lstsq(xtx, xty).solution  # (C+1, D)
    resid = y - coef.T @ x
    tss = (y - y.mean(1, keepdim=True)).pow(2).sum(1)
    rss = resid.pow(2).sum(1)
    # back to per-latent (D, h, w) tensors for the spatial statistics of the unexplained part
    unexplained, start = [], 0
    for d in det:
        n = d[0].numel()
        unexplained.append(resid[:, start : start + n].reshape(d.shape).float())
        start += n
    return {"latents": len(items), "base": _channel_stats(base), "detail": _channel_stats(det),
            "detail_unexplained": {"variance_share": float(rss.sum() / tss.sum().clamp_min(1e-30)),
                                   **_channel_stats(unexplained)}}
