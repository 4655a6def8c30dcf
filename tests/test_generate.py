"""davae generate on a tiny SD3 pipeline built in code (tiny CLIP/CLIP/T5 with local tokenizers, tiny SD3
transformer, tiny KL VAE) and on the tiny LightningDiT path: sizes, seeds, metadata, prompts files,
resume, and the warm start end to end (step-0 adapted model at R == native model at R/2 on the base
channels)."""

from __future__ import annotations

import json

import pytest
import torch

from davae_cli.config import load_preset
from davae_cli.generate import tiled_decode

from conftest import run_cli

R = 64  # DA-VAE resolution: 4x4 latent, 2x2 tokens with p = 2; native at R/2 has the same 4x4 base latent


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny SD3 pipeline folder: transformer/, vae/ (KL, C = 16, shift/scale), text encoders, tokenizers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from davae_cli.text import save_tiny_sd3_text_components

    d = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    SD3Transformer2DModel(**load_preset("tiny").dit.arch).save_pretrained(d / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  norm_num_groups=4, scaling_factor=1.5, shift_factor=0.1).save_pretrained(d / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(d / "scheduler")
    save_tiny_sd3_text_components(d)
    return d


@pytest.fixture(scope="module")
def adapted(pipe, tmp_path_factory):
    """(DA-VAE folder, step-0 adapted DiT folder) on the tiny pipeline."""
    d = tmp_path_factory.mktemp("adapted")
    common = ["--set", "dit.max_sequence_length=8", "--set", f"adapt_dit.resolution={R}"]
    run_cli("train-vae", "--preset", "tiny", "--base-vae", pipe / "vae", "--out", d / "vae", "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny", "--vae", d / "vae" / "final", "--dit", pipe, "--text-encoders", pipe,
            "--out", d / "dit", "--steps", "0", *common)
    return d / "vae" / "final", d / "dit" / "final"


def _gen(adapted, out, *args, check=True):
    vae, dit = adapted
    return run_cli("generate", "--preset", "tiny", "--vae", vae, "--dit", dit, "--out", out, "--steps", "3",
                   "--set", "dit.max_sequence_length=8", *args, "--json", check=check)


def test_sizes_seeds_metadata(adapted, tmp_path):
    from PIL import Image

    r = _gen(adapted, tmp_path / "a", "--prompt", "a red cube", "--num-images", "2", "--seed", "5", "--grid")
    rep = json.loads(r.stdout)
    assert len(rep["written"]) == 2 and rep["res"] == R and rep["tokens"] == 4
    im = Image.open(tmp_path / "a" / "000000.png")
    assert im.size == (R, R)
    meta = json.loads(im.text["parameters"])
    assert meta["prompt"] == "a red cube" and meta["seed"] == 5 and meta["steps"] == 3 and "davae" in meta
    assert json.loads(Image.open(tmp_path / "a" / "000001.png").text["parameters"])["seed"] == 6
    assert (tmp_path / "a" / "grid.png").is_file()
    _gen(adapted, tmp_path / "b", "--prompt", "a red cube", "--num-images", "2", "--seed", "5")
    same = [(tmp_path / d / "000000.png").read_bytes() for d in ("a", "b")]
    assert same[0] == same[1]  # same seed, same image
    import numpy as np

    a0 = torch.from_numpy(np.asarray(Image.open(tmp_path / "a" / "000000.png"), dtype=np.float32))
    a1 = torch.from_numpy(np.asarray(Image.open(tmp_path / "a" / "000001.png"), dtype=np.float32))
    assert (a0 - a1).abs().mean() > 0  # different seeds differ


def test_warm_start_end_to_end_matches_native_at_half_res(adapted, pipe, tmp_path):
    from davae_cli.latents import load_latent

    _gen(adapted, tmp_path / "da", "--prompt", "a red cube", "--prompt", "two dogs", "--seed", "3",
         "--guidance", "3.0", "--save-latents")
    run_cli("generate", "--preset", "tiny", "--native", "--base-pipeline", pipe, "--res", str(R // 2), "--out",
            tmp_path / "nat", "--steps", "3", "--set", "dit.max_sequence_length=8", "--prompt", "a red cube",
            "--prompt", "two dogs", "--seed", "3", "--guidance", "3.0", "--save-latents", "--json")
    for stem in ("000000", "000001"):
        da, _ = load_latent(tmp_path / "da" / f"{stem}.safetensors")
        nat, meta = load_latent(tmp_path / "nat" / f"{stem}.safetensors")
        assert da.shape == (32, 4, 4) and nat.shape == (16, 4, 4)
        torch.testing.assert_close(da[:16], nat, rtol=1e-5, atol=1e-5)
        assert meta["mode"] == "native"


def test_prompts_file_and_resume(adapted, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a cat\n\na dog\na boat\n")
    rep = json.loads(_gen(adapted, tmp_path / "o", "--prompts", pf).stdout)
    assert len(rep["written"]) == 3
    first = (tmp_path / "o" / "000001.png").read_bytes()
    (tmp_path / "o" / "000001.png").unlink()
    rep = json.loads(_gen(adapted, tmp_path / "o", "--prompts", pf).stdout)
    assert rep["skipped_existing"] == 2 and [p.rsplit("/", 1)[1] for p in rep["written"]] == ["000001.png"]
    assert (tmp_path / "o" / "000001.png").read_bytes() == first


def test_generate_errors(adapted, davae_dir, tmp_path):
    r = _gen(adapted, tmp_path / "e1", "--prompt", "x", "--res", "40", check=False)
    assert r.returncode == 1 and "multiple of 32" in r.stderr and "Traceback" not in r.stderr
    r = _gen(adapted, tmp_path / "e2", "--prompts", tmp_path / "missing.txt", check=False)
    assert r.returncode == 1 and "not found" in r.stderr
    r = run_cli("generate", "--preset", "tiny", "--vae", davae_dir, "--dit", adapted[1], "--prompt", "x",
                "--out", tmp_path / "e3", check=False)
    assert r.returncode == 1 and "do not fit together" in r.stderr
    r = _gen(adapted, tmp_path / "e4", "--class-id", "3", check=False)
    assert r.returncode == 1 and "prompts" in r.stderr


def test_lightningdit_generate_matches_native(tmp_path):
    run_cli("train-vae", "--preset", "tiny-imagenet", "--out", tmp_path / "vae", "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny-imagenet", "--vae", tmp_path / "vae" / "final", "--out", tmp_path / "dit",
            "--steps", "0")
    common = ["--preset", "tiny-imagenet", "--class-id", "1", "--class-id", "7", "--steps", "3", "--seed", "2",
              "--guidance", "2.0", "--save-latents", "--json"]
    rep = json.loads(run_cli("generate", *common, "--vae", tmp_path / "vae" / "final", "--dit",
                             tmp_path / "dit" / "final", "--out", tmp_path / "da").stdout)
    assert rep["res"] == 128 and len(rep["written"]) == 2
    run_cli("generate", *common, "--native", "--vae", tmp_path / "vae" / "final", "--res", "64", "--out", tmp_path / "nat")
    from davae_cli.latents import load_latent

    for stem in ("000000", "000001"):
        da, _ = load_latent(tmp_path / "da" / f"{stem}.safetensors")
        nat, _ = load_latent(tmp_path / "nat" / f"{stem}.safetensors")
        torch.testing.assert_close(da[:16], nat, rtol=1e-5, atol=1e-5)


def test_tiled_decode_blends_exactly_for_a_local_decoder():
    """Weights sum to one and tiles land where they belong: a pixel-local decoder is reproduced exactly."""
    conv = torch.nn.Conv2d(4, 3 * 16, 1)

    def decode(z):
        return torch.nn.functional.pixel_shuffle(conv(z), 4)

    z = torch.randn(1, 4, 37, 29)
    with torch.no_grad():
        full = decode(z)
        tiled = tiled_decode(decode, z, tile=12, overlap=4, scale=4)
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)


def test_model_too_large_for_this_cpu_is_refused(tmp_path):
    """A model that cannot fit without a GPU gets a one-line error before anything is loaded."""
    from davae_cli.errors import DavaeError
    from davae_cli.generate import _check_fits_cpu, _params_of_config

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(load_preset("sd35m-1024").dit.arch))
    n = _params_of_config(cfg, "sd3")
    assert 2.2e9 < n < 2.3e9  # SD3.5 Medium, counted on the meta device
    with pytest.raises(DavaeError, match="no GPU"):
        _check_fits_cpu(100 * n, torch.device("cpu"), "a 224B model")
    _check_fits_cpu(100 * n, torch.device("cuda"), "on a GPU the check does not apply")
