"""Equivalence of davae's VA-VAE loader with the official modules, on random weights.

Builds the official VA-VAE f16d32 autoencoder (`lightningdit/tokenizer/autoencoder.py` of caixin98/DA-VAE, run
from a copy fetched OUTSIDE this project; nothing of it is vendored here) with random weights, saves its state
dict the way the release does (`{"state_dict": ...}` in a `.pt`), loads that file through davae
(`load_base_vae(FILE, arch=imagenet-512's vae.base_vae_arch)`), and compares encode (posterior mean) and
decode on the same random inputs. Prints one JSON line.

usage: python benchmarks/official/check_vavae.py OFFICIAL_REPO [--res 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official", type=Path, help="a checkout of caixin98/DA-VAE (its lightningdit/ folder is used)")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = a.official / "lightningdit"
    if not (root / "tokenizer" / "autoencoder.py").is_file():
        print(f"error: {root}/tokenizer/autoencoder.py not found", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from tokenizer.autoencoder import AutoencoderKL as OfficialKL  # noqa: E402 - the fetched copy

    from davae_cli.config import load_preset
    from davae_cli.vae.base import load_base_vae

    torch.manual_seed(a.seed)
    official = OfficialKL(embed_dim=32, ch_mult=(1, 1, 2, 2, 4)).eval()
    with torch.no_grad():  # default inits leave some tensors at 0/1; perturb every one so no mapping hides
        for p in official.parameters():
            p.add_(0.02 * torch.randn_like(p))
    arch = load_preset("imagenet-512").vae.base_vae_arch
    x = torch.rand(2, 3, a.res, a.res) * 2 - 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vavae-random.pt"
        torch.save({"state_dict": official.state_dict()}, path)
        t0 = time.perf_counter()
        ours = load_base_vae(str(path), arch=dict(arch)).vae
        load_s = time.perf_counter() - t0
    with torch.no_grad():
        z_off = official.encode(x).mean
        z_ours = ours.encode(x).latent_dist.mean
        y_off = official.decode(z_off)
        y_ours = ours.decode(z_off).sample
    n_attn = sum(1 for k in official.state_dict() if ".attn." in k and ".mid." not in k)
    out = {
        "res": a.res, "latent_shape": list(z_off.shape), "official_weights": len(official.state_dict()),
        "davae_weights": len(ours.state_dict()), "level_attention_weights": n_attn,
        "encode_max_abs": (z_off - z_ours).abs().max().item(), "encode_rel_l2": ((z_off - z_ours).norm() / z_off.norm()).item(),
        "decode_max_abs": (y_off - y_ours).abs().max().item(), "decode_rel_l2": ((y_off - y_ours).norm() / y_off.norm()).item(),
        "load_s": round(load_s, 2), "torch": torch.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
