"""Features of image folders: listing, clean-fid's resizing, batched extraction, and the on-disk cache
under `$DAVAE_CACHE_DIR/fid-features/` (default `~/.cache/davae/fid-features/`), keyed by a hash of the
relative paths, sizes and mtimes of a folder's image files, the extractor's sha256 and the mode."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import data as D
from ..errors import DavaeError
from ._util import _first_line, write_npz_cache
from .extractors import RESIZE, FeatureExtractor

CACHE_VERSION = "davae-fid-features-1"

# (phase, done, total): called after every batch; total is None while unknown
ProgressFn = Callable[[str, int, Optional[int]], None]


def cache_root() -> Path:
    """`$DAVAE_CACHE_DIR/fid-features`, or `~/.cache/davae/fid-features`."""
    base = os.environ.get("DAVAE_CACHE_DIR") or os.path.join("~", ".cache", "davae")
    return Path(base).expanduser() / "fid-features"


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
        write_npz_cache(path, "feature", notes, feats=fs.feats, skipped=np.array(json.dumps(fs.skipped)))
    return _check_usable(fs, folder, role)


def _check_usable(fs: FeatureSet, folder, role: str) -> FeatureSet:
    if fs.num < 2:
        raise DavaeError(f"{role} folder {folder}: {fs.num} usable image(s) ({len(fs.skipped)} unreadable); "
                         f"FID needs at least 2")
    return fs
