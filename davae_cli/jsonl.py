"""Reading a run's JSON-lines log (`log.jsonl`): every object line, with a torn or foreign line (a kill mid-write,
another tool's output) counted rather than fatal. Imports nothing from the package, so every layer may use it."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(the JSON object lines of `path` in order, how many other non-empty lines there were); ([], 0) when the
    file is absent."""
    path = Path(path)
    records, bad = [], 0
    if not path.is_file():
        return records, bad
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad
