"""`davae ceilings` (metrics/ceilings.py): each number recomputed here by an independent path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from davae_cli.config import load_preset
from davae_cli.metrics.ceilings import _LeastSquares, tokenizer_ceilings
from davae_cli.vae.base import load_base_vae

from conftest import run_cli


def test_least_squares_floor_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 7))
    y = x @ rng.normal(size=(7, 3)) + 0.3 * rng.normal(size=(500, 3)) + 2.0
    ls = _LeastSquares()
    for part in np.array_split(np.arange(500), 3):  # running sums over batches
        ls.add(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
    x1 = np.concatenate([x, np.ones((500, 1))], 1)
    coef, *_ = np.linalg.lstsq(x1, y, rcond=None)
    mse = float(((x1 @ coef - y) ** 2).mean())
    out = ls.floor()
    assert out["mse"] == pytest.approx(mse, rel=1e-6)
    assert out["var_z_base"] == pytest.approx(float(y.var(0).mean()), rel=1e-9)
    assert out["features"] == 7 and out["tokens"] == 500 and out["r2"] == pytest.approx(1 - mse / y.var(0).mean())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(3):
        yy, xx = np.mgrid[0:40, 0:48]
        img = np.stack([np.sin(xx / (3 + i)) * 90 + 128, np.cos(yy / 4) * 80 + 120, (xx + yy) * 2.0], -1)
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i}.png")
    (d / "broken.png").write_bytes(b"not an image")
    return d


def test_ceilings_recomputed_by_hand(photos):
    from davae_cli.data import fit_to_multiple, read_image, to_tensor
    from davae_cli.latents import downsample
    from davae_cli.metrics.image import as_8bit, psnr
    from davae_cli.metrics.latent_stats import detail_structure

    preset = load_preset("tiny", ["vae.base_vae=random", "vae.base_channels=4", "vae.detail_channels=4"])
    base = load_base_vae("random", latent_channels=4)
    items = sorted(photos.glob("*.png"))
    r = tokenizer_ceilings(items, base, preset.vae, res=32, batch_size=2)
    assert r["num_images"] == 3 and len(r["skipped"]) == 1 and "broken.png" in r["skipped"][0]["path"]
    vae = base.vae
    scale = float(vae.config.scaling_factor or 1.0)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
    rows, lat = {"a": [], "c": [], "hb": []}, []
    fit = []
    for p in items[:3]:
        x = to_tensor(fit_to_multiple(read_image(p), 32, 16))[None]
        with torch.no_grad():
            zr = vae.encoder(downsample(x, 2))
            half = vae.decoder(zr).clamp(-1, 1)  # diffusers DecoderTiny returns [-1, 1]
            baseline = F.interpolate(half, scale_factor=2.0, mode="bicubic", align_corners=False).clamp(-1, 1)
            zf = vae.encoder(x)
            full = vae.decoder(zf).clamp(-1, 1)
        resid = x - baseline
        block = F.interpolate(F.avg_pool2d(resid, 2), scale_factor=2.0, mode="nearest")
        for k, y in (("a", baseline), ("c", full), ("hb", x - block)):
            rows[k].append(float(psnr(as_8bit(y), x)))
        zb = (zr - shift) * scale
        lat.append(torch.cat([zb[0], F.pixel_unshuffle((zf - shift) * scale, 2)[0]]))
        fit.append((F.pixel_unshuffle(zf, 2)[0].reshape(16, -1).T, zb[0].reshape(4, -1).T))
    ps = r["psnr"]
    assert ps["base_half_bicubic"] == pytest.approx(np.mean(rows["a"]), abs=1e-4)
    assert ps["base_full"] == pytest.approx(np.mean(rows["c"]), abs=1e-4)
    assert ps["high_band_ceiling"] == pytest.approx(np.mean(rows["hb"]), abs=1e-4)
    a_, c_ = np.mean(rows["a"]), np.mean(rows["c"])
    if abs(c_ - a_) > 0.1:
        assert ps["high_band_gap_closed"] == pytest.approx((np.mean(rows["hb"]) - a_) / (c_ - a_), rel=1e-3)
    ref = detail_structure(lat, 4)
    rd = r["reference_detail"]
    assert rd["channels"] == 16 and rd["latents"] == 3
    assert rd["residual_share"] == pytest.approx(ref["detail_unexplained"]["variance_share"], rel=1e-5)
    assert rd["neighbour_corr"] == pytest.approx(ref["detail_unexplained"]["neighbour_corr"], rel=1e-5)
    assert rd["kurtosis"] == pytest.approx(ref["detail_unexplained"]["kurtosis"], rel=1e-5)
    # (c) the latent source: numpy least squares of z_base on the unshuffled full-resolution latent + 1
    xs = np.concatenate([a.double().numpy() for a, _ in fit])
    ys = np.concatenate([b.double().numpy() for _, b in fit])
    x1 = np.concatenate([xs, np.ones((len(xs), 1))], 1)
    coef, *_ = np.linalg.lstsq(x1, ys, rcond=None)
    assert r["align_floor"]["latent"]["mse"] == pytest.approx(float(((x1 @ coef - ys) ** 2).mean()), rel=1e-4, abs=1e-9)
    assert r["align_floor"]["latent"]["features"] == 16 and r["align_floor"]["trunk"]["features"] > 16
    assert r["align_floor"]["residual"]["features"] == 3 * 16 * 16


def test_ceilings_command(photos, tmp_path):
    args = ["ceilings", photos, "--preset", "tiny", "--base-vae", "random", "--res", 32,
            "--set", "vae.base_channels=4", "--set", "vae.detail_channels=4"]
    r = json.loads(run_cli(*args, "--json").stdout)
    assert {"psnr", "reference_detail", "align_floor", "num_images"} <= set(r) and r["num_images"] == 3
    human = run_cli(*args).stdout
    assert "high-band decoder's ceiling" in human and "reference detail" in human and "alignment floor" in human
    sub = json.loads(run_cli(*args, "--max-images", 2, "--json").stdout)
    assert sub["num_images"] + len(sub["skipped"]) == 2
    bad = run_cli("ceilings", tmp_path / "nowhere", "--preset", "tiny", "--base-vae", "random", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    neg = run_cli(*args, "--max-images", -1, check=False)
    assert neg.returncode != 0 and "max-images" in neg.stderr and "Traceback" not in neg.stderr
