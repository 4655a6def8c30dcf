"""How far `davae generate --native` is from StableDiffusion3Pipeline.__call__ on a tiny random SD3
pipeline built in code (CPU, about a minute): the final latents' relative L2 with the sampler's grid
(diffusers' FlowMatchEulerDiscreteScheduler, as generate uses it now) and with the earlier
`shift(linspace(1, 0, N + 1))` grid. Prints one JSON object.

    PYTHONPATH=. python benchmarks/sampler_fidelity.py [--steps 12] [--guidance 3] [--res 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--shift", type=float, default=3.0)
    args = ap.parse_args()

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from davae_cli import flow
    from davae_cli.config import load_preset
    from davae_cli.dit.sd3 import SD3Backend, sd3_velocity
    from davae_cli.sampling import initial_noise
    from davae_cli.dit.text import PromptEncoder
    from davae_cli.dit.text_random import build_tiny_sd3_text_components

    torch.manual_seed(0)
    comps = build_tiny_sd3_text_components()
    transformer = SD3Transformer2DModel(**load_preset("tiny").dit.arch).eval()
    vae = AutoencoderKL(latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                        layers_per_block=1, norm_num_groups=4)
    sched = FlowMatchEulerDiscreteScheduler(shift=args.shift)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=sched, **comps)
    noise = initial_noise(args.seed, 16, 0, args.res // 8)
    prompt, negative, msl = "the cat", "", 8
    with torch.no_grad():
        ref = pipe(prompt=prompt, negative_prompt=negative, height=args.res, width=args.res,
                   num_inference_steps=args.steps, guidance_scale=args.guidance, latents=noise,
                   max_sequence_length=msl, output_type="latent").images[0]

    with tempfile.TemporaryDirectory() as d:
        for name, comp in comps.items():
            comp.save_pretrained(str(Path(d) / name))
        enc = PromptEncoder.from_spec(d, device="cpu", use_t5=True, max_sequence_length=msl)
        e, p = enc.encode([negative, prompt])
    cond = {"embeds": e, "pooled": p}

    def velocity(x, sigma, guided):
        u, c = sd3_velocity(transformer, torch.cat([x, x]), torch.cat([sigma, sigma]), cond).chunk(2)
        return u + args.guidance * (c - u)

    out = {"steps": args.steps, "guidance": args.guidance, "res": args.res, "shift": args.shift}
    for name, sig in (("diffusers_grid", SD3Backend.sigma_grid(args.steps, args.shift, dict(sched.config), None)),
                      ("linspace_grid", flow.sampling_sigmas(args.steps, args.shift))):
        with torch.no_grad():
            lat = flow.sample(velocity, noise.clone(), sig)[0]
        out[name] = {"rel_l2": float((lat.double() - ref.double()).norm() / ref.double().norm()),
                     "last_step_from_sigma": round(float(sig[-2]), 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
