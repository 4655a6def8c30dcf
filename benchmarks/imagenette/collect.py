"""Helpers of benchmarks/imagenette/run.sh (not part of the library).

  python collect.py upsample SRC DST          bicubic x2 of every PNG in SRC into DST (model (i))
  python collect.py results OUT --per-class N  OUT/results.json and OUT/grid.png from the stages' outputs
  python collect.py diagnose OUT               OUT/diag/diagnosis.json (after diagnose.sh's runs)
  python collect.py detail OUT                 OUT/results.json of detail.sh (issue 37: ceilings, gates, same bases)
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


def _atomic_png(img: Image.Image, path: Path, text: dict | None = None) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def upsample(src: Path, dst: Path) -> None:
    """x2 with the DA-VAE's own upsampling (`davae_cli.latents.upsample`: torch bicubic in float, clamped), the
    path `decode_baseline` takes, so (i) and the DA-VAE's baselines are upsampled the same way. The PNG text
    (generate's metadata: class_id, seed, ...) is kept."""
    import numpy as np
    import torch

    from davae_cli.data import to_tensor, to_uint8
    from davae_cli.latents import upsample as up

    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.png"))
    if not files:
        sys.exit(f"error: no PNG files in {src}")
    for f in files:
        out = dst / f.name
        if out.exists():
            continue
        with Image.open(f) as im:
            x = to_tensor(np.asarray(im.convert("RGB")))[None]
            text = dict(getattr(im, "text", {}) or {})
        with torch.no_grad():
            _atomic_png(Image.fromarray(to_uint8(up(x, 2)[0])), out, text)


def _json_lines(path: Path) -> dict:
    """The last JSON object a command printed on stdout."""
    text = path.read_text().strip().splitlines()
    for line in reversed(text):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"error: no JSON in {path}")


def _minutes(out: Path, stage: str) -> float | None:
    """A stage's wall time in minutes: the sum of OUT/times/STAGE, one line per completed invocation of the stage's
    command as stages.sh timed it (process start, model loading, data, training or sampling, export: everything);
    None when the stage never completed."""
    f = out / "times" / stage
    if not f.is_file():
        return None
    return round(sum(float(v) for v in f.read_text().split()) / 60.0, 2)


def _loop_seconds(run: Path) -> float | None:
    """A trainer's loop time in seconds from RUN/log.jsonl, on the clock of the DiTs' `train_seconds`: each
    invocation (a `start` record) adds the `elapsed_s` of its last `train` record (the loop's clock since that
    invocation's loop began). A resume drops the records after its checkpoint, so work redone after a kill is
    counted once; a killed invocation counts to its last logged step (train_vae.log_every), not to its checkpoint.
    None without a train record."""
    log = run / "log.jsonl"
    if not log.is_file():
        return None
    total, last, seen = 0.0, None, False
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if not isinstance(rec, dict):
            continue
        if rec.get("event") == "start":
            total, last = total + (last or 0.0), None
        elif rec.get("event") == "train" and isinstance(rec.get("elapsed_s"), (int, float)):
            last, seen = float(rec["elapsed_s"]), True
    return total + (last or 0.0) if seen else None


TRAINERS = ("vae", "native_half", "adapt", "native_full")  # the training stages, by their run folder's name
TIME_KINDS = {
    "train_minutes": "each trainer's loop time (the optimisation loop only, summed over resumes; no process start, "
                     "data caching, start/final evaluation or export): the DiTs' davae_native.json/davae_dit.json "
                     "train_seconds, the DA-VAE's from its log.jsonl (its loop holds its periodic evaluations); "
                     "None until the stage's final/ exists",
    "stage_minutes": "each stage's wall time (OUT/times/STAGE: the whole command, every completed invocation)",
    "total_minutes": "the sum of stage_minutes (wall time)",
}


def train_minutes(out: Path) -> dict:
    """{trainer: its loop time in minutes, or None} (TIME_KINDS["train_minutes"]): one kind of time for all four,
    never a stage's wall time."""
    def facts(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    res: dict = {}
    for name in TRAINERS:
        final = out / name / "final"
        if name == "vae":
            sec = _loop_seconds(out / name) if final.is_dir() else None
        else:
            f = facts(final / ("davae_dit.json" if name == "adapt" else "davae_native.json"))
            sec = f.get("train_seconds")
        res[name] = round(sec / 60, 2) if sec is not None else None
    return res


def stage_times(out: Path) -> dict:
    """stage_minutes (each stage's wall time), total_minutes (their sum) and time_kinds (what each time key
    holds)."""
    times = out / "times"
    stages = {p.name: _minutes(out, p.name) for p in sorted(times.iterdir()) if p.is_file()} if times.is_dir() else {}
    return {"stage_minutes": stages, "total_minutes": round(sum(v for v in stages.values() if v), 1),
            "time_kinds": TIME_KINDS}


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


def grid(out: Path, per_class: int, classes=(0, 2, 4, 6, 8), seeds=(0, 1), upscale_rows: int = 3) -> Path:
    """Rows: (class, seed); columns: (i) native 112² + bicubic | (ii) DA-VAE 224² | (iii) native 224² (blank
    where a stage has not run). Then `upscale_rows` rows of the upscale measurement: input at 112² (shown
    nearest-neighbour x2) | bicubic of the base reconstruction (computed here with the DA-VAE's
    `decode_baseline`, the rfid stage's path) | upscale | real."""
    rows = [(c, k) for c in classes for k in seeds if k < per_class]
    files = sorted((out / "samples" / "upscale").glob("*.png"))
    ups = files[:: max(1, len(files) // upscale_rows)][:upscale_rows]  # spread over the classes
    side, pad = 224, 4
    cols = 4 if ups else 3
    canvas = Image.new("RGB", (cols * side + (cols + 1) * pad, (len(rows) + len(ups)) * (side + pad) + pad), (255, 255, 255))

    def paste(path: Path, col: int, row: int, resample=Image.BICUBIC, small: bool = False) -> None:
        if not path.is_file():
            return
        with Image.open(path) as im:
            im = im.convert("RGB")
            if small:
                im = im.resize((side // 2, side // 2), Image.BICUBIC)
            canvas.paste(im.resize((side, side), resample), (pad + col * (side + pad), pad + row * (side + pad)))

    for r, (c, k) in enumerate(rows):
        name = f"{c * per_class + k:06d}.png"
        for col, key in enumerate(KEYS):
            paste(out / "samples" / key / name, col, r)
    real = {p.stem: p for p in (out / "data" / "valsub").rglob("*") if p.is_file() and not p.name.startswith(".")}
    try:
        bicubic = _base_bicubic(out, [real[u.stem] for u in ups if u.stem in real]) if ups else {}
    except Exception as e:  # the grid is an illustration: a failure leaves the column blank, never results.json
        print(f"note: the grid's bicubic column is left blank ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
              file=sys.stderr)
        bicubic = {}
    for j, up in enumerate(ups):
        r = len(rows) + j
        if up.stem in real:
            paste(real[up.stem], 0, r, Image.NEAREST, small=True)
            paste(real[up.stem], 3, r)
            if real[up.stem] in bicubic:
                paste(bicubic[real[up.stem]], 1, r)
        paste(up, 2, r)
    path = out / "grid.png"
    _atomic_png(canvas, path)
    return path


def _base_bicubic(out: Path, reals: list) -> dict:
    """{real image path: PNG path} of the base VAE at 1/s + bicubic (`decode_baseline(encode_base(x))`, 8-bit),
    written to OUT/samples/grid_bicubic/; {} when the DA-VAE (OUT/vae/final) is absent."""
    vae_dir = out / "vae" / "final"
    if not reals or not (vae_dir / "config.json").is_file():
        return {}
    import numpy as np
    import torch

    from davae_cli.data import fit_to_multiple, read_image, to_tensor, to_uint8
    from davae_cli.vae.model import DetailAlignedVAE

    vae = DetailAlignedVAE.from_pretrained(str(vae_dir)).eval()
    dst = out / "samples" / "grid_bicubic"
    dst.mkdir(parents=True, exist_ok=True)
    made = {}
    for p in reals:
        x = to_tensor(np.array(fit_to_multiple(read_image(p), None, vae.granularity)))[None]
        with torch.no_grad():
            y = vae.decode_baseline(vae.encode_base(x))
        made[p] = dst / f"{Path(p).stem}.png"
        _atomic_png(Image.fromarray(to_uint8(y[0])), made[p])
    return made


def _log(out: Path, name: str) -> dict:
    """A stage's JSON output, {} when the stage has not run (yet)."""
    p = out / "logs" / f"{name}.json"
    return _json_lines(p) if p.is_file() and p.stat().st_size else {}


def _sharpness(fid_log: dict, side: str = "gen"):
    """eval-fid --sharpness's mean |Laplacian| of GEN (or REF) in a stage's output; None when absent."""
    return (fid_log.get("sharpness") or {}).get(side)


def _measurements(out: Path) -> dict:
    """Issue 20's keys: rfid, upscale, same_samples, fid_spread, class_accuracy, detail_structure (None where a
    stage has not run)."""
    rf = _log(out, "rfid")
    bl = rf.get("baselines") or {}
    res: dict = {"rfid": {"native_half_bicubic": (bl.get("base_half_bicubic") or {}).get("rfid"),
                          "davae": rf.get("rfid"), "native_full": (bl.get("base_full") or {}).get("rfid")},
                 "tokenizer_val": {"base_half_bicubic": bl.get("base_half_bicubic"),
                                   "davae": {k: rf.get(k) for k in ("rfid", "psnr", "ssim", "lpips", "kid")} if rf else None,
                                   "base_full": bl.get("base_full"), "gap_closed": bl.get("gap_closed"),
                                   "davae_detail_from_base": bl.get("davae_detail_from_base"),
                                   "detail_gain_db": bl.get("detail_gain_db"),
                                   "num_images": rf.get("num_images")},
                 "detail_structure": rf.get("detail_structure")}
    # upscale of the val subset against its two references on the same images: bicubic of the base
    # reconstruction and the DA-VAE's reconstruction (oracle detail), both rows of the rfid stage (the same
    # 8-bit images against the same originals; the decode-then-eval-fid path gave the same numbers to ~1e-5)
    up = _log(out, "fid_upscale")
    rows = {"bicubic": bl.get("base_half_bicubic") or {}, "oracle": rf}
    res["upscale"] = {m: {"bicubic": rows["bicubic"].get("rfid" if m == "fid" else m),
                          "davae": up.get(m) if m in ("fid", "kid") else (up.get("paired") or {}).get(m),
                          "oracle": rows["oracle"].get("rfid" if m == "fid" else m)}
                      for m in ("fid", "kid", "psnr", "lpips")}
    res["upscale"]["sharpness"] = {"bicubic": rows["bicubic"].get("sharpness"), "davae": _sharpness(up),
                                   "oracle": rows["oracle"].get("sharpness")}
    res["upscale"]["num_images"] = (up.get("paired") or {}).get("num_pairs")
    res["upscale"]["lpips_net"] = {"davae": (up.get("paired") or {}).get("lpips_net"), "bicubic": rf.get("lpips_net"),
                                   "oracle": rf.get("lpips_net")}  # the rfid rows share one LPIPS
    res["upscale"]["lpips_backbone"] = (up.get("paired") or {}).get("lpips_backbone") or rf.get("lpips_backbone")
    res["upscale"]["num_images_rfid"] = rf.get("num_images")
    res["upscale"]["source"] = {"davae": "fid_upscale (davae upscale, eval-fid --paired)",
                                "bicubic": "rfid baselines.base_half_bicubic", "oracle": "rfid (the DA-VAE row)"}
    same = {"base_bicubic": _log(out, "fid_davae_base"), "davae_detail_from_base": _log(out, "fid_davae_pred"),
            "davae": _log(out, "fid_davae")}
    res["same_samples"] = {m: {k: v.get(m) for k, v in same.items()} for m in ("fid", "kid")}
    res["same_samples"]["sharpness"] = {k: _sharpness(v) for k, v in same.items()}
    spread = {}
    for key in ("native_half_bicubic", "davae"):  # eval-fid --split 2: two disjoint halves (by seed), same features
        sp = _log(out, f"fid_{key}").get("split") or {}
        a, b = (sp.get("fid") or [None, None])[:2]
        num, kids, how = (sp.get("num_gen") or [None])[0], sp.get("kid"), "eval-fid --split 2 (even/odd seed offsets)"
        if a is None:  # a run folder from before --split: its fid_KEY_h1/h2 stages (first/second half of the seeds)
            h1, h2 = _log(out, f"fid_{key}_h1"), _log(out, f"fid_{key}_h2")
            a, b, num, kids = h1.get("fid"), h2.get("fid"), h1.get("num_gen"), [h1.get("kid"), h2.get("kid")]
            how = "fid_KEY_h1/h2 stages (first/second half of the seeds)" if a is not None else None
        spread[key] = {"half_1": a, "half_2": b, "abs_difference": abs(a - b) if a is not None and b is not None else None,
                       "num_per_half": num, "kid_halves": kids, "halves": how}
    res["fid_spread"] = spread
    # eval-fid --class-probe: a linear probe on the FID Inception's features of train/ (no ImageNet classifier
    # head can be loaded offline); real val/ images are its ceiling. probe_is: the IS formula over the 10 classes
    cls = {"native_half_bicubic": _log(out, "fid_native_half_bicubic"), "davae": _log(out, "fid_davae"),
           "native_full": _log(out, "fid_native_full"), "davae_base": _log(out, "fid_davae_base")}
    classes = {k: v.get("classes") or {} for k, v in cls.items()}
    res["class_accuracy"] = {k: (c.get("gen") or {}).get("accuracy") for k, c in classes.items()}
    res["class_accuracy"]["real_val"] = (classes["davae"].get("ref") or {}).get("accuracy")
    res["probe_is"] = {k: (c.get("gen") or {}).get("probe_is") for k, c in classes.items()}
    res["probe_is"]["real_val"] = (classes["davae"].get("ref") or {}).get("probe_is")
    res["class_probe"] = {**(classes["davae"].get("probe") or {}), "note": classes["davae"].get("note")}
    res["inception_score"] = None
    res["inception_score_reason"] = ("the FID Inception available offline stops at its pool features (no logits); "
                                     "probe_is is the same formula over the probe's 10 classes")
    return res


def machine() -> dict:
    """The CPU model, cores, date and the repository's commit, for results.json."""
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
    return {"cpu": cpu, "cores": os.cpu_count(), "date": date.today().isoformat(), "commit": commit}


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def results(out: Path, per_class: int) -> None:
    res: dict = {"fid": {}, "kid": {}, "sharpness": {}, "tokens": {}, "ms_per_image": {}, "samples": {}}
    for key in KEYS:
        fid = _log(out, f"fid_{key}")
        gen = _log(out, GEN_STAGE[key])
        res["fid"][key] = fid.get("fid")
        res["kid"][key] = fid.get("kid")
        res["sharpness"][key] = _sharpness(fid)
        res["tokens"][key] = gen.get("tokens")
        res["ms_per_image"][key] = gen.get("ms_per_image")
        res["samples"][key] = str(out / "samples" / key)
        res.setdefault("num_gen", fid.get("num_gen"))
        res.setdefault("protocol", {k: fid.get(k) for k in ("mode", "resize", "feature_extractor")})
    # (i) is sampled at 112² and upsampled; its time is the 112² model's (the bicubic step is negligible)
    res["num_gen_native_full"] = _log(out, "fid_native_full").get("num_gen")
    res["sharpness"]["real_val"] = _sharpness(_log(out, "fid_davae"), "ref")
    res["reference"] = _log(out, "fid_davae").get("reference")
    res["num_ref"] = _log(out, "fid_davae").get("num_ref")

    def facts(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    native = facts(out / "native_half" / "final" / "davae_native.json")
    adapt = facts(out / "adapt" / "final" / "davae_dit.json")
    full = facts(out / "native_full" / "final" / "davae_native.json")
    res["train_minutes"] = train_minutes(out)  # loop time only; the stages' wall time is stage_minutes
    res["train_steps"] = {"native_half": native.get("steps"), "adapt": adapt.get("steps"), "native_full": full.get("steps")}
    res.update(_measurements(out))
    res.update(stage_times(out))  # stage_minutes, total_minutes: wall time only
    ev = _last_eval(out / "vae")
    res["tokenizer"] = {
        "half_bicubic": {"psnr": ev.get("base_half_bicubic.psnr"), "ssim": ev.get("base_half_bicubic.ssim")},
        "davae": {"psnr": ev.get("davae.psnr"), "ssim": ev.get("davae.ssim")},
        "full_base": {"psnr": ev.get("base_full.psnr"), "ssim": ev.get("base_full.ssim")},
        "gap_closed": ev.get("gap_closed"), "num_images": ev.get("num_images"), "split": "val (seeded subset)"}
    res["machine"] = machine()
    res["grid"] = str(grid(out, per_class))
    write_json(out / "results.json", res)
    f, k = res["fid"], res["kid"]
    num = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for key in KEYS:
        print(f"{key:22s} FID {num(f[key], '8.2f')}  KID {num(k[key], '.4f')}  tokens {res['tokens'][key]}  "
              f"ms/image {num(res['ms_per_image'][key], '.1f')}")
    ss, up = res["same_samples"]["fid"], res["upscale"]
    print(f"same samples: FID with detail {num(ss['davae'], '.2f')}, detail predicted from the base "
          f"{num(ss['davae_detail_from_base'], '.2f')}, base channels alone {num(ss['base_bicubic'], '.2f')}")
    print("upscale (bicubic | davae | oracle): FID " + " | ".join(num(up["fid"][m], ".2f") for m in ("bicubic", "davae", "oracle"))
          + ", PSNR " + " | ".join(num(up["psnr"][m], ".2f") for m in ("bicubic", "davae", "oracle"))
          + ", LPIPS " + " | ".join(num(up["lpips"][m], ".4f") for m in ("bicubic", "davae", "oracle")))
    ca = res["class_accuracy"]
    print("class accuracy (linear probe): " + ", ".join(f"{k} {num(v, '.3f')}" for k, v in ca.items()))


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
    dt = sub.add_parser("detail")
    dt.add_argument("out", type=Path)
    a = ap.parse_args()
    if a.cmd == "upsample":
        upsample(a.src, a.dst)
    elif a.cmd == "detail":
        from detail_results import detail_results

        detail_results(a.out)
    elif a.cmd == "diagnose":
        diagnose(a.out)
    else:
        results(a.out, a.per_class)


if __name__ == "__main__":
    main()
