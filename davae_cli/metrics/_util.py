"""Small helpers shared by the metrics modules."""

from __future__ import annotations

def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0][:160] if s else type(e).__name__)
