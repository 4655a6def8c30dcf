"""davae: DA-VAE (plug-in latent compression for diffusion via detail alignment) as a library.

    from davae_cli import DetailAlignedVAE, load_preset
    from davae_cli import adapt_dit, generate, run_bench     # the work behind the CLI commands
"""

from .config import ConfigError, Preset, available_presets, load_preset
from .errors import DavaeError
from .vae.base import load_base_vae
from .vae.model import DetailAlignedVAE

from .bench import BenchSettings, run_bench
from .generate import GenerateSettings, generate
from .train.dit import adapt_dit, build_adapted_dit
from .train.vae import train_vae

__version__ = "0.1.0"
__all__ = ["BenchSettings", "ConfigError", "DavaeError", "DetailAlignedVAE", "GenerateSettings", "Preset", "adapt_dit",
           "available_presets", "build_adapted_dit", "generate", "load_base_vae", "load_preset", "run_bench",
           "train_vae"]
