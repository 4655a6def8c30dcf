"""The new DA-VAE blocks: base-encoder trunk wrapper, detail down block, decoder up block (SPEC §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..latents import repeat_base


def _finish_logvar(logvar: torch.Tensor, learn: bool, offset: torch.Tensor) -> torch.Tensor:
    """The logvar channels as the posterior uses them: constant `offset` when not learned, clamped."""
    if not learn:
        logvar = torch.zeros_like(logvar)
    return (logvar + offset).clamp(-30.0, 20.0)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class EncoderTrunk(nn.Module):
    """A copy of the base encoder that returns either its latent or its features before `conv_out`.

    `mode="latent"`: the full encoder output (AutoencoderTiny: its latent; AutoencoderKL: the
    posterior mean channels). `mode="trunk"`: features after the final norm + SiLU (KL) or before
    the last conv (Tiny). Input x (B, 3, H, W) in [-1, 1]; output (B, F, H/f, W/f).
    """

    def __init__(self, encoder: nn.Module, kind: str, mode: str, latent_channels: int):
        super().__init__()
        self.encoder = encoder
        self.kind, self.mode, self.latent_channels = kind, mode, latent_channels

    @property
    def out_channels(self) -> int:
        if self.mode == "latent":
            return self.latent_channels
        if self.kind == "tiny":
            return self.encoder.layers[-1].in_channels
        return self.encoder.conv_out.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if self.kind == "tiny":
            if self.mode == "latent":
                return enc(x)
            # AutoencoderTiny's encoder maps [-1, 1] to [0, 1] before its layers
            return enc.layers[:-1](x.add(1).div(2))
        if self.mode == "latent":
            return enc(x)[:, : self.latent_channels]
        h = enc.conv_in(x)
        for block in enc.down_blocks:
            h = block(h)
        h = enc.mid_block(h)
        return enc.conv_act(enc.conv_norm_out(h))


class DetailDownBlock(nn.Module):
    """Features at s x the latent grid (B, F, s h, s w) -> posterior mean and logvar (B, D, h, w) each.

    3x3 conv to 2D/s² channels (or conv-SiLU-conv with `hidden` channels) + pixel-unshuffle(s) -> 2D
    channels, plus a shortcut from the
    pixel-unshuffled input: `zero_conv` (a zero-initialised 1x1 conv, ImageNet recipe),
    `group_mean` (parameter-free: the mean of each group of s²F/D channels, added to the mean only,
    SD3 recipe; with F = D and s = 2 this is the 2x2 average pool of each feature channel), or `base` (the
    mean starts at z_base repeated D/C times, so Proj(z_d) = z_base at step 0; plus a zero conv).
    With `learn_logvar=False` the logvar is the constant `logvar_init` (a fixed posterior width).
    `factor` is s (the paper: 2).
    """

    def __init__(self, in_channels: int, detail_channels: int, shortcut: str = "zero_conv",
                 conv_init: str = "default", logvar_init: float = 0.0, learn_logvar: bool = True, hidden: int = 0,
                 factor: int = 2):
        super().__init__()
        d, ff = detail_channels, factor * factor
        if (2 * d) % ff:
            raise ValueError(f"2D = {2 * d} must be divisible by s² = {ff} for pixel-unshuffle({factor})")
        self.detail_channels, self.shortcut, self.factor = d, shortcut, factor
        if hidden > 0:  # a nonlinear encoder: conv-SiLU-conv
            self.conv = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(hidden, 2 * d // ff, 3, padding=1))
        else:
            self.conv = nn.Conv2d(in_channels, 2 * d // ff, 3, padding=1)
        if conv_init == "zero":
            _zero(self.conv[-1] if hidden > 0 else self.conv)
        self.learn_logvar = learn_logvar
        if shortcut in ("zero_conv", "base"):
            self.skip = _zero(nn.Conv2d(ff * in_channels, 2 * d, 1))
        elif shortcut == "group_mean":
            if (ff * in_channels) % d:
                raise ValueError(f"group_mean shortcut needs s²F = {ff * in_channels} divisible by D = {d}")
            self.skip = None
        elif shortcut == "group_mean_moments":
            if (ff * in_channels) % (2 * d):
                raise ValueError(f"group_mean_moments shortcut needs s²F = {ff * in_channels} divisible by 2D = {2 * d}")
            self.skip = None
        else:
            raise ValueError(f"unknown detail shortcut {shortcut!r}")
        # a constant offset of the logvar channels (a buffer: part of the artifact, not trained)
        self.register_buffer("logvar_offset", torch.tensor(float(logvar_init)))

    def last_layer(self) -> nn.Parameter:
        return (self.conv[-1] if isinstance(self.conv, nn.Sequential) else self.conv).weight

    def forward(self, feats: torch.Tensor, z_base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.pixel_unshuffle(self.conv(feats), self.factor)  # (B, 2D, h, w)
        unshuffled = F.pixel_unshuffle(feats, self.factor)  # (B, s²F, h, w)
        if self.skip is not None:
            h = h + self.skip(unshuffled)
        elif self.shortcut == "group_mean_moments":  # the official SD3 block: means of s²F/2D channels, all 2D
            b, c4, hh, ww = unshuffled.shape
            h = h + unshuffled.reshape(b, 2 * self.detail_channels, c4 // (2 * self.detail_channels), hh, ww).mean(2)
        mean, logvar = h.chunk(2, dim=1)
        if self.shortcut == "group_mean":
            b, c4, hh, ww = unshuffled.shape
            mean = mean + unshuffled.reshape(b, self.detail_channels, c4 // self.detail_channels, hh, ww).mean(2)
        elif self.shortcut == "base":
            mean = mean + repeat_base(z_base, self.detail_channels)
        return mean, _finish_logvar(logvar, self.learn_logvar, self.logvar_offset)


class DetailUpBlock(nn.Module):
    """Latent (B, C+D, h, w) -> decoder input (B, G, s h, s w).

    A 3x3 conv to s²G channels + pixel-shuffle(s) (or conv-SiLU-conv with `hidden` channels), plus a
    parameter-free shortcut: `repeat` (repeat-interleave the C+D channels to s²G, then pixel-shuffle;
    official code) or `none`. `factor` is s (the paper: 2).
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int, hidden: int = 0,
                 shortcut: str = "repeat", conv_init: str = "default", factor: int = 2):
        super().__init__()
        self.in_channels, self.out_channels, self.base_channels = in_channels, out_channels, base_channels
        self.shortcut, self.factor = shortcut, factor
        ff = factor * factor
        if hidden > 0:
            self.conv = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, ff * out_channels, 3, padding=1)
            )
            last = self.conv[-1]
        else:
            self.conv = nn.Conv2d(in_channels, ff * out_channels, 3, padding=1)
            last = self.conv
        if conv_init == "zero":
            _zero(last)
        if shortcut == "repeat" and (ff * out_channels) % in_channels:
            raise ValueError(f"repeat shortcut needs s²G = {ff * out_channels} divisible by C+D = {in_channels}")
        if shortcut not in ("repeat", "none"):
            raise ValueError(f"unknown up shortcut {shortcut!r}")

    def last_layer(self) -> nn.Parameter:
        return (self.conv[-1] if isinstance(self.conv, nn.Sequential) else self.conv).weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.factor
        h = F.pixel_shuffle(self.conv(z), s)
        if self.shortcut == "repeat":
            rep = (s * s * self.out_channels) // self.in_channels
            h = h + F.pixel_shuffle(z.repeat_interleave(rep, dim=1), s)
        return h


class DecoderTrunk(nn.Module):
    """A copy of the base decoder, entered either at its latent input or right after `conv_in`.

    `mode="latent"`: the whole decoder on a full-resolution *untransformed* base latent.
    `mode="trunk"`: skips the input conv (and Tiny's input clamp); input (B, G, H/f, W/f).
    Output (B, 3, H, W) in about [-1, 1].
    """

    def __init__(self, decoder: nn.Module, kind: str, mode: str):
        super().__init__()
        self.decoder, self.kind, self.mode = decoder, kind, mode

    @property
    def in_channels(self) -> int:
        if self.kind == "tiny":
            conv_in = self.decoder.layers[0]
        else:
            conv_in = self.decoder.conv_in
        return conv_in.in_channels if self.mode == "latent" else conv_in.out_channels

    def last_layer(self) -> nn.Parameter:
        """The weight of the decoder's final conv (for the adaptive GAN weight)."""
        if self.kind == "tiny":
            return self.decoder.layers[-1].weight
        return self.decoder.conv_out.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        if self.mode == "latent":
            return dec(h)
        if self.kind == "tiny":
            return dec.layers[1:](h).mul(2).sub(1)
        # AutoencoderKL decoder from the mid block on (no time embedding, no spatial norm)
        upscale_dtype = next(iter(dec.up_blocks.parameters())).dtype
        h = dec.mid_block(h, None).to(upscale_dtype)
        for block in dec.up_blocks:
            h = block(h, None)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))


class ResBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(x)))), 3x3 convs, constant width, no normalisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ResidualDetailEncoder(nn.Module):
    """A deeper detail encoder for the residual design: features (B, F, s h, s w) -> mean, logvar (B, D, h, w).

    3x3 conv to `hidden` channels, `blocks` residual blocks at the feature grid (s x the token grid),
    SiLU, pixel-unshuffle(s), 1x1 conv to 2D channels (mean, logvar), plus z_base repeated D/C times on the
    mean (shortcut `base`), so Proj(z_d) is close to z_base from step 0; the last conv keeps its
    default (non-zero) initialisation, because zero-initialising both this and the decoder's last conv
    leaves neither a gradient.
    """

    def __init__(self, in_channels: int, detail_channels: int, hidden: int, blocks: int, shortcut: str = "base",
                 logvar_init: float = 0.0, learn_logvar: bool = True, factor: int = 2):
        super().__init__()
        if hidden <= 0:
            raise ValueError("the residual detail encoder needs vae.down_hidden > 0")
        if shortcut != "base":
            raise ValueError(f"detail shortcut {shortcut!r} is not supported with vae.down_blocks > 0 (use base)")
        self.learn_logvar, self.factor, self.detail_channels = learn_logvar, factor, detail_channels
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(hidden) for _ in range(blocks)])
        self.conv_out = nn.Conv2d(factor * factor * hidden, 2 * detail_channels, 1)
        self.register_buffer("logvar_offset", torch.tensor(float(logvar_init)))

    def last_layer(self) -> nn.Parameter:
        return self.conv_out.weight

    def forward(self, feats: torch.Tensor, z_base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.blocks(self.conv_in(feats)))
        mean, logvar = self.conv_out(F.pixel_unshuffle(h, self.factor)).chunk(2, dim=1)
        return mean + repeat_base(z_base, self.detail_channels), _finish_logvar(logvar, self.learn_logvar, self.logvar_offset)


class ResidualDetailDecoder(nn.Module):
    """A decoder for the residual design that also sees the baseline image.

    latent (B, C+D, h, w) -> 3x3 conv to `hidden` + one residual block at the token grid ->
    pixel-shuffle(s) (hidden/s² channels at the f-grid), concatenated with pixel_unshuffle(baseline, f)
    -> 3x3 conv to `hidden`, `blocks` residual blocks, SiLU, 3x3 conv to 3 f^2 channels (zero-initialised)
    -> pixel-shuffle(f), added to the baseline. At step 0 the output is exactly the baseline.
    """

    def __init__(self, in_channels: int, downsample: int, hidden: int, blocks: int, factor: int = 2):
        super().__init__()
        ff = factor * factor
        if hidden <= 0 or hidden % ff:
            raise ValueError(f"the residual detail decoder needs vae.up_hidden > 0 and divisible by s² = {ff}, got {hidden}")
        cell = 3 * downsample * downsample
        self.downsample, self.factor = downsample, factor
        self.latent_in = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), ResBlock(hidden))
        self.conv_in = nn.Conv2d(hidden // ff + cell, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(hidden) for _ in range(blocks)])
        self.conv_out = _zero(nn.Conv2d(hidden, cell, 3, padding=1))

    def last_layer(self) -> nn.Parameter:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        f = self.downsample
        lat = F.pixel_shuffle(self.latent_in(z), self.factor)
        h = self.conv_in(torch.cat([lat, F.pixel_unshuffle(baseline, f)], dim=1))
        return baseline + F.pixel_shuffle(self.conv_out(F.silu(self.blocks(h))), f)
