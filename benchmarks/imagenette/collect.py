"""Helpers of benchmarks/imagenette/run.sh (not part of the library).

  python collect.py upsample SRC DST          bicubic x2 of every PNG in SRC into DST (model (i))
  python collect.py results OUT --per-class N  OUT/results.json and OUT/grid.png from the stages' outputs
  python collect.py diagnose OUT               OUT/diag/diagnosis.json (after diagnose.sh's runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

from PIL import Image

KEYS = ("native_half_bicubic", "davae", "native_full")
GEN_STAGE = {"native_half_bicubic": "gen_native_half", "davae": "gen_davae", "native_full": "gen_native_full"}


def _atomic_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def upsample(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.png"))
    if not files:
        sys.exit(f"error: no PNG files in {src}")
    for f in files:
        out = dst / f.name
        if out.exists():
            continue
        with Image.open(f) as im:
            im = im.convert("RGB")
            _atomic_png(im.resize((im.width * 2, im.height * 2), Image.BICUBIC), out)


def _json_lines(path: Path) -> dict:
    """The last JSON object a command printed on stdout."""
    text = path.read_text().strip().splitlines()
    for line in reversed(text):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"error: no JSON in {path}")


def _minutes(out: Path, stage: str) -> float | None:
    f = out / "times" / stage
    if not f.is_file():
        return None
    return round(sum(float(v) for v in f.read_text().split()) / 60.0, 2)


def _last_eval(run: Path) -> dict:
    """The tokenizer metrics of train-vae's final held-out evaluation (its log)."""
    best = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "eval":
            best = rec
    return best


def grid(out: Path, per_class: int, classes=(0, 2, 4, 6, 8), seeds=(0, 1)) -> Path:
    """Rows: (class, seed); columns: (i) native 112² + bicubic | (ii) DA-VAE 224² | (iii) native 224²."""
    rows = [(c, k) for c in classes for k in seeds if k < per_class]
    side, pad = 224, 4
    canvas = Image.new("RGB", (3 * side + 4 * pad, len(rows) * (side + pad) + pad), (255, 255, 255))
    for r, (c, k) in enumerate(rows):
        name = f"{c * per_class + k:06d}.png"
        for col, key in enumerate(KEYS):
            with Image.open(out / "samples" / key / name) as im:
                im = im.convert("RGB").resize((side, side), Image.BICUBIC)
                canvas.paste(im, (pad + col * (side + pad), pad + r * (side + pad)))
    path = out / "grid.png"
    _atomic_png(canvas, path)
    return path


def results(out: Path, per_class: int) -> None:
    logs = out / "logs"
    res: dict = {"fid": {}, "kid": {}, "tokens": {}, "ms_per_image": {}, "samples": {}}
    for key in KEYS:
        fid = _json_lines(logs / f"fid_{key}.json")
        gen = _json_lines(logs / f"{GEN_STAGE[key]}.json")
        res["fid"][key] = fid.get("fid")
        res["kid"][key] = fid.get("kid")
        res["tokens"][key] = gen.get("tokens")
        res["ms_per_image"][key] = gen.get("ms_per_image")
        res["samples"][key] = str(out / "samples" / key)
        res.setdefault("num_gen", fid.get("num_gen"))
        res.setdefault("protocol", {k: fid.get(k) for k in ("mode", "resize", "feature_extractor")})
    # (i) is sampled at 112² and upsampled; its time is the 112² model's (the bicubic step is negligible)
    res["reference"] = _json_lines(logs / "fid_davae.json").get("reference")
    res["num_ref"] = _json_lines(logs / "fid_davae.json").get("num_ref")
    native = json.loads((out / "native_half" / "final" / "davae_native.json").read_text())
    adapt = json.loads((out / "adapt" / "final" / "davae_dit.json").read_text())
    full = json.loads((out / "native_full" / "final" / "davae_native.json").read_text())
    res["train_minutes"] = {"vae": _minutes(out, "vae"), "native_half": round(native["train_seconds"] / 60, 2),
                            "adapt": round(adapt["train_seconds"] / 60, 2),
                            "native_full": round(full["train_seconds"] / 60, 2)}
    res["train_steps"] = {"native_half": native["steps"], "adapt": adapt["steps"], "native_full": full["steps"]}
    res["stage_minutes"] = {p.name: _minutes(out, p.name) for p in sorted((out / "times").iterdir())}
    res["total_minutes"] = round(sum(v for v in res["stage_minutes"].values() if v), 1)
    ev = _last_eval(out / "vae")
    res["tokenizer"] = {
        "half_bicubic": {"psnr": ev.get("base_half_bicubic.psnr"), "ssim": ev.get("base_half_bicubic.ssim")},
        "davae": {"psnr": ev.get("davae.psnr"), "ssim": ev.get("davae.ssim")},
        "full_base": {"psnr": ev.get("base_full.psnr"), "ssim": ev.get("base_full.ssim")},
        "gap_closed": ev.get("gap_closed"), "num_images": ev.get("num_images"), "split": "val (seeded subset)"}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    res["machine"] = {"cpu": cpu, "cores": os.cpu_count(), "date": date.today().isoformat(), "commit": commit}
    res["grid"] = str(grid(out, per_class))
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    f, k = res["fid"], res["kid"]
    for key in KEYS:
        print(f"{key:22s} FID {f[key]:8.2f}  KID {k[key] if k[key] is not None else float('nan'):.4f}  "
              f"tokens {res['tokens'][key]}  ms/image {res['ms_per_image'][key]:.1f}")


def _residual_std(files, normalizer, c: int) -> float:
    """Std of z_d - repeat(z_base, D/C) over DA-VAE latents (DiT-space files are mapped back first)."""
    import torch
    from safetensors.torch import load_file

    from davae_cli.latents import detail_residual

    vals = []
    for f in files:
        z = load_file(str(f))["latent"].float()[None]
        if normalizer is not None:
            z = normalizer.inverse(z)
        vals.append(detail_residual(z, c).flatten())
    return float(torch.cat(vals).std())


def _maybe(path: Path, key: str):
    return _json_lines(path).get(key) if path.is_file() and path.stat().st_size else None


def diagnose(out: Path) -> None:
    from davae_cli.latents import LatentNormalizer

    d = out / "diag"
    train_files = sorted((out / "adapt" / "cache" / "latents").glob("*.safetensors"))[:200]
    facts = {m: json.loads((p / "davae_dit.json").read_text())
             for m, p in (("raw", out / "adapt" / "final"), ("residual", d / "adapt_residual" / "final"))}
    c = int(facts["raw"]["base_channels"])
    res = {"residual_std": {"training_latents": _residual_std(train_files, None, c)},
           "fid": {"davae_raw_view": _json_lines(out / "logs" / "fid_davae.json").get("fid"),
                   "davae_residual_view": _maybe(d / "fid_residual.json", "fid"),
                   "native_half_bicubic": _json_lines(out / "logs" / "fid_native_half_bicubic.json").get("fid")},
           "kid": {"davae_raw_view": _json_lines(out / "logs" / "fid_davae.json").get("kid"),
                   "davae_residual_view": _maybe(d / "fid_residual.json", "kid"),
                   "native_half_bicubic": _json_lines(out / "logs" / "fid_native_half_bicubic.json").get("kid")},
           "detail_std_in_dit_space": {m: f["detail_std"][:4] for m, f in facts.items()}}
    for m in ("raw", "residual"):
        files = sorted((d / f"latents_{m}").glob("*.safetensors"))
        res["residual_std"][f"generated_{m}_view"] = _residual_std(files, LatentNormalizer.from_facts(facts[m]), c)
    tmp = d / "diagnosis.json.tmp"
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, d / "diagnosis.json")
    print(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("upsample")
    u.add_argument("src", type=Path)
    u.add_argument("dst", type=Path)
    r = sub.add_parser("results")
    r.add_argument("out", type=Path)
    r.add_argument("--per-class", type=int, required=True)
    dg = sub.add_parser("diagnose")
    dg.add_argument("out", type=Path)
    a = ap.parse_args()
    if a.cmd == "upsample":
        upsample(a.src, a.dst)
    elif a.cmd == "diagnose":
        diagnose(a.out)
    else:
        results(a.out, a.per_class)


if __name__ == "__main__":
    main()
