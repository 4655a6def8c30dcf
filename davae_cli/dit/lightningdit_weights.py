"""Reading LightningDiT weights: a `.pt` / `.pth` / `.bin` / `.ckpt` checkpoint (a state dict or a dict with 'ema' /
'model' / ...), a `.safetensors` file or a diffusers folder, loaded strictly into a `lightningdit.LightningDiT`
with one-line errors for anything that does not match (`load_lightningdit_weights`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import DavaeError, first_line

if TYPE_CHECKING:
    from .lightningdit import LightningDiT

__all__ = ["load_lightningdit_weights"]

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
