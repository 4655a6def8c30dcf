"""The zero-init channel extension (SPEC §6), shared by every backend.

A pretrained DiT reads C latent channels through a patch embedder (a Conv2d with kernel = stride = p)
and writes p*p*C values per token through a linear output head that is unpatchified in the (p, q, c)
layout, c fastest. Extending it to C + D channels:

- input: the embedder's weight gains D zero input channels. This is exactly a zero-initialised branch
  for the detail channels summed with the pretrained branch, but it keeps the module a plain Conv2d,
  so an extended diffusers model is still a standard folder (`in_channels = C + D`).
- output: the head gains p*p*D zero rows, interleaved per patch position: old row (pq, c) moves to
  (pq, c) of the wider layout and rows (pq, C..C+D-1) are new. Appending them at the end would scramble
  the unpatchify of the base channels.

At step 0 the extended model is the pretrained function on the base channels for any detail input,
and outputs exactly 0 on the detail channels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DavaeError


def extend_patch_embed(conv: nn.Conv2d, extra: int) -> nn.Conv2d:
    """A copy of `conv` that reads `extra` more input channels (appended after the old ones) with zero
    weights. Bias, kernel, stride and padding are kept."""
    if not isinstance(conv, nn.Conv2d):
        raise DavaeError(f"patch embedder: expected a Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise DavaeError("patch embedder: grouped convolutions are not supported")
    new = nn.Conv2d(conv.in_channels + extra, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    return new


def output_row_index(patch: int, channels: int, extra: int) -> torch.Tensor:
    """Where each old output row goes in the wider head: row (pq, c) -> pq * (C + D) + c."""
    pq = torch.arange(patch * patch).repeat_interleave(channels)
    c = torch.arange(channels).repeat(patch * patch)
    return pq * (channels + extra) + c


def extend_output_head(linear: nn.Linear, patch: int, channels: int, extra: int) -> nn.Linear:
    """A copy of `linear` (out_features = p*p*C) with out_features = p*p*(C+D); the new rows, placed per
    patch position in the (p, q, c) unpatchify layout, have zero weight and bias."""
    if not isinstance(linear, nn.Linear):
        raise DavaeError(f"output head: expected a Linear, got {type(linear).__name__}")
    if linear.out_features != patch * patch * channels:
        raise DavaeError(f"output head: {linear.out_features} outputs, expected p*p*C = {patch}*{patch}*{channels} "
                         f"(a head that learns sigma is not supported)")
    new = nn.Linear(linear.in_features, patch * patch * (channels + extra), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    idx = output_row_index(patch, channels, extra).to(linear.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[idx] = linear.weight
        if linear.bias is not None:
            new.bias.zero_()
            new.bias[idx] = linear.bias
    return new
