"""The pretrained base VAE: loading (hub id, local folder, a single LDM-layout checkpoint file such as the
official VA-VAE release, or `random`), identity hash, latent transform."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..devices import cpu_channels_last
from ..errors import DavaeError, first_line

RANDOM_BASE = "random"
SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def random_base_config(latent_channels: int = 16) -> dict:
    """A small f8 AutoencoderTiny (about 0.3M parameters) for CPU demos and tests."""
    return {
        "_class_name": "AutoencoderTiny",
        "in_channels": 3,
        "out_channels": 3,
        "encoder_block_out_channels": [16, 16, 16, 16],
        "decoder_block_out_channels": [16, 16, 16, 16],
        "num_encoder_blocks": [1, 1, 1, 1],
        "num_decoder_blocks": [1, 1, 1, 1],
        "latent_channels": latent_channels,
        "act_fn": "relu",
        "upsample_fn": "nearest",
        "upsampling_scaling_factor": 2,
        "latent_magnitude": 3,
        "latent_shift": 0.5,
        "force_upcast": False,
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
    }


def vae_from_config(config: dict) -> nn.Module:
    """Instantiate (random weights) a diffusers AutoencoderKL / AutoencoderTiny from its config dict."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    cls_name = config.get("_class_name", "AutoencoderKL")
    cls = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}.get(cls_name)
    if cls is None:
        raise DavaeError(f"base VAE class {cls_name!r} is not supported (supported: {', '.join(SUPPORTED_CLASSES)})")
    import inspect

    known = set(inspect.signature(cls.__init__).parameters)
    cfg = {k: v for k, v in config.items() if k in known}  # drop stale keys (e.g. TAESD's block_out_channels)
    return cls.from_config(cfg)


def state_dict_hash(module: nn.Module, prefixes: Optional[tuple[str, ...]] = None, header: str = "") -> str:
    """sha256 over the tensors of a module (names, shapes, bytes), for models built in code; `prefixes`: only
    the tensors whose names start with one of them; `header`: text hashed first (e.g. settings)."""
    h = hashlib.sha256(header.encode())
    for name, t in sorted(module.state_dict().items()):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().to(torch.float32).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def folder_hash(folder: Path) -> str:
    """sha256 over a diffusers model folder's config and weight files (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json"))
    for p in files:
        h.update(p.name.encode())
        if p.name == "config.json":
            # the diffusers version stamp changes on re-save and says nothing about the weights
            cfg = json.loads(p.read_text())
            cfg.pop("_diffusers_version", None)
            h.update(json.dumps(cfg, sort_keys=True).encode())
            continue
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class BaseVAE:
    """A loaded, frozen base VAE and what identifies it."""

    vae: nn.Module
    source: str  # what the user gave: hub id, folder, or "random"
    subfolder: Optional[str]
    content_hash: str

    @property
    def kind(self) -> str:
        return "tiny" if type(self.vae).__name__ == "AutoencoderTiny" else "kl"

    @property
    def config(self) -> dict:
        cfg = dict(self.vae.config)
        cfg["_class_name"] = type(self.vae).__name__
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k != "_diffusers_version"}


def _resolve_folder(spec: str, subfolder: Optional[str]) -> Path:
    """A local folder for `spec` (a path, or a hub id fetched into the local cache)."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DavaeError(f"base VAE {spec!r} is a file; expected a diffusers model folder")
        if subfolder and (p / subfolder / "config.json").is_file():
            return p / subfolder
        if (p / "config.json").is_file():
            return p
        if (p / "vae" / "config.json").is_file():  # a pipeline folder
            return p / "vae"
        raise DavaeError(f"base VAE folder {spec!r} has no config.json (nor vae/config.json)")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise DavaeError(f"base VAE {spec!r} not found (expected a local diffusers folder or a hub id like owner/name)")
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/*"] if subfolder else ["config.json", "*.safetensors"]
        local = Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all mean "cannot get it"
        reason = first_line(e, 160)
        raise DavaeError(
            f"cannot fetch base VAE {spec!r} from the hub ({reason}); pass a local diffusers folder with --base-vae "
            f"(or `huggingface-cli login` for gated models)"
        ) from None
    folder = local / subfolder if subfolder else local
    if not (folder / "config.json").is_file():
        raise DavaeError(f"base VAE {spec!r} has no config.json in {folder}")
    return folder


SINGLE_FILE_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors")


def is_single_file(spec: Optional[str]) -> bool:
    """Whether `spec` names one checkpoint file (LDM/taming layout) rather than a diffusers folder."""
    if not spec or spec == RANDOM_BASE:
        return False
    p = Path(spec).expanduser()
    return p.is_file() and p.suffix in SINGLE_FILE_SUFFIXES


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def load_single_file_vae(path: Path, arch: Optional[dict]) -> nn.Module:
    """An AutoencoderKL from one checkpoint file in the LDM/taming key layout (the official VA-VAE f16d32
    release: `.pt`/`.ckpt` with a `state_dict`, or `.safetensors`), built from `arch` (a diffusers config
    dict) and filled by `vae.ldm.convert_ldm_vae_state`: every VAE weight of the file must land on the
    model and every weight of the model must come from the file (one line naming the first that does not).
    Training-only entries (loss, discriminator, the vision foundation model) are dropped."""
    from .ldm import convert_ldm_vae_state, strip_prefix

    if not arch:
        raise DavaeError(f"base VAE {path}: a single checkpoint file needs the VAE's architecture "
                         f"(vae.base_vae_arch, a diffusers AutoencoderKL config)")
    if arch.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise DavaeError(f"base VAE {path}: single checkpoint files load as AutoencoderKL, but vae.base_vae_arch "
                         f"names {arch.get('_class_name')}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one line
        raise DavaeError(f"base VAE {path}: not a readable checkpoint ({first_line(e, 160)})") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DavaeError(f"base VAE {path}: expected a state dict")
    state = strip_prefix(state)
    if not any(k.startswith("encoder.") for k in state):
        raise DavaeError(f"base VAE {path}: no LDM-layout VAE weights (encoder.*, decoder.*) in the file")
    try:
        vae = vae_from_config({**arch, "_class_name": "AutoencoderKL"})
    except DavaeError:
        raise
    except Exception as e:  # noqa: BLE001 - a config diffusers rejects
        raise DavaeError(f"base VAE {path}: vae.base_vae_arch is not a valid AutoencoderKL config "
                         f"({first_line(e, 160)})") from None
    converted = convert_ldm_vae_state(state, vae.state_dict(), f"base VAE {path}")
    vae.load_state_dict(converted, strict=True)
    return vae


def load_base_vae(spec: str, subfolder: Optional[str] = None, latent_channels: int = 16,
                  arch: Optional[dict] = None) -> BaseVAE:
    """Load a frozen base VAE from a hub id, a local folder, one LDM-layout checkpoint file (with `arch`, its
    diffusers config; identity = the file's sha256), or `random` (seeded, built in code from `arch`, or a
    small AutoencoderTiny when `arch` is empty)."""
    if is_single_file(spec):
        path = Path(spec).expanduser()
        vae = load_single_file_vae(path, arch)
        vae.eval().requires_grad_(False)
        return BaseVAE(vae, spec, None, file_hash(path))
    if spec == RANDOM_BASE:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same `random` base on every machine, so its hash is stable
        try:
            vae = vae_from_config(dict(arch) if arch else random_base_config(latent_channels))
        finally:
            torch.random.set_rng_state(gen_state)
        vae.eval().requires_grad_(False)
        return BaseVAE(vae, RANDOM_BASE, None, state_dict_hash(vae))
    folder = _resolve_folder(spec, subfolder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DavaeError(f"base VAE config {folder / 'config.json'} is unreadable: {e}") from None
    cls_name = cfg.get("_class_name", "AutoencoderKL")
    if cls_name not in SUPPORTED_CLASSES:
        raise DavaeError(f"base VAE class {cls_name!r} in {folder} is not supported ({', '.join(SUPPORTED_CLASSES)})")
    import diffusers

    cls = getattr(diffusers, cls_name)
    try:
        vae = cls.from_pretrained(str(folder))
    except Exception as e:
        raise DavaeError(f"cannot load base VAE from {folder}: {first_line(e, 200)}") from None
    vae.eval().requires_grad_(False)
    return BaseVAE(vae, spec, subfolder, folder_hash(folder))


class LatentTransform(nn.Module):
    """Maps the base VAE's posterior mean into the space the pretrained DiT was trained on, and back.

    SD3-style: `(mean - shift_factor) * scaling_factor` from the VAE config. LightningDiT-style:
    per-channel `(mean - m_c) / s_c` from the DiT's latent statistics. Stored as buffers, so the
    transform travels with the DA-VAE artifact.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    def set_affine(self, shift: float, scale: float) -> None:
        self.shift.fill_(shift)
        self.scale.fill_(scale)

    def set_per_channel(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.shift.copy_(mean.flatten())
        self.scale.copy_(1.0 / std.flatten())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift[:, None, None]) * self.scale[:, None, None]

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale[:, None, None] + self.shift[:, None, None]


def configure_transform(transform: LatentTransform, vae: nn.Module, vcfg) -> None:
    """Set `transform` as a DA-VAE on `vae` with the settings `vcfg` (a `config.VAEConfig`) uses it: per-channel
    statistics (`base_latent_transform: stats`) or the VAE config's shift and scale (SD3)."""
    if vcfg.base_latent_transform == "stats":
        if not vcfg.base_latent_stats:
            raise DavaeError("vae.base_latent_stats is required for a per-channel base latent transform")
        transform.set_per_channel(*load_latent_stats(vcfg.base_latent_stats, vcfg.base_channels))
    else:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scale = getattr(vae.config, "scaling_factor", None) or 1.0
        transform.set_affine(float(shift), float(scale))


def load_latent_stats(path: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std from a `.pt` (LightningDiT's latents_stats.pt) or `.safetensors` file."""
    p = Path(path)
    if not p.is_file():
        raise DavaeError(f"base latent statistics file not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(str(p))
    else:
        d = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or "mean" not in d or "std" not in d:
        raise DavaeError(f"{path}: expected a dict with 'mean' and 'std' tensors")
    mean, std = torch.as_tensor(d["mean"]).float().flatten(), torch.as_tensor(d["std"]).float().flatten()
    if mean.numel() != channels or std.numel() != channels:
        raise DavaeError(f"{path}: statistics have {mean.numel()} channels, the base VAE has {channels}")
    return mean, std


def conv_layout(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a convolutional fn, fed `cpu_channels_last(x)`; the result returned contiguous, as callers expect."""
    return fn(cpu_channels_last(x)).contiguous()


def base_encode_mean(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base VAE's posterior mean (KL) or deterministic latent (Tiny), untransformed. x in [-1, 1]."""
    # not conv_layout: oneDNN's channels-last results depend on the batch's composition (~1e-6), and z_base must
    # be the same for an image however it is batched (upscale --strength 0 returns it exactly)
    if type(vae).__name__ == "AutoencoderTiny":
        return vae.encoder(x)
    return vae.encode(x).latent_dist.mean


def base_decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Decode an untransformed base latent to an image in [-1, 1] (not clamped)."""
    if type(vae).__name__ == "AutoencoderTiny":
        return conv_layout(vae.decoder, z)
    return conv_layout(lambda t: vae.decode(t).sample, z)


def config_downsample_factor(config: dict) -> int:
    """f of a diffusers VAE from its config (config.json's `_class_name` says whether it is an AutoencoderTiny)."""
    if config.get("_class_name") == "AutoencoderTiny":
        return int(config["upsampling_scaling_factor"]) ** (len(config["encoder_block_out_channels"]) - 1)
    return 2 ** (len(config["block_out_channels"]) - 1)


def base_downsample_factor(vae: nn.Module) -> int:
    return config_downsample_factor({**dict(vae.config), "_class_name": type(vae).__name__})
