"""DiT backends (LightningDiT, SD3) and the zero-init channel extension they share."""
