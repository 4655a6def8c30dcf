"""Equivalence of `davae convert lightningdit` with the official LightningDiT, on random weights.

Builds the official LightningDiT-XL/1 of the DA-VAE recipe (`lightningdit/models/lightningdit.py` of
caixin98/DA-VAE, run from a copy fetched OUTSIDE this project; needs `timm`; configs/
lightningdit_xl_davae_f32d128_detail_align_mean_loss_schedule.yaml: in_chans 128, QK-norm, SwiGLU, RoPE, RMSNorm,
16x16 tokens; fairscale, imported by its rmsnorm.py for unused classes, is stubbed) with random weights, every tensor perturbed, saves it as the trainer does ({"model", "ema"}),
converts it with davae onto a DA-VAE of the imagenet-512 shape (random base, detail statistics set), and compares
davae's velocity (sigma convention, u = eps - x0) with the official network's output at t = 1 - sigma (t = 1 is
data; it predicts x1 - x0 = -u), with and without classes. Prints one JSON line.

usage: python benchmarks/official/check_lightningdit.py OFFICIAL_REPO [--depth 28]
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
    ap.add_argument("official", type=Path)
    ap.add_argument("--depth", type=int, default=28, help="blocks (28 = XL; fewer for a quick run)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = a.official / "lightningdit"
    if not (root / "models" / "lightningdit.py").is_file():
        print(f"error: {root}/models/lightningdit.py not found", file=sys.stderr)
        return 2
    import types

    # models/rmsnorm.py imports fairscale's model-parallel layers for classes the DiT does not use: stub them
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize",
                 "fairscale.nn.model_parallel.layers"):
        sys.modules.setdefault(name, types.ModuleType(name))
    layers = sys.modules["fairscale.nn.model_parallel.layers"]
    for cls in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear"):
        setattr(layers, cls, torch.nn.Linear)
    sys.modules["fairscale.nn.model_parallel"].initialize = sys.modules["fairscale.nn.model_parallel.initialize"]
    sys.path.insert(0, str(root))
    from models.lightningdit import LightningDiT as Official  # noqa: E402 - the fetched copy

    from davae_cli.config import load_preset
    from davae_cli.dit.backend import get_backend, read_facts
    from davae_cli.dit.official import convert_lightningdit
    from davae_cli.train.vae import export_davae
    from davae_cli.vae.base import load_base_vae
    from davae_cli.vae.model import DetailAlignedVAE

    torch.manual_seed(a.seed)
    off = Official(input_size=16, patch_size=1, in_channels=128, hidden_size=1152, depth=a.depth, num_heads=16,
                   use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False).eval()
    with torch.no_grad():
        for p in off.parameters():
            p.add_(0.02 * torch.randn_like(p))
    preset = load_preset("imagenet-512-official", [f"dit.arch.depth={a.depth}"] if a.depth != 28 else [])
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        torch.save({"model": off.state_dict(), "ema": off.state_dict()}, d / "dit.pt")
        stats = {"mean": torch.randn(128) * 0.3, "std": torch.rand(128) + 0.5}
        torch.save({"mean": stats["mean"][:32], "std": stats["std"][:32]}, d / "base_stats.pt")
        v = preset.vae
        base = load_base_vae("random", arch=dict(v.base_vae_arch), latent_channels=32)
        from dataclasses import replace

        vae = DetailAlignedVAE.from_base(base, replace(v, base_vae="random", base_latent_stats=str(d / "base_stats.pt")))
        vae.set_detail_stats(stats["mean"][32:], stats["std"][32:], 0)
        export_davae(vae, d / "vae")
        t0 = time.perf_counter()
        rep = convert_lightningdit(d / "dit.pt", d / "vae", d / "dit", preset)
        convert_s = time.perf_counter() - t0
        backend = get_backend(preset)
        ours = backend.load_adapted(d / "dit").eval()
        facts = read_facts(d / "dit")
    x = torch.randn(2, 128, 16, 16)
    sigma = torch.tensor([0.3, 0.8])
    out = {"depth": a.depth, "parameters": rep["parameters"], "convert_s": round(convert_s, 1)}
    with torch.no_grad():
        for name, y in (("class", torch.tensor([3, 207])), ("null_class", torch.tensor([1000, 1000]))):
            u = backend.velocity(ours, x, sigma, {"labels": y})
            ref = -off(x, 1.0 - sigma, y)
            out[f"{name}_max_abs"] = (u - ref).abs().max().item()
            out[f"{name}_rel_l2"] = ((u - ref).norm() / ref.norm()).item()
    out["facts_detail_stats_match"] = bool(torch.allclose(torch.tensor(facts["detail_mean"]), stats["mean"][32:]))
    out["sample_shift"], out["steps"] = facts["sample_shift"], facts["sampling"]["steps"]
    out["torch"] = torch.__version__
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
