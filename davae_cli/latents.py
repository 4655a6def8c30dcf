"""The DA-VAE latent layout (base channels first, then detail), the downsampling, Proj(), latent files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import DavaeError, first_line

LATENT_KEY = "latent"


RESIZES = ("antialias", "plain", "plain_clamp")


def downsample(x: torch.Tensor, s: int = 2, resize: str = "antialias") -> torch.Tensor:
    """The base image: bicubic 1/s resize of x (B, 3, sH, sW) in [-1, 1].

    "antialias" (the default, used everywhere): antialiased, clamped to [-1, 1]. "plain": without
    antialiasing or clamp, as the official ImageNet DA-VAE computes its base latent; "plain_clamp": without
    antialiasing, clamped, as the official SD3 DA-VAE does (only for DA-VAEs converted from them,
    `vae.base_resize`).
    """
    return bicubic(x, resize, scale_factor=1.0 / s)


def bicubic(x: torch.Tensor, resize: str = "antialias", **size_or_scale) -> torch.Tensor:
    """Bicubic resize of an image in [-1, 1] by a `vae.base_resize` rule: "antialias" (antialiased, clamped),
    "plain" (neither), "plain_clamp" (clamped only). `size_or_scale`: F.interpolate's size= or scale_factor=."""
    y = F.interpolate(x, mode="bicubic", antialias=resize == "antialias", align_corners=False, **size_or_scale)
    return y if resize == "plain" else y.clamp(-1, 1)


def upsample(x: torch.Tensor, s: int = 2) -> torch.Tensor:
    """Bicubic x s upsampling, clamped to [-1, 1]: the baseline's way back to full resolution."""
    return F.interpolate(x, scale_factor=float(s), mode="bicubic", align_corners=False).clamp(-1, 1)


def high_band(x: torch.Tensor, s: int = 2) -> torch.Tensor:
    """x minus its mean over every s x s pixel block (repeated back): the part of an image a resolution s
    times lower cannot hold. Its s x s block means are exactly zero. (B, ch, H, W), H and W multiples of s."""
    if x.shape[-2] % s or x.shape[-1] % s:
        raise ValueError(f"high_band: {tuple(x.shape[-2:])} is not a multiple of s = {s}")
    return x - F.interpolate(F.avg_pool2d(x, s), scale_factor=float(s), mode="nearest")


def split(latent: torch.Tensor, base_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C+D, h, w) -> z_base (B, C, h, w), z_detail (B, D, h, w)."""
    return latent[:, :base_channels], latent[:, base_channels:]


def join(z_base: torch.Tensor, z_detail: torch.Tensor) -> torch.Tensor:
    """Base first: concat([z_base, z_detail], dim=1)."""
    return torch.cat([z_base, z_detail], dim=1)


def project(z_detail: torch.Tensor, base_channels: int) -> torch.Tensor:
    """Proj(z_d)[i] = mean_{j<r} z_d[i*r + j]: group average of r = D/C contiguous channels -> (B, C, h, w)."""
    b, d, h, w = z_detail.shape
    if d % base_channels:
        raise ValueError(f"D = {d} is not a multiple of C = {base_channels}")
    r = d // base_channels
    return z_detail.reshape(b, base_channels, r, h, w).mean(dim=2)


def repeat_base(z_base: torch.Tensor, detail_channels: int) -> torch.Tensor:
    """Proj^T: each of the C base channels repeated D/C times (channel k of the result is base channel k // (D/C)):
    (B, C, h, w) -> (B, D, h, w). The detail channels' starting point for the `base` shortcut."""
    return z_base.repeat_interleave(detail_channels // z_base.shape[1], dim=1)


def detail_residual(latent: torch.Tensor, base_channels: int) -> torch.Tensor:
    """z_d - repeat_base(z_base): the detail channels relative to the base channels they are aligned to.
    (B, C + D, h, w) -> (B, D, h, w)."""
    zd = latent[:, base_channels:]
    return zd - repeat_base(latent[:, :base_channels], zd.shape[1])


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so a reader never
    sees half a file. The file gets the mode a plain `open(path, "wb")` would give (0666 less the umask),
    not the temporary file's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_latent(path: Path, latent: torch.Tensor, metadata: dict) -> None:
    """Write one latent (C+D, h, w) as `.safetensors` (key `latent`) with string metadata, atomically."""
    from safetensors.torch import save

    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    atomic_write_bytes(path, save({LATENT_KEY: latent.detach().cpu().contiguous().float()}, metadata=meta))


def load_latent(path: Path) -> tuple[torch.Tensor, dict]:
    """Read a latent file; returns (latent (C+D, h, w), metadata with JSON values decoded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if LATENT_KEY not in f.keys():
                raise DavaeError(f"{path}: no '{LATENT_KEY}' tensor (not a davae latent file)")
            latent = f.get_tensor(LATENT_KEY)
            raw = f.metadata() or {}
    except DavaeError:
        raise
    except Exception as e:
        raise DavaeError(f"{path}: not a readable safetensors file ({first_line(e, 120)})") from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    if latent.ndim != 3:
        raise DavaeError(f"{path}: latent has shape {tuple(latent.shape)}, expected (C+D, h, w)")
    return latent, meta


class LatentNormalizer:
    """The DiT's view of a DA-VAE latent: base channels as encoded (the DiT's own normalisation), detail
    channels standardised per channel, (z_d - mean) / std, with statistics measured on the DiT's data.

    `residual=True` (`adapt_dit.detail_view: residual`): the detail channels are first taken relative to the
    base channels they are aligned to, z_d - repeat(z_base, D/C), then standardised. For a DA-VAE whose
    z_d = z_base + a small correction (the tiny design's `detail_shortcut: base`) the information lies in
    that difference, a few percent of z_d's spread; standardising z_d itself would ask the DiT to place
    it to within that fraction. The map is invertible given z_base, so the DA-VAE latent is unchanged."""

    def __init__(self, base_channels: int, mean, std, residual: bool = False):
        self.c = int(base_channels)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).detach().cpu().view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).detach().cpu().view(1, -1, 1, 1)
        self.residual = bool(residual)

    @classmethod
    def from_vae(cls, vae) -> "LatentNormalizer":
        return cls(vae.config.base_channels, vae.detail_mean, vae.detail_std)

    @classmethod
    def from_facts(cls, facts: dict) -> "LatentNormalizer":
        """From an adapted DiT's `davae_dit.json`."""
        return cls(facts["base_channels"], facts["detail_mean"], facts["detail_std"],
                   residual=facts.get("detail_view", "raw") == "residual")

    def __call__(self, lat: torch.Tensor) -> torch.Tensor:
        m, s = self.mean.to(lat), self.std.to(lat)
        zd = detail_residual(lat, self.c) if self.residual else lat[:, self.c :]
        return torch.cat([lat[:, : self.c], (zd - m) / s], 1)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self.mean.to(x), self.std.to(x)
        zd = x[:, self.c :] * s + m
        if self.residual:
            zd = zd + repeat_base(x[:, : self.c], zd.shape[1])
        return torch.cat([x[:, : self.c], zd], 1)


NATIVE_FILE = "davae_native.json"


def base_space(vae) -> dict:
    """What fixes the native latent space: the base VAE's weights and the latent transform."""
    return {"base_vae_hash": vae.config.base_vae_hash, "base_channels": int(vae.config.base_channels),
            "downsample": int(vae.config.downsample),
            "transform_shift": [round(float(v), 6) for v in vae.transform.shift],
            "transform_scale": [round(float(v), 6) for v in vae.transform.scale]}


def read_native_facts(folder: str | Path) -> Optional[dict]:
    f = Path(folder) / NATIVE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def check_native_space(facts: Optional[dict], vae, what: str) -> None:
    """One line when a native DiT (with `davae_native.json`) was trained in another latent space."""
    if not facts:
        return
    mine = base_space(vae)
    if facts.get("base_vae_hash") != mine["base_vae_hash"]:
        raise DavaeError(f"{what} was trained on the latents of another base VAE ({str(facts.get('base_vae'))[:60]}, "
                         f"hash {str(facts.get('base_vae_hash'))[:12]}) than this DA-VAE's "
                         f"(hash {str(mine['base_vae_hash'])[:12]})")
    for key in ("transform_shift", "transform_scale"):
        a, b = facts.get(key), mine[key]
        if a is not None and (len(a) != len(b) or any(abs(x - y) > 1e-4 * max(1.0, abs(y)) for x, y in zip(a, b))):
            raise DavaeError(f"{what} was trained with another base latent transform than this DA-VAE's "
                             f"({key} differs)")
