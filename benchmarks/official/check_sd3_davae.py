"""Equivalence of `davae convert sd3-davae` with the official SD3 DA-VAE tokenizer, on random weights.

Builds the official `SD3_DAAutoencoder` (`sd3/modeling/modules/sd3_da_vae.py` of caixin98/DA-VAE, run from a
copy fetched OUTSIDE this project; needs `einops`; its package __init__, which imports the training losses, is
bypassed) in the shipped `da_mode: diff` with alignment `mean`, on a
random VAE of the SD3.5 Medium VAE's configuration saved as a local pipeline folder (its `vae/` is also the
teacher), perturbs every weight of the DA-VAE (not the teacher), saves its state dict as its trainer does
(`pytorch_model.bin`), converts it with davae, and compares on the same random images (the official model
takes [0, 1] images and returns [0, 1]; davae [-1, 1]):

  encode: the official posterior mode (detail) and teacher latent (base) against davae's latent;
  decode: the official forward's image against davae's decode of its own latent, both clamped to [0, 1].

Prints one JSON line. usage: python benchmarks/official/check_sd3_davae.py OFFICIAL_REPO [--res 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official", type=Path)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = a.official / "sd3"
    if not (root / "modeling" / "modules" / "sd3_da_vae.py").is_file():
        print(f"error: {root}/modeling/modules/sd3_da_vae.py not found", file=sys.stderr)
        return 2
    import types

    # modeling/modules/__init__.py imports the training losses (matplotlib, ...): register the package without
    # running it, so only sd3_da_vae.py and what it imports are executed
    sys.path.insert(0, str(root))
    pkg = types.ModuleType("modeling.modules")
    pkg.__path__ = [str(root / "modeling" / "modules")]
    sys.modules["modeling.modules"] = pkg
    from modeling.modules.sd3_da_vae import SD3_DAAutoencoder  # noqa: E402 - the fetched copy

    from diffusers import AutoencoderKL

    from davae_cli.config import load_preset
    from davae_cli.dit.official import convert_sd3_davae
    from davae_cli.vae.model import DetailAlignedVAE

    preset = load_preset("sd35m-1024-official")
    torch.manual_seed(a.seed)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        arch = {k: v for k, v in preset.vae.base_vae_arch.items() if not k.startswith("_")}
        AutoencoderKL(**arch).save_pretrained(str(d / "pipe" / "vae"))
        cfg = SimpleNamespace(
            model=SimpleNamespace(sd3_model_path=str(d / "pipe"), da_mode="diff", teacher_mode="lq"),
            training=SimpleNamespace(mixed_precision="no"),
            losses=SimpleNamespace(encoder_alignment_loss={"weight": 1.0, "align_method": "mean", "proj_channels": 16}))
        off = SD3_DAAutoencoder(config=cfg, device="cpu", dtype=torch.float32).eval()
        assert off.original_vae_model is not None and off.da_mode == "diff"
        with torch.no_grad():
            for name, p in off.named_parameters():
                if not name.startswith("original_vae_model."):
                    p.add_(0.02 * torch.randn_like(p))
        torch.save(off.state_dict(), d / "pytorch_model.bin")
        x01 = torch.rand(2, 3, a.res, a.res)
        with torch.no_grad():
            dec, res = off(x01, sample_posterior=False)
            z_detail, z_base = res["posteriors"].mode(), res["lq_cond_spatial"]
        t0 = time.perf_counter()
        rep = convert_sd3_davae(d / "pytorch_model.bin", d / "pipe", d / "out", preset)
        convert_s = time.perf_counter() - t0
        ours = DetailAlignedVAE.from_pretrained(d / "out").eval()
        with torch.no_grad():
            lat = ours.encode(x01 * 2 - 1).latent
            img = ((ours.decode(lat) + 1) / 2).clamp(0, 1)

    def stats(u, v):
        return (u - v).abs().max().item(), ((u - v).norm() / v.norm()).item()

    out = {"res": a.res, "weights_converted": rep["weights"], "teacher_checked": rep["teacher_checked"],
           "convert_s": round(convert_s, 1), "torch": torch.__version__}
    for name, (u, v) in {"encode_base": (lat[:, :16], z_base), "encode_detail": (lat[:, 16:], z_detail),
                         "decode": (img, dec)}.items():
        out[f"{name}_max_abs"], out[f"{name}_rel_l2"] = stats(u, v)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
