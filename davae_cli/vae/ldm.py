"""LDM/taming-layout KL autoencoder weights (the official VA-VAE and DA-VAE ImageNet releases) -> diffusers
`AutoencoderKL` keys, written out so that every weight of the file is accounted for.

Why not diffusers' own single-file converter: it maps the mid-block attention but not attention inside a
resolution level, so VA-VAE f16d32 (`attn_resolutions: [16]`: attention after every res block of the last
encoder level and of the first decoder level) loaded without error and silently lost those weights. Here
every LDM key either maps onto a parameter of the model built from the architecture or is reported.

The layout, per side (`enc` = encoder, `dec` = decoder; LDM numbers decoder levels from the lowest
resolution up, diffusers from the top, so LDM `up.i` is diffusers `up_blocks.(L-1-i)`):

    LDM                                   diffusers
    {enc,dec}.conv_in / conv_out          same
    {enc,dec}.norm_out                    conv_norm_out
    enc.down.i.block.j.*                  encoder.down_blocks.i.resnets.j.*   (nin_shortcut -> conv_shortcut)
    enc.down.i.attn.j.{norm,q,k,v,proj_out}  encoder.down_blocks.i.attentions.j.{group_norm,to_q,to_k,to_v,to_out.0}
    enc.down.i.downsample.conv            encoder.down_blocks.i.downsamplers.0.conv
    dec.up.i.block.j / attn.j / upsample  decoder.up_blocks.(L-1-i).resnets.j / attentions.j / upsamplers.0.conv
    {enc,dec}.mid.block_1 / block_2       mid_block.resnets.0 / 1
    {enc,dec}.mid.attn_1                  mid_block.attentions.0
    quant_conv / post_quant_conv          same

Attention projections are 1x1 convolutions in LDM and linear layers in diffusers (weights [c, c, 1, 1] ->
[c, c]). Level attention needs `AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D` in the architecture.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from ..errors import DavaeError

# the namespaces of a KL autoencoder's own weights; anything else in a checkpoint (loss.*, discriminator,
# foundation_model.*, optimizer state) is training-only and dropped
VAE_NAMESPACES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
PREFIXES = ("first_stage_model.", "vae.")

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RES = {"nin_shortcut": "conv_shortcut"}


def strip_prefix(state: dict) -> dict:
    """The VAE's own entries of a checkpoint, with a `first_stage_model.` / `vae.` prefix removed (a full
    latent-diffusion checkpoint keeps its autoencoder under `first_stage_model.`)."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith(VAE_NAMESPACES)}


def _rename_resnet_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RES.get(head, head)}.{tail}"


def _rename_attn_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _ATTN:
        return ""
    return f"{_ATTN[head]}.{tail}"


def ldm_key_to_diffusers(key: str, num_levels: int) -> str:
    """The diffusers AutoencoderKL key of one LDM key ("" when the key has no place in that layout)."""
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", lambda m: f"{m[1]}.{m[2]}.{m[3]}"),
        (r"(encoder|decoder)\.norm_out\.(.+)", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
        (r"(encoder|decoder)\.mid\.block_([12])\.(.+)",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_rename_resnet_part(m[3])}"),
        (r"(encoder|decoder)\.mid\.attn_1\.(.+)",
         lambda m: (f"{m[1]}.mid_block.attentions.0.{a}" if (a := _rename_attn_part(m[2])) else "")),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)",
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_rename_resnet_part(m[3])}"),
        (r"encoder\.down\.(\d+)\.attn\.(\d+)\.(.+)",
         lambda m: (f"encoder.down_blocks.{m[1]}.attentions.{m[2]}.{a}" if (a := _rename_attn_part(m[3])) else "")),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{_rename_resnet_part(m[3])}"),
        (r"decoder\.up\.(\d+)\.attn\.(\d+)\.(.+)",
         lambda m: (f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.attentions.{m[2]}.{a}"
                    if (a := _rename_attn_part(m[3])) else "")),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (r"(quant_conv|post_quant_conv)\.(.+)", lambda m: f"{m[1]}.{m[2]}"),
    ]
    for pattern, make in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return make(m)
    return ""


def fit_tensor(v: torch.Tensor, shape) -> Optional[torch.Tensor]:
    """`v` as a weight of `shape`: itself when the shapes agree, a 1x1 conv kernel [c, c, 1, 1] as the linear
    weight [c, c] (LDM attention projections), else None."""
    if tuple(v.shape) == tuple(shape):
        return v
    if v.dim() == 4 and tuple(v.shape[2:]) == (1, 1) and tuple(v.shape[:2]) == tuple(shape):
        return v[:, :, 0, 0]
    return None


def convert_ldm_vae_state(state: dict, target: dict, source: str) -> dict:
    """Map an LDM-layout VAE state dict (prefix already stripped) onto `target` (the state dict of the
    diffusers model the architecture builds). Every LDM key must land on a target key of the same number of
    elements and every target key must be filled, else a one-line DavaeError naming the first offender."""
    num_levels = 1 + max((int(m[1]) for k in target if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))), default=0)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        new = ldm_key_to_diffusers(key, num_levels)
        if not new or new not in target:
            where = ("a level attention the architecture does not have (use AttnDownEncoderBlock2D / "
                     "AttnUpDecoderBlock2D at that level in vae.base_vae_arch)"
                     if re.search(r"\.(down|up)\.\d+\.attn\.", key) else "no place in vae.base_vae_arch")
            raise DavaeError(f"{source}: weight {key} has {where}")
        want = target[new].shape
        v = fit_tensor(state[key], want)
        if v is None:
            raise DavaeError(f"{source}: weight {key} has shape {tuple(state[key].shape)}, vae.base_vae_arch expects "
                             f"{tuple(want)} for {new}")
        out[new] = v
    missing = [k for k in target if k not in out]
    if missing:
        raise DavaeError(f"{source}: {len(missing)} weights of vae.base_vae_arch are not in the file "
                         f"(first: {missing[0]})")
    return out
