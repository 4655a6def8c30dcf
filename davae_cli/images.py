"""Images out: decoding (whole, or in blended tiles when memory runs out), PNG files with their settings as
text chunks, and grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import DavaeError
from .latents import atomic_write_bytes, save_latent


def _blend_window(n: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    w = torch.ones(n)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if not first:
            w[:overlap] = ramp
        if not last:
            w[-overlap:] = ramp.flip(0)
    return w


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, tile: int, overlap: int,
                 scale: int) -> torch.Tensor:
    """Decode overlapping latent tiles and blend them with linear ramps over the overlap: memory bounded by
    one tile, seams hidden by the blending (the decoder's receptive field must fit the overlap to be exact)."""
    _, _, h, w = latent.shape
    if h <= tile and w <= tile:
        return decode(latent)
    stride = tile - overlap
    if stride <= 0:
        raise DavaeError(f"tile {tile} must be larger than the overlap {overlap}")

    def starts(n):
        s = list(range(0, max(n - tile, 0) + 1, stride))
        if s[-1] + tile < n:
            s.append(n - tile)
        return s

    ys, xs = starts(h), starts(w)
    out = weight = None
    for yi, y in enumerate(ys):
        for xi, x in enumerate(xs):
            th, tw = min(tile, h - y), min(tile, w - x)
            img = decode(latent[:, :, y : y + th, x : x + tw]).float()
            if out is None:
                out = torch.zeros(img.shape[0], img.shape[1], h * scale, w * scale, device=img.device)
                weight = torch.zeros(1, 1, h * scale, w * scale, device=img.device)
            wy = _blend_window(th * scale, overlap * scale, yi == 0, yi == len(ys) - 1).to(img.device)
            wx = _blend_window(tw * scale, overlap * scale, xi == 0, xi == len(xs) - 1).to(img.device)
            win = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += img * win
            weight[:, :, y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += win
    return out / weight


def _png_bytes(img: torch.Tensor, meta: dict) -> bytes:
    import io

    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .data import to_uint8

    arr = to_uint8(img)
    info = PngInfo()
    for k, v in meta.items():
        info.add_text(f"davae:{k}", v if isinstance(v, str) else json.dumps(v))
    info.add_text("parameters", json.dumps(meta))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_sample(out_dir: Path, stem: str, img: torch.Tensor, latent: torch.Tensor, meta: dict,
                 save_latents: bool) -> str:
    """OUT/<stem>.png with `meta` (None values dropped) as PNG text, and with `save_latents` the final latent
    (DiT space) as OUT/<stem>.safetensors; both atomic. Returns the PNG's path."""
    meta = {k: v for k, v in meta.items() if v is not None}
    if save_latents:
        save_latent(out_dir / f"{stem}.safetensors", latent.float(), {**meta, "space": "dit"})
    atomic_write_bytes(out_dir / f"{stem}.png", _png_bytes(img, meta))
    return str(out_dir / f"{stem}.png")


def grid_path(out_dir: str | Path) -> Path:
    """Where `--grid` writes: beside the sample folder (`samples/` -> `samples-grid.png`), never inside it, so
    the folder holds exactly the samples (what `eval-fid` counts)."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(f"{out_dir.name}-grid.png")


def write_grid(paths: list[Path], out: Path) -> None:
    from PIL import Image

    if not paths:
        return
    ims = [Image.open(p).convert("RGB") for p in paths]
    w, h = ims[0].size
    cols = math.ceil(math.sqrt(len(ims)))
    rows = math.ceil(len(ims) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(ims):
        grid.paste(im.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    import io

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


AUTO_TILE = 64  # latent tile side used when a whole decode does not fit


def tile_overlap(tile: int) -> int:
    """The latent overlap `generate` blends adjacent tiles over: a quarter of the tile, at least 4."""
    return max(4, tile // 4)


def decode_images(model, lat: torch.Tensor, tile: Optional[int]) -> torch.Tensor:
    """latents (B, C+D, h, w) -> images (B, 3, H, W) with `model.decode`: whole, or in blended tiles of side
    `tile` (per image); None: whole, falling back to tiles when the GPU runs out of memory; 0: never tiled."""
    def tiled(t):
        return torch.cat([tiled_decode(model.decode, lat[i : i + 1], t, tile_overlap(t), model.granularity)
                          for i in range(lat.shape[0])])

    if tile:
        return tiled(tile)
    try:
        return model.decode(lat)
    except torch.cuda.OutOfMemoryError:
        if tile == 0:
            raise DavaeError("the decode ran out of GPU memory; pass --tile 64 (or smaller) to decode in tiles") from None
        torch.cuda.empty_cache()
        return tiled(AUTO_TILE)
