"""davae: DA-VAE (plug-in latent compression for diffusion via detail alignment) as a library.

    from davae_cli import DetailAlignedVAE, load_preset
    from davae_cli import adapt_dit, generate, run_bench     # the work behind the CLI commands

The names below are imported on first use (PEP 562), so `import davae_cli` and the command line's
`--help` do not load torch or diffusers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ConfigError": ".config", "Preset": ".config_schema", "available_presets": ".config", "load_preset": ".config",
    "DavaeError": ".errors",
    "load_base_vae": ".vae.base",
    "DetailAlignedVAE": ".vae.model",
    "BenchSettings": ".bench", "run_bench": ".bench", "run_bench_sweep": ".bench", "plot_bench": ".bench",
    "write_report": ".metrics.report", "model_card": ".cards", "write_model_card": ".cards",
    "GenerateSettings": ".pipeline", "generate": ".generate",
    "DAVAEPipeline": ".pipeline", "DAVAEPipelineOutput": ".pipeline",
    "adapt_dit": ".train.dit", "build_adapted_dit": ".train.dit",
    "train_vae": ".train.vae",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


class _PackageFace(types.ModuleType):
    """`davae_cli.generate` is the function, as it was before the names became lazy: importing the submodule
    of the same name must not rebind the package attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PackageFace
