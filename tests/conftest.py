"""Shared fixtures: tiny base VAEs saved as diffusers folders, presets for them, tiny images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("DAVAE_LPIPS_RANDOM_BACKBONE", "1")  # LPIPS without downloading VGG weights
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what `davae`'s main() sets (in-process runs skip it)
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker, and for the CLIs it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared"
TAESD3 = SHARED / "weights" / "taesd3"
SUN_HAYS = SHARED / "data" / "sun_hays80"


def _tiny_kl(path: Path, latent_channels: int = 4, scaling_factor: float = 1.5, shift_factor: float = 0.1) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )
    vae.save_pretrained(str(path))
    return path


def _tiny_tae(path: Path, latent_channels: int = 4) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(2)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=latent_channels,
    )
    vae.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def kl_base(tmp_path_factory) -> Path:
    """A tiny AutoencoderKL folder (f8, C = 4, shift 0.1, scale 1.5)."""
    return _tiny_kl(tmp_path_factory.mktemp("kl_base"))


@pytest.fixture(scope="session")
def tae_base(tmp_path_factory) -> Path:
    """A tiny AutoencoderTiny folder (f8, C = 4)."""
    return _tiny_tae(tmp_path_factory.mktemp("tae_base"))


def write_preset(path: Path, base: Path, style: str = "official", **overrides) -> Path:
    """A preset YAML for the tiny test bases. `official`: SD3/ImageNet-style trunks (KL base, C=4,
    D=12, r=3); `residual`: the CPU design of the `tiny` preset (Tiny base, C=4, D=4)."""
    if style == "official":
        vae = dict(base_vae=str(base), base_channels=4, detail_channels=12, downsample=8, detail_features="trunk",
                   train_detail_trunk=True, detail_shortcut="zero_conv", decoder_input="trunk",
                   train_decoder_trunk=True, up_shortcut="repeat", up_hidden=0)
    else:
        vae = dict(base_vae=str(base), base_channels=4, detail_channels=4, downsample=8, detail_features="residual",
                   train_detail_trunk=False, detail_shortcut="base", logvar_init=-12.0, learn_logvar=False,
                   decoder_input="residual", train_decoder_trunk=False, up_hidden=16, up_shortcut="none",
                   up_conv_init="zero", up_input="detail_residual")
    data = {
        "name": f"test-{style}",
        "vae": vae,
        "loss": dict(l1=1.0, lpips=0.0, kl=1e-6, adv=0.0, align=0.5),
        "train_vae": dict(resolution=32, crop_size=32, batch_size=2, steps=4, lr=1e-3, betas=[0.9, 0.999],
                          warmup_steps=0, checkpoint_every=2, keep_checkpoints=2, log_every=1, eval_every=2,
                          num_val=2, stats_images=4, seed=0, ema_decay=0.9),
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        data[section][name] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def images_dir(tmp_path) -> Path:
    """Eight small random-texture RGB images (48x40 .. 64x56) plus one unreadable file."""
    from PIL import Image

    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = 48 + 2 * i, 40 + 2 * i
        base = rng.integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        (d / ("sub" if i % 2 else "")).mkdir(exist_ok=True)
        img.save(d / ("sub" if i % 2 else "") / f"img{i}.png")
    (d / "broken.jpg").write_bytes(b"this is not a jpeg")
    return d


class _Completed:
    """What `subprocess.run` returns, for an in-process run."""

    def __init__(self, args, returncode: int, stdout: str, stderr: str):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr


def _in_process(args: list[str]) -> _Completed:
    """The Typer app in this process (no interpreter start or torch/diffusers import: ~5 s less per call), with
    what a process exit would undo undone: run-folder locks released, --debug state reset. An exception the
    app did not turn into its one-line error shows its traceback in stderr, as a process would."""
    import traceback

    from typer.testing import CliRunner

    from davae_cli.cli import common
    from davae_cli.cli.app import app
    from davae_cli.train import loop

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # accelerate's singletons start afresh, as in a new process
    GradientState._reset_state()
    try:
        res = CliRunner().invoke(app, args, env={"COLUMNS": "120"})
    finally:
        for key in list(loop._HELD):
            loop.unlock_run(key)
        common.STATE["debug"] = False
        os.environ.pop("DAVAE_DEBUG", None)
    stderr = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        stderr += "".join(traceback.format_exception(res.exception))
    return _Completed(args, res.exit_code, res.stdout, stderr)


def run_cli(*args, check=True, env=None, subprocess_=False):
    """The CLI as a user's script would call it: in a fresh process when `env` is given (kill hooks, launch
    variables) or `subprocess_`, else in this process (the same app, exit code, stdout and stderr)."""
    argv = [str(a) for a in args]
    if env is None and not subprocess_:
        res = _in_process(argv)
    else:
        res = subprocess.run([sys.executable, "-m", "davae_cli", *argv], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "120", **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="session")
def davae_dir(tmp_path_factory, kl_base) -> Path:
    """An untrained DA-VAE on the tiny KL base (C = 4, D = 12), exported by `davae train-vae --steps 0`."""
    d = tmp_path_factory.mktemp("davae")
    preset = write_preset(d / "p.yaml", kl_base)
    run_cli("train-vae", "--preset", preset, "--out", d / "run", "--steps", "0")
    return d / "run" / "final"


@pytest.fixture(scope="session")
def lightning(tmp_path_factory):
    """(DA-VAE folder, step-0 adapted DiT folder) of the tiny LightningDiT preset (`tiny-imagenet`)."""
    d = tmp_path_factory.mktemp("ldit")
    run_cli("train-vae", "--preset", "tiny-imagenet", "--out", d / "vae", "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny-imagenet", "--vae", d / "vae" / "final", "--out", d / "dit", "--steps", "0")
    return d / "vae" / "final", d / "dit" / "final"


# the longest tests first, each on its own worker: `--dist worksteal` deals the collection to the N workers in N
# contiguous chunks, in order, so a file of _LONG placed at the start of chunk j is the first thing worker j runs
# (with fewer workers than files, the rest start chunk 0). Left where they are, two long tests can fall into one
# worker's chunk, or start last, and the run waits minutes for them while the other workers are idle.
_LONG = ("test_imagenette_chain.py", "test_help_examples.py")  # ~4 min each on this 2-core machine


def long_first(items: list, workers: int) -> list:
    """`items` with each _LONG file's tests at the start of a different worker's chunk (see above)."""
    groups = [[it for it in items if Path(str(it.fspath)).name == name] for name in _LONG]
    groups = [g for g in groups if g]
    rest = [it for it in items if Path(str(it.fspath)).name not in _LONG]
    own, shared = groups[:workers], groups[workers:]
    out = [it for g in shared for it in g] + rest
    starts, start = [], 0  # where each worker's chunk begins, as worksteal deals them
    for i in range(workers):
        starts.append(start)
        start += (len(items) - start) // (workers - i)
    for j, g in enumerate(own):
        out[starts[j]:starts[j]] = g
    return out


def pytest_collection_modifyitems(session, config, items):
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    items[:] = long_first(items, max(1, workers))


def torchscript_file(module: "torch.nn.Module", path: Path) -> Path:
    """`module` scripted and saved to `path`: a stand-in feature extractor for `eval-fid --inception`."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path
