"""train-dit: the native model's latents are exactly the DA-VAE's base channels, a short run lowers the loss,
exact --resume, the time budget, the export loads in adapt-dit (warm start = the native function) and in
generate --native, and bad input is refused before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from davae_cli.config import load_preset

from conftest import run_cli, _tiny_tae

SETS = ["--set", "train_dit.steps=6"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from davae_cli.train.vae import train_vae

    d = tmp_path_factory.mktemp("tivae")
    train_vae(load_preset("tiny-imagenet", ["train_vae.steps=0"]), [], d / "run")
    return d / "run" / "final"


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    """Two class folders of 64x64 photos-like images (smooth random colour fields)."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for i in range(8):
        arr = rng.integers(0, 255, size=(6, 6, 3)).astype(np.uint8)
        sub = d / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).resize((80, 72), Image.BICUBIC).save(sub / f"im{i}.png")
    return d


def _train(vae, data, out, *extra, check=True, env=None):
    return run_cli("train-dit", "--preset", "tiny-imagenet", "--vae", vae, "--data", data, "--out", out, *extra,
                   "--json", check=check, env=env)


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if r.get("event") == "train"]


def _events(run, event):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("event") == event]


def _trainable(ckpt):
    """The trainable weights a checkpoint folder holds."""
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)["trainable"]


def test_native_latents_are_the_davae_base_channels(vae):
    """The native model at R/2 sees exactly what the DA-VAE's base channels hold at R (the warm start's premise)."""
    from davae_cli.train.native import BaseLatentEncoder
    from davae_cli import latents as L
    from davae_cli.vae.model import DetailAlignedVAE

    m = DetailAlignedVAE.from_pretrained(str(vae)).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        native = BaseLatentEncoder(m).encode(L.downsample(x, 2)).latent
        da = m.encode(x).latent
    assert native.shape == (2, 16, 8, 8)
    assert torch.equal(native, da[:, :16])


def test_latents_from_davae_base_equal_adapt_dits_base_channels(vae, classes, tmp_path):
    """train_dit.latents_from=davae_base: the native cache holds, for every image, exactly the base channels of
    adapt-dit's cached latent of the same image at s x the resolution (PIL resize to R, float downsample)."""
    from davae_cli.latents import load_latent

    _train(vae, classes, tmp_path / "n", "--steps", "1", "--set", "train_dit.latents_from=davae_base")
    run_cli("adapt-dit", "--preset", "tiny-imagenet", "--vae", vae, "--dit", tmp_path / "n" / "final", "--data",
            classes, "--out", tmp_path / "a", "--steps", "1", "--set", "adapt_dit.resolution=128",
            "--set", "adapt_dit.batch_size=2")
    index = lambda run: {r["source"]: r["latent"] for r in map(json.loads, (run / "cache" / "index.jsonl").read_text().splitlines())}  # noqa: E731
    native, adapted = index(tmp_path / "n"), index(tmp_path / "a")
    assert native.keys() == adapted.keys() and len(native) == 8
    for src in native:
        a, _ = load_latent(native[src])
        b, _ = load_latent(adapted[src])
        assert a.shape == (16, 8, 8) and torch.equal(a, b[:16]), src
    r = _train(vae, classes, tmp_path / "bad", "--set", "train_dit.latents_from=nope", check=False)
    assert r.returncode == 1 and "train_dit.latents_from: 'nope' is not one of" in r.stderr


def test_train_resume_and_the_export_loads_everywhere(vae, classes, tmp_path):
    from safetensors.torch import load_file

    from davae_cli.dit.lightningdit import LightningDiTBackend
    from davae_cli.dit.lightningdit import LightningDiT

    full = json.loads(_train(vae, classes, tmp_path / "full", *SETS).stdout)
    assert full["steps"] == 6 and full["probe_loss_end"] < full["probe_loss_start"]
    cut = tmp_path / "cut"
    killed = _train(vae, classes, cut, *SETS, check=False, env={"DAVAE_KILL_AFTER_STEP": "5"})
    assert killed.returncode != 0 and not (cut / "final").exists()
    # the kill came right after step 5's checkpoint: it is there, `latest` names it, no later step ran, and it
    # holds the uninterrupted run's weights of step 5
    ck = cut / "checkpoints" / "step-0000005"
    assert (cut / "checkpoints" / "latest").read_text().strip() == ck.name
    assert sorted(p.name for p in (cut / "checkpoints").glob("step-*")) == [ck.name]
    assert _losses(cut) == _losses(tmp_path / "full")[:5]
    at_kill, ref = _trainable(ck), _trainable(tmp_path / "full" / "checkpoints" / ck.name)
    assert at_kill.keys() == ref.keys() and all(torch.equal(at_kill[k], ref[k]) for k in ref)
    _train(vae, classes, cut, *SETS, "--resume")
    # the resume began at that checkpoint (a restart from 0 would log start at step 0 and redo steps 1-5) ...
    assert [(r["step"], r["start_step"]) for r in _events(cut, "start")] == [(0, 0), (5, 5)]
    # ... and continued from its weights and optimiser state: the step after it is the uninterrupted run's
    assert _losses(cut) == _losses(tmp_path / "full") and len(_losses(tmp_path / "full")) == 6
    final = tmp_path / "full" / "final"
    a = load_file(final / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    facts = json.loads((final / "davae_native.json").read_text())
    assert facts["resolution"] == 64 and facts["latent_side"] == 8 and facts["steps"] == 6
    assert facts["train_seconds"] > 0 and not facts["stopped_by_time_limit"]
    native = LightningDiT.from_pretrained(str(final))
    assert native.config.input_size == 8 and native.config.in_channels == 16 and native.config.num_classes == 10

    # adapt-dit warm-starts it: at step 0 the base outputs are the native model's, the detail outputs zero
    run_cli("adapt-dit", "--preset", "tiny-imagenet", "--vae", vae, "--dit", final, "--out", tmp_path / "ad",
            "--steps", "0")
    backend = LightningDiTBackend(load_preset("tiny-imagenet"))
    adapted = backend.load_adapted(tmp_path / "ad" / "final")
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(3, 32, 8, 8, generator=g), torch.rand(3, generator=g)
    cond = {"labels": torch.tensor([0, 1, 10])}
    with torch.no_grad():
        v, v_ref = backend.velocity(adapted, x, sigma, cond), backend.velocity(native.eval(), x[:, :16], sigma, cond)
    assert (v[:, :16] - v_ref).abs().max() <= 1e-6 and torch.count_nonzero(v[:, 16:]) == 0

    # generate --native samples it at its own resolution
    r = run_cli("generate", "--preset", "tiny-imagenet", "--native", "--base-pipeline", final, "--vae", vae,
                "--res", "64", "--class-id", "1", "--sampling-steps", "2", "--out", tmp_path / "g", "--json")
    rep = json.loads(r.stdout)
    assert rep["tokens"] == 64 and len(rep["written"]) == 1
    from PIL import Image

    with Image.open(tmp_path / "g" / "000000.png") as im:
        assert im.size == (64, 64)
    # ... and at another resolution (LightningDiT computes its position tables for the grid it is given)
    r = run_cli("generate", "--preset", "tiny-imagenet", "--native", "--base-pipeline", final, "--vae", vae,
                "--res", "96", "--class-id", "1", "--sampling-steps", "2", "--out", tmp_path / "g2", "--json")
    assert json.loads(r.stdout)["tokens"] == 144
    with Image.open(tmp_path / "g2" / "000000.png") as im:
        assert im.size == (96, 96)
    # a size that is no whole number of tokens is one line
    r = run_cli("generate", "--preset", "tiny-imagenet", "--native", "--base-pipeline", final, "--vae", vae,
                "--res", "100", "--class-id", "1", "--out", tmp_path / "g3", check=False)
    assert r.returncode == 1 and "multiple of" in r.stderr and "Traceback" not in r.stderr


def test_time_budget_stops_exports_and_resumes(vae, classes, tmp_path):
    out = tmp_path / "t"
    m = json.loads(_train(vae, classes, out, "--steps", "500", "--max-minutes", "0.0001").stdout)
    assert m["stopped_by_time_limit"] and 1 <= m["steps"] < 500
    facts = json.loads((out / "final" / "davae_native.json").read_text())
    assert facts["stopped_by_time_limit"] and facts["steps"] == m["steps"]
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "time_limit" and e["step"] == m["steps"] for e in events)
    # a longer budget continues from the checkpoint at the step reached; time spent before counts
    first = facts["train_seconds"]
    m2 = json.loads(_train(vae, classes, out, "--steps", str(m["steps"] + 2), "--max-minutes", "5", "--resume").stdout)
    assert m2["steps"] == m["steps"] + 2 and not m2["stopped_by_time_limit"]
    assert m2["train_seconds"] >= first


def test_bad_input_is_one_line_and_writes_nothing(vae, classes, tmp_path):
    # a folder without class sub-folders
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list(classes.rglob("*.png"))[:3]:
        shutil.copy(p, flat / p.name)
    r = _train(vae, flat, tmp_path / "a", check=False)
    assert r.returncode == 1 and "one sub-folder per class" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists()
    # the SD3 preset has no native trainer
    r = run_cli("train-dit", "--preset", "tiny", "--vae", vae, "--data", classes, "--out", tmp_path / "b", check=False)
    assert r.returncode == 1 and "LightningDiT" in r.stderr and not (tmp_path / "b").exists()
    # a native model of another size (trained at 128²: a 16x16 grid) for a DA-VAE grid of 8x8
    _train(vae, classes, tmp_path / "n128", "--res", "128", "--steps", "1")
    r = run_cli("adapt-dit", "--preset", "tiny-imagenet", "--vae", vae, "--dit", tmp_path / "n128" / "final",
                "--data", classes, "--out", tmp_path / "c", check=False)
    assert r.returncode == 1 and "16x16 latent grid" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()
    # a DA-VAE on another base VAE than the one the native model was trained on
    _train(vae, classes, tmp_path / "n64", "--steps", "1")
    other_base = _tiny_tae(tmp_path / "tae16", latent_channels=16)
    from davae_cli.train.vae import train_vae

    train_vae(load_preset("tiny-imagenet", [f"vae.base_vae={other_base}", "vae.base_vae_subfolder=null",
                                            "train_vae.steps=0"]), [], tmp_path / "vae2")
    r = run_cli("adapt-dit", "--preset", "tiny-imagenet", "--vae", tmp_path / "vae2" / "final",
                "--dit", tmp_path / "n64" / "final", "--data", classes, "--out", tmp_path / "d", check=False)
    assert r.returncode == 1 and "another base VAE" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()
    r = run_cli("generate", "--preset", "tiny-imagenet", "--native", "--base-pipeline", tmp_path / "n64" / "final",
                "--vae", tmp_path / "vae2" / "final", "--res", "64", "--class-id", "0", "--out", tmp_path / "e",
                check=False)
    assert r.returncode == 1 and "another base VAE" in r.stderr and not (tmp_path / "e").exists()
