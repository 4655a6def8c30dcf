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

`DetailFromBase` is that least-squares map as an object: fitted on some latents, it replaces the detail
channels of any latent by their prediction from its base channels. Decoding such latents tells what the
decoder makes of z_base alone (its own learned upsampling), so the PSNR or FID difference to the full
latent is what the detail channels' own content is worth (`davae decode --detail-from-base`, the
`davae_detail_from_base` rows of `train-vae` and `eval-fid --reconstruct --baselines`).
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


def _design(base: list[torch.Tensor]) -> torch.Tensor:
    """(C + 1, N) float64: the base channels of every position, and a row of ones (the intercept)."""
    return torch.cat([torch.cat([b.flatten(1), torch.ones(1, b[0].numel())], 0) for b in base], 1).double()


def _items(latents: Iterable[torch.Tensor], c: int) -> list[torch.Tensor]:
    """(C + D, h, w) tensors on the CPU from latents (B, C + D, h, w) or (C + D, h, w); sizes may differ."""
    items = [t.detach().cpu() for t in latents]
    items = [t for x in items for t in (x if x.dim() == 4 else x[None])]
    if not items:
        raise ValueError("no latents")
    if items[0].shape[0] <= c:
        raise ValueError(f"latents have {items[0].shape[0]} channels: no detail channels after C = {c}")
    return items


class DetailFromBase:
    """The least-squares prediction z_d ~ A z_base + b (per detail channel, over all positions of the
    latents it is fitted on; A is C x D). `predict(latent)` returns the latent with its detail channels
    replaced by that prediction from its own base channels."""

    def __init__(self, coef: torch.Tensor, base_channels: int):
        self.coef = coef.double()  # (C + 1, D): A stacked on b
        self.c = int(base_channels)

    @classmethod
    def fit(cls, latents: Iterable[torch.Tensor], base_channels: int) -> "DetailFromBase":
        """Least squares over every position of `latents` (each (B, C + D, h, w) or (C + D, h, w), any sizes),
        streamed: only first and second moments are kept (float64), so an iterator over many files is fine."""
        c = int(base_channels)
        n, sx, sy, sxx, sxy = 0, 0.0, 0.0, 0.0, 0.0
        for t in latents:
            t = t.detach().cpu()
            for item in (t if t.dim() == 4 else t[None]):
                if item.shape[0] <= c:
                    raise ValueError(f"latents have {item.shape[0]} channels: no detail channels after C = {c}")
                x, y = item[:c].flatten(1).double(), item[c:].flatten(1).double()  # (C, N), (D, N)
                n += x.shape[1]
                sx, sy = sx + x.sum(1), sy + y.sum(1)
                sxx, sxy = sxx + x @ x.T, sxy + x @ y.T
        if n == 0:
            raise ValueError("no latents")
        mx, my = sx / n, sy / n
        cxx = sxx / n - torch.outer(mx, mx)  # covariances: the fit on centred channels
        cxy = sxy / n - torch.outer(mx, my)
        # on unit-variance base channels (conditioning of their correlation, not of raw sums); lstsq copes with a
        # constant or collinear channel
        sd = cxx.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
        a = torch.linalg.lstsq(cxx / torch.outer(sd, sd), cxy / sd[:, None]).solution / sd[:, None]  # (C, D)
        return cls(torch.cat([a, (my - mx @ a)[None]], 0), c)

    def predict(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C + D, h, w) -> the same with z_d := A z_base + b (dtype and device kept)."""
        c = self.c
        b, _, h, w = latent.shape
        base = latent[:, :c].double().permute(0, 2, 3, 1).reshape(-1, c)  # (B h w, C)
        coef = self.coef.to(latent.device)
        pred = base @ coef[:c] + coef[c]  # (B h w, D)
        pred = pred.reshape(b, h, w, -1).permute(0, 3, 1, 2).to(latent.dtype)
        return torch.cat([latent[:, :c], pred], 1)


def detail_structure(latents: Iterable[torch.Tensor], base_channels: int) -> dict:
    """The statistics above for latents, each (B, C + D, h, w) or (C + D, h, w); sizes may differ between
    items. Returns {latents, base, detail, detail_unexplained: {variance_share, std, neighbour_corr, kurtosis}}."""
    c = int(base_channels)
    items = _items(latents, c)
    base = [t[:c] for t in items]
    det = [t[c:] for t in items]
    y = torch.cat([d.flatten(1) for d in det], 1).double()  # (D, N)
    resid = y - DetailFromBase.fit(items, c).coef.T @ _design(base)
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
