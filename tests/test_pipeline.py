"""DAVAEPipeline (issue 39 item 2): the same pixels as `davae generate` and `davae upscale` for the same seeds on the
four families (tiny SD3, FLUX, Z-Image, LightningDiT models), diffusers' seeds (a list of generators equals
`--seed S --num-images n`), the DA-VAE found when both folders move together, and one-line errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from test_any_size import flux_adapted  # noqa: F401 - fixture: the step-0 adaptation of the tiny FLUX.1 pipeline
from test_flux import flux_pipe  # noqa: F401 - fixture: the tiny FLUX.1 pipeline
from test_generate import adapted, pipe  # noqa: F401 - fixtures: the tiny SD3 pipeline and its step-0 adaptation
from test_zimage import zimage_pipe  # noqa: F401 - fixture: the tiny Z-Image pipeline

from davae_cli import DAVAEPipeline
from davae_cli.errors import DavaeError


@pytest.fixture(scope="module")
def zimage_pair(zimage_pipe, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("pipezimage")
    run_cli("train-vae", "--preset", "tiny-zimage", "--base-vae", zimage_pipe / "vae", "--out", d / "vae",
            "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny-zimage", "--vae", d / "vae" / "final", "--dit", zimage_pipe,
            "--text-encoders", zimage_pipe, "--out", d / "dit", "--steps", "0", "--set", "adapt_dit.resolution=64")
    return d / "vae" / "final", d / "dit" / "final"


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _same_as_generate(pair, preset, tmp_path, cond_flag, cond_value, call_kw):
    """generate --seed 5 --num-images 2 vs the pipeline with [Generator().manual_seed(5 + k)], and with seed=5."""
    vae, dit = pair
    run_cli("generate", "--preset", preset, "--vae", vae, "--dit", dit, cond_flag, cond_value, "--seed", "5",
            "--num-images", "2", "--sampling-steps", "2", "--out", tmp_path / "g")
    pipe_ = DAVAEPipeline.from_pretrained(dit, vae=vae)
    gens = [torch.Generator().manual_seed(5 + k) for k in range(2)]
    out = pipe_(**call_kw, num_images_per_prompt=2, num_inference_steps=2, generator=gens)
    assert len(out.images) == 2 and out.latents.shape[0] == 2
    for k in range(2):
        assert np.array_equal(np.asarray(out.images[k]), _pixels(tmp_path / "g" / f"00000{k}.png")), k
    again = pipe_(**call_kw, num_images_per_prompt=2, num_inference_steps=2, seed=5, output_type="np")
    assert np.array_equal(again.images[1], _pixels(tmp_path / "g" / "000001.png"))
    other = pipe_(**call_kw, num_inference_steps=2, generator=torch.Generator().manual_seed(6), output_type="np")
    assert not np.array_equal(other.images[0], _pixels(tmp_path / "g" / "000000.png"))  # the seed matters
    return pipe_


def _same_as_upscale(pipe_, pair, preset, tmp_path, cond_flags, call_kw, size=(48, 80)):
    """upscale of one non-square photo vs pipe.upscale of the same image (seed 0, strength 0)."""
    vae, dit = pair
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "in" / "x.png")
    run_cli("upscale", tmp_path / "in", "--preset", preset, "--vae", vae, "--dit", dit, *cond_flags, "--res", "64",
            "--steps", "2", "--out", tmp_path / "u")
    with Image.open(tmp_path / "in" / "x.png") as im:
        out = pipe_.upscale(im.copy(), res=64, num_inference_steps=2, **call_kw)
    assert np.array_equal(np.asarray(out.images[0]), _pixels(tmp_path / "u" / "x.png"))


def test_lightningdit_generate_and_upscale(lightning, tmp_path):
    p = _same_as_generate(lightning, "tiny-imagenet", tmp_path, "--class-id", "1", {"class_labels": [1]})
    _same_as_upscale(p, lightning, "tiny-imagenet", tmp_path, ["--class-id", "1"], {"class_labels": 1})
    with pytest.raises(DavaeError, match="class-conditional"):
        p(prompt="a cat")


def test_sd3_generate_and_upscale(adapted, tmp_path):  # noqa: F811
    p = _same_as_generate(adapted, "tiny", tmp_path, "--prompt", "a red cube", {"prompt": "a red cube"})
    _same_as_upscale(p, adapted, "tiny", tmp_path, ["--prompt", "a red cube"], {"prompt": "a red cube"})


def test_flux_generate_and_upscale(flux_adapted, tmp_path):  # noqa: F811
    p = _same_as_generate(flux_adapted, "tiny-flux", tmp_path, "--prompt", "a red cube", {"prompt": "a red cube"})
    _same_as_upscale(p, flux_adapted, "tiny-flux", tmp_path, ["--prompt", "a red cube"], {"prompt": "a red cube"})


def test_zimage_generate_and_upscale(zimage_pair, tmp_path):
    p = _same_as_generate(zimage_pair, "tiny-zimage", tmp_path, "--prompt", "a red cube", {"prompt": "a red cube"})
    _same_as_upscale(p, zimage_pair, "tiny-zimage", tmp_path, ["--prompt", "a red cube"], {"prompt": "a red cube"})


def test_finds_its_davae_when_both_folders_move(lightning, tmp_path):
    vae, dit = lightning
    moved = tmp_path / "moved"
    shutil.copytree(vae.parent, moved / "vae-run")  # the two run folders side by side, elsewhere
    shutil.copytree(dit.parent, moved / "dit-run")
    facts = json.loads((moved / "dit-run" / "final" / "davae_dit.json").read_text())
    facts["davae"]["path"] = str(tmp_path / "gone")  # the recorded absolute path no longer exists
    facts["davae"]["relative_path"] = "../../vae-run/final"
    (moved / "dit-run" / "final" / "davae_dit.json").write_text(json.dumps(facts))
    p = DAVAEPipeline.from_pretrained(moved / "dit-run" / "final")
    assert p.vae_dir == str((moved / "vae-run" / "final").resolve())
    # no relative path either (a folder from before it was recorded): found beside it by its content hash
    del facts["davae"]["relative_path"]
    (moved / "dit-run" / "final" / "davae_dit.json").write_text(json.dumps(facts))
    assert DAVAEPipeline.from_pretrained(moved / "dit-run" / "final").vae_dir == str(moved / "vae-run" / "final")
    shutil.rmtree(moved / "vae-run")
    with pytest.raises(DavaeError, match="pass vae="):
        DAVAEPipeline.from_pretrained(moved / "dit-run" / "final")


def test_the_export_records_where_its_davae_is(lightning):
    vae, dit = lightning
    rec = json.loads((dit / "davae_dit.json").read_text())["davae"]
    assert (dit / rec["relative_path"]).resolve() == vae.resolve()


def test_bad_calls_are_one_line(lightning):
    vae, dit = lightning
    p = DAVAEPipeline.from_pretrained(dit, vae=vae)
    with pytest.raises(DavaeError, match="square"):
        p(class_labels=[1], height=64, width=128)
    with pytest.raises(DavaeError, match="one per image"):
        p(class_labels=[1], num_images_per_prompt=2, generator=[torch.Generator()])
    with pytest.raises(DavaeError, match="output_type"):
        p(class_labels=[1], num_inference_steps=1, output_type="latent")
    with pytest.raises(DavaeError, match="nothing to generate"):
        p()


def test_native_lightningdit_is_generate_native(lightning, tmp_path):
    """native=True: the base model (a checkpoint file, preset and DA-VAE given) samples as `generate --native`."""
    from davae_cli.config import load_preset
    from davae_cli.dit.lightningdit import LightningDiTBackend

    vae, _ = lightning
    ckpt = tmp_path / "native.pt"
    torch.save(LightningDiTBackend(load_preset("tiny-imagenet")).load("random").state_dict(), ckpt)
    run_cli("generate", "--preset", "tiny-imagenet", "--native", "--base-pipeline", ckpt, "--vae", vae, "--res", "64",
            "--class-id", "3", "--seed", "2", "--steps", "2", "--out", tmp_path / "n")
    with pytest.raises(DavaeError, match="preset"):
        DAVAEPipeline.from_pretrained(ckpt, native=True, vae=vae)
    p = DAVAEPipeline.from_pretrained(ckpt, native=True, vae=vae, preset="tiny-imagenet")
    out = p(class_labels=3, height=64, num_inference_steps=2, generator=torch.Generator().manual_seed(2))
    assert np.array_equal(np.asarray(out.images[0]), _pixels(tmp_path / "n" / "000000.png"))
    with pytest.raises(DavaeError, match="adapted model"):
        p.upscale(out.images[0])


def test_generate_finds_the_davae_without_vae(lightning, tmp_path):
    """`davae generate --dit X` without --vae (what the model card shows): the DA-VAE the folder records."""
    vae, dit = lightning
    common = ["--preset", "tiny-imagenet", "--class-id", "1", "--steps", "2"]
    run_cli("generate", *common, "--dit", dit, "--out", tmp_path / "a")
    run_cli("generate", *common, "--dit", dit, "--vae", vae, "--out", tmp_path / "b")
    assert np.array_equal(_pixels(tmp_path / "a" / "000000.png"), _pixels(tmp_path / "b" / "000000.png"))
