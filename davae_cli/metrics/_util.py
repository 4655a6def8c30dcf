"""Small helpers shared by the metrics modules."""

from __future__ import annotations

from ..errors import first_line


def _first_line(e: BaseException) -> str:
    return first_line(e, 160)
