"""Any size on every backend (issue 38 item 1): LightningDiT computes its fixed position tables (2D sin-cos and
RoPE) for the grid it is given, square or not, and checks on load that the tables stored for its trained grid are
the formulas'; `upscale` of a non-square image works on the LightningDiT, SD3 and FLUX paths; `generate --res`
runs LightningDiT at other grids; a size no model can take is refused in one line before any model is loaded, and
a --res that is not a whole number of tokens is rounded down with a note saying to what."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image

from conftest import run_cli
from test_upscale import _photo
from davae_cli.errors import DavaeError
from davae_cli.latents import load_latent
from davae_cli.vae.model import DetailAlignedVAE

from test_flux import flux_pipe  # noqa: F401 - fixture: the tiny FLUX.1 pipeline
from test_generate import adapted, pipe  # noqa: F401 - fixtures: the tiny SD3 pipeline and its step-0 adaptation

WIDE = (64, 96)  # (height, width) of the non-square input: 96 wide, 64 high


def _random_ldit(seed=0, **kw):
    """A tiny LightningDiT with every weight random (the from-scratch init zeroes adaLN and the output head)."""
    from davae_cli.dit.lightningdit import build_lightningdit

    torch.manual_seed(seed)
    m = build_lightningdit("tiny", **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape) / math.sqrt(p[0].numel() if p.ndim > 1 else 10))
    return m.eval()


# ------------------------------------------------------------------------------------------------ the tables
def test_tables_of_any_grid_follow_the_formulas_and_continue_the_trained_ones():
    from davae_cli.dit.lightningdit_layers import rope_tables_2d, sincos_pos_embed_2d

    m = _random_ldit(input_size=4)  # hidden 64, head dim 16, trained on 4x4 tokens
    pos, rope = m.position_tables(4, 4, "cpu")
    assert pos is m.pos_embed and rope[0] is m.feat_rope.freqs_cos  # the trained grid: the stored tables themselves
    assert torch.equal(sincos_pos_embed_2d(64, (4, 4)), m.pos_embed[0])  # (rows, cols) == the square formula
    assert torch.equal(rope_tables_2d(16, (4, 4))[1], m.feat_rope.freqs_sin)
    pos, (cos, sin) = m.position_tables(3, 5, "cpu")  # 3 rows, 5 columns
    assert pos.shape == (1, 15, 64) and cos.shape == sin.shape == (15, 16)
    d, pe = 64, pos[0].double()
    for row, col in [(0, 4), (2, 1), (1, 3)]:  # token k = row * 5 + col; column first, then row
        k = row * 5 + col
        for i in range(d // 4):
            w = 1.0 / 10000 ** (i / (d // 4))
            ref = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
            got = [pe[k, i], pe[k, d // 4 + i], pe[k, d // 2 + i], pe[k, 3 * d // 4 + i]]
            assert all(abs(float(a) - b) < 1e-6 for a, b in zip(got, ref))
    # a larger grid continues the trained one: its top-left 4x4 block holds the trained grid's tables
    big = sincos_pos_embed_2d(64, (4, 7)).reshape(4, 7, 64)[:, :4].reshape(16, 64)
    assert torch.equal(big, m.pos_embed[0])
    # RoPE on the non-square grid: q.k after rotation depends only on the 2D offset between the tokens
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    rq = m.feat_rope(q.expand(1, 1, 15, 16), (cos, sin))[0, 0]
    rk = m.feat_rope(k.expand(1, 1, 15, 16), (cos, sin))[0, 0]
    dots = rq @ rk.T

    def tok(r, c):
        return r * 5 + c

    assert torch.allclose(dots[tok(0, 0), tok(1, 3)], dots[tok(1, 1), tok(2, 4)], atol=1e-5)
    assert not torch.allclose(dots[tok(0, 0), tok(1, 3)], dots[tok(0, 0), tok(2, 1)], atol=1e-3)
    assert m.position_tables(3, 5, "cpu")[0] is pos  # computed once per grid


@pytest.mark.parametrize("patch", [1, 2])
def test_forward_on_a_non_square_grid(patch):
    """Without blocks the model is per token: the left (top) part of a wide (tall) input gives exactly the output
    of that part alone, so the tokens' positions, tables and unpatchify all follow the non-square grid."""
    m = _random_ldit(depth=0, patch_size=patch)  # trained on 8x8
    x, t, y = torch.randn(2, 4, 8, 12), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad():
        wide = m(x, t, y)
        assert wide.shape == (2, 4, 8, 12)
        assert torch.equal(wide[..., :8], m(x[..., :8], t, y))
        tall = m(x.transpose(2, 3).contiguous(), t, y)
        assert tall.shape == (2, 4, 12, 8)
        assert torch.equal(tall[:, :, :8], m(x.transpose(2, 3)[:, :, :8].contiguous(), t, y))


def test_tables_first_made_in_inference_mode_serve_training():
    """Sampling (inference mode) may be the first to ask for a grid's tables; training at that grid must still
    backpropagate through them (inference tensors cannot be saved for backward)."""
    m = _random_ldit(patch_size=2)
    x, t, y = torch.randn(2, 4, 8, 12), torch.rand(2), torch.tensor([1, 2])
    with torch.inference_mode():
        m(x, t, y)
    m.train()
    m(x, t, y).square().mean().backward()
    assert m.x_embedder.proj.weight.grad is not None


def test_another_grid_equals_the_model_built_for_it():
    """The model trained on 8x8, run on 12x12, is the model built for 12x12 with the same weights (whose tables are
    the stored ones): the tables computed on the fly are the ones a model of that grid stores."""
    from davae_cli.dit.lightningdit import build_lightningdit

    m8 = _random_ldit(seed=3, patch_size=2)
    m12 = build_lightningdit("tiny", patch_size=2, input_size=12).eval()
    tables = {"pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"}  # m12 keeps its own (12x12) ones
    missing, _ = m12.load_state_dict({k: v for k, v in m8.state_dict().items() if k not in tables}, strict=False)
    assert set(missing) == tables
    x, t, y = torch.randn(2, 4, 12, 12), torch.rand(2), torch.tensor([0, 5])
    with torch.no_grad():
        torch.testing.assert_close(m8(x, t, y), m12(x, t, y), rtol=0, atol=1e-6)


def test_stored_tables_are_checked_on_load(tmp_path):
    from davae_cli.dit.lightningdit import LightningDiT
    from davae_cli.dit.lightningdit_weights import load_lightningdit_weights

    src = _random_ldit(seed=1)
    sd = src.state_dict()
    bad = {**sd, "pos_embed": sd["pos_embed"].clone()}
    bad["pos_embed"][0, 5, 3] += 0.01  # a learned or differently laid-out table would differ like this
    torch.save({"ema": bad}, tmp_path / "bad.pt")
    target = _random_ldit(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(DavaeError) as err:
        load_lightningdit_weights(target, tmp_path / "bad.pt")
    assert "pos_embed is not the fixed table of a 8x8 token grid" in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded
    load_lightningdit_weights(target, _save(tmp_path / "good.pt", sd))  # the formulas' tables: loaded
    # a diffusers folder with another RoPE table
    with torch.no_grad():
        src.feat_rope.freqs_cos[3] = 1.0
    src.save_pretrained(str(tmp_path / "folder"))
    with pytest.raises(DavaeError, match="feat_rope.freqs_cos is not the fixed table"):
        LightningDiT.from_pretrained(str(tmp_path / "folder"))


def _save(path, sd):
    torch.save(sd, path)
    return path


# ------------------------------------------------------------------------------------------------ upscale, per backend
@pytest.fixture(scope="module")
def flux_adapted(flux_pipe, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("anyflux")
    run_cli("train-vae", "--preset", "tiny-flux", "--base-vae", flux_pipe / "vae", "--out", d / "vae", "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny-flux", "--vae", d / "vae" / "final", "--dit", flux_pipe,
            "--text-encoders", flux_pipe, "--out", d / "dit", "--steps", "0", "--set", "adapt_dit.resolution=64")
    return d / "vae" / "final", d / "dit" / "final"


def _up(pair, out, *inputs, preset, check=True, extra=()):
    vae, dit = pair
    return run_cli("upscale", *inputs, "--preset", preset, "--vae", vae, "--dit", dit, "--out", out, "--steps", "2",
                   *extra, "--json", check=check)


def _wide_upscaled_to_128(pair, tmp_path, preset, extra=()):
    """`upscale --res 128` of a 96x64 image (and a 64x64 one): 192x128 and 128x128, the wide one's base channels
    exactly its encoded base image (--strength 0)."""
    from davae_cli.upscale import prepare_base_image

    wide = _photo(tmp_path / "in" / "wide.png", *WIDE)
    _photo(tmp_path / "in" / "sq.png", 64, 64, seed=1)
    rep = json.loads(_up(pair, tmp_path / "up", tmp_path / "in", preset=preset,
                         extra=["--res", "128", "--save-latents", *extra]).stdout)
    assert len(rep["written"]) == 2 and sorted(rep["sizes"]) == [[128, 128], [128, 192]]
    for name, size in (("wide", (192, 128)), ("sq", (128, 128))):
        with Image.open(tmp_path / "up" / f"{name}.png") as im:
            assert im.size == size
    lat, _ = load_latent(tmp_path / "up" / "wide.safetensors")
    vae = DetailAlignedVAE.from_pretrained(str(pair[0])).eval()
    c = vae.config.base_channels
    assert lat.shape[1:] == (8, 12)  # 128 x 192 at s f = 16
    with torch.no_grad():
        want = vae.encode_base_image(prepare_base_image(wide, (64, 96))[None])[0]
    assert torch.equal(lat[:c], want)


def test_upscale_non_square_lightningdit(lightning, tmp_path):
    _wide_upscaled_to_128(lightning, tmp_path, "tiny-imagenet", ["--class-id", "1"])
    # a tall image too, at a --res other than the adapted one (128): 8 x 5 base tokens
    _photo(tmp_path / "tall" / "tall.png", 96, 60, seed=2)
    rep = json.loads(_up(lightning, tmp_path / "up2", tmp_path / "tall", preset="tiny-imagenet",
                         extra=["--res", "80", "--class-id", "1"]).stdout)
    assert rep["sizes"] == [[128, 80]]


def test_upscale_non_square_sd3(adapted, tmp_path):  # noqa: F811
    _wide_upscaled_to_128(adapted, tmp_path, "tiny", ["--prompt", "a red cube", "--set", "dit.max_sequence_length=8"])


def test_upscale_non_square_flux(flux_adapted, tmp_path):
    _wide_upscaled_to_128(flux_adapted, tmp_path, "tiny-flux", ["--prompt", "a red cube"])


# ------------------------------------------------------------------------------------------------ sizes
def _broken_copy(dit, dest):
    """The adapted DiT folder without its weights: loading it fails, so an error about sizes proves that the
    sizes were checked before any model was loaded."""
    shutil.copytree(dit, dest)
    for f in dest.glob("*.safetensors"):
        f.unlink()
    return dest


def test_sizes_are_checked_before_loading_and_rounded_with_a_note(lightning, tmp_path):
    vae, dit = lightning
    _photo(tmp_path / "in" / "a.png", *WIDE)
    broken = _broken_copy(dit, tmp_path / "broken")
    r = _up((vae, broken), tmp_path / "out", tmp_path / "in", preset="tiny-imagenet", check=False,
            extra=["--res", "8"])  # 4 px of base image, less than one token (8 px)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.returncode == 1 and len(lines) == 1 and "smaller than one DiT token" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    # 250 is not a whole number of 16 px tokens: rounded down to 240, and said so
    rep = json.loads(_up(lightning, tmp_path / "r", tmp_path / "in", preset="tiny-imagenet",
                         extra=["--res", "250", "--class-id", "1"]).stdout)
    assert rep["sizes"] == [[240, 368]]  # the long side in proportion to 125 px (184), whole tokens
    r = _up(lightning, tmp_path / "r", tmp_path / "in", preset="tiny-imagenet", extra=["--res", "250", "--overwrite"])
    assert "--res 250 is not a whole number of DiT tokens" in r.stderr and "short side of 240" in r.stderr


def test_generate_lightningdit_at_other_sizes(lightning, tmp_path):
    """generate --res on LightningDiT at grids other than the adapted one (and --native from a checkpoint file
    built for the base grid); a --res no model can take is refused before loading, with the nearest sizes."""
    from davae_cli.config import load_preset
    from davae_cli.dit.lightningdit import LightningDiTBackend

    vae, dit = lightning
    common = ["--preset", "tiny-imagenet", "--class-id", "1", "--steps", "2", "--json"]
    rep = json.loads(run_cli("generate", *common, "--vae", vae, "--dit", dit, "--res", "96", "--out", tmp_path / "g").stdout)
    assert rep["res"] == 96 and rep["tokens"] == 36
    with Image.open(rep["written"][0]) as im:
        assert im.size == (96, 96)
    ckpt = tmp_path / "native.pt"  # a native model stored for its base grid (8x8 latents at 64²)
    torch.save(LightningDiTBackend(load_preset("tiny-imagenet")).load("random").state_dict(), ckpt)
    rep = json.loads(run_cli("generate", *common, "--native", "--base-pipeline", ckpt, "--vae", vae, "--res", "96",
                             "--out", tmp_path / "n").stdout)
    with Image.open(rep["written"][0]) as im:
        assert im.size == (96, 96)
    r = run_cli("generate", *common, "--vae", vae, "--dit", _broken_copy(dit, tmp_path / "broken"), "--res", "250",
                "--out", tmp_path / "x", check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.returncode == 1 and len(lines) == 1 and "multiple of 16" in lines[0] and "240 or 256" in lines[0], r.stderr
    assert not (tmp_path / "x").exists()
