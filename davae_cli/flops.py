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
    "device_peak_tflops",
    "end_to_end_flops",
    "flop_ratio",
    "flop_result",
    "latent_tokens",
    "mm",
    "step_floor_ms",
]


def mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) matmul."""
    return 2 * m * k * n


def latent_tokens(height: int, width: int, downsample: int, patch: int) -> int:
    """Number of DiT tokens for an image of ``height x width`` pixels, a VAE with spatial factor
    ``downsample`` and a DiT patch size ``patch`` (e.g. 1024x1024, f8, p2 -> 4096)."""
    step = downsample * patch
    if height % step or width % step:
        raise ValueError(f"{height}x{width} is not divisible by downsample*patch = {step}")
    return (height // step) * (width // step)


def flop_result(parts: dict[str, int], attention: int, image_tokens: int, batch: int, **extra) -> dict:
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
