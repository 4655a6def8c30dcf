"""Checkpoints trained with the official DA-VAE code (caixin98/DA-VAE) -> davae folders.

Implemented: the ImageNet DA-VAE tokenizer (`lightningdit/davae`, class `DAVAE` with `da_mode: detail`), whose
Lightning checkpoint holds

    base_encoder.*, base_quant_conv.*    the frozen VA-VAE encoder (LDM layout)
    da.encoder.*                         the detail encoder: a full LDM encoder copy (its conv_out unused)
    da.da_down.conv.*                    3x3 conv to 2D/4 channels, then pixel-unshuffle(2) -> 2D (mean, logvar)
    da.da_down.shortcut_proj.weight      1x1 conv, no bias, on the pixel-unshuffled features (2048 -> 192)
    da.da_up.conv.*                      3x3 conv from C + D to 4G, then pixel-shuffle(2), + repeat shortcut
    da.decoder.*                         the decoder, entered at its mid block (its conv_in unused)

(`dc.` in place of `da.` is accepted too). davae's model has the same blocks (`detail_features: trunk`,
`detail_shortcut: zero_conv`, `decoder_input: trunk`, `up_shortcut: repeat`); what differs is set on the
converted folder so it computes what the official model computes: the base image without antialiasing
(`base_resize: plain`), and the up block fed the raw base latent (`decoder_base_space: raw`). The latent
davae hands the DiT keeps its base channels first and normalised per channel with the statistics given
(`--stats`: the official 128-channel `latents_stats.pt`, whose first C entries normalise the base and the
rest the detail channels, as the official LightningDiT trainer does; or LightningDiT's 32-channel file, the
detail statistics then measured later).

The base VAE's decoder is not in a DA-VAE checkpoint: the VA-VAE file it was built on (`--base-vae`) supplies
it, and its encoder must equal the checkpoint's base encoder (checked).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ..config_schema import Preset
from ..errors import DavaeError, first_line
from ..vae.ldm import fit_tensor, ldm_key_to_diffusers


def _read_state(path: Path, allow_pickle: bool) -> dict:
    if not path.is_file():
        raise DavaeError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001
        hint = "" if allow_pickle else " (a Lightning checkpoint with pickled objects needs --allow-pickle)"
        raise DavaeError(f"{path}: not a readable checkpoint{hint} ({first_line(e, 160)})") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DavaeError(f"{path}: expected a state dict")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_dit_job(out: Path, preset: Preset, backend: str, hint: str, *files: Path) -> None:
    """The checks every DiT conversion makes before it loads anything: a new output folder, a preset of the
    right family, existing input files."""
    if out.exists():
        raise DavaeError(f"{out} already exists (choose a new folder)")
    if preset.dit.backend != backend:
        raise DavaeError(f"preset {preset.name} is a {preset.dit.backend} preset; the official model is {hint}")
    for f in files:
        if not f.is_file():
            raise DavaeError(f"{f}: file not found")


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _ldm_onto(part: str, ldm: dict, target: torch.nn.Module, num_levels: int, source: str, skip: tuple = ()) -> int:
    """Copy LDM-layout `part` ("encoder"/"decoder") weights onto a diffusers Encoder/Decoder; every key of
    either side must match (keys in `skip` may be absent from the file). Returns the count."""
    own = target.state_dict()
    out = {}
    for key, v in ldm.items():
        new = ldm_key_to_diffusers(f"{part}.{key}", num_levels)
        name = new[len(part) + 1:] if new.startswith(part + ".") else ""
        if not name or name not in own:
            raise DavaeError(f"{source}: weight {part}.{key} has no place in the davae model")
        fitted = fit_tensor(v, own[name].shape)
        if fitted is None:
            raise DavaeError(f"{source}: weight {part}.{key} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[name].shape)}")
        out[name] = fitted.float()
    missing = [k for k in own if k not in out and not k.startswith(skip)]
    if missing:
        raise DavaeError(f"{source}: {len(missing)} {part} weights are missing (first: {missing[0]})")
    target.load_state_dict({**own, **out})
    return len(out)


def _stats(path: Path, c: int, d: int) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """(base mean, base std, detail (mean, std) or None) from a LightningDiT-style statistics file."""
    if not path.is_file():
        raise DavaeError(f"{path}: statistics file not found")
    st = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(st, dict) or "mean" not in st or "std" not in st:
        raise DavaeError(f"{path}: expected a dict with 'mean' and 'std' tensors")
    mean, std = torch.as_tensor(st["mean"]).float().flatten(), torch.as_tensor(st["std"]).float().flatten()
    if mean.numel() == c + d:
        return mean[:c], std[:c], (mean[c:], std[c:])
    if mean.numel() == c:
        return mean, std, None
    raise DavaeError(f"{path}: statistics have {mean.numel()} channels; expected C = {c} or C + D = {c + d}")


def convert_imagenet_davae(ckpt: str | Path, base_vae: str | Path, stats: str | Path, out: str | Path,
                           preset: Preset, *, allow_pickle: bool = False) -> dict:
    """Convert an official ImageNet DA-VAE checkpoint (see the module doc) into a davae DA-VAE folder at `out`
    (written atomically). `preset` gives the architecture (`imagenet-512`: VA-VAE f16d32, D = 96)."""
    from ..exports import export_davae
    from ..vae.base import load_base_vae
    from ..vae.ldm import convert_ldm_vae_state
    from ..vae.model import DetailAlignedVAE

    ckpt, base_vae, stats, out = Path(ckpt), Path(base_vae), Path(stats), Path(out)
    if out.exists():
        raise DavaeError(f"{out} already exists (choose a new folder)")
    src = f"official DA-VAE {ckpt}"
    state = _read_state(ckpt, allow_pickle)
    head = next((h for h in ("da.", "dc.", "model.dc.") if any(k.startswith(h + "da_down.") for k in state)), None)
    if head is None:
        raise DavaeError(f"{src}: no detail path (da.da_down.* / dc.da_down.*): not an official DA-VAE checkpoint")
    da = _sub(state, head)
    v = replace(preset.vae, base_vae=str(base_vae), detail_features="trunk", detail_shortcut="zero_conv",
                decoder_input="trunk", up_shortcut="repeat", up_hidden=0, down_hidden=0, down_blocks=0, up_blocks=0,
                up_input="latent", learn_logvar=True, logvar_init=0.0, base_resize="plain", decoder_base_space="raw",
                base_latent_transform="stats")
    c, d = v.base_channels, v.detail_channels
    bmean, bstd, detail_stats = _stats(stats, c, d)
    base = load_base_vae(str(base_vae), arch=dict(v.base_vae_arch))
    # the checkpoint's frozen base encoder must be the base VAE's
    theirs = {**{f"encoder.{k}": t for k, t in _sub(state, "base_encoder.").items()},
              **{f"quant_conv.{k}": t for k, t in _sub(state, "base_quant_conv.").items()}}
    if not theirs:
        raise DavaeError(f"{src}: no base encoder (base_encoder.*) in the checkpoint")
    ours = base.vae.state_dict()
    enc_only = {k: t for k, t in ours.items() if k.startswith(("encoder.", "quant_conv."))}
    conv = convert_ldm_vae_state(theirs, enc_only, src)
    diff = next((k for k in enc_only if not torch.equal(conv[k].float(), enc_only[k].float())), None)
    if diff is not None:
        raise DavaeError(f"{src}: its base encoder differs from the base VAE {base_vae} (first: {diff}); pass the "
                         f"VA-VAE file the DA-VAE was trained on")
    with tempfile.TemporaryDirectory() as tmp:  # base statistics in the shape from_base reads
        sp = Path(tmp) / "base_stats.pt"
        torch.save({"mean": bmean, "std": bstd}, sp)
        model = DetailAlignedVAE.from_base(base, replace(v, base_latent_stats=str(sp)))
    levels = len(base.vae.config.block_out_channels)
    n = _ldm_onto("encoder", _sub(da, "encoder."), model.detail_trunk.encoder, levels, src)
    n += _ldm_onto("decoder", _sub(da, "decoder."), model.decoder_trunk.decoder, levels, src)
    # the new blocks
    blocks = {"da_down.conv.weight": model.down.conv.weight, "da_down.conv.bias": model.down.conv.bias,
              "da_down.shortcut_proj.weight": model.down.skip.weight,
              "da_up.conv.weight": model.up.conv.weight, "da_up.conv.bias": model.up.conv.bias}
    for key, param in blocks.items():
        if key not in da:
            raise DavaeError(f"{src}: weight {head}{key} is missing (the shortcut must be a 1x1 projection: 4F not "
                             f"divisible by 2D)")
        if da[key].shape != param.shape:
            raise DavaeError(f"{src}: weight {head}{key} has shape {tuple(da[key].shape)}, the {preset.name} "
                             f"architecture expects {tuple(param.shape)} (C = {c}, D = {d})")
        with torch.no_grad():
            param.copy_(da[key])
    with torch.no_grad():
        model.down.skip.bias.zero_()  # the official shortcut has no bias
    unused = [k for k in da if not k.startswith(("encoder.", "decoder.")) and k not in blocks]
    if unused:
        raise DavaeError(f"{src}: weight {head}{unused[0]} has no place in the davae model")
    if detail_stats is not None:
        model.set_detail_stats(detail_stats[0], detail_stats[1], 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_davae(model, out, trained=False)
    return {"out": str(out), "weights": n + len(blocks), "base_vae": str(base_vae), "stats": str(stats),
            "detail_stats": "from the statistics file" if detail_stats is not None else "not set (measure them)",
            "base_resize": "plain", "decoder_base_space": "raw", "checkpoint_prefix": head}


def convert_lightningdit(ckpt: str | Path, vae_dir: str | Path, out: str | Path, preset: Preset, *,
                         allow_pickle: bool = False) -> dict:
    """The official LightningDiT-XL trained on DA-VAE latents (`lightningdit/train.py`: the 256² model's
    patch embedder and final layer zero-padded to C + D = 128 channels, base first; QK-norm on; a checkpoint
    with 'ema'/'model' entries) -> a davae adapted-DiT folder for the DA-VAE at `vae_dir`, which must be
    the official tokenizer converted with the official 128-channel statistics (`davae convert
    imagenet-davae --stats latents_stats.pt`): the official trainer normalised all 128 channels with that
    file, so the converted DA-VAE's base transform and detail statistics are exactly the DiT's input
    normalisation. `preset` gives the architecture and the sampling recipe (`imagenet-512-official`)."""
    from .backend import get_backend
    from .lightningdit_weights import load_lightningdit_weights
    from ..exports import export_adapted, sampling_facts
    from ..vae.model import DetailAlignedVAE

    ckpt, vae_dir, out = Path(ckpt), Path(vae_dir), Path(out)
    _check_dit_job(out, preset, "lightningdit", "a LightningDiT (use imagenet-512-official)", ckpt)
    vae = DetailAlignedVAE.from_pretrained(vae_dir)
    c, d = int(vae.config.base_channels), int(vae.config.detail_channels)
    if bool(torch.all(vae.detail_mean == 0)) and bool(torch.all(vae.detail_std == 1)):
        raise DavaeError(f"{vae_dir}: the DA-VAE has no detail statistics; convert it with the official 128-channel "
                         f"latents_stats.pt (davae convert imagenet-davae ... --stats latents_stats.pt)")
    backend = get_backend(preset)
    arch_c = int(preset.dit.arch.get("in_channels", c))
    if arch_c != c:
        raise DavaeError(f"dit.arch.in_channels = {arch_c}, but the DA-VAE has C = {c} base channels")
    model = backend.load("random")
    backend.extend(model, d)
    load_lightningdit_weights(model, ckpt, prefer_ema=True, trust_pickle=allow_pickle)
    stats = {"mean": [float(v) for v in vae.detail_mean], "std": [float(v) for v in vae.detail_std],
             "source": "the official latent statistics (channels C..C+D), via the converted DA-VAE", "view": "raw"}
    facts = sampling_facts(preset, vae, vae_dir, backend, model, str(ckpt), 0, detail_stats=stats)
    facts["converted_from"] = {"checkpoint": str(ckpt.resolve()), "code": "caixin98/DA-VAE lightningdit/train.py"}
    out.parent.mkdir(parents=True, exist_ok=True)
    export_adapted(backend, model, facts, out, trained=False)
    return {"out": str(out), "parameters": sum(p.numel() for p in model.parameters()), "channels": c + d,
            "use_qknorm": bool(preset.dit.arch.get("use_qknorm", False)), "vae": str(vae_dir),
            "sample_shift": facts["sample_shift"], "sampling": facts["sampling"]}


SD3_TRAINING_ONLY = ("encoder_alignment_proj.", "loss.", "discriminator.")


def convert_sd3_davae(ckpt: str | Path, base_vae: str | Path, out: str | Path, preset: Preset, *,
                      allow_pickle: bool = False) -> dict:
    """The official SD3 DA-VAE tokenizer (`sd3/modeling/modules/sd3_da_vae.py`, `SD3_DAAutoencoder` in the
    shipped `da_mode: diff`; its `pytorch_model.bin` / state dict) -> a davae DA-VAE folder on the SD3(.5) VAE
    `base_vae` (a diffusers folder, a pipeline folder with `vae/`, or a hub id).

    Its keys, diffusers-named: `vae.encoder.*` (the SD3 encoder, frozen: the detail trunk), `vae.decoder.*`
    (trained: the decoder, entered after its conv_in), `dc_down.conv.*` (3x3 conv to 2D/4 + pixel-unshuffle,
    with a parameter-free group mean of 64 channels added to mean and logvar), `dc_up.conv.*` (3x3 conv +
    pixel-shuffle + repeat shortcut, reading [z_detail, z_base] detail first), and, when it was saved with
    its teacher, `original_vae_model.vae.*` (the base VAE: checked against `base_vae`). The converted folder
    sets `detail_shortcut: group_mean_moments`, `up_input_order: detail_first` and `base_resize: plain_clamp`
    (the official base image: bicubic without antialiasing, clamped), so it computes what the official model
    computes, while its latent stays base first. The official code does not normalise the detail channels
    for its DiT (its statistics file is never found), so the folder's detail statistics stay 0 / 1."""
    from ..exports import export_davae
    from ..vae.base import load_base_vae
    from ..vae.model import DetailAlignedVAE

    ckpt, out = Path(ckpt), Path(out)
    if out.exists():
        raise DavaeError(f"{out} already exists (choose a new folder)")
    src = f"official SD3 DA-VAE {ckpt}"
    state = _read_state(ckpt, allow_pickle)
    key = next((k for k in state if k.endswith("dc_down.conv.weight")), None)
    if key is None:
        raise DavaeError(f"{src}: no dc_down.conv.weight: not an official SD3 DA-VAE checkpoint")
    head = key[: -len("dc_down.conv.weight")]
    sd = _sub(state, head)
    spec = str(base_vae)
    sub = "vae" if (Path(spec) / "vae" / "config.json").is_file() else (
        preset.vae.base_vae_subfolder if not Path(spec).exists() else None)
    base = load_base_vae(spec, sub, latent_channels=preset.vae.base_channels)
    v = replace(preset.vae, base_vae=spec, base_vae_subfolder=sub, detail_features="trunk",
                detail_shortcut="group_mean_moments", decoder_input="trunk", up_shortcut="repeat", up_hidden=0,
                down_hidden=0, down_blocks=0, up_blocks=0, up_input="latent", learn_logvar=True, logvar_init=0.0,
                base_resize="plain_clamp", decoder_base_space="transformed", up_input_order="detail_first",
                base_latent_transform="config")
    model = DetailAlignedVAE.from_base(base, v)
    used: set[str] = set()

    def load_into(module: torch.nn.Module, prefix: str, what: str, skip: tuple = ()) -> int:
        own = module.state_dict()
        part = _sub(sd, prefix)
        extra = [k for k in part if k not in own]
        if extra:
            raise DavaeError(f"{src}: weight {head}{prefix}{extra[0]} has no place in the davae model")
        missing = [k for k in own if k not in part and not k.startswith(skip)]
        if missing:
            raise DavaeError(f"{src}: {len(missing)} {what} weights are missing (first: {head}{prefix}{missing[0]})")
        for k, t in part.items():
            if t.shape != own[k].shape:
                raise DavaeError(f"{src}: weight {head}{prefix}{k} has shape {tuple(t.shape)}, the {preset.name} "
                                 f"architecture expects {tuple(own[k].shape)}")
        module.load_state_dict({**own, **{k: t.float() for k, t in part.items()}})
        used.update(prefix + k for k in part)
        return len(part)

    n = load_into(model.detail_trunk.encoder, "vae.encoder.", "encoder")
    n += load_into(model.decoder_trunk.decoder, "vae.decoder.", "decoder")
    n += load_into(model.down.conv, "dc_down.conv.", "dc_down")
    n += load_into(model.up.conv, "dc_up.conv.", "dc_up")
    teacher = _sub(sd, "original_vae_model.vae.")
    if teacher:
        ours = base.vae.state_dict()
        diff = next((k for k, t in teacher.items() if k not in ours or not torch.equal(t.float(), ours[k].float())), None)
        if diff is not None:
            raise DavaeError(f"{src}: its teacher VAE differs from the base VAE {spec} (first: {diff}); pass the "
                             f"SD3 VAE the DA-VAE was trained with")
        used.update("original_vae_model.vae." + k for k in teacher)
    # the VAE's own quant convs (absent from SD3.5's VAE) are unused by the DA-VAE
    unused = [k for k in sd if k not in used and not k.startswith(SD3_TRAINING_ONLY + ("vae.quant_conv.", "vae.post_quant_conv."))]
    if unused:
        raise DavaeError(f"{src}: weight {head}{unused[0]} has no place in the davae model")
    out.parent.mkdir(parents=True, exist_ok=True)
    export_davae(model, out, trained=False)
    return {"out": str(out), "weights": n, "base_vae": spec, "teacher_checked": bool(teacher),
            "detail_stats": "0 / 1: the official SD3 code feeds its DiT the raw detail channels",
            "base_resize": "plain_clamp", "up_input_order": "detail_first", "checkpoint_prefix": head}


def _read_lora(path: Path) -> tuple[Path, dict]:
    """(the safetensors file, its tensors) of a diffusers LoRA folder (`pytorch_lora_weights.safetensors`) or
    file; a `transformer.` prefix (pipeline-level LoRA files) is removed."""
    from safetensors.torch import load_file

    f = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    if not f.is_file():
        raise DavaeError(f"{path}: no pytorch_lora_weights.safetensors (the official trainer's lora_step_N folder)")
    try:
        sd = load_file(str(f))
    except Exception as e:  # noqa: BLE001
        raise DavaeError(f"{f}: not a readable safetensors file ({first_line(e, 160)})") from None
    if any(k.startswith("transformer.") for k in sd):
        sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    if not any(".lora_A." in k for k in sd):
        raise DavaeError(f"{f}: no LoRA weights (lora_A / lora_B) in the file")
    return f, sd


def convert_sd3_dit(heads: str | Path, lora: str | Path, vae_dir: str | Path, out: str | Path, preset: Preset, *,
                    dit: Optional[str] = None, lora_alpha: Optional[float] = None, allow_pickle: bool = False) -> dict:
    """The official SD3.5 adaptation (`sd3/omini/train_sd3_davae`: `step_N.pt` with the tokenizer patch embedder
    and output head, `SplitAddConv2d` / `ConcatLinearHead` branches in the detail-first order, plus the peft LoRA
    saved by diffusers' `save_lora_adapter` in `lora_step_N/`) -> a davae adapted-DiT folder: the pretrained
    transformer (`dit`, default the preset's) with the LoRA merged and the two heads written as davae's widened,
    base-first layers (input conv: [base | detail] columns, biases summed; output rows (p, q, c) with the base
    channels first in each patch position). `vae_dir`: the converted official SD3 DA-VAE. The LoRA's alpha comes
    from the file's metadata, else `lora_alpha`, else its rank (the official recipe: alpha = rank = 256)."""
    from .backend import get_backend
    from .sd3 import extend_sd3
    from ..exports import export_adapted, sampling_facts
    from ..vae.model import DetailAlignedVAE

    heads, lora, vae_dir, out = Path(heads), Path(lora), Path(vae_dir), Path(out)
    _check_dit_job(out, preset, "sd3", "an SD3.5 adaptation (use sd35m-1024-official)", heads)
    try:
        obj = torch.load(str(heads), map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001
        raise DavaeError(f"{heads}: not a readable checkpoint ({first_line(e, 160)})") from None
    hs = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    names = {"conv_b": "tokenizer_patch_embed.proj.base_conv", "conv_e": "tokenizer_patch_embed.proj.extra_conv",
             "lin_b": "project_out.base_linear", "lin_e": "project_out.extra_linear"}
    if not isinstance(hs, dict) or f"{names['conv_e']}.weight" not in hs:
        raise DavaeError(f"{heads}: no {names['conv_e']}.weight: not the official trainer's step_N.pt (the branch "
                         f"heads, augment_mode branch)")
    vae = DetailAlignedVAE.from_pretrained(vae_dir)
    c, d = int(vae.config.base_channels), int(vae.config.detail_channels)
    backend = get_backend(preset)
    spec = dit or preset.dit.pretrained
    model = backend.load(spec)
    if int(model.config.in_channels) != c:
        raise DavaeError(f"the transformer {spec} reads {model.config.in_channels} channels, the DA-VAE has C = {c}")
    model, f, rank, alpha, targets = _merge_sd3_lora(model, lora, lora_alpha, spec)
    extend_sd3(model, d)
    _copy_sd3_heads(model, hs, names, heads, c, d)
    stats = {"mean": [0.0] * d, "std": [1.0] * d, "view": "raw",
             "source": "none: the official SD3 code feeds its DiT the raw detail channels"}
    facts = sampling_facts(preset, vae, vae_dir, backend, model, str(spec), 0, detail_stats=stats)
    facts["converted_from"] = {"heads": str(heads.resolve()), "lora": str(f.resolve()), "lora_alpha": alpha,
                               "code": "caixin98/DA-VAE sd3/omini/train_sd3_davae"}
    out.parent.mkdir(parents=True, exist_ok=True)
    export_adapted(backend, model, facts, out, trained=False)
    return {"out": str(out), "lora_rank": rank, "lora_alpha": alpha, "lora_targets": len(targets),
            "base_transformer": str(spec), "vae": str(vae_dir), "sample_shift": facts["sample_shift"]}


def _merge_sd3_lora(model, lora: Path, lora_alpha: Optional[float], spec: str):
    """`model` with the official peft LoRA (`lora_step_N/`) loaded and merged; returns (merged model, the LoRA file,
    rank, alpha, target modules). alpha: the file's metadata, else `lora_alpha`, else the rank."""
    import json

    from .diffusers_family import merged_copy

    f, lsd = _read_lora(lora)
    rank = next(v.shape[0] for k, v in lsd.items() if ".lora_A." in k)
    from peft import LoraConfig, set_peft_model_state_dict

    meta_alpha = None
    try:
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata() or {}
        for key in ("lora_adapter_metadata", "transformer.lora_adapter_metadata"):
            if key in meta:
                meta_alpha = json.loads(meta[key]).get("lora_alpha")
    except Exception:  # noqa: BLE001 - metadata is optional
        meta_alpha = None
    alpha = float(meta_alpha if meta_alpha is not None else lora_alpha if lora_alpha is not None else rank)
    targets = sorted({k.split(".lora_A.")[0] for k in lsd if ".lora_A." in k})
    have = {n for n, _ in model.named_modules()}
    strange = [t for t in targets if t not in have]
    if strange:
        raise DavaeError(f"{f}: LoRA weights for {strange[0]}, which the transformer {spec} does not have (a LoRA of "
                         f"another model?)")
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    res = set_peft_model_state_dict(model, lsd, adapter_name="default")
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    if unexpected:
        raise DavaeError(f"{f}: LoRA weight {unexpected[0]} has no place in the transformer {spec}")
    missing_lora = [k for k in (getattr(res, "missing_keys", []) or []) if "lora_" in k]
    if missing_lora:
        raise DavaeError(f"{f}: {len(missing_lora)} LoRA weights are missing (first: {missing_lora[0]})")
    model = merged_copy(model)
    return model, f, rank, alpha, targets


def _copy_sd3_heads(model, hs: dict, names: dict, heads: Path, c: int, d: int) -> None:
    """The official branch heads (`hs`: base and extra conv / linear) into the widened, base-first layers of the
    extended `model`: input conv [base | detail] columns with biases summed, output rows (p, q, c) base first."""
    p = int(model.config.patch_size)
    conv, head = model.pos_embed.proj, model.proj_out
    want = {f"{names['conv_b']}.weight": (conv.weight.shape[0], c, p, p), f"{names['conv_e']}.weight": (conv.weight.shape[0], d, p, p),
            f"{names['lin_b']}.weight": (p * p * c, head.weight.shape[1]), f"{names['lin_e']}.weight": (p * p * d, head.weight.shape[1])}
    for k, shape in want.items():
        if k not in hs:
            raise DavaeError(f"{heads}: weight {k} is missing")
        if tuple(hs[k].shape) != shape:
            raise DavaeError(f"{heads}: weight {k} has shape {tuple(hs[k].shape)}, expected {shape} (C = {c}, D = {d}, p = {p})")
    with torch.no_grad():
        conv.weight.copy_(torch.cat([hs[f"{names['conv_b']}.weight"], hs[f"{names['conv_e']}.weight"]], 1))
        conv.bias.copy_(hs[f"{names['conv_b']}.bias"] + hs[f"{names['conv_e']}.bias"])
        wb = hs[f"{names['lin_b']}.weight"].reshape(p * p, c, -1)
        we = hs[f"{names['lin_e']}.weight"].reshape(p * p, d, -1)
        head.weight.copy_(torch.cat([wb, we], 1).reshape(p * p * (c + d), -1))
        bb = hs[f"{names['lin_b']}.bias"].reshape(p * p, c)
        be = hs[f"{names['lin_e']}.bias"].reshape(p * p, d)
        head.bias.copy_(torch.cat([bb, be], 1).reshape(-1))
    known = {f"{n}.{w}" for n in names.values() for w in ("weight", "bias")}
    unused = [k for k in hs if k not in known and not k.endswith("pos_embed")]
    if unused:
        raise DavaeError(f"{heads}: weight {unused[0]} has no place in the davae model")


# ------------------------------------------------------------------------------------- the conversion table
from .registry import OFFICIAL_KINDS  # noqa: E402 - the table lives import-free for the command line


def convert_official(kind: str, checkpoint: Path, out: Path, preset: Preset, inputs: dict,
                     allow_pickle: bool = False) -> tuple[dict, str]:
    """Run the conversion of `kind` (a key of OFFICIAL_KINDS) with `inputs` (checked against the table:
    a missing required input or one that does not apply is one line); returns (report, one-line summary)."""
    spec = OFFICIAL_KINDS[kind]
    for name, given in inputs.items():
        if given is not None and name not in spec["needs"] + spec["optional"]:
            raise DavaeError(f"does not apply to `convert {kind}`", param=name)
    for name in spec["needs"]:
        if inputs.get(name) is None:
            raise DavaeError(f"is required to convert {kind}", param=name)
    i = inputs
    if kind == "imagenet-davae":
        report = convert_imagenet_davae(checkpoint, i["base_vae"], i["stats"], out, preset, allow_pickle=allow_pickle)
        return report, f"converted {report['weights']} weights; detail statistics: {report['detail_stats']}"
    if kind == "sd3-davae":
        report = convert_sd3_davae(checkpoint, i["base_vae"], out, preset, allow_pickle=allow_pickle)
        return report, f"converted {report['weights']} weights; detail statistics: {report['detail_stats']}"
    if kind == "sd3-dit":
        report = convert_sd3_dit(checkpoint, i["lora"], i["vae"], out, preset, dit=i.get("dit"),
                                 lora_alpha=i.get("lora_alpha"), allow_pickle=allow_pickle)
        return report, (f"merged a rank-{report['lora_rank']} LoRA (alpha {report['lora_alpha']:g}) on "
                        f"{report['lora_targets']} modules into {report['base_transformer']}")
    report = convert_lightningdit(checkpoint, i["vae"], out, preset, allow_pickle=allow_pickle)
    return report, (f"converted {report['parameters']:,} parameters ({report['channels']} channels, "
                    f"QK-norm {report['use_qknorm']})")
