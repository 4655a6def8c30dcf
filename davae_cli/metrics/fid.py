"""The Fréchet and kernel distances: clean-fid's (`frechet_distance`, `kernel_distance`) on float64
statistics; KID subsets are drawn with a fixed seed so that a rerun gives the same value."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Optional

import numpy as np

from ..errors import DavaeError
from ._util import _first_line

KID_SEED = 0


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
