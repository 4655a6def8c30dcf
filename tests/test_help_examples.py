"""Every `--help` example that needs no download, run as printed (issue 38, item 9).

The examples of every command's `--help` are run in the order a reader would try them, in one folder laid out as
the examples assume a user's to be: `photos/`, `cat.png`, `prompts.txt`, `data/val/` and `data/train/` (class
folders), `imagenette224/train`, `../shared/weights/taesd3` (a link to the project's copy) and the run folders
that earlier examples write (`runs/tiny`, `runs/tiny-dit`, ...). Where an example names a folder no other example
makes (`runs/vae`, `samples/`, `decoded_a/`), SETUP makes it first with the CLI, or links it to the folder an
example made that stands for it (`runs/tvae` is `runs/tiny`).

Each example runs with the argv it prints. Only the cost is cut, in the presets every command resolves
(`cli.common.resolve_preset`): at most TRAIN_STEPS training steps and SAMPLE_STEPS sampling steps, so the chain
takes minutes instead of hours; everything else (flags, folders, settings a `--resume` must match, what one
example leaves for the next) is the user's.

An example is not run when it needs what this machine cannot have: a download (hub weights, the official
checkpoints, the user's own data sets under /data or /models) or, for HEAVY, no download but the full-size
SD3.5 architectures (10+ GB, minutes per step on a CPU; `DAVAE_HEAVY_EXAMPLES=1` runs them too). Each such
example is listed with its reason; `test_every_example_is_run_or_has_a_reason` fails when a help text gains an
example that is in neither list, or a listed one is no longer printed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED, run_cli

TAESD3 = SHARED / "weights" / "taesd3"
IMAGENETTE = SHARED / "data" / "imagenette224"
SUN_HAYS = SHARED / "data" / "sun_hays80"

TRAIN_STEPS = 2
SAMPLE_STEPS = 4

_SD35 = "download: SD3.5 Medium from the hub (gated) or a local pipeline under /models"
_OFFICIAL = "download: the official DA-VAE release checkpoints"
NOT_RUN = {
    "train-vae --preset sd35m-1024 --data /data/hq --out runs/sd35": _SD35 + "; the user's photos in /data/hq",
    "adapt-dit --preset sd35m-1024 --vae runs/sd35/final --data /data/synthetic --out runs/sd35-dit --dit "
    "/models/stable-diffusion-3.5-medium": _SD35,
    "adapt-dit --preset imagenet-512 --vae runs/in512/final --data /data/imagenet/train --out runs/in512-dit --dit "
    "lightningdit-xl-imagenet256-800ep.pt": "download: ImageNet and the pretrained LightningDiT-XL checkpoint",
    "train-dit --preset imagenette --vae runs/v/final --data /data/imagenet/train --res 256 --out runs/native-256":
        "download: ImageNet (the user's /data/imagenet)",
    "generate --preset sd35m-2048 --vae runs/sd35/final --dit runs/sd35-dit/final --prompt a lighthouse at dusk, "
    "photo --res 2048 --out out/": _SD35 + " (runs/sd35 is made from it)",
    "generate --preset sd35m-1024 --native --base-pipeline /models/stable-diffusion-3.5-medium --prompt a lighthouse "
    "at dusk, photo --res 1024 --out out-native/": _SD35,
    "generate --preset imagenet-512 --vae runs/in512/final --dit runs/in512-dit/final --class-id 207 --class-id 360 "
    "--num-images 25 --out samples/": "download: ImageNet and LightningDiT-XL (runs/in512 is made from them)",
    "upscale photo_1024.png --preset sd35m-2048 --vae runs/sd35-2048/final --dit runs/sd35-2048-dit/final --prompt "
    "a lighthouse at dusk, photo --out up/": _SD35,
    "synth --preset flux-2048 --base-pipeline /models/FLUX.1-dev --prompts t2i-prompts.parquet --res 1024 "
    "--shard-size 1000 --batch-size 8 --out /data/synth/": "download: FLUX.1-dev (gated) and a prompt set",
    "synth --preset sd35m-1024 --base-pipeline /models/stable-diffusion-3.5-large --prompts prompts.jsonl --res 1024 "
    "--out /data/synth/": "download: SD3.5 Large (gated) and a prompt set",
    "adapt-dit --preset sd35m-1024 --vae runs/sd35/final --data /data/synth/ --out runs/sd35-dit": _SD35,
    "eval-fid samples/ --ref-stats cifar10:32:train": "download: clean-fid fetches the CIFAR-10 statistics",
    "eval-fid up/ data/val/ --paired --lpips-net vgg": "download: torchvision's VGG16 weights (the example names "
                                                        "the user's local copy in DAVAE_LPIPS_WEIGHTS)",
    "convert imagenet-davae davae_f16d32.ckpt --base-vae vavae-imagenet256-f16d32-dinov2.pt --stats "
    "latents_stats.pt --out runs/official-davae": _OFFICIAL,
    "convert lightningdit lightningdit_xl_davae.pt --vae runs/official-davae --out runs/official-dit --preset "
    "imagenet-512-official": _OFFICIAL,
    "convert sd3-davae pytorch_model.bin --base-vae /models/sd35m --out runs/official-sd3-davae": _OFFICIAL,
    "convert sd3-dit checkpoints/step_20000.pt --lora lora_weights/lora_step_20000 --vae runs/official-sd3-davae "
    "--dit /models/sd35m --out runs/official-sd3-dit": _OFFICIAL,
    "encode photos/ --vae runs/official-davae --out latents/ --res 512": _OFFICIAL + " (converted to runs/official-davae)",
    "generate --preset imagenet-512-official --vae runs/official-davae --dit runs/official-dit --class-id 207 --out "
    "samples/": _OFFICIAL,
}
_FULL = "no download, but the full SD3.5 Medium architecture (random weights, 10+ GB, minutes per step on a CPU)"
HEAVY = {
    "generate --preset sd35m-1024 --random-weights --prompt x --res 1024 --num-images 20 --batch-size 10 --compile "
    "--json --out speed/": _FULL,
    "bench --preset sd35m-1024 --res 1024": _FULL,
    "bench --preset sd35m-2048 --res 2048 --compile --json": _FULL,
    "bench --preset sd35m-1024 --res 512 --steps 1 --repeats 1 --warmup 0 --no-decode": _FULL,
    "bench --preset sd35m-1024 --res 1024 --batch-size 10 --text-encoders": _FULL + ", with its text encoders",
    "bench --preset sd35m-1024 --res 512 --res 1024 --res 2048 --plot speedup.png": _FULL,
}

# the order a reader tries the commands in: each one's inputs are made before it
ORDER = ["train-vae", "adapt-dit", "encode", "train-dit", "decode", "generate", "upscale", "synth", "bench",
         "report", "eval-fid", "ceilings", "convert"]

# folders an example names that no example makes: (made by the CLI) or (a link to what stands for it)
SETUP = {
    "generate": [("link", "runs/tvae", "runs/tiny"), ("link", "runs/tdit", "runs/tiny-dit")],
    "train-dit": [("run", "train-vae --preset imagenette --base-vae ../shared/weights/taesd3 --data "
                          "imagenette224/train --out runs/inette-vae --set train_vae.num_val=0 "
                          "--set train_vae.stats_images=8")],
    "decode": [("link", "runs/vae", "runs/inette-vae"), ("link", "runs/native", "runs/native-112"),
               ("run", "adapt-dit --preset imagenette --vae runs/vae/final --dit runs/native/final --data "
                       "imagenette224/train --out runs/adapt"),
               ("run", "generate --preset imagenette --vae runs/vae/final --dit runs/adapt/final --class-id 0 "
                       "--class-id 1 --num-images 4 --save-latents --out samples/")],
    "report": [("link", "runs/sd3-adapt", "runs/tiny-dit")],
    "eval-fid": [("link", "decoded_a", "dec"), ("link", "decoded_b", "dec-pred"), ("copy", "samples/10000", "samples")],
}


# ------------------------------------------------------------------ reading the examples
def example_commands(text: str) -> list[tuple[list[str], dict[str, str]]]:
    """The commands of a help text's examples as (argv after `davae` or `-m davae_cli`, environment): continued
    lines joined, comments and shell redirections cut off, `VAR=value` prefixes returned as the environment, a
    shell `for VAR in A B ...; do` loop's variable set to its first value."""
    out, loop_vars = [], {}
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        loop = re.match(r"\s*for (\w+) in (\S+)", line)
        if loop:
            loop_vars[loop.group(1)] = loop.group(2)
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for stop in (">", "|", "||", "&&"):
            if stop in tokens:
                tokens = tokens[: tokens.index(stop)]
        env = {}
        while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
            key, value = tokens.pop(0).split("=", 1)
            env[key] = value
        tokens = [re.sub(r"\$(\w+)", lambda m: loop_vars.get(m.group(1), m.group(0)), t) for t in tokens]
        if tokens[:1] == ["davae"]:
            out.append((tokens[1:], env))
        elif "davae_cli" in tokens:
            out.append((tokens[tokens.index("davae_cli") + 1:], env))
    return out


def help_examples() -> dict[str, list[tuple[list[str], dict[str, str]]]]:
    from davae_cli.cli.app import COMMANDS

    return {name: example_commands(text) for name, _, text in COMMANDS if text}


def key(argv: list[str]) -> str:
    return " ".join(argv)


def test_every_example_is_run_or_has_a_reason():
    printed = {key(argv) for examples in help_examples().values() for argv, _ in examples}
    assert len(printed) > 50
    assert set(help_examples()) == set(ORDER)
    stale = (set(NOT_RUN) | set(HEAVY)) - printed
    assert not stale, f"listed but no longer printed by any --help: {sorted(stale)}"
    assert not set(NOT_RUN) & set(HEAVY)


def test_the_reader_sees_the_loop_variable_and_the_environment():
    text = """
  DAVAE_X=~/w.pth davae eval-fid up/ data/val/ --paired   # a comment
  for step in 100 200; do
    davae eval-fid "samples/$step" --ref-stats val.npz --json > "fid_$step.json" || exit 1
  done
  accelerate launch --num_processes 2 -m davae_cli train-vae --preset tiny \\
      --out runs/x
"""
    assert example_commands(text) == [
        (["eval-fid", "up/", "data/val/", "--paired"], {"DAVAE_X": "~/w.pth"}),
        (["eval-fid", "samples/100", "--ref-stats", "val.npz", "--json"], {}),
        (["train-vae", "--preset", "tiny", "--out", "runs/x"], {})]


# ------------------------------------------------------------------ the user's folder
def _user_folder(root: Path) -> Path:
    """`root/work`, laid out as the examples assume; `root/shared/weights/taesd3` is the project's copy."""
    from PIL import Image

    work = root / "work"
    (root / "shared" / "weights").mkdir(parents=True)
    (root / "shared" / "weights" / "taesd3").symlink_to(TAESD3)
    photos = sorted(SUN_HAYS.glob("*.jpg"))[:8]
    (work / "photos").mkdir(parents=True)
    for i, f in enumerate(photos):  # a user's photos, smaller (the examples do not depend on their size)
        Image.open(f).convert("RGB").resize((320, 240), Image.BICUBIC).save(work / "photos" / f"photo{i}.jpg")
    shutil.copy(work / "photos" / "photo0.jpg", work / "dog.jpg")
    Image.open(work / "photos" / "photo1.jpg").save(work / "cat.png")
    Image.open(work / "photos" / "photo2.jpg").crop((0, 0, 256, 256)).save(work / "photo.png")
    for f in (work / "photos").iterdir():  # a text-to-image model adapts on captioned images
        f.with_suffix(".txt").write_text(f"a photograph, {f.stem}")
    (work / "prompts.txt").write_text("a lighthouse at dusk\na red bicycle\na bowl of ramen\na snowy forest\n")
    classes = sorted(p.name for p in (IMAGENETTE / "train").iterdir())
    for split, src, n in (("data/train", "train", 4), ("data/val", "val", 2)):
        for c in classes:
            (work / split / c).mkdir(parents=True)
            for f in sorted((IMAGENETTE / src / c).iterdir())[:n]:
                (work / split / c / f.name).symlink_to(f)
    (work / "imagenette224").mkdir()
    (work / "imagenette224" / "train").symlink_to(work / "data" / "train")
    (work / "val").symlink_to(work / "data" / "val")
    (work / "tench").symlink_to(work / "data" / "val" / classes[0])
    return work


def _cost_cut(monkeypatch):
    """Every preset the CLI resolves trains at most TRAIN_STEPS steps and samples at most SAMPLE_STEPS."""
    from davae_cli.cli import app, common  # noqa: F401  (app: every command module imported, so each is patched)

    real = common.resolve_preset

    def resolve(*args, **kwargs):
        p = real(*args, **kwargs)
        for section in ("train_vae", "adapt_dit", "train_dit"):
            sec = getattr(p, section)
            sec.steps = min(sec.steps, TRAIN_STEPS)
        p.sample.steps = min(p.sample.steps, SAMPLE_STEPS)
        return p

    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("davae_cli.cli") and getattr(module, "resolve_preset", None) is real:
            monkeypatch.setattr(module, "resolve_preset", resolve)
            patched.append(name)
    assert {"davae_cli.cli.common", "davae_cli.cli.generate", "davae_cli.cli.bench"} <= set(patched), patched


def _setup(work: Path, command: str, failures: list[str], timings: list) -> None:
    for kind, a, *b in SETUP.get(command, []):
        if kind == "link":
            (work / a).parent.mkdir(parents=True, exist_ok=True)
            (work / a).symlink_to(work / b[0])
        elif kind == "copy":  # the images only (samples/10000: one checkpoint's samples)
            (work / a).mkdir(parents=True)
            for f in (work / b[0]).glob("*.png"):
                shutil.copy(f, work / a / f.name)
        else:
            t0 = time.perf_counter()
            res = run_cli(*shlex.split(a), check=False)
            timings.append((time.perf_counter() - t0, f"{a}   (setup)"))
            if res.returncode:
                failures.append(f"setup `davae {a}` failed:\n{res.stderr[-1500:]}")


def _expected_failure(argv: list[str]) -> str | None:
    """The one-line error an example gives on purpose on this machine (an optional extra not installed)."""
    if "--report-to" in argv and argv[argv.index("--report-to") + 1] == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            return "davae[wandb]"
    return None


@pytest.mark.skipif(not (TAESD3.is_dir() and IMAGENETTE.is_dir() and SUN_HAYS.is_dir()),
                    reason="needs ../shared (TAESD3 weights, Imagenette, sun_hays80)")
def test_every_help_example_that_needs_no_download_runs_as_printed(tmp_path, monkeypatch):
    work = _user_folder(tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.setenv("WANDB_MODE", "offline")
    _cost_cut(monkeypatch)
    heavy = os.environ.get("DAVAE_HEAVY_EXAMPLES") == "1"
    examples = help_examples()
    failures, ran, setup = [], [], []
    for command in ORDER:
        _setup(work, command, failures, setup)
        for argv, env in examples[command]:
            if key(argv) in NOT_RUN or (key(argv) in HEAVY and not heavy):
                continue
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            t0 = time.perf_counter()
            res = run_cli(*argv, check=False)
            ran.append((time.perf_counter() - t0, key(argv)))
            expected = _expected_failure(argv)
            if expected:
                lines = [line for line in res.stderr.splitlines() if line.strip()]
                if not (res.returncode == 1 and len(lines) == 1 and expected in lines[0]):
                    failures.append(f"`davae {key(argv)}`: expected one line naming {expected}:\n{res.stderr}")
            elif res.returncode:
                failures.append(f"`davae {key(argv)}` (--help of {command}) exit {res.returncode}:\n"
                                f"{res.stderr[-1500:]}")
    for seconds, example in sorted(ran + setup, reverse=True):  # shown with -s, or when the test fails
        print(f"{seconds:6.1f} s  davae {example}")
    assert not failures, "\n\n".join(failures)
    assert len(ran) >= 40, ran
