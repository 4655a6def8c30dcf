"""Analytic FLOP model for one denoising step (one transformer forward) of the DiTs.

Conventions (used by ``davae bench`` to compute ideal speed-ups and per-step time floors):

- A matmul of an ``M x K`` by a ``K x N`` matrix costs ``2 * M * N * K`` FLOPs (multiply-adds x 2); a
  convolution costs ``2 * out_elements * in_channels * kh * kw``. This is the convention of
  ``torch.utils.flop_counter.FlopCounterMode``, and the tests check the counts against it exactly.
- Only matmuls/convolutions are counted. Elementwise work is ignored: biases, LayerNorm/RMSNorm
  (including QK-norm), activations (SiLU, GELU, SwiGLU gating), softmax and its scaling, adaLN
  modulate/gate/residual adds, positional embeddings, RoPE, sinusoidal timestep features, label
  embedding lookups, patchify/unpatchify reshapes. These are a few percent of the work at most and are
  memory-bound anyway, so the time floors derived from this count are lower bounds.
- Attention ``softmax(Q K^T) V`` over ``L`` tokens costs ``4 * B * heads * L^2 * head_dim`` (QK^T and AV);
  this is reported as ``attention``; everything else is ``linear``.
- The counts are for a forward pass of ``batch`` samples; classifier-free guidance runs the model on a
  batch of 2 (conditional + unconditional) per sample, so pass ``batch=2`` for one CFG step of one image.
- LoRA adapters (rank << width) are not counted: after merging they cost nothing.
"""

from __future__ import annotations

__all__ = [
    "PEAK_TFLOPS",
    "counted_flops",
    "end_to_end_flops",
    "flux_flops",
    "SD35_MEDIUM_CONFIG",
    "device_peak_tflops",
    "flop_ratio",
    "latent_tokens",
    "lightningdit_flops",
    "sd3_flops",
    "step_floor_ms",
    "text_encoder_flops",
]


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) matmul."""
    return 2 * m * k * n


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


def latent_tokens(height: int, width: int, downsample: int, patch: int) -> int:
    """Number of DiT tokens for an image of ``height x width`` pixels, a VAE with spatial factor
    ``downsample`` and a DiT patch size ``patch`` (e.g. 1024x1024, f8, p2 -> 4096)."""
    step = downsample * patch
    if height % step or width % step:
        raise ValueError(f"{height}x{width} is not divisible by downsample*patch = {step}")
    return (height // step) * (width // step)


def _result(parts: dict[str, int], attention: int, image_tokens: int, batch: int, **extra) -> dict:
    linear = sum(parts.values())
    return {
        "total": linear + attention,
        "attention": attention,
        "linear": linear,
        "image_tokens": image_tokens,
        "batch": batch,
        "parts": dict(parts),
        **extra,
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
        "patch_embed": _mm(img, c_in * p * p, d),
        "time_text_embed": _mm(b, 256, d) + _mm(b, d, d) + _mm(b, pooled_dim, d) + _mm(b, d, d),
        "context_embedder": _mm(txt, joint_dim, caption_dim),
        "adaln": 0,
        "qkvo_image": 0,
        "qkvo_text": 0,
        "attn2_qkvo": 0,
        "ff_image": 0,
        "ff_text": 0,
        "final": _mm(b, d, 2 * d) + _mm(img, d, p * p * c_out),
    }
    attention = 0
    ff = _mm(1, d, 4 * d) + _mm(1, 4 * d, d)  # per token
    for i in range(n_layers):
        pre_only = i == n_layers - 1
        is_dual = i in dual
        parts["adaln"] += _mm(b, d, (9 if is_dual else 6) * d) + _mm(b, d, (2 if pre_only else 6) * d)
        parts["qkvo_image"] += _mm(img, d, 4 * d)
        parts["qkvo_text"] += _mm(txt, d, (3 if pre_only else 4) * d)
        attention += 4 * b * heads * (n_img + n_txt) ** 2 * head_dim
        if is_dual:
            parts["attn2_qkvo"] += _mm(img, d, 4 * d)
            attention += 4 * b * heads * n_img**2 * head_dim
        parts["ff_image"] += img * ff
        if not pre_only:
            parts["ff_text"] += txt * ff
    return _result(parts, attention, n_img, b, text_tokens=n_txt)


def lightningdit_flops(config: dict, image_tokens: int, batch: int = 1) -> dict:
    """FLOPs of one forward of a LightningDiT-style class-conditional DiT.

    Assumes the architecture of hustvl/LightningDiT ``models/lightningdit.py`` with ``use_swiglu=True`` (as in
    LightningDiT-XL): per block an adaLN modulation ``hidden -> 6*hidden`` (per sample), ``qkv``
    ``hidden -> 3*hidden``, softmax attention over the image tokens, ``proj`` ``hidden -> hidden``, and a
    SwiGLU FFN ``SwiGLUFFN(hidden, int(2/3 * int(hidden * mlp_ratio)))`` (``w12``: ``hidden -> 2*h_ff``,
    ``w3``: ``h_ff -> hidden``; 3072 for XL); a patch-embed conv ``in_channels -> hidden`` with
    kernel = stride = patch; the timestep MLP ``256 -> hidden -> hidden`` (per sample; the class label is an
    embedding lookup, free); the final layer adaLN ``hidden -> 2*hidden`` (per sample) and linear
    ``hidden -> patch^2 * out_channels``. It does not import ``davae_cli.dit.lightningdit``; if that module
    departs from this layout (e.g. ``wo_shift`` adaLN ``hidden -> 4*hidden`` or a GELU MLP), this count is off
    by those layers. An ``mlp_hidden`` key in ``config`` overrides the FFN width. Elementwise work (RMSNorm,
    QK-norm, RoPE, SiLU gating, softmax, modulation) is ignored.

    Config keys: ``hidden_size``, ``depth``, ``num_heads``, ``mlp_ratio``, ``in_channels``,
    ``out_channels`` (default ``in_channels``), ``patch_size``; ``num_classes`` is accepted and unused.
    """
    h = int(config["hidden_size"])
    depth = int(config["depth"])
    heads = int(config["num_heads"])
    if h % heads:
        raise ValueError(f"hidden_size {h} is not divisible by num_heads {heads}")
    head_dim = h // heads
    mlp_ratio = float(config.get("mlp_ratio", 4.0))
    h_ff = int(config.get("mlp_hidden") or int(2 / 3 * int(h * mlp_ratio)))
    c_in = int(config.get("in_channels", 32))
    c_out = config.get("out_channels")
    c_out = c_in if c_out is None else int(c_out)
    p = int(config.get("patch_size", 1))
    n, b = int(image_tokens), int(batch)
    if min(n, b) <= 0:
        raise ValueError(f"need image_tokens > 0 and batch > 0; got {n}, {b}")

    rows = b * n
    parts = {
        "patch_embed": _mm(rows, c_in * p * p, h),
        "time_embed": _mm(b, 256, h) + _mm(b, h, h),
        "adaln": depth * _mm(b, h, 6 * h),
        "qkv": depth * _mm(rows, h, 3 * h),
        "proj": depth * _mm(rows, h, h),
        "ffn": depth * (_mm(rows, h, 2 * h_ff) + _mm(rows, h_ff, h)),
        "final": _mm(b, h, 2 * h) + _mm(rows, h, p * p * c_out),
    }
    attention = depth * 4 * b * heads * n**2 * head_dim
    return _result(parts, attention, n, b, text_tokens=0, ffn_hidden=h_ff)


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
    emb = _mm(b, 256, h) + _mm(b, h, h) + _mm(b, config["pooled_projection_dim"], h) + _mm(b, h, h)
    if config.get("guidance_embeds"):
        emb += _mm(b, 256, h) + _mm(b, h, h)
    double, single = config["num_layers"], config["num_single_layers"]
    parts = {
        "embed": _mm(b * n, c_in, h) + _mm(b * m, config["joint_attention_dim"], h) + emb,
        "double_modulation": double * 2 * _mm(b, h, 6 * h),
        "double_qkvo": double * (4 * _mm(b * n, h, h) + 4 * _mm(b * m, h, h)),
        "double_mlp": double * (_mm(b * n, h, ff) + _mm(b * n, ff, h) + _mm(b * m, h, ff) + _mm(b * m, ff, h)),
        "single_modulation": single * _mm(b, h, 3 * h),
        "single_qkv_mlp_in": single * (3 * _mm(big, h, h) + _mm(big, h, ff)),
        "single_out": single * _mm(big, h + ff, h),
        "final": _mm(b, h, 2 * h) + _mm(b * n, h, c_out),
    }
    attention = (double + single) * 4 * b * heads * (n + m) ** 2 * head_dim
    return _result(parts, attention, n, b, text_tokens=m)


def flop_ratio(native: dict, davae: dict) -> float:
    """Ideal speed-up ``native["total"] / davae["total"]``."""
    return native["total"] / davae["total"]


def counted_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` as torch's ``FlopCounterMode`` counts them (the convention above).
    Call it on a module built on the meta device with meta inputs to count without computing: used for the
    parts with no analytic model here (the VAE decoders, the text encoders)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # the math SDPA backend decomposes attention into the two bmm's the counter knows; fused kernels (e.g.
    # the CPU flash kernel) have no entry in torch's FLOP registry and would count as zero
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def text_encoder_flops(arch: str = "sd3", max_sequence_length: int = 256) -> int:
    """FLOPs of encoding one prompt with SD3's three text encoders (``davae_cli.text.SD3_TEXT_ARCH``:
    CLIP-L and CLIP-G on 77 tokens, T5-XXL on ``max_sequence_length``; ``arch="flux"``: FLUX.1's CLIP-L and
    T5-XXL), counted on the meta device."""
    from .text import build_sd3_text_encoders, run_sd3_text_encoders

    encoders = build_sd3_text_encoders(arch, device="meta")
    return counted_flops(run_sd3_text_encoders, encoders, 1, max_sequence_length)


def end_to_end_flops(native: dict, davae: dict, *, steps: int, text: float = 0.0) -> dict:
    """FLOPs per image of everything a user waits for, and their ratio. ``native`` / ``davae``: ``{"step":
    FLOPs of the average denoising step per image (CFG included), "decode": FLOPs of decoding one image}``;
    ``text``: FLOPs of the text encoding per image (the same on both sides: the prompt and, with CFG, the
    negative prompt). The decode is not reduced by DA-VAE (both decode the full-resolution image), so this
    ratio is lower than the per-step one."""
    totals = {k: steps * float(v["step"]) + float(v.get("decode", 0.0)) + float(text)
              for k, v in (("native", native), ("davae", davae))}
    return {"native": totals["native"], "davae": totals["davae"], "ratio": totals["native"] / totals["davae"],
            "steps": steps, "text": float(text),
            "decode": {"native": float(native.get("decode", 0.0)), "davae": float(davae.get("decode", 0.0))}}


# Dense (no sparsity) tensor-core peaks in TFLOP/s, keyed "<chip>:<dtype>". H100 = SXM5 (the common
# "NVIDIA H100 80GB HBM3"); the H200 has the H100 SXM compute; "H100 PCIe" is the slower PCIe card.
PEAK_TFLOPS: dict[str, float] = {
    "H100:bf16": 989.0,
    "H100:fp16": 989.0,
    "H100:tf32": 494.5,
    "H100 PCIe:bf16": 756.0,
    "H100 PCIe:fp16": 756.0,
    "H100 PCIe:tf32": 378.0,
    "H200:bf16": 989.0,
    "H200:fp16": 989.0,
    "H200:tf32": 494.5,
    "A100:bf16": 312.0,
    "A100:fp16": 312.0,
    "A100:tf32": 156.0,
}

_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "tf32": "tf32",
}


def device_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Peak dense TFLOP/s for a ``torch.cuda.get_device_name()`` string and a dtype ("bf16"/"bfloat16"/
    "torch.bfloat16", "fp16"/"float16", "tf32"); None when the chip or dtype is unknown (fp32 included)."""
    if not device_name or not dtype:
        return None
    key = _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."))
    if key is None:
        return None
    name = device_name.upper()
    chips = sorted({k.split(":")[0] for k in PEAK_TFLOPS}, key=len, reverse=True)  # most specific first
    for chip in chips:
        if chip.upper() in name:
            return PEAK_TFLOPS.get(f"{chip}:{key}")
    return None


def step_floor_ms(flops: dict | float, peak_tflops: float) -> float:
    """Lower bound in milliseconds for a forward of ``flops`` FLOPs (a dict from this module or a number)
    at ``peak_tflops`` TFLOP/s."""
    total = flops["total"] if isinstance(flops, dict) else float(flops)
    return total / (peak_tflops * 1e12) * 1e3
