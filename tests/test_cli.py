"""The CLI end to end on tiny models: train-vae --steps 0, encode, decode, and every bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from davae_cli.latents import load_latent, save_latent
from conftest import run_cli, write_preset


run = run_cli


def one_line_error(res, fragment):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and fragment in lines[0], res.stderr


def test_help_has_examples():
    for cmd in ("train-vae", "encode", "decode"):
        out = run(cmd, "--help").stdout
        assert "Example" in out and "davae " + cmd in out


def test_encode_decode_round_trip(tmp_path, davae_dir, images_dir):
    good = [p for p in sorted(images_dir.rglob("*.png"))][:3]
    res = run("encode", *good, "--vae", davae_dir, "--out", tmp_path / "lat", "--res", 32, "--json")
    report = json.loads(res.stdout)  # stdout is exactly one JSON object
    assert report["num_written"] == 3 and report["num_failed"] == 0
    lat, meta = load_latent(tmp_path / "lat" / "img0.safetensors")
    assert lat.shape == (16, 2, 2)  # C+D = 4+12, 32 px / (s f = 16)
    assert meta["C"] == 4 and meta["D"] == 12 and meta["resolution"] == [32, 32]
    assert meta["transform"]["detail"] == "posterior mean" and meta["davae"].startswith("sha256:")
    res = run("decode", tmp_path / "lat", "--vae", davae_dir, "--out", tmp_path / "png")
    img = np.asarray(Image.open(tmp_path / "png" / "img0.png"))
    assert img.shape == (32, 32, 3)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["img0.png", "img2.png", "img4.png"]


def test_encode_keeps_native_size_when_already_a_multiple(tmp_path, davae_dir):
    Image.fromarray(np.full((48, 64, 3), 100, np.uint8)).save(tmp_path / "a.png")
    run("encode", tmp_path / "a.png", "--vae", davae_dir, "--out", tmp_path / "lat")
    lat, meta = load_latent(tmp_path / "lat" / "a.safetensors")
    assert lat.shape == (16, 3, 4) and meta["resolution"] == [48, 64]


def test_no_silent_overwrite_and_partial_failures(tmp_path, davae_dir, images_dir):
    # broken.jpg is reported, the good images are still written, the exit code is non-zero
    res = run("encode", images_dir, "--vae", davae_dir, "--out", tmp_path / "lat", "--res", 32, check=False)
    assert res.returncode == 1 and "broken.jpg" in res.stderr and "Traceback" not in res.stderr
    assert len(list((tmp_path / "lat").glob("*.safetensors"))) == 8
    before = (tmp_path / "lat" / "img1.safetensors").read_bytes()
    res = run("encode", images_dir / "sub" / "img1.png", "--vae", davae_dir, "--out", tmp_path / "lat", "--res", 48)
    assert "1 skipped" in res.stderr and "--overwrite" in res.stderr  # kept, and not a failure
    assert (tmp_path / "lat" / "img1.safetensors").read_bytes() == before
    run("encode", images_dir / "sub" / "img1.png", "--vae", davae_dir, "--out", tmp_path / "lat", "--res", 48,
        "--overwrite")
    assert load_latent(tmp_path / "lat" / "img1.safetensors")[0].shape[1:] == (3, 3)
    # decode: existing PNG kept without --overwrite
    run("decode", tmp_path / "lat" / "img0.safetensors", "--vae", davae_dir, "--out", tmp_path / "png")
    before = (tmp_path / "png" / "img0.png").stat().st_mtime_ns
    res = run("decode", tmp_path / "lat" / "img0.safetensors", "--vae", davae_dir, "--out", tmp_path / "png")
    assert "1 skipped" in res.stderr and "--overwrite" in res.stderr
    assert (tmp_path / "png" / "img0.png").stat().st_mtime_ns == before


def test_decode_refuses_latents_of_another_davae(tmp_path, davae_dir, kl_base):
    other = write_preset(tmp_path / "p.yaml", kl_base, train_vae__seed=5)
    run("train-vae", "--preset", other, "--out", tmp_path / "other", "--steps", "0",
        "--set", "vae.detail_conv_init=zero")
    Image.fromarray(np.full((32, 32, 3), 50, np.uint8)).save(tmp_path / "x.png")
    run("encode", tmp_path / "x.png", "--vae", tmp_path / "other" / "final", "--out", tmp_path / "lat")
    lat, meta = load_latent(tmp_path / "lat" / "x.safetensors")
    save_latent(tmp_path / "lat" / "wrong_shape.safetensors", torch.zeros(8, 2, 2), meta)
    (tmp_path / "lat" / "garbage.safetensors").write_bytes(b"nope")
    res = run("decode", tmp_path / "lat", "--vae", davae_dir, "--out", tmp_path / "png", check=False)
    assert res.returncode == 1
    assert "x.safetensors: made by a different DA-VAE" in res.stderr
    assert "wrong_shape.safetensors: latent has 8 channels" in res.stderr
    assert "garbage.safetensors: not a readable safetensors file" in res.stderr
    assert not (tmp_path / "png").exists()  # nothing written, not even an empty folder


@pytest.mark.parametrize("args, fragment", [
    (["encode", "nowhere.png", "--vae", "{vae}", "--out", "{tmp}/o"], "nowhere.png: not found"),
    (["encode", "{tmp}", "--vae", "{tmp}/missing", "--out", "{tmp}/o"], "is not a DA-VAE folder"),
    (["encode", "{tmp}", "--vae", "{vae}", "--out", "{tmp}/o", "--res", "8"], "--res 8 is smaller than one latent token"),
    (["train-vae", "--preset", "nope", "--out", "{tmp}/r"], "unknown preset 'nope'"),
    (["train-vae", "--preset", "tiny", "--set", "loss.algn=1", "--out", "{tmp}/r"], "unknown key 'loss.algn'"),
    (["train-vae", "--preset", "tiny", "--base-vae", "random", "--out", "{tmp}/r"], "--data is required"),
    (["train-vae", "--preset", "tiny", "--base-vae", "{tmp}/no_vae", "--steps", "0", "--out", "{tmp}/r"],
     "not found"),
    (["train-vae", "--preset", "tiny", "--steps", "0", "--out", "{tmp}/r"], "pass a local diffusers folder with --base-vae"),
    (["train-vae", "--preset", "tiny", "--base-vae", "random", "--data", "{tmp}/nodata", "--out", "{tmp}/r"],
     "input not found"),
])
def test_bad_input_is_one_line(tmp_path, davae_dir, args, fragment):
    args = [a.format(vae=davae_dir, tmp=tmp_path) for a in args]
    res = run(*args, check=False)
    if "not found" in fragment and args[0] == "encode":
        assert res.returncode == 1 and fragment in res.stderr and "Traceback" not in res.stderr
    else:
        one_line_error(res, fragment)


def test_random_base_tiny_run_with_bundled_photos(tmp_path):
    res = run("train-vae", "--preset", "tiny", "--base-vae", "random", "--data", "skimage", "--out", tmp_path / "r",
              "--steps", "2", "--set", "train_vae.crop_size=32", "--set", "train_vae.num_val=2",
              "--set", "train_vae.stats_images=2", "--set", "train_vae.resolution=64", "--json")
    out = json.loads(res.stdout)
    assert out["steps"] == 2 and out["eval"]["num_images"] == 2 and "davae.psnr" in out["eval"]
    assert out["eval"]["detail_structure"]["latents"] == 2  # train-vae --json reports the latent structure
    assert (tmp_path / "r" / "final" / "config.json").is_file()
