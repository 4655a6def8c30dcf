"""davae upscale of latent files (tiny LightningDiT models built in code): the base latents of a native
generation (`generate --native --save-latents`) are taken as they are, mapped into the DA-VAE's z_base space,
and only the detail channels are generated (--strength 0); class and seed come from each file; the outputs
are s x the base resolution and their saved latents decode with `decode --base-only` / `--detail-from-base`.
Also the input rules (folders of PNGs and latents) and bad latent files (one line, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from davae_cli.latents import load_latent, save_latent
from davae_cli.vae.model import DetailAlignedVAE

from test_generate import R, adapted, pipe  # noqa: F401 - fixtures: the tiny SD3 pipeline and its step-0 adaptation

NATIVE_RES = 64  # the native tiny LightningDiT's resolution: 8x8 latents, the adapted model's grid at 128²


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(DA-VAE, adapted DiT, folder of native generations with their latents): tiny-imagenet at step 0; two
    classes, seed 4, so the latents' own class and seed are not upscale's defaults."""
    d = tmp_path_factory.mktemp("uplat")
    run_cli("train-vae", "--preset", "tiny-imagenet", "--out", d / "vae", "--steps", "0")
    vae = d / "vae" / "final"
    run_cli("adapt-dit", "--preset", "tiny-imagenet", "--vae", vae, "--out", d / "dit", "--steps", "0")
    run_cli("generate", "--preset", "tiny-imagenet", "--native", "--vae", vae, "--res", NATIVE_RES, "--class-id", "3",
            "--class-id", "5", "--seed", "4", "--steps", "2", "--save-latents", "--out", d / "nat")
    return vae, d / "dit" / "final", d / "nat"


def _up(models, out, *inputs, check=True, extra=()):
    vae, dit, _ = models
    return run_cli("upscale", *inputs, "--preset", "tiny-imagenet", "--vae", vae, "--dit", dit, "--out", out,
                   "--steps", "2", *extra, "--json", check=check)


def _meta(png):
    with Image.open(png) as im:
        return json.loads(im.text["parameters"]), im.size


def _in_base_space(vae, native: torch.Tensor, meta: dict) -> torch.Tensor:
    """The native latent mapped into the DA-VAE's z_base space, recomputed here: back to the base VAE's
    posterior mean with the transform recorded in the file, then the DA-VAE's transform."""
    rec = meta["base_transform"]
    shift_n, scale_n = (torch.tensor(rec[k], dtype=torch.float64)[:, None, None] for k in ("shift", "scale"))
    shift, scale = (getattr(vae.transform, k).double()[:, None, None] for k in ("shift", "scale"))
    return ((native.double() / scale_n + shift_n - shift) * scale).float()


def test_native_latents_keep_their_base_class_and_seed(models, tmp_path):
    vae_dir, dit, nat = models
    vae = DetailAlignedVAE.from_pretrained(str(vae_dir)).eval()
    rep = json.loads(_up(models, tmp_path / "up", nat, extra=["--from-latents", "--save-latents"]).stdout)
    assert rep["latent_inputs"] == 2 and len(rep["written"]) == 2 and rep["strength"] == 0.0
    assert rep["sizes"] == [[2 * NATIVE_RES, 2 * NATIVE_RES]]
    for stem, cls in (("000000", 3), ("000001", 5)):
        native, nmeta = load_latent(nat / f"{stem}.safetensors")
        assert native.shape[0] == 16 and nmeta["class_id"] == cls and nmeta["mode"] == "native"
        up, umeta = load_latent(tmp_path / "up" / f"{stem}.safetensors")
        assert up.shape == (32, NATIVE_RES // 8, NATIVE_RES // 8)
        torch.testing.assert_close(up[:16], _in_base_space(vae, native, nmeta), rtol=0, atol=1e-6)
        meta, size = _meta(tmp_path / "up" / f"{stem}.png")
        assert size == (2 * NATIVE_RES, 2 * NATIVE_RES)  # s x the base resolution
        with Image.open(nat / f"{stem}.png") as im:
            assert im.size == (NATIVE_RES, NATIVE_RES)
        assert meta["class_id"] == cls and meta["seed"] == nmeta["seed"] == 4 and meta["source_seed"] == 4
        assert meta["mode"] == "upscale" and meta["source_kind"] == "latent" and meta["strength"] == 0.0
        assert meta["source"].endswith(f"{stem}.safetensors") and meta["base_size"] == [NATIVE_RES, NATIVE_RES]
        assert meta["source_meta"]["mode"] == "native" and meta["source_meta"]["class_id"] == cls
        assert umeta["space"] == "dit" and umeta["class_id"] == cls and umeta["davae"] == vae.identity
    # --class-id and --seed override the files'; --strength > 0 regenerates the base channels too
    _up(models, tmp_path / "up1", nat / "000000.safetensors", extra=["--class-id", "7", "--seed", "9",
                                                                     "--strength", "1", "--save-latents"])
    meta, _ = _meta(tmp_path / "up1" / "000000.png")
    assert meta["class_id"] == 7 and meta["seed"] == 9 and meta["source_seed"] == 4 and meta["strength"] == 1.0
    up1, _ = load_latent(tmp_path / "up1" / "000000.safetensors")
    native, _ = load_latent(nat / "000000.safetensors")
    assert not torch.allclose(up1[:16], native, atol=1e-3)
    # a C+D latent of this DA-VAE (upscale's own): its base channels, its own resolution, the detail regenerated
    rep = json.loads(_up(models, tmp_path / "again", tmp_path / "up" / "000001.safetensors",
                         extra=["--save-latents"]).stdout)
    assert rep["sizes"] == [[2 * NATIVE_RES, 2 * NATIVE_RES]]
    again, _ = load_latent(tmp_path / "again" / "000001.safetensors")
    first, _ = load_latent(tmp_path / "up" / "000001.safetensors")
    assert torch.equal(again[:16], first[:16]) and _meta(tmp_path / "again" / "000001.png")[0]["class_id"] == 5


def test_upscaled_latents_decode_three_ways(models, tmp_path):
    """The experiment's three decodes of the same generated bases: upscale's image, `decode --detail-from-base`
    and `decode --base-only` (base VAE + bicubic) of upscale's saved latents."""
    vae_dir, dit, nat = models
    _up(models, tmp_path / "up", nat, extra=["--from-latents", "--save-latents"])
    run_cli("decode", tmp_path / "up", "--vae", vae_dir, "--dit", dit, "--out", tmp_path / "dec")
    run_cli("decode", tmp_path / "up", "--vae", vae_dir, "--dit", dit, "--base-only", "--out", tmp_path / "base")
    run_cli("decode", tmp_path / "up", "--vae", vae_dir, "--dit", dit, "--detail-from-base", "--out", tmp_path / "pred")
    from davae_cli.data import to_uint8

    vae = DetailAlignedVAE.from_pretrained(str(vae_dir)).eval()
    for stem, cls in (("000000", 3), ("000001", 5)):
        up = np.asarray(Image.open(tmp_path / "up" / f"{stem}.png")).astype(int)
        dec = np.asarray(Image.open(tmp_path / "dec" / f"{stem}.png")).astype(int)
        assert np.abs(up - dec).max() <= 1  # the upscaled image, from its saved latent
        native, nmeta = load_latent(nat / f"{stem}.safetensors")
        with torch.no_grad():  # base only: the native base channels themselves + bicubic
            want = to_uint8(vae.decode_baseline(_in_base_space(vae, native, nmeta)[None])[0]).astype(int)
        base = np.asarray(Image.open(tmp_path / "base" / f"{stem}.png")).astype(int)
        assert base.shape == (2 * NATIVE_RES, 2 * NATIVE_RES, 3) and np.abs(base - want).max() <= 1
        for folder, how in (("dec", "davae"), ("base", "base_only"), ("pred", "detail_from_base")):
            with Image.open(tmp_path / folder / f"{stem}.png") as im:
                assert im.size == (2 * NATIVE_RES, 2 * NATIVE_RES)
                assert im.text["davae:decoded"] == how and json.loads(im.text["davae:class_id"]) == cls
                assert json.loads(im.text["davae:source_seed"]) == 4


def test_bad_latent_inputs_are_one_line_and_write_nothing(models, tmp_path):
    from safetensors.torch import save_file

    vae, _, nat = models
    native, meta = load_latent(nat / "000000.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_latent(bad / "seven.safetensors", torch.randn(7, 8, 8), meta)
    save_file({"weight": torch.zeros(3)}, str(bad / "weights.safetensors"))
    save_latent(bad / "noclass.safetensors", native, {k: v for k, v in meta.items() if k != "class_id"})
    save_latent(bad / "anon.safetensors", native, {"class_id": 3})
    save_latent(bad / "far.safetensors", native, {**meta, "class_id": 12})
    (bad / "junk.safetensors").write_bytes(b"not a safetensors file")
    cases = [
        ([bad / "seven.safetensors"], [], "seven.safetensors: latent has 7 channels; upscale takes a base latent"),
        ([bad / "weights.safetensors"], [], "weights.safetensors: no 'latent' tensor"),
        ([bad / "junk.safetensors"], [], "junk.safetensors: not a readable safetensors file"),
        ([bad / "noclass.safetensors"], [], "noclass.safetensors: no class_id in its metadata; pass --class-id"),
        ([bad / "anon.safetensors"], [], "anon.safetensors: no base VAE identity"),
        ([bad / "far.safetensors"], [], "far.safetensors: its class_id 12 is not a class of this model"),
        ([nat / "000000.safetensors"], ["--res", "256"], "--res 256 does not fit"),
        ([nat / "000000.safetensors"], ["--prompt", "x"], "class-conditional: use --class-id"),
        ([nat / "000000.safetensors", nat / "000000.png"], [], "same file stem"),
        ([bad / "nowhere"], ["--from-latents"], "not found"),
    ]
    for inputs, extra, fragment in cases:
        r = _up(models, tmp_path / "out", *inputs, extra=extra, check=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
        assert r.returncode == 1 and len(lines) == 1 and fragment in lines[0], (fragment, r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    # the missing class given on the command line: upscaled
    _up(models, tmp_path / "ok", bad / "noclass.safetensors", extra=["--class-id", "2"])
    assert _meta(tmp_path / "ok" / "noclass.png")[0]["class_id"] == 2


def test_which_files_a_folder_gives(tmp_path):
    """A folder of PNGs and latents (generate --save-latents): its images, with a note, or with --from-latents
    its latents; a folder of latents alone: its latents; explicit files by their suffix."""
    from davae_cli.upscale import _inputs

    both, only = tmp_path / "both", tmp_path / "only"
    for d in (both, only):
        d.mkdir()
        save_latent(d / "000000.safetensors", torch.zeros(16, 8, 8), {"base_vae_hash": "x"})
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(both / "000000.png")
    notes = []
    src = _inputs([str(both)], on_message=notes.append)
    assert src.kinds == ["image"] and src.items == [str(both / "000000.png")] and "--from-latents" in notes[0]
    src = _inputs([str(both)], from_latents=True)
    assert src.kinds == ["latent"] and src.items == [str(both / "000000.safetensors")]
    notes.clear()
    src = _inputs([str(only)], on_message=notes.append)
    assert src.kinds == ["latent"] and not notes
    src = _inputs([str(both / "000000.safetensors")])  # an explicit file: a latent by its suffix
    assert src.kinds == ["latent"]


def test_native_transform_is_mapped_into_the_davae_base_space(models, tmp_path):
    """A native latent recorded with another base latent transform than the DA-VAE's is mapped through the base
    VAE's posterior mean; with the DA-VAE's own (LightningDiT natives) it is taken bit for bit."""
    from davae_cli.upscale import read_base_latent

    vae_dir, _, nat = models
    vae = DetailAlignedVAE.from_pretrained(str(vae_dir)).eval()
    native, meta = load_latent(nat / "000001.safetensors")
    z, _ = read_base_latent(str(nat / "000001.safetensors"), vae)
    assert torch.equal(z, native)
    other = {"shift": [float(v) + 0.25 for v in vae.transform.shift],
             "scale": [2.0 * float(v) for v in vae.transform.scale]}
    save_latent(tmp_path / "o.safetensors", native, {**meta, "base_transform": other})
    z, _ = read_base_latent(str(tmp_path / "o.safetensors"), vae)
    want = _in_base_space(vae, native, {"base_transform": other})
    torch.testing.assert_close(z, want, rtol=0, atol=1e-6)
    assert not torch.allclose(z, native, atol=1e-2)


def test_sd3_native_latents_take_their_prompt(adapted, pipe, tmp_path):  # noqa: F811
    """The same on SD3: the native pipeline's latent ((mean - shift_factor) * scaling_factor, recorded) mapped
    into the DA-VAE's z_base space, the prompt from the file."""
    vae_dir, dit = adapted
    run_cli("generate", "--preset", "tiny", "--native", "--base-pipeline", pipe, "--res", R // 2, "--steps", "2",
            "--set", "dit.max_sequence_length=8", "--prompt", "a red cube", "--seed", "3", "--save-latents",
            "--out", tmp_path / "nat")
    run_cli("upscale", tmp_path / "nat", "--from-latents", "--preset", "tiny", "--vae", vae_dir, "--dit", dit,
            "--set", "dit.max_sequence_length=8", "--steps", "2", "--save-latents", "--out", tmp_path / "up")
    native, nmeta = load_latent(tmp_path / "nat" / "000000.safetensors")
    assert nmeta["base_transform"]["scale"] == [1.5] * 16 and nmeta["base_transform"]["shift"] == [0.1] * 16
    vae = DetailAlignedVAE.from_pretrained(str(vae_dir)).eval()
    up, _ = load_latent(tmp_path / "up" / "000000.safetensors")
    torch.testing.assert_close(up[:16], _in_base_space(vae, native, nmeta), rtol=0, atol=1e-6)
    meta, size = _meta(tmp_path / "up" / "000000.png")
    assert size == (R, R) and meta["prompt"] == "a red cube" and meta["seed"] == 3
