"""Loading a diffusers transformer (SD3, FLUX) from `random`, a local folder or a hub id, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import DavaeError, first_line


def load_transformer(cls, spec: str, subfolder: Optional[str], arch: Optional[dict], *, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device=None, hub_hint: str = ""):
    """`spec`: "random" (a new `cls` from `arch`, seeded, initialised on `device`: a GPU is much faster for
    billions of parameters, and the values then differ from a CPU initialisation), a local folder (a model
    folder, or a pipeline folder with `subfolder`), or a hub id. A folder holding another class is refused."""
    name = cls.__name__
    if spec == "random":
        if not arch:
            raise DavaeError(f"dit.arch is empty: a random {name} needs its config (its constructor's kwargs)")
        try:
            dev = torch.device(device or "cpu")
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), dev:
                torch.manual_seed(seed)
                model = cls(**arch)
        except TypeError as e:
            raise DavaeError(f"dit.arch: not a valid {name} config ({e})") from None
        return model if dtype == torch.float32 else model.to(dtype)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DavaeError(f"{spec}: a {name} is a diffusers folder, not a file", param="dit")
        folder = path
        if not (folder / "config.json").is_file() and subfolder and (folder / subfolder / "config.json").is_file():
            folder = folder / subfolder
        if not (folder / "config.json").is_file():
            raise DavaeError(f"{spec}: no config.json (expected a {name} or pipeline folder)", param="dit")
        found = json.loads((folder / "config.json").read_text()).get("_class_name")
        if found not in (None, name):
            raise DavaeError(f"{spec}: holds a {found}, not a {name} (this preset's dit.backend needs a "
                             f"{name} checkpoint)", param="dit")
        try:
            return cls.from_pretrained(folder, torch_dtype=dtype)
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
            raise DavaeError(f"{spec}: unreadable ({first_line(e, 160)})", param="dit") from None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise DavaeError(f"{spec}: no such folder (and not a hub id like owner/name)", param="dit")
    try:
        return cls.from_pretrained(spec, subfolder=subfolder, torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001
        first = first_line(e, 160)
        raise DavaeError(f"cannot load the {name} {spec!r} ({first}); pass a local diffusers folder{hub_hint}") from None


# ---------------------------------------------------------------------------------------------- models
def check_fits_cpu(n_params: int, device: torch.device, what: str) -> None:
    import os

    if device.type != "cpu":
        return
    need = n_params * 4
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > 0.9 * free:
        raise DavaeError(f"{what} needs about {need / 2**30:.0f} GB in fp32 but this machine has no GPU and only "
                         f"{free / 2**30:.0f} GB free; run on a GPU")


def params_of_config(config_file: Path, cls) -> int:
    """Parameter count of a model folder's architecture (`cls` built from its config.json on the meta device,
    no memory used); 0 when the config cannot be built."""
    cfg = {k: v for k, v in json.loads(Path(config_file).read_text()).items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = cls.from_config(cfg)
    except Exception:  # noqa: BLE001 - an unknown config: no estimate
        return 0
    return sum(p.numel() for p in model.parameters())
