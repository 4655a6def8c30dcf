"""Equivalence of `davae convert sd3-dit` with the official SD3.5 adaptation, on random weights.

Wraps an SD3.5 Medium-width transformer (reduced depth, `--layers`) in the official
`SD3TransformerWrapperTokenizer` (`sd3/omini/pipeline/sd3_transformer_wrapper_tokenizer.py` of caixin98/DA-VAE,
run from a copy fetched OUTSIDE this project) as its trainer does (`augment_mode: branch`, `reverse: true`, 16 + 16
channels), adds the official LoRA (rank 8 here, alpha = rank, the official targets) with peft, perturbs the LoRA
and both heads, saves them as the trainer does (`step_N.pt` with the heads, diffusers' `save_lora_adapter`), converts
with davae and compares the transformer outputs on the same inputs: the official model reads and writes the detail
channels first, davae base first (the comparison reorders the official side). Prints one JSON line.

usage: python benchmarks/official/check_sd3_dit.py OFFICIAL_REPO [--layers 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = a.official / "sd3" / "omini" / "pipeline"
    if not (root / "sd3_transformer_wrapper_tokenizer.py").is_file():
        print(f"error: {root}/sd3_transformer_wrapper_tokenizer.py not found", file=sys.stderr)
        return 2
    import importlib.util

    spec = importlib.util.spec_from_file_location("official_wrapper", root / "sd3_transformer_wrapper_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["official_wrapper"] = mod
    spec.loader.exec_module(mod)  # the fetched copy, without its package __init__

    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from davae_cli.config import load_preset
    from davae_cli.dit.official import convert_sd3_dit
    from davae_cli.train.vae import export_davae
    from davae_cli.vae.base import load_base_vae
    from davae_cli.vae.model import DetailAlignedVAE

    preset = load_preset("sd35m-1024-official")
    arch = dict(preset.dit.arch, num_layers=a.layers, dual_attention_layers=list(range(min(a.layers, 13))))
    torch.manual_seed(a.seed)
    base = SD3Transformer2DModel(**arch).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    wrapper = mod.SD3TransformerWrapperTokenizer(copy.deepcopy(base), patch_embed_cfg={
        "in_channels": 32, "out_channels": 32, "augment_mode": "branch", "reverse": True})
    tr = wrapper.transformer
    tr.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(preset.dit.lora_targets)))
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_" in n or n.startswith(("pos_embed.proj.", "proj_out.")):
                p.add_(0.02 * torch.randn_like(p))
    tr.eval()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        base.save_pretrained(str(d / "pipe" / "transformer"))
        tr.save_lora_adapter(str(d / "lora_step_1"), adapter_name="default")
        heads = {f"tokenizer_patch_embed.{k}": v for k, v in wrapper.tokenizer_patch_embed.state_dict().items()}
        heads.update({f"project_out.{k}": v for k, v in wrapper.project_out.state_dict().items()})
        torch.save({"global_step": 1, "model_state_dict": heads}, d / "step_1.pt")
        v = preset.vae
        vae = DetailAlignedVAE.from_base(load_base_vae("random", arch=dict(v.base_vae_arch), latent_channels=16),
                                         replace(v, base_vae="random"))
        export_davae(vae, d / "vae")
        t0 = time.perf_counter()
        rep = convert_sd3_dit(d / "step_1.pt", d / "lora_step_1", d / "vae", d / "out",
                              replace(preset, dit=replace(preset.dit, arch=arch, text_encoders="tiny-random")),
                              dit=str(d / "pipe"))
        convert_s = time.perf_counter() - t0
        ours = SD3Transformer2DModel.from_pretrained(str(d / "out")).eval()
        facts = json.loads((d / "out" / "davae_dit.json").read_text())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 16, 16, generator=g)
    eh = torch.randn(2, 20, arch["joint_attention_dim"], generator=g)
    pool = torch.randn(2, arch["pooled_projection_dim"], generator=g)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        y_off = tr(hidden_states=torch.cat([x[:, 16:], x[:, :16]], 1), encoder_hidden_states=eh,
                   pooled_projections=pool, timestep=t, return_dict=False)[0]
        y_off = torch.cat([y_off[:, 16:], y_off[:, :16]], 1)  # detail first -> base first
        y = ours(hidden_states=x, encoder_hidden_states=eh, pooled_projections=pool, timestep=t, return_dict=False)[0]
    print(json.dumps({"layers": a.layers, "lora_rank": rep["lora_rank"], "lora_targets": rep["lora_targets"],
                      "max_abs": (y - y_off).abs().max().item(), "rel_l2": ((y - y_off).norm() / y_off.norm()).item(),
                      "detail_stats": [facts["detail_mean"][0], facts["detail_std"][0]], "sample_shift": facts["sample_shift"],
                      "negative_prompt": facts["sampling"]["negative_prompt"], "convert_s": round(convert_s, 1),
                      "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
