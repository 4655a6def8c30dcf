"""LightningDiT (hustvl/LightningDiT): the class-conditional DiT trained on VA-VAE f16d32 latents (SPEC §2, §6).

Written from the published architecture; parameter and buffer names follow the public checkpoints
(`lightningdit-xl-imagenet256-800ep.pt`, `...-64ep.pt`) so that their state dict loads strictly:

    x_embedder.proj.{weight,bias}                    Conv2d(C, hidden, k=p, s=p)
    pos_embed                                        (1, T, hidden) fixed 2D sin-cos table (a frozen parameter)
                                                     of the trained grid; other grids compute theirs
    t_embedder.mlp.{0,2}.{weight,bias}               sinusoidal(256) -> Linear -> SiLU -> Linear
    y_embedder.embedding_table.weight                (num_classes + 1, hidden): the last row is the null class
    feat_rope.freqs_{cos,sin}                        (T, head_dim) 2D RoPE tables (persistent buffers), use_rope
    blocks.i.norm{1,2}.weight                        RMSNorm (use_rmsnorm; LayerNorm without affine otherwise)
    blocks.i.attn.qkv.{weight,bias}, attn.proj.{weight,bias}
    blocks.i.attn.{q,k}_norm.weight                  only with use_qknorm (the released models have none)
    blocks.i.mlp.w12.{weight,bias}, mlp.w3.{weight,bias}    SwiGLU (use_swiglu; else mlp.fc1 / mlp.fc2, GELU-tanh)
    blocks.i.adaLN_modulation.1.{weight,bias}        SiLU -> Linear(hidden, 6 * hidden) (4 * hidden with wo_shift)
    final_layer.norm_final.weight                    RMSNorm only
    final_layer.adaLN_modulation.1.{weight,bias}     SiLU -> Linear(hidden, 2 * hidden)
    final_layer.linear.{weight,bias}                 Linear(hidden, p * p * C), unpatchified (p, q, c), c fastest

Released ImageNet-256 model: XL/1, input_size 16 (256 / 16), in_channels 32, use_swiglu, use_rope,
use_rmsnorm, no QK-norm, with shift, 1000 classes, class dropout 0.1. These are the constructor's defaults
here (the official constructor defaults every option to False).

Time convention (LightningDiT's `transport`, a SiT fork, "Linear" path, velocity prediction):
`x_t = t * x_data + (1 - t) * noise`, so **t = 0 is pure noise and t = 1 is data**, and the network
predicts the velocity `dx_t/dt = x_data - noise`. The raw t in [0, 1] goes into the sinusoidal
embedding (no x1000 scaling). Training draws t from a logit-normal(0, 1). Sampling integrates the ODE
forward from t = 0 to t = 1 on a grid `linspace(0, 1, steps)` mapped by the timestep shift
`t' = s t / (1 + (s - 1) t)` (`shift_time`); the released config uses s = 0.3, which puts more steps
near the noise end. In the diffusers/SD3 convention (sigma = 1 - t) this is the usual shift
`sigma' = S sigma / (1 + (S - 1) sigma)` with S = 1 / s (0.3 -> 3.33).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import DavaeError, first_line
from ..flops import flop_result, mm
from .backend import Backend
from .extend import extend_output_head, extend_patch_embed, output_row_index

__all__ = [
    "LIGHTNINGDIT_SIZES",
    "LightningDiT",
    "build_lightningdit",
    "extend_lightningdit",
    "load_lightningdit_weights",
    "shift_time",
]

# Architecture presets (official names without the "LightningDiT-" prefix, plus L/1 and a CPU "tiny").
LIGHTNINGDIT_SIZES: dict[str, dict] = {
    "B/1": {"depth": 12, "hidden_size": 768, "num_heads": 12, "patch_size": 1},
    "B/2": {"depth": 12, "hidden_size": 768, "num_heads": 12, "patch_size": 2},
    "L/1": {"depth": 24, "hidden_size": 1024, "num_heads": 16, "patch_size": 1},
    "L/2": {"depth": 24, "hidden_size": 1024, "num_heads": 16, "patch_size": 2},
    "XL/1": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 1},
    "XL/2": {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2},
    "1p0B/1": {"depth": 24, "hidden_size": 1536, "num_heads": 24, "patch_size": 1},
    "1p0B/2": {"depth": 24, "hidden_size": 1536, "num_heads": 24, "patch_size": 2},
    "1p6B/1": {"depth": 28, "hidden_size": 1792, "num_heads": 28, "patch_size": 1},
    "1p6B/2": {"depth": 28, "hidden_size": 1792, "num_heads": 28, "patch_size": 2},
    "tiny": {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 1, "input_size": 8, "in_channels": 4,
             "num_classes": 10},
}


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's sampling timestep shift in its own convention (t = 0 noise, t = 1 data):
    `t' = s t / (1 + (s - 1) t)`. s = 1 is the identity; s < 1 spends more steps near the noise end."""
    return shift * t / (1 + (shift - 1) * t)


# ----------------------------------------------------------------------------------------------------
# positional tables


def _hw(grid: int | tuple[int, int]) -> tuple[int, int]:
    """A token grid given as its side (square) or as (rows, columns)."""
    return (int(grid), int(grid)) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def sincos_pos_embed_2d(dim: int, grid: int | tuple[int, int]) -> torch.Tensor:
    """(rows * cols, dim) fixed 2D sin-cos embedding of a token grid (`grid`: its side, or (rows, cols)); token
    k = row * cols + col. The first dim / 2 features encode the column, the last dim / 2 the row; each half is
    [sin(pos w), cos(pos w)] with w_i = 10000^(-i / (dim / 4)) (the official `get_2d_sincos_pos_embed`, whose
    meshgrid puts the column first). Computed in float64, returned in float32."""
    if dim % 4:
        raise DavaeError(f"LightningDiT: hidden_size {dim} must be a multiple of 4 for the 2D sin-cos embedding")
    gh, gw = _hw(grid)
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)  # row of token k
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)  # column of token k

    def one_axis(p: torch.Tensor) -> torch.Tensor:
        ang = p[:, None] * omega[None, :]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


def rope_tables_2d(head_dim: int, grid: int | tuple[int, int],
                   theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows * cols, head_dim) cos / sin tables of the 2D rotary embedding (EVA-02 style, as in LightningDiT) of
    a token grid (`grid`: its side, or (rows, cols)): the first head_dim / 2 features rotate with the token's
    row, the last head_dim / 2 with its column; rotation pairs are adjacent features (2i, 2i + 1), frequency
    theta^(-2i / (head_dim / 2)). Positions are the token's row and column (0, 1, 2, ...), so a larger or
    non-square grid continues the trained one (its tables are, up to float rounding, a block of the larger's)."""
    half = head_dim // 2
    if head_dim % 4:
        raise DavaeError(f"LightningDiT: head dim {head_dim} must be a multiple of 4 for 2D RoPE")
    gh, gw = _hw(grid)
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # (half / 2,)

    def axis(n: int) -> torch.Tensor:  # (n, half), pairs share a frequency
        pos = torch.arange(n) / n * n  # the official position formula (pt_seq_len = ft_seq_len = n)
        return (pos[:, None] * inv_freq[None, :]).repeat_interleave(2, dim=-1)

    rows = axis(gh)[:, None, :].expand(gh, gw, half)
    cols = axis(gw)[None, :, :].expand(gh, gw, half)
    table = torch.cat([rows, cols], dim=-1).reshape(gh * gw, head_dim)
    return table.cos(), table.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, T, head_dim) rotated by the (T, head_dim) tables: pairs (a, b) -> (a cos - b sin, b cos + a sin)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (a, b) -> (-b, a)
    return x * cos + rotated * sin


class RotaryEmbedding2D(nn.Module):
    """The 2D RoPE tables of the trained grid, as persistent buffers because the released checkpoints store them
    (`feat_rope.freqs_cos`, `feat_rope.freqs_sin`); other grids get theirs from `LightningDiT.position_tables`."""

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        self.head_dim = head_dim
        cos, sin = rope_tables_2d(head_dim, grid)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (N, heads, T, head_dim) rotated with `tables` (cos, sin), or with the trained grid's."""
        cos, sin = (self.freqs_cos, self.freqs_sin) if tables is None else tables
        return apply_rope(x, cos, sin)


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (T, head_dim)


def check_position_tables(hidden_size: int, head_dim: int, grid: int, tables: dict[str, torch.Tensor],
                          source: str) -> None:
    """One line when a stored fixed table (`pos_embed`, `feat_rope.freqs_cos` / `_sin`, as found in `tables`) is
    not the one the formulas give for the trained `grid` x `grid`: the model computes the tables of every other
    grid from those formulas, so a stored table they do not reproduce (another convention, a trained position
    embedding) would put the trained grid and the others in different position spaces. The tolerance allows the
    rounding of the stored dtype (and of float64 sin/cos in numpy vs torch)."""
    want = {"pos_embed": sincos_pos_embed_2d(hidden_size, grid)[None]}
    if "feat_rope.freqs_cos" in tables or "feat_rope.freqs_sin" in tables:
        want["feat_rope.freqs_cos"], want["feat_rope.freqs_sin"] = rope_tables_2d(head_dim, grid)
    for name, ref in want.items():
        stored = tables.get(name)
        if stored is None or stored.is_meta:
            continue
        tol = max(1e-5, 2 * torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 0.0
        err = float("inf")
        if stored.numel() == ref.numel():
            err = (stored.detach().float().cpu().reshape(ref.shape) - ref).abs().max().item()
        if not err <= tol:
            raise DavaeError(f"LightningDiT weights from {source}: {name} is not the fixed table of a {grid}x{grid} "
                             f"token grid (largest difference {err:.3g}): a learned or differently laid-out table, "
                             f"which the tables davae computes for other image sizes would not continue")


# ----------------------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (`weight`), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def _norm(dim: int, rms: bool) -> nn.Module:
    return RMSNorm(dim) if rms else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Conv2d(k = s = p) patchifier; tokens in row-major order. Named `proj` like timm's PatchEmbed.

    After a DA-VAE extension (`base_channels` < the conv's input channels) the same conv is evaluated as
    the sum of its base-channel slice and its detail-channel slice. That is the same function, but the
    base slice runs the pretrained model's exact kernel and shapes, so at step 0 (zero detail weights)
    the extended model reproduces the pretrained one bit for bit instead of up to summation order."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, base_channels: int | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.base_channels = in_channels if base_channels is None else base_channels
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cb, conv = self.base_channels, self.proj
        if cb >= conv.in_channels:
            out = conv(x)
        else:
            out = F.conv2d(x[:, :cb], conv.weight[:, :cb], conv.bias, conv.stride)  # base branch (N, d, H/p, W/p)
            out = out + F.conv2d(x[:, cb:], conv.weight[:, cb:], None, conv.stride)  # + zero-init detail branch
        return out.flatten(2).transpose(1, 2)  # (N, T, d)


class TimestepEmbedder(nn.Module):
    """t (N,) -> [cos(t f), sin(t f)] with f_i = 10000^(-i / 128), i < 128 -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; with dropout_prob > 0 the table has a last "null" row (id == num_classes) used for
    classifier-free guidance, and training replaces labels by it with probability dropout_prob."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = torch.as_tensor(force_drop_ids, device=labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, use_rmsnorm: bool):
        super().__init__()
        if dim % num_heads:
            raise DavaeError(f"LightningDiT: hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        n, t, d = x.shape
        # q, k, v: (N, heads, T, head_dim)
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class SwiGLUFFN(nn.Module):
    """w3(silu(a) * b) with [a, b] = w12(x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMlp(nn.Module):
    """fc2(gelu_tanh(fc1(x))), named like timm's Mlp."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """The released models' SwiGLU width: int(2/3 * int(hidden * mlp_ratio)) (3072 for hidden 1152)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 * attn(mod(norm1(x))); x += g2 * mlp(mod(norm2(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, use_qknorm: bool, use_swiglu: bool,
                 use_rmsnorm: bool, wo_shift: bool):
        super().__init__()
        self.wo_shift = wo_shift
        self.norm1 = _norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, use_qknorm, use_rmsnorm)
        self.norm2 = _norm(hidden_size, use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))
        else:
            self.mlp = GeluMlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        # x (N, T, d), c (N, d); every modulation (N, d), broadcast over the T tokens
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)  # (N, T, d)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, d)
        return x


class FinalLayer(nn.Module):
    """norm -> adaLN modulation (shift, scale) -> Linear(hidden, p * p * c).

    After a DA-VAE extension (`base_channels` < c) the rows of the pretrained channels and the new rows
    are evaluated as two separate products and interleaved back: the same function, but the base rows use
    the pretrained model's exact GEMM shapes, so step 0 reproduces it bit for bit (see PatchEmbed)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool,
                 base_channels: int | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.base_channels = out_channels if base_channels is None else base_channels
        self.norm_final = _norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        h = modulate(self.norm_final(x), shift, scale)
        # 2D products: a 3D matmul picks its folding from requires_grad, which would make the two paths
        # below round differently
        lead, h = h.shape[:-1], h.reshape(-1, h.shape[-1])
        p, cb, lin = self.patch_size, self.base_channels, self.linear
        channels = lin.out_features // (p * p)
        if cb >= channels:
            return F.linear(h, lin.weight, lin.bias).unflatten(0, lead)
        base = output_row_index(p, cb, channels - cb).to(h.device)
        keep = torch.ones(lin.out_features, dtype=torch.bool, device=h.device)
        keep[base] = False
        new = keep.nonzero().squeeze(1)
        order = torch.cat([base, new]).argsort()  # position of each output row in cat([base rows, new rows])
        out = torch.cat([F.linear(h, lin.weight[base], lin.bias[base]), F.linear(h, lin.weight[new], lin.bias[new])],
                        dim=-1)
        return out[:, order].unflatten(0, lead)


# ----------------------------------------------------------------------------------------------------
# model


class LightningDiT(ModelMixin, ConfigMixin):
    """Class-conditional LightningDiT as a diffusers model (`save_pretrained` / `from_pretrained`).

    `forward(x, t, y)`: x (N, in_channels, H, W); t (N,) in LightningDiT's convention (t = 0 noise, t = 1 data,
    see the module docstring); y (N,) class ids, `num_classes` = the null class. Returns the velocity
    (N, in_channels, H, W). `input_size` is the trained grid (H = W = input_size): the fixed position tables of
    that grid are the stored ones (`pos_embed`, `feat_rope`), checked on load to be what the formulas give;
    any other H x W (multiples of the patch size, square or not) gets its tables computed from the same
    formulas (`position_tables`).

    `detail_channels` is bookkeeping for DA-VAE: how many of the `in_channels` (the last ones) were added
    by `extend_lightningdit` (0 for a pretrained model). It does not change the architecture or the
    function; the patch embedder uses it only to evaluate the base-channel slice of its conv separately.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        use_checkpoint: bool = False,
        detail_channels: int = 0,
    ):
        super().__init__()
        if learn_sigma:
            raise DavaeError("LightningDiT: learn_sigma=True is not supported (the velocity model has out = in channels)")
        if not 0 <= detail_channels < in_channels:
            raise DavaeError(f"LightningDiT: detail_channels {detail_channels} must be in [0, in_channels {in_channels})")
        if input_size % patch_size:
            raise DavaeError(f"LightningDiT: input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.gradient_checkpointing = use_checkpoint

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, in_channels - detail_channels)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # a frozen parameter, not a buffer: the released checkpoints store it as `pos_embed`
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(hidden_size, self.grid)[None], requires_grad=False)
        self.feat_rope = RotaryEmbedding2D(hidden_size // num_heads, self.grid) if use_rope else None
        self._tables: dict = {}  # (rows, cols, device, dtype) -> (pos, rope) of grids other than the trained one
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm,
                                      in_channels - detail_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """From-scratch init (DiT recipe): xavier linears, zero adaLN and output layers."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' `from_pretrained`, then the stored position tables checked (`check_position_tables`)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.check_position_tables(str(args[0]) if args else "a diffusers folder")
        return loaded

    def check_position_tables(self, source: str, tables: dict[str, torch.Tensor] | None = None) -> None:
        """DavaeError (one line) when `tables` (default: this model's own) hold a `pos_embed` or RoPE table that
        is not the formulas' for the trained grid (see `check_position_tables`)."""
        own = {"pos_embed": self.pos_embed}
        if self.feat_rope is not None:
            own.update({"feat_rope.freqs_cos": self.feat_rope.freqs_cos, "feat_rope.freqs_sin": self.feat_rope.freqs_sin})
        check_position_tables(int(self.config.hidden_size), int(self.config.hidden_size) // int(self.config.num_heads),
                              self.grid, own if tables is None else {k: v for k, v in tables.items() if k in own}, source)

    def position_tables(self, rows: int, cols: int, device) -> tuple[torch.Tensor, Rope | None]:
        """(pos (1, rows * cols, d), RoPE (cos, sin) or None) of a rows x cols token grid: the stored tables for the
        trained grid (bit for bit what the released checkpoints hold), else computed from the same formulas in
        this model's dtype, once per grid and device."""
        if (rows, cols) == (self.grid, self.grid):
            rope = None if self.feat_rope is None else (self.feat_rope.freqs_cos, self.feat_rope.freqs_sin)
            return self.pos_embed, rope
        key = (rows, cols, str(device), self.pos_embed.dtype)
        if key not in self._tables:
            if len(self._tables) >= 8:  # many sizes in one process (a folder of odd images): keep memory bounded
                self._tables.clear()
            self._tables[key] = self._computed_tables(rows, cols, device)
        return self._tables[key]

    @torch.compiler.disable  # plain table building, outside any compiled graph (which takes its result as input)
    def _computed_tables(self, rows: int, cols: int, device) -> tuple[torch.Tensor, Rope | None]:
        dtype = self.pos_embed.dtype
        with torch.inference_mode(False):  # ordinary tensors even when first asked inside sampling's inference mode
            pos = sincos_pos_embed_2d(int(self.config.hidden_size), (rows, cols))[None].to(device=device, dtype=dtype)
            rope = None
            if self.feat_rope is not None:
                cos, sin = rope_tables_2d(self.feat_rope.head_dim, (rows, cols))
                rope = (cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype))
        return pos, rope

    def unpatchify(self, x: torch.Tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
        """(N, T, p * p * c) -> (N, c, rows p, cols p) (default: the trained grid); token features in (p, q, c)
        order, c fastest."""
        n, c, p = x.shape[0], self.out_channels, self.patch_size
        gh, gw = rows or self.grid, cols or self.grid
        x = x.reshape(n, gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % p or x.shape[3] % p or 0 in x.shape[2:]:
            raise DavaeError(f"LightningDiT: expected x of shape (N, {self.in_channels}, H, W) with H and W positive "
                             f"multiples of the patch size {p}, got {tuple(x.shape)}")
        n, rows, cols = x.shape[0], x.shape[2] // p, x.shape[3] // p
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(n) if t.ndim == 0 else t
        y = torch.as_tensor(y, device=x.device)
        y = y.expand(n) if y.ndim == 0 else y
        pos, rope = self.position_tables(rows, cols, x.device)

        # x (N, C[+D], H, W); T = (H / p) * (W / p) tokens of width d = hidden_size
        h = self.x_embedder(x) + pos.to(x.dtype)  # (N, T, d)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, d)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, c, rope, use_reentrant=False)
            else:
                h = block(h, c, rope)  # (N, T, d)
        h = self.final_layer(h, c)  # (N, T, p * p * out_channels)
        return self.unpatchify(h, rows, cols)  # (N, out_channels, H, W)


def build_lightningdit(size: str, **overrides) -> LightningDiT:
    """A LightningDiT of preset `size` (see LIGHTNINGDIT_SIZES; an optional "LightningDiT-" prefix is
    accepted); `overrides` are constructor arguments (e.g. input_size, in_channels, use_qknorm)."""
    key = size.removeprefix("LightningDiT-")
    if key not in LIGHTNINGDIT_SIZES:
        raise DavaeError(f"unknown LightningDiT size {size!r} (known: {', '.join(LIGHTNINGDIT_SIZES)})")
    return LightningDiT(**{**LIGHTNINGDIT_SIZES[key], **overrides})


# ----------------------------------------------------------------------------------------------------
# weights

_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _pick_state_dict(obj, prefer_ema: bool, path: Path) -> tuple[dict, str]:
    if _is_state_dict(obj):
        return obj, "state dict"
    if isinstance(obj, dict):
        order = ("ema", "model", "state_dict", "module") if prefer_ema else ("model", "state_dict", "module", "ema")
        for name in order:
            if _is_state_dict(obj.get(name)):
                return obj[name], repr(name)
        keys = ", ".join(map(str, list(obj)[:8]))
        raise DavaeError(f"{path}: no model weights found (top-level keys: {keys})")
    raise DavaeError(f"{path}: expected a state dict or a dict with 'ema'/'model', got {type(obj).__name__}")


def _read_torch(path: Path, trust_pickle: bool):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as a one-line DavaeError
        if not trust_pickle:
            msg = first_line(e, 160)
            raise DavaeError(f"{path}: cannot read with torch.load(weights_only=True) ({msg}); "
                             f"pass trust_pickle=True only for a file you trust") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise DavaeError(f"{path}: cannot read ({first_line(e)})") from None


def _read_folder(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if files:
        sd: dict = {}
        for f in files:
            sd.update(load_file(str(f), device="cpu"))
        return sd
    files = sorted(path.glob("diffusion_pytorch_model*.bin"))
    if files:
        sd = {}
        for f in files:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
        return sd
    raise DavaeError(f"{path}: no diffusion_pytorch_model*.safetensors / .bin weights in this folder")


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _mismatch_message(model: nn.Module, sd: dict, source: str) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return None

    def few(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {few(shapes)}")
    hints = []
    if any(".q_norm." in k or ".k_norm." in k for k in missing + unexpected):
        hints.append("use_qknorm differs from the checkpoint")
    if any(k.startswith(("x_embedder.proj.", "final_layer.linear.")) for k in shapes):
        hints.append("channel count differs: load pretrained weights before extend_lightningdit")
    hint = f" (hint: {'; '.join(hints)})" if hints else ""
    return f"LightningDiT weights from {source} do not match the model: {'; '.join(parts)}{hint}"


def load_lightningdit_weights(model: LightningDiT, path: str | Path, prefer_ema: bool = True, *,
                              trust_pickle: bool = False) -> LightningDiT:
    """Load weights strictly into `model` from a `.pt`/`.pth`/`.bin`/`.ckpt` checkpoint (a state dict, or a
    dict with 'ema' / 'model' / ... like the released `lightningdit-xl-imagenet256-800ep.pt`; 'ema' is used
    when `prefer_ema`), a `.safetensors` file, or a diffusers folder (`save_pretrained` output).
    `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped. Any missing, unexpected or
    shape-mismatched key, and a stored position table that is not the formulas' (`check_position_tables`),
    raises DavaeError with a one-line message before anything is loaded. `.pt` files are read with
    `weights_only=True`; `trust_pickle=True` allows a full unpickle for files that need it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DavaeError(f"LightningDiT weights not found: {p}")
    if p.is_dir():
        sd, what = _read_folder(p), "diffusers folder"
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd, what = load_file(str(p), device="cpu"), "safetensors"
        except Exception as e:  # noqa: BLE001
            raise DavaeError(f"{p}: cannot read safetensors ({first_line(e)})") from None
    else:
        sd, what = _pick_state_dict(_read_torch(p, trust_pickle), prefer_ema, p)
    sd = _strip_prefixes({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    msg = _mismatch_message(model, sd, f"{p.name} [{what}]")
    if msg:
        raise DavaeError(msg)
    model.check_position_tables(f"{p.name} [{what}]", sd)  # before loading: nothing half-loaded
    model.load_state_dict(sd, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------
# DA-VAE warm start


def extend_lightningdit(model: LightningDiT, detail_channels: int) -> LightningDiT:
    """Zero-init channel extension in place (SPEC §6): the patch embedder reads C + D channels (the new
    input weights are zero) and the output head writes C + D channels per patch position (the new rows,
    interleaved in the (p, q, c) layout, have zero weight and bias). At step 0 the base-channel outputs
    equal the pretrained model's for any detail input and the detail outputs are exactly 0. No module is
    added: the state dict has the same keys, only two tensors are wider. Returns `model`."""
    if detail_channels <= 0:
        raise DavaeError(f"extend_lightningdit: detail_channels must be positive, got {detail_channels}")
    c, p = model.in_channels, model.patch_size
    if model.out_channels != c:
        raise DavaeError("extend_lightningdit: the model's output channels differ from its input channels")
    model.x_embedder.proj = extend_patch_embed(model.x_embedder.proj, detail_channels)
    model.final_layer.linear = extend_output_head(model.final_layer.linear, p, c, detail_channels)
    model.in_channels = model.out_channels = c + detail_channels
    base = c - int(model.config.detail_channels)  # the pretrained model's channels
    model.x_embedder.base_channels = model.final_layer.base_channels = base
    model.register_to_config(in_channels=c + detail_channels,
                             detail_channels=int(model.config.detail_channels) + detail_channels)
    return model


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
        "patch_embed": mm(rows, c_in * p * p, h),
        "time_embed": mm(b, 256, h) + mm(b, h, h),
        "adaln": depth * mm(b, h, 6 * h),
        "qkv": depth * mm(rows, h, 3 * h),
        "proj": depth * mm(rows, h, h),
        "ffn": depth * (mm(rows, h, 2 * h_ff) + mm(rows, h_ff, h)),
        "final": mm(b, h, 2 * h) + mm(rows, h, p * p * c_out),
    }
    attention = depth * 4 * b * heads * n**2 * head_dim
    return flop_result(parts, attention, n, b, text_tokens=0, ffn_hidden=h_ff)


# ----------------------------------------------------------------------------------------------------
# the backend


def lightningdit_velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """LightningDiT: t = 1 - sigma (t = 1 is data) and it predicts x0 - eps. x (N, C[+D], h, w), sigma (N,),
    labels (N,) -> eps - x0 (N, C[+D], h, w). Labels arrive already dropped to the null class by the caller,
    so the model's own dropout is disabled."""
    y = cond["labels"]
    return -model(x, 1.0 - sigma, y, force_drop_ids=torch.zeros_like(y))


class LightningDiTBackend(Backend):
    """Class-conditional LightningDiT (ImageNet): a local checkpoint, folder or `random` from `dit.arch`;
    everything trains (SPEC §6) except the fixed sin-cos position table; labels with a null class for CFG;
    its official integrator's grid (uniform in time, then shifted)."""

    name = "lightningdit"
    label = "LightningDiT"
    conditioning = "class"
    velocity = staticmethod(lightningdit_velocity)

    @classmethod
    def model_class(cls) -> type:
        return LightningDiT

    def arch_config(self) -> dict:
        """The preset's architecture (its `size` with the `dit.arch` overrides), built on the meta device."""
        arch = dict(self.preset.dit.arch)
        size = arch.pop("size", "XL/1")
        with torch.device("meta"):
            return dict(build_lightningdit(size, **arch).config)

    def load(self, spec: str, seed: int = 0, dtype=torch.float32, device=None, latent_side=None) -> nn.Module:
        """`latent_side`: the token grid's side (p = 1) when it is not the DA-VAE latent of
        adapt_dit.resolution (the native model at the base resolution, benchmarks)."""
        arch = dict(self.preset.dit.arch)
        size = arch.pop("size", "XL/1")
        # the token grid follows the recipe's resolution; the class count and the null class follow dit.*
        # (class_dropout_prob > 0 keeps the null-class row; the trainer drops labels itself)
        arch.setdefault("input_size", latent_side or self.preset.adapt_dit.resolution // self.preset.granularity)
        arch.setdefault("num_classes", self.preset.dit.num_classes)
        arch.setdefault("class_dropout_prob", self.preset.dit.cond_dropout)
        p = Path(spec).expanduser()
        if p.is_dir() and (p / "config.json").is_file():
            return LightningDiT.from_pretrained(str(p), torch_dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = build_lightningdit(size, **arch)
            except TypeError as e:
                raise DavaeError(f"dit.arch: not a valid LightningDiT config ({e})") from None
        if spec != "random":
            if not p.is_file():
                raise DavaeError(f"{spec}: no such checkpoint file or folder (LightningDiT loads local files)", param="dit")
            load_lightningdit_weights(model, str(p))
        return model.to(dtype)

    def check_grid(self, model, side: int, granularity: int, downsample: int) -> None:
        grid = int(model.config.input_size)
        if grid != side:
            raise DavaeError(f"the DiT was built for a {grid}x{grid} latent grid, but adapt_dit.resolution "
                             f"{self.preset.adapt_dit.resolution} with this DA-VAE (s*f = {granularity}) needs "
                             f"{side}x{side}: adapt a DiT trained at {side * downsample}² (its base resolution)", param="dit")

    def extend(self, model, detail_channels: int):
        return extend_lightningdit(model, detail_channels)

    def bench_models(self, spec, seed, device, dtype, res):
        """Two models: the position table depends on the token grid (LightningDiT-XL is 675M parameters, so
        holding both is no problem)."""
        from .backend import place_frozen

        p = self.preset
        out = {}
        sides = {"native": res // p.vae.downsample, "davae": res // p.granularity}
        for which, side in sides.items():
            m = self.load(spec, seed=seed, latent_side=side)
            if which == "davae":
                self.extend(m, p.vae.detail_channels)
            out[which] = place_frozen(m, device, dtype)
        return out

    def random_condition(self, config, batch, device, dtype, generator):
        return {"labels": (torch.arange(batch) % self.preset.dit.num_classes).to(device)}

    def prepare_training(self, model) -> list[str]:
        """Everything trains (SPEC §6) except the fixed sin-cos position table."""
        model.requires_grad_(True)
        if isinstance(getattr(model, "pos_embed", None), nn.Parameter):
            model.pos_embed.requires_grad_(False)
        return [n for n, p in model.named_parameters() if p.requires_grad]

    @classmethod
    def flops(cls, config, image_tokens, text_tokens=0, batch=1):
        return lightningdit_flops(config, image_tokens, batch)

    def native_model(self, spec, *, res, vae_dir, shift, recipe, device, dtype, on_message=lambda t: None):
        """The pretrained LightningDiT (checkpoint, folder or `random` from the preset), built for its base
        resolution's grid and run at `res` (any multiple of f * p: other grids compute their position tables);
        decodes with the base VAE of the DA-VAE in `vae_dir` (its latent transform inverted)."""
        from ..latents import check_native_space, read_native_facts
        from ..sampling import SamplingModel
        from ..vae.base import base_decode
        from ..vae.model import DetailAlignedVAE
        from .backend import place_frozen

        p = self.preset
        if not vae_dir or res is None:
            raise DavaeError("with a LightningDiT preset needs --vae (for its base VAE) and --res", param="native")
        f = p.vae.downsample
        # built for its base resolution's grid (the checkpoint's); other sizes compute their position tables
        dit = place_frozen(self.load(spec, seed=p.adapt_dit.seed), device, dtype)
        davae = DetailAlignedVAE.from_pretrained(str(vae_dir)).to(device).eval()
        if Path(spec).is_dir():
            check_native_space(read_native_facts(spec), davae, f"the native DiT {spec}")

        def decode(latent):
            return base_decode(davae.base.vae, davae.transform.inverse(latent.float()))

        return SamplingModel(
            name="native", backend=type(self), dit=dit, base_channels=int(dit.config.in_channels), detail_channels=0,
            granularity=f, patch_size=int(dit.config.patch_size),
            shift=float(p.sample.shift if shift is None else shift), decoder=decode,
            recipe=recipe, conditioning="class", identity={"dit_source": spec, "base_vae_hash": davae.config.base_vae_hash},
            parts={"davae": davae})
