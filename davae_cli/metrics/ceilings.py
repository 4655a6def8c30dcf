"""What a tokenizer design can reach at best, measured before any training (issue 37, item 1).

For a base VAE, a scale s and held-out images x (full resolution, in [-1, 1]):

(a) `psnr`: the PSNR of (a) the base at 1/s + bicubic (the same tokens as a DA-VAE), (c) the base at full
    resolution (s² times the tokens), and the best a **high-band** decoder can do: it may add only what the base
    resolution cannot hold (`vae.residual_band: high`: the decode's s x s block means are the baseline's), so its
    best output is baseline + high_band(x - baseline) and its only error is the block means of x - baseline.
    `high_band_gap_closed` = (ceiling - a) / (c - a); under 0.4 the full band is needed for the 40 % gate.
(b) `reference_detail`: the base VAE's own latent of the full image, pixel-unshuffled to the base grid (s² C
    channels beside z_base): its share of variance not explained linearly by z_base, and that residual's
    neighbour correlation and kurtosis (`latent_stats.detail_structure`). This detail is real and has a
    latent's structure by construction: the realistic target for "generable" detail channels.
(c) `align_floor`: the least alignment MSE a detail head can reach, in closed form, per feature source the
    head reads: Proj(z_d) is linear in the head's features, so the best it can do is the least-squares fit of
    z_base on them (per token, on the s x s block of feature pixels a pixel-unshuffle gives it, plus a bias).
    A 3x3 conv before the unshuffle sees a little more, so for heads with a conv this is an upper bound; for a
    frozen trunk it is the floor for the whole run, for a trainable one the floor at the start.
    `var_z_base` is the floor of a head that outputs a constant (alignment off).
Everything is a running sum over the images (double precision), so any number of images fits in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import data as D
from .. import latents as L
from ..errors import DavaeError
from .latent_stats import detail_structure

ProgressFn = Callable[[str, int, int], None]
FEATURE_SOURCES = ("trunk", "latent", "residual")  # what a detail head reads (vae.detail_features)
STRUCTURE_LATENTS = 1024  # (b) is measured on the first this many images (memory bound), as evaluate's structure


class _LeastSquares:
    """Running X'X, X'Y of rows (features + a bias column) -> the residual sum of squares of the best fit."""

    def __init__(self):
        self.xtx = self.xty = None
        self.yty = 0.0
        self.ysum = None
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:  # x (N, P), y (N, C)
        x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        y = y.double()
        if self.xtx is None:
            self.xtx, self.xty, self.ysum = x.T @ x, x.T @ y, y.sum(0)
        else:
            self.xtx += x.T @ x
            self.xty += x.T @ y
            self.ysum += y.sum(0)
        self.yty += float(y.pow(2).sum())
        self.n += x.shape[0]

    def floor(self) -> dict:
        """{mse, var_y, r2, features}: per element of y."""
        c = self.xty.shape[1]
        d = self.xtx.diagonal().clamp_min(1e-12).sqrt()  # scaled columns: a better-conditioned solve
        a = torch.linalg.lstsq(self.xtx / torch.outer(d, d), self.xty / d[:, None]).solution / d[:, None]
        rss = self.yty - 2 * float((a * self.xty).sum()) + float((a * (self.xtx @ a)).sum())
        mse = max(rss, 0.0) / (self.n * c)
        var = (self.yty - float(self.ysum.pow(2).sum()) / self.n) / (self.n * c)
        return {"mse": mse, "var_z_base": var, "r2": 1 - mse / var if var > 0 else None,
                "features": int(self.xtx.shape[0]) - 1, "tokens": self.n}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ch, h, w) -> (B h w, ch)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@torch.no_grad()
def tokenizer_ceilings(items: list, base, vcfg, *, res: Optional[int] = None, batch_size: int = 16,
                       progress: Optional[ProgressFn] = None) -> dict:
    """(a), (b), (c) above on the images `items` (paths or arrays), each fitted to res (short side, centre crop
    to a multiple of s f). `base` is a `vae.base.BaseVAE`, `vcfg` a `config.VAEConfig` (its scale, transform)."""
    from ..vae.base import LatentTransform, base_decode, base_encode_mean, configure_transform
    from ..vae.blocks import EncoderTrunk
    from .image import as_8bit, psnr

    s, f, c = vcfg.scale, vcfg.downsample, vcfg.base_channels
    vae = base.vae
    kind = "tiny" if type(vae).__name__ == "AutoencoderTiny" else "kl"
    trunk = EncoderTrunk(vae.encoder, kind, "trunk", c)
    transform = LatentTransform(c)
    configure_transform(transform, vae, vcfg)
    g = s * f
    sums = {k: 0.0 for k in ("base_half_bicubic", "base_full", "high_band_ceiling")}
    fits = {k: _LeastSquares() for k in FEATURE_SOURCES}
    latents: list = []
    n, skipped = 0, []
    for start in range(0, len(items), batch_size):
        arrs = []
        for item in items[start : start + batch_size]:
            try:
                arrs.append(D.fit_to_multiple(D.read_image(item), res, g))
            except Exception as e:  # unreadable or too small: counted, never fatal
                skipped.append({"path": str(item), "reason": str(e).splitlines()[0] if str(e) else type(e).__name__})
        groups: dict = {}
        for a in arrs:
            groups.setdefault(a.shape, []).append(a)
        for group in groups.values():
            x = torch.stack([D.to_tensor(a) for a in group])
            z_raw = base_encode_mean(vae, L.downsample(x, s, vcfg.base_resize))
            z_base = transform(z_raw)
            baseline = L.upsample(base_decode(vae, z_raw).clamp(-1, 1), s)
            z_full_raw = base_encode_mean(vae, x)
            full = base_decode(vae, z_full_raw).clamp(-1, 1)
            ceiling = baseline + L.high_band(x - baseline, s)
            for key, y in (("base_half_bicubic", baseline), ("base_full", full), ("high_band_ceiling", ceiling)):
                sums[key] += float(psnr(as_8bit(y), x).sum())
            # (b) the base VAE's full-resolution latent, in the DiT's space, unshuffled to the base grid
            ref = F.pixel_unshuffle(transform(z_full_raw), s)
            for z, r in zip(z_base, ref):
                if len(latents) < STRUCTURE_LATENTS:
                    latents.append(torch.cat([z, r]).float())
            # (c) z_base on each feature source, per token
            y = _rows(z_base)
            fits["trunk"].add(_rows(F.pixel_unshuffle(trunk(x), s)), y)
            fits["latent"].add(_rows(F.pixel_unshuffle(z_full_raw, s)), y)
            fits["residual"].add(_rows(F.pixel_unshuffle(x - baseline, g)), y)
            n += x.shape[0]
        if progress:
            progress("ceilings", min(start + batch_size, len(items)), len(items))
    if n < 2:
        raise DavaeError(f"{n} usable image(s) ({len(skipped)} unreadable); the ceilings need at least 2")
    p = {k: v / n for k, v in sums.items()}
    a_, c_ = p["base_half_bicubic"], p["base_full"]
    structure = detail_structure(latents, c)
    return {
        "num_images": n, "res": res, "scale": s, "downsample": f, "base_channels": c, "skipped": skipped,
        "psnr": {**p, "high_band_gap_closed": (p["high_band_ceiling"] - a_) / (c_ - a_) if c_ - a_ > 0.1 else None,
                 "note": "mean PSNR over images of the 8-bit outputs; high_band_ceiling = baseline + high_band(x - "
                         "baseline): the best a vae.residual_band = high decoder can do; the full band's best is x"},
        "reference_detail": {
            "channels": s * s * c, "latents": structure["latents"],
            "residual_share": structure["detail_unexplained"]["variance_share"],
            "neighbour_corr": structure["detail_unexplained"]["neighbour_corr"],
            "kurtosis": structure["detail_unexplained"]["kurtosis"],
            "z_base": structure["base"], "detail": structure["detail"], "unexplained": structure["detail_unexplained"],
            "note": "the base VAE's latent of the full image, transformed, pixel-unshuffled to the base grid; "
                    "unexplained = beyond its least-squares prediction from z_base",
        },
        "align_floor": {**{k: v.floor() for k, v in fits.items()},
                        "note": "least-squares MSE of z_base (per element) on the s x s unshuffled block of each "
                                "feature source + a bias, per token: the least alignment loss of a linear head on it "
                                "(an upper bound for heads with a 3x3 conv; at the start for a trainable trunk), in the "
                                "transformed z_base space (loss.align_target: transformed). "
                                "trunk: the base encoder before its last conv on the full image; latent: its output; "
                                "residual: the pixels of x - baseline"},
    }


def ceilings_for_folder(folder: str | Path, base, vcfg, *, res: Optional[int] = None, max_images: int = 0,
                        seed: int = 0, batch_size: int = 16, progress: Optional[ProgressFn] = None) -> dict:
    """`tokenizer_ceilings` on the images under `folder` (a seeded subset of `max_images` when > 0)."""
    from .features import list_folder

    items = list(list_folder(folder, "REF").items)
    if max_images and len(items) > max_images:
        g = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(items), generator=g)[:max_images].tolist())
        items = [items[i] for i in keep]
    out = tokenizer_ceilings(items, base, vcfg, res=res, batch_size=batch_size, progress=progress)
    out["reference"] = str(Path(folder).expanduser())
    return out
