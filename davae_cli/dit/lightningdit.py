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

Here: the size presets, the model, the DA-VAE extension, the FLOP model and the backend; the position
tables and layers are in `lightningdit_layers`, checkpoint reading in `lightningdit_weights`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import DavaeError
from ..flops import flop_result, mm
from .backend import Backend
from .extend import extend_output_head, extend_patch_embed
from .lightningdit_layers import (
    FinalLayer,
    LabelEmbedder,
    LightningDiTBlock,
    PatchEmbed,
    Rope,
    RotaryEmbedding2D,
    TimestepEmbedder,
    check_position_tables,
    rope_tables_2d,
    sincos_pos_embed_2d,
)
from .lightningdit_weights import load_lightningdit_weights

__all__ = [
    "LIGHTNINGDIT_SIZES",
    "LightningDiT",
    "LightningDiTBackend",
    "build_lightningdit",
    "extend_lightningdit",
    "lightningdit_flops",
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

    def heads(self, model, detail_channels: int):
        """The widened patch-embed conv and output linear; the copied embedder and final layer keep their
        `base_channels` (the pretrained C), so they split base and detail exactly as `extend_lightningdit`.
        bench's one trunk serves both grids: every grid but the trained one computes its position tables."""
        c, p, d = int(model.in_channels), int(model.patch_size), detail_channels
        return ({"x_embedder.proj": extend_patch_embed(model.x_embedder.proj, d),
                 "final_layer.linear": extend_output_head(model.final_layer.linear, p, c, d)},
                {"in_channels": c + d, "out_channels": c + d})

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
