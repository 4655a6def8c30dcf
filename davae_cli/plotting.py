"""matplotlib behind one door: the optional `plot` extra, figures drawn by the Agg canvas, PNG files written
atomically.

Figures are `matplotlib.figure.Figure` objects on their own Agg canvas, never pyplot's: no global figure list to
close, and no backend switched under a caller who uses another one (a notebook). The bench plot and the run report
both go through here.
"""

from __future__ import annotations

import io
from pathlib import Path

from .errors import DavaeError

EXTRA_HINT = 'pip install "davae[plot]"'


def new_figure(width: float, height: float, dpi: int = 110):
    """An empty figure of `width` x `height` inches on an Agg canvas; a missing matplotlib is one line naming
    the extra that installs it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DavaeError(f"plots need matplotlib, an optional extra: {EXTRA_HINT}") from None
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def require_matplotlib() -> None:
    """Fail now, before minutes of work whose plot could not be drawn."""
    new_figure(1, 1)


def png_bytes(fig, title: str | None = None) -> bytes:
    """The figure as PNG; `title` also goes into the file's Title text chunk (what a viewer or PIL's
    `Image.text` shows without reading pixels)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Title": title} if title else None)
    return buf.getvalue()


def plain_log_ticks(axis, decades: float = 1.0) -> None:
    """A log axis labelled in plain numbers: 1, 2, 5 x 10^k over up to 3 `decades`, the powers of ten alone over
    more (matplotlib's default labels only the decades, often none at all over a short range)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())


def check_output(path: str | Path, overwrite: bool, param: str = "out") -> Path:
    """`path` as a Path, refused (one line) when it names a folder, or exists and `overwrite` is False."""
    path = Path(path)
    if path.is_dir():
        raise DavaeError(f"{path} is a folder: give a file name", param=param)
    if path.exists() and not overwrite:
        raise DavaeError(f"{path} exists (--overwrite replaces it)")
    return path


def write_output(path: str | Path, data: bytes, overwrite: bool, param: str = "out") -> Path:
    """Write `data` to `path` atomically (a reader never sees half a file), refusing to replace an existing
    file unless `overwrite`."""
    from .latents import atomic_write_bytes

    path = check_output(path, overwrite, param)
    atomic_write_bytes(path, data)
    return path
