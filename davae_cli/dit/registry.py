"""The registry of DiT families: a preset's `dit.backend` -> the `Backend` class of the family's module.

Import-free on purpose (the preset loader validates names with it); `dit.backend.backend_class` imports the
module on first use. Adding a family is one module under `dit/` and one line here.
"""

REGISTRY: dict[str, str] = {
    "sd3": "davae_cli.dit.sd3:SD3Backend",
    "flux": "davae_cli.dit.flux:FluxBackend",
    "lightningdit": "davae_cli.dit.lightningdit:LightningDiTBackend",
    "zimage": "davae_cli.dit.zimage:ZImageBackend",
}


DEFAULT_BACKEND = "sd3"  # a preset's dit.backend when it names none


def backend_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


# `davae convert KIND`: what each kind needs (required inputs, optional ones), its default preset, and how it
# runs; the command line reads this table and names no checkpoint kind itself.
OFFICIAL_KINDS: dict[str, dict] = {
    "imagenet-davae": {"needs": ("base_vae", "stats"), "optional": (), "preset": "imagenet-512",
                       "help": "the official ImageNet DA-VAE tokenizer"},
    "lightningdit": {"needs": ("vae",), "optional": (), "preset": "imagenet-512-official",
                     "help": "the official LightningDiT-XL trained on its latents"},
    "sd3-davae": {"needs": ("base_vae",), "optional": (), "preset": "sd35m-1024-official",
                  "help": "the official SD3 DA-VAE tokenizer"},
    "sd3-dit": {"needs": ("lora", "vae"), "optional": ("dit", "lora_alpha"), "preset": "sd35m-1024-official",
                "help": "the official SD3.5 adaptation: step_N.pt heads + --lora"},
}
