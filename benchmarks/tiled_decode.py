"""Seam error and cost of `davae generate`'s tiled decode (issue 14): a random-weight VAE of the preset's
architecture (the SD3.5 VAE for the sd35m presets; `--which davae` the DA-VAE decoder built on it) decodes
one latent whole and in tiles (generate's tiling: `--tile` latent pixels, a quarter of it overlapping, linear
blending); prints JSON with the max / mean absolute difference (image range [-1, 1], before and after the
[-1, 1] clamp that PNG writing applies), the PSNR of the tiled image against the whole one, the times, and on
a GPU the peak memory of each.

    python benchmarks/tiled_decode.py --preset sd35m-1024 --res 1024 --tile 64 [--tile 32] [--which davae]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from davae_cli.bench import build_decoders, plan
from davae_cli.config import load_preset
from davae_cli.devices import resolve_device, resolve_dtype
from davae_cli.images import tile_overlap, tiled_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd35m-1024")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--tile", type=int, action="append", help="latent tile side (repeatable; default 64)")
    ap.add_argument("--which", choices=("native", "davae"), default="native",
                    help="native: the base VAE at full resolution; davae: the DA-VAE decoder")
    ap.add_argument("--no-whole", action="store_true", help="tiled only (when the whole decode does not fit)")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    preset = load_preset(a.preset)
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    cuda = device.type == "cuda"
    native, davae = build_decoders(preset, device, dtype)
    decode = native if a.which == "native" else davae
    ch, side = plan(preset, a.res)[a.which]["latent"][:2]
    scale = a.res // side
    z = torch.randn(1, ch, side, side, generator=torch.Generator().manual_seed(a.seed)).to(device, dtype)

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            img = fn().float()
        if cuda:
            torch.cuda.synchronize()
        return img, time.perf_counter() - t0, (torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)

    out = {"preset": a.preset, "res": a.res, "which": a.which, "latent": [ch, side, side], "device": str(device),
           "dtype": str(dtype).replace("torch.", ""), "weights": "random (seed 0)", "latent_noise_seed": a.seed,
           "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}
    whole = None
    if not a.no_whole:
        whole, sec, mem = timed(lambda: decode(z))
        out["whole"] = {"seconds": sec, "peak_mem_mb": mem, "range": [float(whole.min()), float(whole.max())]}
    out["tiled"] = []
    for t in a.tile or [64]:
        ov = tile_overlap(t)
        img, sec, mem = timed(lambda: tiled_decode(decode, z, t, ov, scale))
        row = {"tile": t, "overlap": ov, "seconds": sec, "peak_mem_mb": mem}
        if whole is not None:
            diff = (img - whole).abs()
            clamped = (img.clamp(-1, 1) - whole.clamp(-1, 1)).abs()
            mse = float(clamped.pow(2).mean())
            row.update(max_abs=float(diff.max()), mean_abs=float(diff.mean()), max_abs_clamped=float(clamped.max()),
                       mean_abs_clamped=float(clamped.mean()),
                       psnr_db=10 * math.log10(4.0 / mse) if mse > 0 else float("inf"))
        out["tiled"].append(row)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
