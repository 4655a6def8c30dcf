"""`encode_images` / `decode_latents`: images <-> one latent file per image, in batches, atomically.

Bad inputs are reported one by one and never stop the good ones; existing outputs are kept unless
`overwrite=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from . import data as D
from .errors import DavaeError, first_line
from .latents import atomic_write_bytes, load_latent, save_latent
from .vae.model import DetailAlignedVAE

ProgressFn = Callable[[int], None]  # called with the number of items just finished


@dataclass
class BatchReport:
    """What a batch command did: files written, inputs that failed (with why)."""

    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {"written": self.written, "failed": [{"input": i, "error": e} for i, e in self.failed],
                "skipped_existing": self.skipped_existing, "num_written": len(self.written),
                "num_failed": len(self.failed), "num_skipped_existing": len(self.skipped_existing)}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _claim_output(out: Path, claimed: set, overwrite: bool, report: BatchReport, item: str) -> bool:
    """True if `item` may write `out`; an output already on disk is skipped (kept, not a failure) unless
    `overwrite`, and two inputs with the same stem are a failure of the second."""
    if out in claimed:
        report.failed.append((item, f"another input also maps to {out.name} (same file stem)"))
        return False
    if out.exists() and not overwrite:
        report.skipped_existing.append(str(out))
        return False
    claimed.add(out)
    return True


@torch.no_grad()
def encode_images(vae: DetailAlignedVAE, inputs: Iterable[str], out_dir: str | Path, *, res: Optional[int] = None,
                  batch_size: int = 8, sample: bool = False, seed: int = 0, overwrite: bool = False,
                  progress: Optional[ProgressFn] = None, on_total: Optional[Callable[[int], None]] = None) -> BatchReport:
    """Encode images (files or folders, recursive) to `out_dir/<stem>.safetensors`, key `latent`
    (C+D, h, w), base first, with metadata. `res` resizes the short side, then each side is centre-
    cropped down to a multiple of s*f (an image already at that size is untouched): `res` = 1000 with s*f = 16
    gives 992 px on the short side. `out_dir` is created with the first file written."""
    if batch_size < 1:
        raise DavaeError("must be >= 1", param="batch_size")
    progress = progress or (lambda n: None)
    g = vae.granularity
    if res is not None and res < g:
        raise DavaeError(f"{res} is smaller than one latent token of this DA-VAE (s*f = {g} px)", param="res")
    source = D.list_images(inputs, missing_ok=True)
    report = BatchReport()
    for path, why in source.skipped:
        report.failed.append((path, why if why == "not found" else f"unreadable image: {why}"))
    out_dir = Path(out_dir)
    if on_total:
        on_total(len(source))
    device = _device_of(vae)
    ident = vae.describe()
    transform = {
        "base": "z_base = (E_base(bicubic_antialiased_down(x, 1/s)).mean - shift) * scale",
        "base_shift": vae.transform.shift.tolist(),
        "base_scale": vae.transform.scale.tolist(),
        "detail": "posterior sample" if sample else "posterior mean",
    }
    # group by size so that every batch is one tensor
    pending: dict[tuple, list] = {}
    claimed: set = set()
    gen = torch.Generator(device=device).manual_seed(seed)

    def flush(items):
        x = torch.stack([t for _, _, t, _ in items]).to(device)
        latents = vae.encode(x, sample=sample, generator=gen).latent.float().cpu()
        for (item, out, t, orig), lat in zip(items, latents):
            meta = {**ident, "resolution": [int(t.shape[1]), int(t.shape[2])], "source": Path(str(item)).name,
                    "source_size": orig, "transform": transform, "format": "davae-latent-v1"}
            save_latent(out, lat, meta)
            report.written.append(str(out))
        progress(len(items))

    for i, item in enumerate(source.items):
        label = item if isinstance(item, str) else f"skimage:{item[1]}"
        out = out_dir / f"{source.name(i)}.safetensors"
        if not _claim_output(out, claimed, overwrite, report, label):
            progress(1)
            continue
        try:
            arr = D.read_image(item)
            orig = [int(arr.shape[0]), int(arr.shape[1])]
            t = D.to_tensor(D.fit_to_multiple(arr, res, g))
        except DavaeError as e:
            report.failed.append((label, str(e)))
            progress(1)
            continue
        except Exception as e:
            report.failed.append((label, f"unreadable image: {first_line(e, 100)}"))
            progress(1)
            continue
        key = tuple(t.shape)
        pending.setdefault(key, []).append((label, out, t, orig))
        if len(pending[key]) >= batch_size:
            flush(pending.pop(key))
    for items in pending.values():
        flush(items)
    return report


def check_latent_compatible(vae: DetailAlignedVAE, latent: torch.Tensor, meta: dict,
                            dit_space_ok: bool = False, dit_davae: Optional[dict] = None) -> Optional[str]:
    """None if `latent` was made in this DA-VAE's latent space (same C, D, base VAE, and this DA-VAE or one with
    its latent identity: a decoder-only fine-tune shares it), else why not. `dit_davae`: the `davae` facts of the
    adapted DiT that DiT-space latents were sampled with (older latents record only the DA-VAE's identity; the
    DiT's facts then say whether this DA-VAE shares its latent)."""
    ident = vae.describe()
    if latent.shape[0] != vae.latent_channels:
        return f"latent has {latent.shape[0]} channels, this DA-VAE expects C+D = {vae.latent_channels}"
    for key in ("C", "D", "base_vae_hash"):
        if key in meta and meta[key] != ident[key]:
            what = {"base_vae_hash": "a DA-VAE on a different base VAE"}.get(key, f"{key} = {meta[key]}")
            return f"made by {what} ({key} {str(meta[key])[:23]} vs {str(ident[key])[:23]})"
    if "davae" not in meta:
        return "no DA-VAE identity in its metadata (not written by `davae encode`)"
    same_space = (meta["davae"] == ident["davae"] or meta.get("latent_identity") == ident["latent_identity"]
                  or (dit_davae is not None and meta["davae"] == dit_davae.get("identity") and vae.is_recorded(dit_davae)))
    if not same_space:
        return (f"made by a different DA-VAE (davae {str(meta['davae'])[:23]} vs {ident['davae'][:23]}), "
                f"not one with this DA-VAE's latent")
    if meta.get("space") == "dit" and not dit_space_ok:
        return ("a normalised DiT-space latent from `davae generate --save-latents`: pass --dit (the adapted DiT it "
                "was sampled with) to decode it")
    return None


def check_decode_mode(base_only: bool, detail_from_base: bool) -> None:
    if base_only and detail_from_base:
        raise DavaeError("--base-only and --detail-from-base are two different decodes: pass one")


@torch.no_grad()
def decode_latents(vae: DetailAlignedVAE, inputs: Iterable[str], out_dir: str | Path, *, overwrite: bool = False,
                   progress: Optional[ProgressFn] = None, on_total: Optional[Callable[[int], None]] = None,
                   dit_dir: Optional[str | Path] = None, base_only: bool = False,
                   detail_from_base: bool = False) -> BatchReport:
    """Decode latent files (or folders of them, recursive) to `out_dir/<stem>.png` at full resolution.

    `dit_dir`: the adapted DiT whose latent normalisation DiT-space latents (`generate --save-latents`) are
    in; they are mapped back to DA-VAE latents first. `base_only`: decode only the base channels, with the
    base VAE at 1/s + bicubic x s (the baseline at the same tokens): the same latents with and without their
    detail channels, which tells the detail's contribution from the base channels' own content.
    `detail_from_base`: decode with the DA-VAE, the detail channels replaced by their least-squares
    prediction from the base channels, fitted over all the latents given (`metrics.latent_stats.DetailFromBase`):
    what the decoder makes of the base channels alone, so the difference to a plain decode is what the
    detail channels' own content is worth."""
    check_decode_mode(base_only, detail_from_base)
    normalizer, facts = _dit_normalizer(vae, dit_dir) if dit_dir is not None else (None, None)
    progress = progress or (lambda n: None)
    report = BatchReport()
    files = _latent_files(inputs, report)
    out_dir = Path(out_dir)  # created with the first file written
    if on_total:
        on_total(len(files))
    device = _device_of(vae)

    def read(f: Path) -> tuple[torch.Tensor, dict]:
        """The DA-VAE latent (1, C+D, h, w) of file f and its metadata, or DavaeError(why it cannot be decoded
        here)."""
        latent, meta = load_latent(f)
        why = check_latent_compatible(vae, latent, meta, dit_space_ok=normalizer is not None,
                                      dit_davae=facts["davae"] if normalizer is not None else None)
        if why:
            raise DavaeError(why)
        z = latent[None].to(device)
        return (normalizer.inverse(z) if meta.get("space") == "dit" else z), meta

    predictor = None
    if detail_from_base:
        from .metrics.latent_stats import DetailFromBase

        def decodable():  # every latent that decodes here, streamed; the failures are reported below
            for f in files:
                try:
                    yield read(f)[0].cpu()
                except DavaeError:
                    pass

        try:
            predictor = DetailFromBase.fit(decodable(), vae.config.base_channels)
        except ValueError:  # nothing decodable: each file's failure is reported below
            predictor = None
    claimed: set = set()
    for f in files:
        out = out_dir / f"{f.stem}.png"
        try:
            if not _claim_output(out, claimed, overwrite, report, str(f)):
                continue
            z, meta = read(f)
            if base_only:
                img = vae.decode_baseline(z[:, : vae.config.base_channels])[0]
            else:
                img = vae.decode(predictor.predict(z) if predictor is not None else z)[0]
            atomic_write_bytes(out, _png_with_meta(img, meta, "base_only" if base_only else
                                                   "detail_from_base" if predictor is not None else "davae"))
            report.written.append(str(out))
        except DavaeError as e:
            report.failed.append((str(f), str(e)))
        finally:
            progress(1)
    return report


def _dit_normalizer(vae: DetailAlignedVAE, dit_dir: str | Path):
    """(the latent normalisation of the adapted DiT at `dit_dir`, its facts); it must be adapted for `vae`."""
    from .dit.backend import read_facts
    from .latents import LatentNormalizer

    facts = read_facts(Path(dit_dir))
    if not vae.is_recorded(facts["davae"]):
        raise DavaeError(f"{dit_dir} was adapted for another DA-VAE ({facts['davae']['identity'][:16]}), not "
                         f"{vae.identity[:16]}", param="dit")
    return LatentNormalizer.from_facts(facts), facts


def _latent_files(inputs: Iterable[str], report: BatchReport) -> list[Path]:
    """The latent files named by `inputs` (folders searched recursively); a missing one goes to `report.failed`."""
    files: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            report.failed.append((str(inp), "not found"))
        elif p.is_dir():
            files += sorted(p.rglob("*.safetensors"))
        else:
            files.append(p)
    return files


# what a decoded PNG keeps of its latent's metadata: how it was made (generate, upscale, encode), not the identities
_CARRIED = ("prompt", "negative_prompt", "class_id", "seed", "steps", "guidance", "guidance_interval", "sampler",
            "shift", "res", "mode", "strength", "source", "source_seed")


def _png_with_meta(img: torch.Tensor, meta: dict, decoded: str) -> bytes:
    """The PNG of a decoded latent, with its generation metadata (e.g. class_id, seed, prompt) carried over
    as `davae:*` text like `generate`'s, plus `davae:decoded` (davae | base_only | detail_from_base)."""
    from .images import _png_bytes

    kept = {k: meta[k] for k in _CARRIED if meta.get(k) is not None}
    return _png_bytes(img, {**kept, "decoded": decoded})
