"""One LoRA training step of the full SD3.5 Medium architecture on a DA-VAE latent (issue 4's GPU check).

Random weights, bf16 autocast (trainable weights fp32), batch 1, 1024² -> 64x64x32 DA-VAE latent ->
32x32 = 1024 image tokens, 333 text tokens. Uses the same library pieces as `davae adapt-dit`: the
zero-init extension, the preset's LoRA (rank 256 on the image stream) and fully trained heads, and the
rectified-flow loss with the cosine detail schedule. Prints one JSON object.

    PYTHONPATH=. python benchmarks/sd35_lora_step.py [--steps 4] [--no-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from davae_cli.config import load_preset
from davae_cli.dit.sd3 import SD3Backend
from davae_cli.dit.sd3 import extend_sd3, load_sd3_transformer, lora_module_names
from davae_cli.train.flow_trainer import flow_step_loss


def run(preset_name: str, steps: int, checkpointing: bool, device: str, sets=()) -> dict:
    preset = load_preset(preset_name, list(sets))
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = load_sd3_transformer("random", arch=preset.dit.arch, device=device)
    extend_sd3(model, preset.vae.detail_channels)
    backend = SD3Backend(preset)
    names = set(backend.prepare_training(model))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    params = [p for n, p in model.named_parameters() if n in names]
    opt = torch.optim.AdamW(params, lr=preset.adapt_dit.lr, betas=tuple(preset.adapt_dit.betas))
    side = preset.adapt_dit.resolution // preset.granularity
    c = preset.vae.base_channels
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(1, c + preset.vae.detail_channels, side, side, device=device, generator=g)
    cond = {"embeds": torch.randn(1, 77 + preset.dit.max_sequence_length, preset.dit.arch["joint_attention_dim"],
                                  device=device, generator=g),
            "pooled": torch.randn(1, preset.dit.arch["pooled_projection_dim"], device=device, generator=g)}
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss, parts = flow_step_loss(backend, model, x0, cond, step, preset, c, g)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, preset.adapt_dit.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append((time.perf_counter() - t0) * 1000)
        losses.append(float(loss.detach()))
    return {
        "preset": preset_name, "gradient_checkpointing": checkpointing, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "image_tokens": (side // 2) ** 2, "latent": list(x0.shape[1:]),
        "text_tokens": 77 + preset.dit.max_sequence_length, "lora_rank": preset.dit.lora_rank,
        "lora_modules": len(lora_module_names(model)),
        "trainable_params": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in model.parameters()),
        "step_ms": times, "step_ms_median_after_first": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "losses": losses, "grad_norm_last": float(gn),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sd35m-1024")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--set", action="append", default=[], help="preset override (CPU smoke runs)")
    a = ap.parse_args()
    print(json.dumps(run(a.preset, a.steps, not a.no_checkpointing, a.device, a.set)))
