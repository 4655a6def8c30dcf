"""A size no backend can take is refused before any model loads, in one line naming the largest size it can make
(issue 38): SD3's table of positions (`pos_embed_max_size`) and Z-Image's RoPE axes (`axes_lens`) bound the token
grid; FLUX and LightningDiT compute positions for each grid and have no bound. `Backend.max_token_grid` reads the
bound from the transformer's config.json in the adapted DiT folder; `generate --res`, `generate --native --res` and
`upscale` (the long side of each input's grid, with or without --res) check it before loading.

The tiny SD3 preset: pos_embed_max_size 32, patch 2; with the tiny DA-VAE (s = 2, f = 8) a token is 32 output px,
so the largest image is 1024; the base pipeline alone (f = 8) makes at most 512."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from conftest import run_cli
from test_generate import adapted, pipe  # noqa: F401 - fixtures: the tiny SD3 pipeline and its step-0 adaptation
from test_upscale import _photo

PHRASE = "this SD3 transformer's positions reach 32 tokens a side (pos_embed_max_size)"
COMMON = ["--preset", "tiny", "--set", "dit.max_sequence_length=8", "--prompt", "a red cube", "--steps", "1"]


def _error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: a size error seen with this in place was raised before loading."""
    import importlib

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the size was checked")

    # the modules (the package's `generate` and `upscale` names are the functions)
    monkeypatch.setattr(importlib.import_module("davae_cli.generate"), "load_model", boom)
    monkeypatch.setattr(importlib.import_module("davae_cli.upscale"), "load_adapted", boom)


# ------------------------------------------------------------------------------------------ the classmethod
def test_max_token_grid_of_each_family():
    from diffusers.models.embeddings import PatchEmbed
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    from davae_cli.dit.flux import FluxBackend
    from davae_cli.dit.sd3 import SD35_MEDIUM_CONFIG, SD3Backend
    from davae_cli.dit.zimage import ZIMAGE_TURBO_CONFIG, ZImageBackend

    assert SD3Backend.max_token_grid({"pos_embed_max_size": 32}) == 32
    assert SD3Backend.max_token_grid(SD35_MEDIUM_CONFIG) == 384
    assert SD3Backend.max_token_grid({"pos_embed_max_size": None}) is None  # a table computed for each grid
    assert SD3Backend.max_token_grid({}) == 96  # left out of the file: SD3Transformer2DModel's default
    assert ZImageBackend.max_token_grid({"axes_lens": [256, 64, 48]}) == 48  # rows and columns; not the caption axis
    assert ZImageBackend.max_token_grid(ZIMAGE_TURBO_CONFIG) == 512
    assert ZImageBackend.max_token_grid({}) == 512  # ZImageTransformer2DModel's default (1024, 512, 512)
    assert FluxBackend.max_token_grid({"axes_dims_rope": [16, 56, 56]}) is None
    # the bounds are diffusers' own: SD3's PatchEmbed crops its table (33 tokens fail), Z-Image indexes its RoPE rows
    embed = PatchEmbed(height=8, width=8, patch_size=2, in_channels=4, embed_dim=8, pos_embed_max_size=4)
    assert embed(torch.zeros(1, 4, 8, 8)).shape == (1, 16, 8)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        embed(torch.zeros(1, 4, 10, 8))
    rope = RopeEmbedder(axes_dims=[4, 4, 4], axes_lens=[8, 4, 4])
    assert rope(torch.tensor([[0, 3, 3]])).shape == (1, 6)
    with pytest.raises(IndexError):
        rope(torch.tensor([[0, 4, 0]]))


def test_lightningdit_has_no_limit():
    from davae_cli.dit.lightningdit import LightningDiTBackend

    assert LightningDiTBackend.max_token_grid({"input_size": 16, "patch_size": 1}) is None


def test_read_from_the_folder_alone(tmp_path):
    """An adapted folder's facts and config.json give the bound (no weights there: nothing is loaded), and
    check_res refuses past it for Z-Image too; FLUX's folder has none."""
    from davae_cli.dit.backend import read_max_token_grid
    from davae_cli.errors import DavaeError
    from davae_cli.generate import check_res

    facts = {"backend": "zimage", "granularity": 16, "patch_size": 2, "resolution": 1024}
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "davae_dit.json").write_text(json.dumps(facts))
    (tmp_path / "z" / "config.json").write_text(json.dumps({"axes_lens": [256, 64, 64], "all_patch_size": [2]}))
    assert read_max_token_grid(tmp_path / "z") == (64, "this Z-Image transformer's positions reach 64 tokens a "
                                                       "side (axes_lens)")
    check_res(2048, str(tmp_path / "z"))  # 64 tokens of 32 px: the largest
    with pytest.raises(DavaeError) as e:
        check_res(2080, str(tmp_path / "z"))
    assert e.value.as_flag() == ("--res 2080: this Z-Image transformer's positions reach 64 tokens a side "
                                 "(axes_lens); the largest size it can make is 2048 (64 tokens of 32 px)")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "davae_dit.json").write_text(json.dumps({**facts, "backend": "flux"}))
    (tmp_path / "f" / "config.json").write_text(json.dumps({"patch_size": 1, "in_channels": 64}))
    assert read_max_token_grid(tmp_path / "f") is None
    check_res(8192, str(tmp_path / "f"))
    assert read_max_token_grid(tmp_path / "missing") is None  # unreadable: the loader says why


# ----------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("res", ["1056", "2048", "1050"])
def test_generate_too_large_is_refused_before_loading(adapted, tmp_path, no_loading, res):  # noqa: F811
    vae, dit = adapted
    r = run_cli("generate", *COMMON, "--vae", vae, "--dit", dit, "--res", res, "--out", tmp_path / "g", check=False)
    assert r.returncode == 1 and _error_lines(r) == [
        f"Error: --res {res}: {PHRASE}; the largest size it can make is 1024 (32 tokens of 32 px)"], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "g").exists()


def test_generate_at_the_largest_size(adapted, tmp_path):  # noqa: F811
    vae, dit = adapted
    rep = json.loads(run_cli("generate", *COMMON, "--vae", vae, "--dit", dit, "--res", "1024", "--out", tmp_path / "g",
                             "--json").stdout)
    assert rep["res"] == 1024 and rep["tokens"] == 32 * 32
    with Image.open(rep["written"][0]) as im:
        assert im.size == (1024, 1024)


def test_generate_native_too_large_is_refused_before_loading(pipe, tmp_path, no_loading):  # noqa: F811
    """--native from the pipeline folder: f = 8, p = 2, so 16 px a token and at most 512."""
    r = run_cli("generate", *COMMON, "--native", "--base-pipeline", pipe, "--res", "528", "--out", tmp_path / "n",
                check=False)
    assert r.returncode == 1 and _error_lines(r) == [
        f"Error: --res 528: {PHRASE}; the largest size it can make is 512 (32 tokens of 16 px)"], r.stderr


def test_generate_native_at_the_largest_size(pipe, tmp_path):  # noqa: F811
    rep = json.loads(run_cli("generate", *COMMON, "--native", "--base-pipeline", pipe, "--res", "512",
                             "--out", tmp_path / "n", "--json").stdout)
    with Image.open(rep["written"][0]) as im:
        assert im.size == (512, 512)


# ------------------------------------------------------------------------------------------------ upscale
def _up(adapted, tmp_path, out, *extra, check=True):  # noqa: F811
    vae, dit = adapted
    return run_cli("upscale", tmp_path / "in", *COMMON, "--vae", vae, "--dit", dit, "--out", tmp_path / out, *extra,
                   "--json", check=check)


def test_upscale_too_large_is_refused_before_loading(adapted, tmp_path, no_loading):  # noqa: F811
    """A 96x64 input at --res 1024 is 48x32 tokens: its long side counts. 672 is the largest short side whose
    long side fits (21 tokens short, 31 long; 22 short would be 33 long)."""
    _photo(tmp_path / "in" / "wide.png", 64, 96)
    _photo(tmp_path / "in" / "sq.png", 64, 64, seed=1)  # fits at 1024 (32x32)
    r = _up(adapted, tmp_path, "u", "--res", "1024", check=False)
    assert r.returncode == 1 and _error_lines(r) == [
        f"Error: {tmp_path / 'in' / 'wide.png'}: at --res 1024 the output would be 1536x1024, 48x32 DiT tokens; "
        f"{PHRASE}; the largest --res every input fits at is 672"], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "u").exists()


def test_upscale_too_long_at_the_default_resolution(adapted, tmp_path, no_loading):  # noqa: F811
    """Without --res the adapted resolution (64) is used: a 20:1 input is then 40x2 tokens; said so, with the
    --res that fits."""
    _photo(tmp_path / "in" / "strip.png", 32, 640)
    r = _up(adapted, tmp_path, "u", check=False)
    assert r.returncode == 1 and _error_lines(r) == [
        f"Error: {tmp_path / 'in' / 'strip.png'}: at the model's resolution 64 (no --res given) the output would be "
        f"1280x64, 40x2 DiT tokens; {PHRASE}; the largest --res every input fits at is 32"], r.stderr


def test_upscale_at_the_largest_size(adapted, tmp_path):  # noqa: F811
    _photo(tmp_path / "in" / "wide.png", 64, 96)
    rep = json.loads(_up(adapted, tmp_path, "u", "--res", "672").stdout)
    assert rep["sizes"] == [[672, 992]]  # 21x31 tokens of 32 px
    with Image.open(rep["written"][0]) as im:
        assert im.size == (992, 672)


# ------------------------------------------------------------------------------------------ DAVAEPipeline
def test_pipeline_names_the_limit_instead_of_failing_in_the_forward(adapted):  # noqa: F811
    """A loaded model: DAVAEPipeline's generation and upscale meet the same bound (`sampling.check_token_grid`) in
    one DavaeError, where diffusers' forward would raise "Height (33) cannot be greater than pos_embed_max_size"."""
    from davae_cli import DAVAEPipeline
    from davae_cli.errors import DavaeError

    vae, dit = adapted
    p = DAVAEPipeline.from_pretrained(dit, vae=vae, preset="tiny")
    with pytest.raises(DavaeError) as e:
        p("a red cube", height=1056, width=1056, num_inference_steps=1)
    assert str(e.value) == f"1056x1056 (33x33 tokens, width x height): {PHRASE}; the largest square it can make is 1024"
    wide = Image.new("RGB", (96, 64), (120, 30, 200))  # at short side 1024: a 1536x1024 output, 48x32 tokens
    with pytest.raises(DavaeError, match=re.escape(f"1536x1024 (48x32 tokens, width x height): {PHRASE}")):
        p.upscale(wide, prompt="a red cube", res=1024, num_inference_steps=1)
    assert p("a red cube", height=64, width=64, num_inference_steps=1).images[0].size == (64, 64)
