"""`davae presets`: list the bundled presets or print one, resolved, as YAML."""

from __future__ import annotations

from typing import Optional

import typer

from ..config import available_presets, read_preset_yaml
from .common import SetOpt, print_json, resolve_preset


def presets_cmd(
    name: Optional[str] = typer.Argument(None, help="A preset to print (name or YAML path)."),
    sets: Optional[list[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """List bundled presets, or print one with its --set overrides applied.

    Example: davae presets tiny --set train_vae.steps=50
    """
    if name is None:
        rows = {n: read_preset_yaml(n).get("description", "") for n in available_presets()}
        if json_out:
            print_json(rows)
        else:
            width = max(map(len, rows), default=0) + 1
            for n, d in rows.items():
                typer.echo(f"{n:{width}s} {d}")
        return
    p = resolve_preset(name, sets)
    if json_out:
        print_json(p.to_dict())
    else:
        typer.echo(p.to_yaml(), nl=False)
