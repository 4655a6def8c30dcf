"""DiT families (one module each: sd3, flux, lightningdit, ...), the `Backend` protocol they implement
(`backend.py`), the registry that maps a preset's `dit.backend` to them (`registry.py`), and what they share:
the zero-init channel extension (`extend.py`), diffusers loading and LoRA (`loader.py`, `diffusers_family.py`),
text encoders and the prompt cache (`text.py`)."""
