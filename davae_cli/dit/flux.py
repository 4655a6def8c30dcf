"""FLUX.1 (`FluxTransformer2DModel`, `FluxPipeline`): where everything FLUX-specific lives; `FluxBackend` is
registered as "flux". The transformer works on the packed latent, its zero-init channel extension,
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
from .diffusers_family import DiffusersBackend
from .text_random import ClipT5Text
from ..flops import flop_result, mm

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


def flux_flops(config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> dict:
    """FLOPs of one forward of diffusers' ``FluxTransformer2DModel`` (FLUX.1) on ``image_tokens`` packed
    tokens (one per 2x2 latent cell) and ``text_tokens`` T5 tokens.

    Width h = heads x head_dim, MLP width 4h, n image and m text tokens, L = n + m:
    - embedders: x_embedder (in_channels -> h) on n rows, context_embedder (joint -> h) on m rows, and on
      one row per sample the timestep, guidance (guidance-distilled models) and pooled-text MLPs
      (256 -> h -> h, 256 -> h -> h, pooled -> h -> h);
    - each double-stream block: AdaLN-Zero modulation h -> 6h for both streams; q, k, v and output
      projections for both streams (4 h x h on n rows and on m rows); joint attention over L tokens;
      a GELU MLP h -> 4h -> h for both streams;
    - each single-stream block on L rows: modulation h -> 3h; q, k, v (3 h x h) and the MLP input h -> 4h;
      attention over L; the fused output projection 5h -> h (no separate attention output projection);
    - final: modulation h -> 2h on one row per sample, proj_out h -> out_channels on n rows.
    """
    h = config["num_attention_heads"] * config["attention_head_dim"]
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    c_in = config["in_channels"]
    c_out = config.get("out_channels") or c_in
    ff = 4 * h
    b, n, m = batch, image_tokens, text_tokens
    big = b * (n + m)
    emb = mm(b, 256, h) + mm(b, h, h) + mm(b, config["pooled_projection_dim"], h) + mm(b, h, h)
    if config.get("guidance_embeds"):
        emb += mm(b, 256, h) + mm(b, h, h)
    double, single = config["num_layers"], config["num_single_layers"]
    parts = {
        "embed": mm(b * n, c_in, h) + mm(b * m, config["joint_attention_dim"], h) + emb,
        "double_modulation": double * 2 * mm(b, h, 6 * h),
        "double_qkvo": double * (4 * mm(b * n, h, h) + 4 * mm(b * m, h, h)),
        "double_mlp": double * (mm(b * n, h, ff) + mm(b * n, ff, h) + mm(b * m, h, ff) + mm(b * m, ff, h)),
        "single_modulation": single * mm(b, h, 3 * h),
        "single_qkv_mlp_in": single * (3 * mm(big, h, h) + mm(big, h, ff)),
        "single_out": single * mm(big, h + ff, h),
        "final": mm(b, h, 2 * h) + mm(b * n, h, c_out),
    }
    attention = (double + single) * 4 * b * heads * (n + m) ** 2 * head_dim
    return flop_result(parts, attention, n, b, text_tokens=m)


class FluxBackend(ClipT5Text, DiffusersBackend):
    """FLUX.1: a token is a 2x2 cell of the latent (in_channels = 4C), one forward per step (FLUX.1-dev takes
    the guidance scale as an input, FLUX.1-schnell none), FluxPipeline's dynamic-shift grid, CLIP-L + T5-XXL
    prompts (`text.FluxPromptEncoder`). No `max_token_grid`: its RoPE (`FluxPosEmbed`) is computed from the
    token positions of each grid, so any grid has positions."""

    name = "flux"
    label = "FLUX.1"
    token_note = "FLUX packs 2x2 latent cells into a token"
    text_arch, tiny_text_arch = "flux", "tiny-flux"  # CLIP-L + T5-XXL (ClipT5Text)
    transformer_class = "FluxTransformer2DModel"
    default_scheduler = FLUX1_SCHEDULER_CONFIG
    default_scheduler_name = "FLUX.1's scheduler_config"
    hub_hint = ", or for the gated FLUX.1-dev accept its licence on the hub and log in"
    velocity = staticmethod(flux_velocity)

    @classmethod
    def config_channels(cls, config: dict) -> int:
        return int(config["in_channels"]) // (PACK * PACK)

    @classmethod
    def config_token_side(cls, config: dict) -> int:
        return PACK * int(config.get("patch_size", 1) or 1)

    @classmethod
    def widen_config(cls, config: dict, channels: int) -> dict:
        return {**config, "in_channels": PACK * PACK * channels, "out_channels": PACK * PACK * channels}

    def extend(self, model, detail_channels: int):
        return extend_flux(model, detail_channels)

    def heads(self, model, detail_channels: int):
        extra = PACK * PACK * detail_channels
        return ({"x_embedder": extend_input(model.x_embedder, extra), "proj_out": extend_output(model.proj_out, extra)},
                {"out_channels": int(model.config.in_channels) + extra})

    @classmethod
    def sigma_grid(cls, steps, shift, scheduler_config, image_tokens):
        return flux_sigmas(steps, scheduler_config or None, image_tokens, shift)

    @classmethod
    def guidance_mode(cls, config: dict) -> str:
        return "distilled" if config.get("guidance_embeds") else "none"

    @classmethod
    def guidance_inputs(cls, guidance: float, batch: int, device) -> dict:
        return {"guidance": torch.full((batch,), float(guidance), device=device)}

    def training_inputs(self, batch: int, device) -> dict:
        """FLUX.1-dev trains with its guidance embedding fed the sampling guidance (as diffusers' FLUX LoRA
        scripts); `flux_velocity` drops it for a model without the embedding (FLUX.1-schnell)."""
        return self.guidance_inputs(float(self.preset.sample.guidance), batch, device)

    @classmethod
    def prompt_encoder(cls, spec, *, device, dtype=torch.float32, use_t5=True, max_sequence_length=512):
        from .text import FluxPromptEncoder

        return FluxPromptEncoder.from_spec(spec, device=device, dtype=dtype, max_sequence_length=max_sequence_length)

    def random_prompt_encoder(self, *, use_t5, device, dtype):
        """FLUX.1's CLIP-L and T5-XXL with random weights (the tiny pair for a tiny-random preset)."""
        from .text import FluxPromptEncoder
        from .text_random import TINY_SPEC, build_sd3_text_encoders, build_tiny_flux_text_components

        a = self.preset.dit.arch
        comps = build_tiny_flux_text_components(int(a.get("joint_attention_dim", 32)), int(a.get("pooled_projection_dim", 16)))
        if self.preset.dit.text_encoders != TINY_SPEC:
            real = build_sd3_text_encoders("flux", device, dtype)
            comps.update(text_encoder=real["text_encoder"], text_encoder_2=real["text_encoder_3"])
        return FluxPromptEncoder(comps, identity="random", device=device, dtype=dtype,
                                 max_sequence_length=self.preset.dit.max_sequence_length)

    def random_condition(self, config, batch, device, dtype, generator):
        cond = {"embeds": torch.randn(batch, self.text_tokens(), config["joint_attention_dim"],
                                      generator=generator).to(device, dtype),
                "pooled": torch.randn(batch, config["pooled_projection_dim"], generator=generator).to(device, dtype)}
        if self.guidance_mode(config) == "distilled":
            cond.update(self.guidance_inputs(float(self.preset.sample.guidance), batch, device))
        return cond

    @classmethod
    def flops(cls, config, image_tokens, text_tokens, batch=1):
        return flux_flops(config, image_tokens, text_tokens, batch)
