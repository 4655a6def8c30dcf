"""FLUX.1 backend: diffusers `FluxTransformer2DModel` on the packed latent, its zero-init channel extension,
the velocity in davae's sigma convention, and `FluxPipeline`'s sigma grid (dynamic shift from the token
count).

Packing (`FluxPipeline._pack_latents`): a latent (B, C, H, W) becomes (B, H/2 * W/2, 4C) tokens; feature
`c * 4 + 2 i + j` of a token is channel c at offset (i, j) of its 2x2 cell (channel-major). With the DA-VAE
latent's base channels first, the first 4C features of a packed C + D latent are exactly the native packed
features, and the 4D new ones follow. So the extension appends 4D zero input columns to `x_embedder` and
4D zero output rows (weight and bias) to `proj_out`; no interleaving is needed (unlike SD3's unpatchify
layout, `extend.py`). At step 0 the extended model is the pretrained function on the base channels for any
detail input and outputs exactly 0 on the detail channels; `save_pretrained` writes a plain
`FluxTransformer2DModel` folder with in_channels = out_channels = 4 (C + D).

FLUX.1-dev is guidance-distilled: one forward per step with the guidance scale as an input embedding
(`guidance`, what `FluxPipeline`'s `guidance_scale` means), no negative branch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import DavaeError

PACK = 2  # FluxPipeline packs 2x2 latent cells into one token

# FLUX.1-dev's transformer/config.json (black-forest-labs/FLUX.1-dev): 19 double-stream and 38 single-stream
# blocks, width 24 x 128 = 3072, guidance embedding; 64 = 4 x 16 packed input channels.
FLUX1_DEV_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# FLUX.1-dev's scheduler/scheduler_config.json: dynamic shifting, mu from the image token count
FLUX1_SCHEDULER_CONFIG: dict = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as `FluxPipeline._pack_latents`."""
    b, c, h, w = latent.shape
    if h % PACK or w % PACK:
        raise DavaeError(f"FLUX packs 2x2 latent cells: the latent {h}x{w} must have even sides")
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W) for a latent of height x width, as `FluxPipeline._unpack_latents`."""
    b, n, f = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, f // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE position ids (H/2 * W/2, 3) of the token grid of a height x width latent: (0, row, col), as
    `FluxPipeline._prepare_latent_image_ids`."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """FLUX predicts eps - x0 in the sigma convention. x (N, C[+D], h, w) -> the velocity, same shape.
    cond: embeds (N, T5 tokens, joint_attention_dim), pooled (N, 768), and for a guidance-distilled model
    guidance (N,) (the guidance scale). The timestep is passed as FluxPipeline passes it: (sigma * 1000) / 1000."""
    _, _, h, w = x.shape
    dtype = next(iter(model.parameters())).dtype
    tokens = pack(x)
    txt = cond["embeds"]
    distilled = bool(getattr(model.config, "guidance_embeds", False))
    guidance = cond.get("guidance") if distilled else None  # FLUX.1-schnell has no guidance input
    if guidance is None and distilled:
        raise DavaeError("this FLUX transformer is guidance-distilled: a guidance value is needed")
    out = model(hidden_states=tokens, encoder_hidden_states=txt, pooled_projections=cond["pooled"],
                timestep=(sigma * 1000.0).to(dtype) / 1000, guidance=guidance,
                txt_ids=torch.zeros(txt.shape[1], 3, device=x.device, dtype=dtype),
                img_ids=image_ids(h, w, x.device, dtype), return_dict=False)[0]
    return unpack(out, h, w)


def flux_sigmas(steps: int, scheduler_config: Optional[dict] = None, image_tokens: Optional[int] = None,
                shift: Optional[float] = None) -> torch.Tensor:
    """The `steps + 1` sigmas (float32, ending in 0) that `FluxPipeline.__call__` steps through: its
    `linspace(1, 1/steps, steps)` sigmas through diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps`
    with `mu` from the pipeline's `calculate_shift(image_tokens)` (dynamic shifting), or with `shift` when the
    config does not shift dynamically."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    cfg = dict(FLUX1_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
    if shift is not None and not cfg.get("use_dynamic_shifting"):
        cfg["shift"] = float(shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if sched.config.get("use_flow_sigmas"):
        sigmas = None
    if image_tokens is None:
        raise DavaeError("FLUX's dynamic shift needs the image token count")
    c = sched.config
    mu = calculate_shift(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    return sched.sigmas.detach().float().cpu()


def load_flux_transformer(spec: str, subfolder: Optional[str] = "transformer", arch: Optional[dict] = None,
                          seed: int = 0, dtype: torch.dtype = torch.float32, device=None):
    """`spec`: "random" (a new model from `arch`, seeded, built on `device`), a local folder (a transformer
    folder, or a pipeline folder with `subfolder`), or a hub id."""
    from diffusers import FluxTransformer2DModel

    from .loader import load_transformer

    return load_transformer(FluxTransformer2DModel, spec, subfolder, arch, seed=seed, dtype=dtype, device=device,
                            hub_hint=", or for the gated FLUX.1-dev accept its licence on the hub and log in")


def latent_channels(model) -> int:
    """C (or C + D) of the unpacked latent a FLUX transformer reads: in_channels / 4."""
    return int(model.config.in_channels) // (PACK * PACK)


def extend_input(linear: nn.Linear, extra: int) -> nn.Linear:
    """`x_embedder` reading `extra` more packed features (appended, zero weights); bias kept."""
    new = nn.Linear(linear.in_features + extra, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : linear.in_features].copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def extend_output(linear: nn.Linear, extra: int) -> nn.Linear:
    """`proj_out` writing `extra` more packed features (appended rows, zero weight and bias)."""
    new = nn.Linear(linear.in_features, linear.out_features + extra, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: linear.out_features].copy_(linear.weight)
        if linear.bias is not None:
            new.bias.zero_()
            new.bias[: linear.out_features].copy_(linear.bias)
    return new


def extend_flux(model, detail_channels: int):
    """The zero-init extension in FLUX's packed layout, in place (see the module doc); the config becomes
    in_channels = out_channels = 4 (C + D)."""
    cfg = model.config
    if int(cfg.patch_size) != 1:
        raise DavaeError(f"FLUX transformer: patch_size {cfg.patch_size} (FLUX.1 uses 1 on the packed latent)")
    cin = int(cfg.in_channels)
    if (cfg.out_channels or cin) != cin:
        raise DavaeError(f"FLUX transformer: in_channels {cin} != out_channels {cfg.out_channels}; cannot extend")
    if detail_channels <= 0:
        raise DavaeError(f"detail channels must be positive, got {detail_channels}")
    extra = PACK * PACK * detail_channels
    model.x_embedder = extend_input(model.x_embedder, extra)
    model.proj_out = extend_output(model.proj_out, extra)
    model.out_channels = cin + extra
    model.register_to_config(in_channels=cin + extra, out_channels=cin + extra)
    return model
