"""The Fréchet and kernel distances on float64 statistics: the Fréchet distance by symmetric eigendecomposition
(equal to clean-fid's `frechet_distance`, faster), clean-fid's `kernel_distance` for KID with its subsets drawn
with a fixed seed so that a rerun gives the same value."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import DavaeError

KID_SEED = 0


def frechet(mu1, sigma1, mu2, sigma2, notes: Optional[list] = None) -> float:
    """The Fréchet distance |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), the quantity clean-fid's
    `frechet_distance` computes, with the trace term taken from the symmetric form S1^1/2 S2 S1^1/2 (same
    eigenvalues as S1 S2): two symmetric eigendecompositions instead of scipy's `sqrtm` of a non-symmetric
    product — about 4x faster at 2048 dimensions (4 s against 17 s on a 2-core CPU) and free of its complex
    round-off. Agrees with clean-fid's value to ~1e-12 relative on full-rank statistics (tests). With fewer
    images than feature dimensions the covariances are singular; `notes` says so."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise DavaeError(f"the Fréchet distance needs statistics of one dimension (got {mu1.shape}, {s1.shape} "
                         f"and {mu2.shape}, {s2.shape})")
    if not (np.isfinite(s1).all() and np.isfinite(s2).all()):
        raise DavaeError("the Fréchet distance could not be computed (non-finite covariance); too few images?")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    if notes is not None and (w < 1e-10 * max(float(w.max()), 1e-300)).any():
        notes.append("the feature covariance is singular (fewer images than feature dimensions?): the FID is "
                     "computed, but it is biased and noisy at this sample size")
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^1/2
    m = root @ s2 @ root
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def kid(feats1: np.ndarray, feats2: np.ndarray, seed: int = KID_SEED) -> float:
    """clean-fid's KID (100 subsets of min(n1, n2, 1000)), with numpy's global RNG seeded and restored."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)))
    finally:
        np.random.set_state(state)
