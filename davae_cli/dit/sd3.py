"""SD3 / SD3.5 (`SD3Transformer2DModel`, `StableDiffusion3Pipeline`): where everything SD3-specific lives.

`SD3Backend` (registered as "sd3"): the zero-init extension of its Conv2d patch embedder and (p, q, c)
unpatchify head (`extend.py`), the velocity (SD3 already predicts eps - x0; timestep = sigma * 1000), the
pipeline's sigma grid (diffusers' FlowMatchEulerDiscreteScheduler from the pipeline's scheduler_config),
classifier-free guidance with a negative prompt, CLIP-L + CLIP-G + T5-XXL prompts (`text.PromptEncoder`),
LoRA and export (`diffusers_family.py`), and the FLOP model of one forward (`sd3_flops`)."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import DavaeError
from ..flops import flop_result, mm
from .diffusers_family import DiffusersBackend
from .text_random import ClipT5Text
from .extend import extend_output_head, extend_patch_embed


def load_sd3_transformer(spec: str, subfolder: Optional[str] = "transformer", arch: Optional[dict] = None,
                         seed: int = 0, dtype: torch.dtype = torch.float32, device=None):
    """`spec`: "random" (a new model from `arch`, seeded), a local folder (a transformer folder, or a pipeline
    folder with `subfolder`), or a hub id. `device`: where a random model is initialised (a GPU is much
    faster for billions of parameters; the values then differ from a CPU initialisation)."""
    from diffusers import SD3Transformer2DModel

    from .loader import load_transformer

    return load_transformer(SD3Transformer2DModel, spec, subfolder, arch, seed=seed, dtype=dtype, device=device,
                            hub_hint=", or for the gated stabilityai models accept the licence on the hub and run "
                                     "`huggingface-cli login`")


def extend_sd3(model, detail_channels: int):
    """The zero-init channel extension of SPEC §6 in place: `pos_embed.proj` reads C + D channels and
    `proj_out` writes p*p*(C+D) values in the (p, q, c) unpatchify layout. The config is updated, so
    `save_pretrained` writes a standard folder with in_channels = out_channels = C + D."""
    cfg = model.config
    c, p = cfg.in_channels, cfg.patch_size
    if (cfg.out_channels or c) != c:
        raise DavaeError(f"SD3 transformer: in_channels {c} != out_channels {cfg.out_channels}; cannot extend")
    if detail_channels <= 0:
        raise DavaeError(f"detail channels must be positive, got {detail_channels}")
    model.pos_embed.proj = extend_patch_embed(model.pos_embed.proj, detail_channels)
    model.proj_out = extend_output_head(model.proj_out, p, c, detail_channels)
    model.out_channels = c + detail_channels
    model.register_to_config(in_channels=c + detail_channels, out_channels=c + detail_channels)
    return model


def pipeline_sigmas(steps: int, shift: Optional[float] = None, scheduler_config: Optional[dict] = None,
                    image_tokens: Optional[int] = None) -> torch.Tensor:
    """The `steps + 1` sigmas (float32, ending in 0) that `StableDiffusion3Pipeline.__call__` steps through
    with this scheduler configuration: diffusers' own `FlowMatchEulerDiscreteScheduler.set_timesteps`,
    called as the pipeline calls it (`retrieve_timesteps`, and `mu` from the pipeline's `calculate_shift`
    when the config uses dynamic shifting). `shift` replaces the config's shift; `scheduler_config` None:
    diffusers' defaults."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    cfg = dict(scheduler_config or {})
    if cfg.get("stochastic_sampling"):
        raise DavaeError("the pipeline's scheduler uses stochastic sampling, which davae's ODE sampler does not "
                         "reproduce; pass a scheduler_config without it")
    if shift is not None:
        cfg["shift"] = float(shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    kwargs = {}
    if sched.config.get("use_dynamic_shifting"):
        if image_tokens is None:
            raise DavaeError("the scheduler uses dynamic shifting: the image token count is needed")
        c = sched.config
        kwargs["mu"] = calculate_shift(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                       c.get("base_shift", 0.5), c.get("max_shift", 1.16))
    retrieve_timesteps(sched, steps, "cpu", **kwargs)
    return sched.sigmas.detach().float().cpu()


# Stable Diffusion 3.5 Medium transformer config (``transformer/config.json`` of
# ``stabilityai/stable-diffusion-3.5-medium``): inner width 24 * 64 = 1536, 24 MMDiT-X blocks, the first 13
# with a second (image-only) self-attention. Built on the meta device this has 2,243,171,520 parameters
# (checked in tests/test_flops.py).
SD35_MEDIUM_CONFIG: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}


def sd3_flops(config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> dict:
    """FLOPs of one forward of diffusers' ``SD3Transformer2DModel`` (SD3 / SD3.5 MMDiT and MMDiT-X).

    ``config`` uses the keys of the model's ``config.json``; ``image_tokens`` is the number of patch tokens
    (latent H*W / patch^2), ``text_tokens`` the length of ``encoder_hidden_states`` (77 CLIP + 256 T5 = 333
    for the SD3 pipelines), ``batch`` the batch size of the forward (2 for one CFG step).

    Counted, following diffusers 0.42 (``transformer_sd3.py``, ``attention.JointTransformerBlock``,
    ``normalization.AdaLayerNormZero / SD35AdaLayerNormZeroX / AdaLayerNormContinuous``):

    - ``pos_embed.proj``: conv ``in_channels -> inner``, kernel = stride = patch (per image token);
    - ``time_text_embed``: timestep MLP ``256 -> inner -> inner`` and pooled projection
      ``pooled_projection_dim -> inner -> inner`` (per sample);
    - ``context_embedder``: ``joint_attention_dim -> caption_projection_dim`` (per text token);
    - per block (per sample): ``norm1.linear`` ``inner -> 6*inner`` (``9*inner`` in dual-attention blocks,
      ``SD35AdaLayerNormZeroX``), ``norm1_context.linear`` ``inner -> 6*inner`` (``2*inner`` in the last,
      ``context_pre_only`` block, which uses ``AdaLayerNormContinuous``);
    - per block (per token): ``to_q/k/v`` + ``to_out`` on image tokens, ``add_q/k/v_proj`` on text tokens
      (the context queries are computed even in the last block), ``to_add_out`` except in the last block;
      joint attention over ``image_tokens + text_tokens``; in dual-attention blocks ``attn2`` (q/k/v/out and
      self-attention over the image tokens only); the GELU-tanh feed-forward ``inner -> 4*inner -> inner``
      on image tokens and (``ff_context``) on text tokens except in the last block;
    - ``norm_out.linear`` ``inner -> 2*inner`` (per sample) and ``proj_out`` ``inner -> patch^2*out_channels``.

    Elementwise work is ignored (see the module docstring). Returns a dict with ``total``, ``attention``
    (the L^2 part), ``linear`` (everything else), ``image_tokens``, ``text_tokens``, ``batch`` and a
    ``parts`` breakdown of ``linear``.
    """
    n_layers = int(config["num_layers"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config["attention_head_dim"])
    d = heads * head_dim
    joint_dim = int(config.get("joint_attention_dim", 4096))
    caption_dim = int(config.get("caption_projection_dim", d))
    pooled_dim = int(config.get("pooled_projection_dim", 2048))
    c_in = int(config.get("in_channels", 16))
    c_out = config.get("out_channels")
    c_out = c_in if c_out is None else int(c_out)
    p = int(config.get("patch_size", 2))
    dual = {int(i) for i in (config.get("dual_attention_layers") or ())}
    n_img, n_txt, b = int(image_tokens), int(text_tokens), int(batch)
    if min(n_img, b) <= 0 or n_txt < 0:
        raise ValueError(f"need image_tokens > 0, text_tokens >= 0, batch > 0; got {n_img}, {n_txt}, {b}")
    if caption_dim != d:
        raise ValueError(f"caption_projection_dim ({caption_dim}) must equal heads*head_dim ({d}) in SD3")

    img, txt = b * n_img, b * n_txt  # rows of the token matmuls
    parts = {
        "patch_embed": mm(img, c_in * p * p, d),
        "time_text_embed": mm(b, 256, d) + mm(b, d, d) + mm(b, pooled_dim, d) + mm(b, d, d),
        "context_embedder": mm(txt, joint_dim, caption_dim),
        "adaln": 0,
        "qkvo_image": 0,
        "qkvo_text": 0,
        "attn2_qkvo": 0,
        "ff_image": 0,
        "ff_text": 0,
        "final": mm(b, d, 2 * d) + mm(img, d, p * p * c_out),
    }
    attention = 0
    ff = mm(1, d, 4 * d) + mm(1, 4 * d, d)  # per token
    for i in range(n_layers):
        pre_only = i == n_layers - 1
        is_dual = i in dual
        parts["adaln"] += mm(b, d, (9 if is_dual else 6) * d) + mm(b, d, (2 if pre_only else 6) * d)
        parts["qkvo_image"] += mm(img, d, 4 * d)
        parts["qkvo_text"] += mm(txt, d, (3 if pre_only else 4) * d)
        attention += 4 * b * heads * (n_img + n_txt) ** 2 * head_dim
        if is_dual:
            parts["attn2_qkvo"] += mm(img, d, 4 * d)
            attention += 4 * b * heads * n_img**2 * head_dim
        parts["ff_image"] += img * ff
        if not pre_only:
            parts["ff_text"] += txt * ff
    return flop_result(parts, attention, n_img, b, text_tokens=n_txt)


def sd3_velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """SD3 already uses the sigma convention; its timestep is sigma * 1000.

    x (N, C[+D], h, w) -> velocity of the same shape; embeds (N, 77 + T5 tokens, joint_attention_dim),
    pooled (N, pooled_projection_dim), sigma (N,). Inside diffusers' SD3Transformer2DModel: patchify to
    (N, h w / p^2, hidden), joint attention with the text tokens, proj_out to (N, h w / p^2, p p (C[+D])),
    unpatchify back to (N, C[+D], h, w)."""
    return model(hidden_states=x, encoder_hidden_states=cond["embeds"], pooled_projections=cond["pooled"],
                 timestep=sigma * 1000.0, return_dict=False)[0]


class SD3Backend(ClipT5Text, DiffusersBackend):
    name = "sd3"
    label = "SD3"
    transformer_class = "SD3Transformer2DModel"
    hub_hint = (", or for the gated stabilityai models accept the licence on the hub and run "
                "`huggingface-cli login`")
    velocity = staticmethod(sd3_velocity)
    grid_limit_key = "pos_embed_max_size"

    @classmethod
    def max_token_grid(cls, config: dict) -> Optional[int]:
        """`pos_embed_max_size`: the side of the stored sin-cos table, from which diffusers' `PatchEmbed` crops
        the centre for each grid (a larger grid is a ValueError in the forward); None (a table computed for
        each grid) when the config sets none."""
        side = cls.config_value(config, "pos_embed_max_size")
        return None if side is None else int(side)

    def extend(self, model, detail_channels: int):
        return extend_sd3(model, detail_channels)

    def heads(self, model, detail_channels: int):
        c, p, d = int(model.config.in_channels), int(model.config.patch_size), detail_channels
        return ({"pos_embed.proj": extend_patch_embed(model.pos_embed.proj, d),
                 "proj_out": extend_output_head(model.proj_out, p, c, d)}, {"out_channels": c + d})

    @classmethod
    def sigma_grid(cls, steps, shift, scheduler_config, image_tokens):
        return pipeline_sigmas(steps, shift, scheduler_config, image_tokens)

    @classmethod
    def prompt_encoder(cls, spec, *, device, dtype=torch.float32, use_t5=True, max_sequence_length=256):
        from .text import PromptEncoder

        return PromptEncoder.from_spec(spec, device=device, dtype=dtype, use_t5=use_t5,
                                       max_sequence_length=max_sequence_length)

    def prompt_cache_kind(self) -> str:
        return "sd3"

    def use_t5(self) -> bool:
        return bool(self.preset.dit.use_t5)

    def random_prompt_encoder(self, *, use_t5, device, dtype):
        """CLIP-L, CLIP-G and T5-XXL of their real architectures with random weights (the tiny set for a
        tiny-random preset) behind local tokenizers."""
        from .text import PromptEncoder
        from .text_random import build_sd3_text_encoders, build_tiny_sd3_text_components

        comps = build_tiny_sd3_text_components()
        if self._text_arch() != "tiny":
            comps.update(build_sd3_text_encoders("sd3", device, dtype))
        joint = int(comps["text_encoder_3"].config.d_model)
        if not use_t5:
            comps["text_encoder_3"] = comps["tokenizer_3"] = None
        return PromptEncoder(comps, identity="random", device=device, dtype=dtype,
                             max_sequence_length=self.preset.dit.max_sequence_length, joint_attention_dim=joint)

    def text_tokens(self) -> int:
        return CLIP_TOKENS + int(self.preset.dit.max_sequence_length)

    def random_condition(self, config, batch, device, dtype, generator):
        return {"embeds": torch.randn(batch, self.text_tokens(), config["joint_attention_dim"],
                                      generator=generator).to(device, dtype),
                "pooled": torch.randn(batch, config["pooled_projection_dim"], generator=generator).to(device, dtype)}

    @classmethod
    def flops(cls, config, image_tokens, text_tokens, batch=1):
        return sd3_flops(config, image_tokens, text_tokens, batch)


CLIP_TOKENS = 77  # SD3 concatenates CLIP's 77 tokens before T5's
