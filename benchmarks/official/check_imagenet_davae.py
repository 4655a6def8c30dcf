"""Equivalence of `davae convert imagenet-davae` with the official ImageNet DA-VAE, on random weights.

Builds the official `DAVAE` (da_mode detail, align_method mean; `lightningdit/davae/ldm` of caixin98/DA-VAE, run
from a copy fetched OUTSIDE this project, nothing of it vendored; `pytorch_lightning` is replaced by a stub
module whose LightningModule is torch's Module, and the loss by torch.nn.Identity; needs `einops`) from the
official ImageNet configs' shapes, perturbs every weight, saves its state dict as a Lightning checkpoint would,
writes the VA-VAE file its base came from, converts both with davae, and compares on the same random images:

  encode: the official base posterior mode and detail posterior mode against davae's latent (base channels
          un-normalised with the converted statistics, detail channels as they are);
  decode: the official decoder on cat([z_b, z_hc]) against davae's decode of the same latent.

Prints one JSON line. usage: python benchmarks/official/check_imagenet_davae.py OFFICIAL_REPO [--res 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official", type=Path)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = a.official / "lightningdit" / "davae"
    if not (root / "ldm" / "models" / "da_autoencoder.py").is_file():
        print(f"error: {root}/ldm/models/da_autoencoder.py not found", file=sys.stderr)
        return 2
    stub = types.ModuleType("pytorch_lightning")
    stub.LightningModule = torch.nn.Module
    sys.modules.setdefault("pytorch_lightning", stub)
    sys.path.insert(0, str(root))
    from ldm.models.da_autoencoder import DAVAE  # noqa: E402 - the fetched copy

    from davae_cli.config import load_preset
    from davae_cli.dit.official import convert_imagenet_davae
    from davae_cli.vae.model import DetailAlignedVAE

    dd = dict(double_z=True, z_channels=32, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4],
              num_res_blocks=2, dropout=0.0)
    torch.manual_seed(a.seed)
    off = DAVAE(ddconfig_base={**dd, "resolution": 256, "attn_resolutions": [16]},
                ddconfig_da={**dd, "resolution": 512, "attn_resolutions": [32]},
                lossconfig={"target": "torch.nn.Identity"}, base_embed_dim=32, da_mode="detail",
                align_method="mean", enable_deep_compress=True).eval()
    with torch.no_grad():
        for p in off.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sd = {k: v for k, v in off.state_dict().items()}
    x = torch.rand(2, 3, a.res, a.res) * 2 - 1
    with torch.no_grad():
        z_b = off.encode_base(x).mode()
        z_hc = off.encode_hc(x).mode()
        y_off = off.decode(torch.cat([z_b, z_hc], 1))
    stats = {"mean": torch.randn(128) * 0.3, "std": torch.rand(128) + 0.5}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ck = d / "davae.ckpt"
        torch.save({"state_dict": sd, "global_step": 1}, ck)
        # the VA-VAE file the base came from: its encoder + quant_conv, and a decoder of the same shape
        vavae = {f"encoder.{k[len('base_encoder.'):]}": v for k, v in sd.items() if k.startswith("base_encoder.")}
        vavae.update({f"quant_conv.{k[len('base_quant_conv.'):]}": v for k, v in sd.items() if k.startswith("base_quant_conv.")})
        vavae.update({f"decoder.{k[len('da.decoder.'):]}": v.clone() for k, v in sd.items() if k.startswith("da.decoder.")})
        vavae["post_quant_conv.weight"], vavae["post_quant_conv.bias"] = torch.randn(32, 32, 1, 1) * 0.1, torch.zeros(32)
        torch.save({"state_dict": vavae}, d / "vavae.pt")
        torch.save(stats, d / "latents_stats.pt")
        t0 = time.perf_counter()
        rep = convert_imagenet_davae(ck, d / "vavae.pt", d / "latents_stats.pt", d / "out", load_preset("imagenet-512"))
        convert_s = time.perf_counter() - t0
        ours = DetailAlignedVAE.from_pretrained(d / "out").eval()
        with torch.no_grad():
            lat = ours.encode(x).latent
            base_raw = ours.transform.inverse(lat[:, :32])
            y_ours = ours.decode(torch.cat([ours.transform(z_b), z_hc], 1))

    def rel(u, v):
        return ((u - v).norm() / v.norm()).item()

    print(json.dumps({
        "res": a.res, "weights_converted": rep["weights"],
        "encode_base_max_abs": (base_raw - z_b).abs().max().item(), "encode_base_rel_l2": rel(base_raw, z_b),
        "encode_detail_max_abs": (lat[:, 32:] - z_hc).abs().max().item(), "encode_detail_rel_l2": rel(lat[:, 32:], z_hc),
        "decode_max_abs": (y_ours - y_off).abs().max().item(), "decode_rel_l2": rel(y_ours, y_off),
        "detail_stats_match": bool(torch.allclose(ours.detail_mean, stats["mean"][32:])),
        "convert_s": round(convert_s, 1), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
