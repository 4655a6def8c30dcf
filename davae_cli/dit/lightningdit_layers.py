"""LightningDiT's building blocks: the fixed position tables (2D sin-cos embedding, 2D RoPE, and the check that a
stored table is the formulas') and the layers of the model (norms, embedders, attention, FFNs, the adaLN block,
the final layer). Parameter names follow the released checkpoints; the model that assembles them is
`lightningdit.LightningDiT`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DavaeError
from .extend import output_row_index


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
