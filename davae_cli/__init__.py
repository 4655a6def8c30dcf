"""davae: DA-VAE (plug-in latent compression for diffusion via detail alignment) as a library.

    from davae_cli import DetailAlignedVAE, load_preset
"""

from .config import ConfigError, Preset, available_presets, load_preset
from .errors import DavaeError
from .vae.base import load_base_vae
from .vae.model import DetailAlignedVAE

__version__ = "0.1.0"
__all__ = ["ConfigError", "DavaeError", "DetailAlignedVAE", "Preset", "available_presets", "load_base_vae", "load_preset"]
