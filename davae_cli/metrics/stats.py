"""Reference statistics: `.npz` files (mu, sigma, optional feats, the protocol) and clean-fid's named
statistics (NAME[:RES[:SPLIT]]), with the checks that they match the extractor in use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DavaeError
from ._util import _first_line
from .extractors import CLEANFID_TIMEOUT_S, FeatureExtractor, _quiet


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
        raise DavaeError(f"{spec!r}: expected an .npz file or NAME[:RES[:SPLIT]], e.g. cifar10:32:train", param="ref_stats")
    if len(parts) == 1:
        return parts[0], "na", "custom"
    res = parts[1]
    if not res.isdigit():
        raise DavaeError(f"{spec!r}: RES must be a number of pixels, e.g. cifar10:32:train", param="ref_stats")
    return parts[0], res, parts[2] if len(parts) == 3 and parts[2] else "train"


def is_stats_file(spec: str) -> bool:
    return spec.lower().endswith(".npz") or Path(spec).expanduser().is_file()


def load_stats_npz(path: str | Path) -> RefStats:
    """`mu`/`sigma` (+ optional `feats`, `num_images`, `protocol`) from an .npz: ours, clean-fid's, or
    an ADM reference batch (which also holds `arr_0`, `mu_s`, ...; only `mu`/`sigma` are read)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DavaeError(f"{path}: file not found", param="ref_stats")
    try:
        z = np.load(p, allow_pickle=False)
        keys = list(z.files)
    except Exception as e:
        raise DavaeError(f"{path}: not a readable .npz ({_first_line(e)})", param="ref_stats") from None
    with z:
        if "mu" not in keys or "sigma" not in keys:
            raise DavaeError(f"{path}: no `mu` and `sigma` arrays in it (it holds: {', '.join(keys) or 'nothing'})", param="ref_stats")
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
        raise DavaeError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (F,) and (F, F)", param="ref_stats")
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
        raise DavaeError(f"{spec}: clean-fid statistics {fname} are not available ({_first_line(e)}); "
                         f"put the file in {folder} or pass an .npz", param="ref_stats") from None
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
