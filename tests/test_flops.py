"""The analytic FLOP model (davae_cli/flops.py) against torch's FlopCounterMode and hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from davae_cli.dit.lightningdit import lightningdit_flops
from davae_cli.dit.sd3 import SD35_MEDIUM_CONFIG, sd3_flops
from davae_cli.flops import PEAK_TFLOPS, device_peak_tflops, flop_ratio, latent_tokens, step_floor_ms

TINY_SD3 = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 12,
    "out_channels": 4,
    "pos_embed_max_size": 16,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}


def _count(fn) -> int:
    # The math SDPA backend decomposes attention into two bmm's (QK^T, AV), which FlopCounterMode counts as
    # 2*B*h*L*L*d each. The fused CPU kernel (_scaled_dot_product_flash_attention_for_cpu) has no entry in
    # torch's flop registry and would count as 0, i.e. the whole `attention` term would be missing.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_layers": 3}, {"num_layers": 3, "dual_attention_layers": (), "qk_norm": None, "out_channels": 6}],
    ids=["2-layers-dual0", "3-layers-dual0", "3-layers-no-dual"],
)
def test_sd3_matches_flop_counter(overrides):
    from diffusers import SD3Transformer2DModel

    cfg = {**TINY_SD3, **overrides}
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**cfg).eval()
    batch, h, w, text = 2, 8, 6, 5  # latent 8x6 with patch 2 -> 12 image tokens (non-square on purpose)
    x = torch.randn(batch, cfg["in_channels"], h, w)
    ctx = torch.randn(batch, text, cfg["joint_attention_dim"])
    pooled = torch.randn(batch, cfg["pooled_projection_dim"])
    t = torch.full((batch,), 500.0)
    measured = _count(lambda: model(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t))

    est = sd3_flops(cfg, image_tokens=(h // 2) * (w // 2), text_tokens=text, batch=batch)
    assert est["total"] == measured
    assert est["total"] == est["attention"] + est["linear"]
    assert (est["image_tokens"], est["text_tokens"], est["batch"]) == (12, text, batch)


def test_sd3_attention_term_by_hand():
    # 2 layers, block 0 dual: 2 joint attentions over 12+5 tokens, 1 image-only attention over 12 tokens.
    est = sd3_flops(TINY_SD3, image_tokens=12, text_tokens=5, batch=2)
    assert est["attention"] == 4 * 2 * 2 * 8 * (2 * 17**2 + 12**2)


class _HandLightningDiT(nn.Module):
    """The LightningDiT layout the FLOP model assumes (hustvl/LightningDiT, use_swiglu=True), matmuls only."""

    def __init__(self, hidden, depth, heads, mlp_ratio, c_in, c_out, patch, num_classes):
        super().__init__()
        h_ff = int(2 / 3 * int(hidden * mlp_ratio))
        self.heads, self.patch = heads, patch
        self.x_embedder = nn.Conv2d(c_in, hidden, patch, stride=patch)
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "ada": nn.Linear(hidden, 6 * hidden), "qkv": nn.Linear(hidden, 3 * hidden),
                "proj": nn.Linear(hidden, hidden), "w12": nn.Linear(hidden, 2 * h_ff), "w3": nn.Linear(h_ff, hidden),
            })
            for _ in range(depth)
        )
        self.final_ada = nn.Linear(hidden, 2 * hidden)
        self.final = nn.Linear(hidden, patch * patch * c_out)

    def forward(self, x, t_freq, y):
        x = self.x_embedder(x).flatten(2).transpose(1, 2)
        c = self.t_mlp(t_freq) + self.y_embedder(y)
        b, n, d = x.shape
        for blk in self.blocks:
            mods = blk["ada"](nn.functional.silu(c)).chunk(6, dim=1)
            q, k, v = blk["qkv"](x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            x = x + mods[2].unsqueeze(1) * blk["proj"](a)
            x1, x2 = blk["w12"](x).chunk(2, dim=-1)
            x = x + mods[5].unsqueeze(1) * blk["w3"](nn.functional.silu(x1) * x2)
        self.final_ada(nn.functional.silu(c))
        return self.final(x)


TINY_LDIT = {"hidden_size": 24, "depth": 2, "num_heads": 3, "mlp_ratio": 4.0, "in_channels": 5,
             "out_channels": 5, "patch_size": 2, "num_classes": 10}


def test_lightningdit_hand_count():
    # hidden 24, depth 2, 3 heads (head_dim 8), SwiGLU width int(2/3 * 96) = 64, patch 2, 5 channels,
    # 9 image tokens, batch 3. Written out term by term:
    b, n = 3, 9
    rows = b * n
    patch_embed = 2 * rows * (5 * 2 * 2) * 24
    time_embed = 2 * b * 256 * 24 + 2 * b * 24 * 24
    per_block = (
        2 * b * 24 * (6 * 24)  # adaLN
        + 2 * rows * 24 * (3 * 24)  # qkv
        + 4 * b * 3 * n * n * 8  # QK^T and AV
        + 2 * rows * 24 * 24  # proj
        + 2 * rows * 24 * (2 * 64)  # w12
        + 2 * rows * 64 * 24  # w3
    )
    final = 2 * b * 24 * (2 * 24) + 2 * rows * 24 * (2 * 2 * 5)
    expected = patch_embed + time_embed + 2 * per_block + final

    est = lightningdit_flops(TINY_LDIT, image_tokens=n, batch=b)
    assert est["ffn_hidden"] == 64
    assert est["total"] == expected
    assert est["attention"] == 2 * 4 * b * 3 * n * n * 8

    torch.manual_seed(0)
    model = _HandLightningDiT(24, 2, 3, 4.0, 5, 5, 2, 10).eval()
    x = torch.randn(b, 5, 6, 6)
    measured = _count(lambda: model(x, torch.randn(b, 256), torch.tensor([0, 1, 10])))
    assert measured == expected


def test_lightningdit_xl_ffn_width():
    xl = {"hidden_size": 1152, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0, "in_channels": 128,
          "patch_size": 1, "num_classes": 1000}
    assert lightningdit_flops(xl, image_tokens=256)["ffn_hidden"] == 3072


def test_sd35_medium_config_builds_to_expected_size():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM_CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 2_243_171_520
    assert sum(blk.attn2 is not None for blk in model.transformer_blocks) == 13
    assert model.transformer_blocks[-1].context_pre_only


def test_spec7_ratios_and_floors():
    # SPEC §7: SD3.5M, CFG (batch 2), 333 text tokens; 1024^2: 4096 native vs 1024 DA-VAE tokens,
    # 2048^2: 16384 vs 4096; per-step floors at 989 TFLOP/s.
    assert latent_tokens(1024, 1024, 8, 2) == 4096 and latent_tokens(1024, 1024, 16, 2) == 1024
    assert latent_tokens(2048, 2048, 8, 2) == 16384 and latent_tokens(2048, 2048, 16, 2) == 4096

    def f(tokens):
        return sd3_flops(SD35_MEDIUM_CONFIG, image_tokens=tokens, text_tokens=333, batch=2)

    n1k, d1k, n2k, d2k = f(4096), f(1024), f(16384), f(4096)
    assert flop_ratio(n1k, d1k) == pytest.approx(4.6, rel=0.05)
    assert flop_ratio(n2k, d2k) == pytest.approx(7.9, rel=0.05)
    peak = device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak == 989.0
    for flops, ms in [(n1k, 22.8), (d1k, 5.0), (n2k, 181.0), (d2k, 22.8)]:
        assert step_floor_ms(flops, peak) == pytest.approx(ms, rel=0.05)
    assert d2k["total"] == n1k["total"]  # same token count, same work


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 80GB HBM3", "torch.bfloat16", 989.0),
        ("NVIDIA H100 80GB HBM3", "fp16", 989.0),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA H200", "float16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 80GB HBM3", "fp32", None),
        ("NVIDIA GeForce RTX 4090", "bf16", None),
        ("", "bf16", None),
    ],
)
def test_device_peak_tflops(name, dtype, expected):
    assert device_peak_tflops(name, dtype) == expected


def test_peak_table_keys():
    for key, value in PEAK_TFLOPS.items():
        chip, dtype = key.split(":")
        assert chip and dtype in {"bf16", "fp16", "tf32"} and value > 0


def test_bad_inputs():
    with pytest.raises(ValueError):
        sd3_flops(TINY_SD3, image_tokens=0, text_tokens=5)
    with pytest.raises(ValueError):
        latent_tokens(1000, 1024, 8, 2)


def _encoder_layer_flops(n: int, hidden: int, inner: int, ffn: int, ffn_mats: int) -> int:
    """One pre-norm encoder layer on n tokens: q, k, v, o projections, ffn_mats FFN matrices, attention."""
    return 2 * n * (4 * hidden * inner + ffn_mats * hidden * ffn) + 4 * n * n * inner


def test_sd3_text_encoder_flops_by_hand():
    from davae_cli.dit.text_random import text_encoder_flops
    from davae_cli.dit.text_random import SD3_TEXT_ARCH

    total = 0
    for name in ("text_encoder", "text_encoder_2"):  # CLIP-L, CLIP-G: 77 tokens, projection of the pooled token
        a = SD3_TEXT_ARCH[name]
        h = a["hidden_size"]
        total += a["num_hidden_layers"] * _encoder_layer_flops(77, h, h, a["intermediate_size"], 2)
        total += 2 * h * a["projection_dim"]
    t5 = SD3_TEXT_ARCH["text_encoder_3"]  # gated-GELU: wi_0, wi_1, wo
    total += t5["num_layers"] * _encoder_layer_flops(256, t5["d_model"], t5["num_heads"] * t5["d_kv"], t5["d_ff"], 3)
    assert text_encoder_flops("sd3", 256) == total
    assert 2.3e12 < total < 2.6e12  # T5-XXL dominates: ~2 x 4.7e9 parameters x 256 tokens


def test_counted_flops_on_meta_equal_a_real_forward():
    """The meta-device count (no memory, no compute) is the count of the real computation."""
    from davae_cli.bench import build_decoders as _build_decoders, decode_flops, plan
    from davae_cli.config import load_preset
    from davae_cli.flops import counted_flops

    p = load_preset("tiny")
    shapes = plan(p, 64)
    meta = decode_flops(p, shapes)
    native, davae = _build_decoders(p, "cpu", torch.float32)
    for name, fn in (("native", native), ("davae", davae)):
        ch, side = shapes[name]["latent"][0], shapes[name]["latent"][1]
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
            fn(torch.randn(1, ch, side, side))
        assert meta[name] == c.get_total_flops() > 0
    assert counted_flops(nn.Linear(6, 5, bias=False), torch.zeros(3, 6, device="meta")) == 2 * 3 * 6 * 5


def test_end_to_end_flops_by_hand():
    from davae_cli.flops import end_to_end_flops

    e = end_to_end_flops({"step": 10.0, "decode": 7.0}, {"step": 2.0, "decode": 8.0}, steps=4, text=3.0)
    assert (e["native"], e["davae"]) == (4 * 10 + 7 + 3, 4 * 2 + 8 + 3)
    assert e["ratio"] == pytest.approx(50 / 19)
