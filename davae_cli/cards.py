"""Model cards: the `README.md` every exported folder carries, in the Hugging Face hub's format (YAML front
matter, then Markdown), so that a folder pushed to a model hub says what it is, how it was trained and what
it scored.

A card is built from what the run folder recorded (its resolved `config.yaml`, `run.json` and `log.jsonl`)
and what the exporter knows (the kind of folder, its base model); nothing is filled in that was not measured:
held-out metrics are the last `eval` event of the log, and a trainer that evaluates nothing gets a line
saying so. `model_card` returns the text; `write_model_card` writes it into a folder atomically.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import yaml

from .jsonl import read_jsonl

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name; a path (absolute, ./, several parts) is not one

# licences of the base models the bundled presets name (the hub's `license` values); a base that is a local
# folder or another id has none recorded, so the card leaves the field out rather than guess
LICENSES = {
    "stabilityai/stable-diffusion-3.5-medium": ("other", "stabilityai-ai-community"),
    "stabilityai/stable-diffusion-3.5-large": ("other", "stabilityai-ai-community"),
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license"),
    "Tongyi-MAI/Z-Image-Turbo": ("apache-2.0", None),
    "madebyollin/taesd3": ("mit", None),
    "madebyollin/taesd": ("mit", None),
    "hustvl/vavae-imagenet256-f16d32-dinov2": ("mit", None),
    "hustvl/lightningdit-xl-imagenet256-64ep": ("mit", None),
}

KINDS = {
    # kind: (title, pipeline_tag or None, what the folder is)
    "davae": ("DA-VAE tokenizer", None,
              "a detail-aligned VAE: the base VAE's C channels of the half-resolution image plus D detail channels "
              "of the full image, decoded to the full resolution"),
    "adapted-dit": ("DA-VAE-adapted DiT", None,
                    "a pretrained DiT warm-started on DA-VAE latents (zero-initialised channel extensions): it "
                    "generates at 2x the resolution for the token count of the base resolution"),
    "native-dit": ("native DiT", "unconditional-image-generation",
                   "a class-conditional LightningDiT trained from scratch on the base channels (the model "
                   "`davae adapt-dit` starts from)"),
}


def _front_matter(fields: dict) -> str:
    kept = {k: v for k, v in fields.items() if v not in (None, [], "")}
    return "---\n" + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True) + "---\n"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_summary(run_dir: Optional[Path]) -> dict:
    """What a run folder recorded about its training: preset, settings, data, steps, training time, the last
    held-out evaluation (or None)."""
    if run_dir is None:
        return {}
    run_dir = Path(run_dir)
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    events = read_jsonl(run_dir / "log.jsonl")[0]
    trains = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    start = next((e for e in events if e.get("event") == "start"), {})
    return {"config": config, "run": _read_json(run_dir / "run.json"),
            "steps": max((int(e.get("step", 0)) for e in events), default=None),
            "train_seconds": trains[-1].get("elapsed_s") if trains else None,
            "device": start.get("device"), "world_size": start.get("world_size"),
            "eval": evals[-1] if evals else None}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _metrics_table(ev: Optional[dict]) -> list[str]:
    if not ev:
        return ["This run recorded no held-out evaluation (its trainer evaluates nothing, or it was exported "
                "without training): no metric is given."]
    rows = [(k, v) for k, v in ev.items() if k not in ("step", "event") and isinstance(v, (int, float))]
    out = [f"Measured by the run on its held-out images at step {ev.get('step')} (the last evaluation):", "",
           "| metric | value |", "|---|---|"]
    out += [f"| `{k}` | {_fmt(v)} |" for k, v in rows]
    return out


def _usage(kind: str, folder: Path, preset: Optional[str], conditioning: str) -> list[str]:
    p = f" --preset {preset}" if preset else ""
    if kind == "davae":
        return ["```python", "from davae_cli import DetailAlignedVAE", "",
                f'vae = DetailAlignedVAE.from_pretrained("{folder}")',
                "latent = vae.encode(images).latent   # images (N, 3, H, W) in [-1, 1] -> (N, C + D, h, w), base first",
                "recon = vae.decode(latent)", "```", "", "```bash",
                f"davae encode photos/ --vae {folder} --out latents/",
                f"davae eval-fid val/ --reconstruct --vae {folder} --baselines", "```"]
    native = kind == "native-dit"
    lines = ["```python", "from davae_cli import DAVAEPipeline", "",
             f'pipe = DAVAEPipeline.from_pretrained("{folder}"{", native=True" if native else ""})']
    cond, flag = (("class_labels=[1]", "--class-id 1") if conditioning == "class"
                  else ('prompt="a lighthouse at dusk"', '--prompt "a lighthouse at dusk"'))
    lines += [f"image = pipe({cond}).images[0]"]
    if not native:
        lines += [f"bigger = pipe.upscale(image{', class_labels=[1]' if conditioning == 'class' else ''}).images[0]"]
    lines += ["```", "", "```bash"]
    if native:
        lines += [f"davae generate{p} --native --base-pipeline {folder} {flag} --out samples/"]
    else:
        lines += [f"davae generate{p} --dit {folder} {flag} --out samples/   # finds its DA-VAE (or pass --vae)"]
    return lines + ["```"]


def model_card(folder: Path, *, kind: str, run_dir: Optional[Path] = None, base_model: Optional[str] = None,
               conditioning: str = "prompt", data: Optional[list] = None, extra_tags: tuple[str, ...] = (),
               notes: tuple[str, ...] = ()) -> str:
    """The card of the folder `folder` (the path users will load) of `kind` (a key of KINDS); `run_dir` the run
    that trained it (None for a converted checkpoint); `base_model` the hub id or path it was made from;
    `conditioning` "prompt" or "class" (for the usage snippet); `data` what it trained on (default: the run's
    `run.json`)."""
    title, tag, what = KINDS[kind]
    info = run_summary(run_dir)
    cfg = info.get("config", {})
    preset = cfg.get("name")
    lic = LICENSES.get(base_model or "")
    hub_base = base_model if base_model and _HUB_ID.match(base_model) and not Path(base_model).exists() else None
    fm = _front_matter({
        "library_name": "davae", "base_model": hub_base, "license": lic[0] if lic else None,
        "license_name": lic[1] if lic else None, "pipeline_tag": tag,
        "tags": ["davae", "da-vae", "diffusion", "latent-compression", *extra_tags]})
    lines = [f"# {title}" + (f" ({preset})" if preset else ""), "",
             f"This folder is {what}. Made with davae, an implementation of DA-VAE (CVPR 2026, *Plug-in Latent "
             "Compression for Diffusion via Detail Alignment*; the authors' code: "
             "https://github.com/caixin98/DA-VAE).", ""]
    lines += ["## How it was made", ""]
    if base_model:
        lines.append(f"- base model: `{base_model}`")
    if preset:
        lines.append(f"- preset: `{preset}` (the resolved settings are in the run's `config.yaml`)")
    data = data or info.get("run", {}).get("data")
    if data:
        lines.append(f"- data: {', '.join(f'`{d}`' for d in (data if isinstance(data, list) else [data]))}")
    if info.get("steps") is not None:
        lines.append(f"- steps: {info['steps']}")
    if info.get("train_seconds") is not None:
        lines.append(f"- training time: {float(info['train_seconds']) / 3600:.2f} h"
                     + (f" on {info['world_size']} x {info['device']}" if info.get("device") else ""))
    if run_dir is None:
        lines.append("- converted from a checkpoint, not trained here")
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Held-out metrics", ""] + _metrics_table(info.get("eval"))
    lines += ["", "## Use", ""] + _usage(kind, folder, preset, conditioning)
    return fm + "\n" + "\n".join(lines) + "\n"


def card_run_dir(out_dir: Path) -> Optional[Path]:
    """The run folder a trainer's export `RUN/final` belongs to (None when `out_dir` is not inside one)."""
    run = Path(out_dir).parent
    return run if (run / "config.yaml").is_file() else None


def write_model_card(into: Path, folder: Optional[Path] = None, **kw) -> Path:
    """Write `model_card(folder, ...)` to `into/README.md` (temp file + rename). `into` is where the export is
    being written (an exporter's temporary folder), `folder` the path it will have (default: `into`)."""
    from .latents import atomic_write_bytes

    into = Path(into)
    path = into / CARD_FILE
    atomic_write_bytes(path, model_card(Path(folder or into), **kw).encode())
    return path
