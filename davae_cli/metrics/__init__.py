"""Metrics, one job per module:

- `image`: PSNR, SSIM, and `reconstruction_metrics()` (with LPIPS) for any reconstruction evaluation
- `extractors`: FID feature extractors and the clean-fid modes
- `features`: features of image folders and their on-disk cache
- `stats`: reference statistics files (`.npz`) and clean-fid's named statistics
- `fid`: the Fréchet and kernel (KID) distances
- `lpips_weights`: LPIPS's ImageNet trunk from a local file (offline machines)
- `evaluate`: the evaluations behind `davae eval-fid` (FID/KID, statistics files, tokenizer metrics)
- `report`: the HTML run report behind `davae report` (plots of log.jsonl, samples, checkpoints, settings)
"""

from .image import psnr, reconstruction_metrics, ssim

__all__ = ["psnr", "reconstruction_metrics", "ssim"]
