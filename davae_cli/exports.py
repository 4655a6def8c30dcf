"""What the trainers and the converters of the official checkpoints both write (DESIGN: what two modules share
moves below both): the DA-VAE folder (`export_davae`), the adapted DiT folder (`export_adapted`) with its sampling
facts (`sampling_facts`, `FACTS_FILE`), and the atomic folder replacement under them (`write_folder`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import DavaeError, first_line
from .latents import atomic_write_bytes

if TYPE_CHECKING:
    from .config_schema import Preset
    from .vae.model import DetailAlignedVAE

FACTS_FILE = "davae_dit.json"  # the sampling facts written beside an adapted model


def _aside(out_dir: Path) -> Path:
    """Where `write_folder` puts the folder it replaces while the new one is renamed in."""
    return out_dir.with_name(out_dir.name + ".old")


def finish_swap(out_dir: Path) -> bool:
    """Finish what a killed `write_folder` left at `out_dir`; True when there was something to do. The swap's
    order (new folder complete → old renamed aside → new renamed in → old removed) makes an aside `<out>.old`
    mean the new `<out>.tmp` was already complete: with `<out>` missing, the new one is renamed in (the swap
    completed, not rolled back); with `<out>` present, only the old one is left to remove. Every step is safe
    to kill again. A `<out>.tmp` without an aside (a write that did not finish) is left to `clear_temporaries`."""
    out_dir = Path(out_dir)
    old, tmp = _aside(out_dir), out_dir.with_name(out_dir.name + ".tmp")
    if not old.is_dir():
        return False
    if not out_dir.exists():
        os.replace(tmp if tmp.is_dir() else old, out_dir)  # no new folder (removed by hand): the old one back
    shutil.rmtree(old, ignore_errors=True)
    return True


def write_folder(out_dir: Path, write, what: str) -> None:
    """Fill `out_dir` through `write(tmp)` into `<out_dir>.tmp`, then swap it in: the old folder renamed aside
    to `<out_dir>.old`, the new one renamed in, the old one removed. `out_dir` is complete or absent at every
    moment, and a previous one stays until the new one is whole; a kill between two steps is finished by
    `finish_swap` (this function's next call, or `clear_temporaries` at a run's next start). A failed write (a
    full disk, a quota) removes the temporary folder and ends in one line naming `what`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    finish_swap(out_dir)  # an earlier swap here killed half-way: finished before its `.tmp` is reused
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DavaeError(f"could not write {what} to {out_dir.parent} ({e.strerror or first_line(e, 80)}); "
                         f"nothing of it was kept — free space and run again (--resume continues from the last "
                         f"checkpoint)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        os.replace(out_dir, _aside(out_dir))
    os.replace(tmp, out_dir)
    shutil.rmtree(_aside(out_dir), ignore_errors=True)


def export_davae(model: DetailAlignedVAE, out_dir: Path, *, trained: bool = True) -> None:
    """`save_pretrained` into a temporary folder with its model card (README.md, from the run folder above
    `out_dir` when `trained`; a converter passes `trained=False`), then rename: `out_dir` is complete or absent."""
    from .cards import card_run_dir, write_model_card

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        write_model_card(tmp, folder=out_dir, kind="davae", base_model=model.config.base_vae_source,
                         run_dir=card_run_dir(out_dir) if trained else None)

    write_folder(out_dir, write, "the DA-VAE")


def export_adapted(backend, model, facts: dict, out_dir: Path, facts_file: str = FACTS_FILE, *,
                   trained: bool = True) -> None:
    """Write into a temporary folder with the model card (README.md, from the run folder above `out_dir` when
    `trained`; a converter passes `trained=False`), then rename: `out_dir` is complete or absent."""
    from .cards import card_run_dir, write_model_card

    native = facts_file != FACTS_FILE
    cond = "class" if native else (facts.get("conditioning") or {}).get("type", "prompt")
    if isinstance(facts.get("davae"), dict) and facts["davae"].get("path"):
        # where the DA-VAE is seen from this folder: found again when both folders move together
        facts = {**facts, "davae": {**facts["davae"], "relative_path": os.path.relpath(
            Path(facts["davae"]["path"]).resolve(), Path(out_dir).resolve())}}

    def write(tmp: Path) -> None:
        backend.export(model, tmp)
        atomic_write_bytes(tmp / facts_file, json.dumps(facts, indent=2).encode())
        write_model_card(tmp, folder=out_dir, kind="native-dit" if native else "adapted-dit",
                         base_model=None if native else facts.get("dit_source"), conditioning=cond,
                         run_dir=card_run_dir(out_dir) if trained else None)

    write_folder(out_dir, write, "the adapted DiT")


def sampling_facts(preset: Preset, vae: DetailAlignedVAE, vae_dir: Path, backend, model, dit_spec: str,
                   steps: int, detail_stats: Optional[dict] = None) -> dict:
    """What sampling needs, written beside the adapted model (`davae_dit.json`): both timestep shifts, the
    sampling recipe, SD3's scheduler configuration, and the detail channels' statistics (`detail_stats`:
    measured on the DiT's training latents; None: the DA-VAE's own, from its training crops)."""
    d, smp = preset.dit, preset.sample
    cond: dict[str, Any]
    if backend.conditioning == "prompt":
        cond = {"type": "prompt", "text_encoders": d.text_encoders, "max_sequence_length": d.max_sequence_length,
                "use_t5": d.use_t5}
    else:
        cond = {"type": "class", "num_classes": d.num_classes}
    if detail_stats is None:
        detail_stats = {"mean": [float(v) for v in vae.detail_mean], "std": [float(v) for v in vae.detail_std],
                        "source": "davae"}
    facts = {
        "format": "davae-dit", "version": 2, "backend": backend.name, "preset": preset.name,
        "train_shift": d.train_shift, "sample_shift": smp.shift,
        "sampling": {"steps": smp.steps, "guidance": smp.guidance,
                     "guidance_interval": list(smp.guidance_interval) if smp.guidance_interval else None,
                     "sampler": smp.sampler, "negative_prompt": smp.negative_prompt},
        "base_channels": vae.config.base_channels,
        "detail_channels": vae.config.detail_channels, "patch_size": backend.patch_size(model),
        "resolution": preset.adapt_dit.resolution, "granularity": vae.granularity,
        "detail_mean": detail_stats["mean"], "detail_std": detail_stats["std"],
        "detail_view": detail_stats.get("view", "raw"),
        "detail_noise": preset.adapt_dit.detail_noise, "detail_ramp_steps": preset.adapt_dit.detail_ramp_steps,
        "detail_stats": {k: v for k, v in detail_stats.items() if k not in ("mean", "std", "view")},
        "base_normalisation": "as encoded by the DA-VAE (its base latent transform), unchanged",
        "davae": {"path": str(Path(vae_dir).resolve()), "identity": vae.identity,
                  "latent_identity": vae.latent_identity, "base_vae_hash": vae.config.base_vae_hash},
        "dit_source": dit_spec, "steps": steps, "conditioning": cond,
    }
    facts.update(backend.sampling_facts(model, dit_spec))
    return facts
