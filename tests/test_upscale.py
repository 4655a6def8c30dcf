"""davae upscale on the three backends (tiny SD3, FLUX and LightningDiT models built in code): with --strength 0
the final latent's base channels are exactly the encoded input's; sizes, metadata, resume, bad input. Also the
base-channel hold of the sampler and the class conditioning (the label reaches the model, CFG's unconditional
branch gets the null class)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from conftest import run_cli
from davae_cli import flow
from davae_cli.data import to_tensor
from davae_cli.latents import load_latent
from davae_cli.vae.model import DetailAlignedVAE

from test_generate import R, adapted, pipe  # noqa: F401 - fixtures: the tiny SD3 pipeline and its step-0 adaptation
from test_flux import flux_pipe  # noqa: F401 - fixture: the tiny FLUX.1 pipeline


def _photo(path, h, w, seed=0):
    """A smooth random colour field (h x w), saved as PNG; returns the uint8 array."""
    rng = np.random.default_rng(seed)
    arr = np.asarray(Image.fromarray(rng.integers(0, 255, size=(5, 6, 3)).astype(np.uint8)).resize((w, h), Image.BICUBIC))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _base_of(vae_dir, x_base: torch.Tensor) -> torch.Tensor:
    vae = DetailAlignedVAE.from_pretrained(str(vae_dir)).eval()
    return vae.encode_base_image(x_base[None])[0]


def _up(vae, dit, out, *inputs, preset="tiny", check=True, extra=()):
    return run_cli("upscale", *inputs, "--preset", preset, "--vae", vae, "--dit", dit, "--out", out, "--steps", "3",
                   *extra, "--json", check=check)


# ------------------------------------------------------------------------------------------------ the sampler
def test_hold_channels_keeps_the_base_on_its_path_and_exact_at_the_end():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    seen = []

    def velocity(x, sigma, guided):  # a field that would push every channel away from x0
        seen.append((float(sigma[0]), x[:, :3].clone()))
        return torch.ones_like(x) * 3.0

    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.1, 0.0])
    out = flow.sample(velocity, eps, sigmas, constrain=flow.hold_channels(x0, eps[:, :3], 3))
    assert torch.equal(out[:, :3], x0)  # exact, not approximately
    for s, held in seen:  # before each evaluation: (1 - sigma) x0 + sigma eps
        torch.testing.assert_close(held, (1 - s) * x0 + s * eps[:, :3])
    # the other channels move with the velocity: eps + sum(dsigma) * 3 = eps - 3
    torch.testing.assert_close(out[:, 3:], eps[:, 3:] - 3.0)
    # until = 0.4: held down to sigma 0.4, then free (regenerated)
    seen.clear()
    out = flow.sample(velocity, eps, sigmas, constrain=flow.hold_channels(x0, eps[:, :3], 3, until=0.4))
    torch.testing.assert_close(seen[2][1], 0.6 * x0 + 0.4 * eps[:, :3])
    torch.testing.assert_close(out[:, :3], seen[2][1] - 0.4 * 3.0)


def test_prepare_base_image_is_the_davae_downsample():
    from davae_cli.latents import downsample
    from davae_cli.upscale import base_size, prepare_base_image

    arr = (np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8)
    # an input at R gives exactly the DA-VAE's own base image of it (antialiased bicubic 1/2, in float)
    torch.testing.assert_close(prepare_base_image(arr, (32, 48)), downsample(to_tensor(arr)[None], 2)[0],
                               rtol=0, atol=1e-6)
    assert torch.equal(prepare_base_image(arr, (64, 96)), to_tensor(arr))  # already the base size: untouched
    assert base_size(40, 90, 64, 2, 16) == (32, 64)  # short side R/2 = 32, long side 72 -> 64 (whole tokens)
    assert base_size(90, 40, 64, 2, 16) == (64, 32)


# ------------------------------------------------------------------------------------------------ SD3
def test_upscale_sd3(adapted, tmp_path):
    vae, dit = adapted
    a = _photo(tmp_path / "in" / "a.png", R // 2, R // 2)  # a native R/2 image: used as it is
    b = _photo(tmp_path / "in" / "b.png", 40, 90, seed=1)  # any size: short side -> R/2, whole tokens
    rep = json.loads(_up(vae, dit, tmp_path / "up", tmp_path / "in",
                         extra=["--prompt", "a red cube", "--save-latents", "--set", "dit.max_sequence_length=8"]).stdout)
    assert len(rep["written"]) == 2 and rep["strength"] == 0.0 and sorted(rep["sizes"]) == [[R, R], [R, 2 * R]]
    with Image.open(tmp_path / "up" / "a.png") as im:
        assert im.size == (R, R)
        meta = json.loads(im.text["parameters"])
    assert meta["mode"] == "upscale" and meta["prompt"] == "a red cube" and meta["strength"] == 0.0
    assert meta["source"].endswith("a.png") and meta["base_size"] == [R // 2, R // 2]
    with Image.open(tmp_path / "up" / "b.png") as im:
        assert im.size == (2 * R, R)
    from davae_cli.upscale import prepare_base_image

    lat_a, _ = load_latent(tmp_path / "up" / "a.safetensors")
    assert torch.equal(lat_a[:16], _base_of(vae, to_tensor(a)))  # --strength 0: the encoded input, exactly
    lat_b, _ = load_latent(tmp_path / "up" / "b.safetensors")
    assert torch.equal(lat_b[:16], _base_of(vae, prepare_base_image(b, (R // 2, R))))
    # resumable: existing outputs are skipped
    rep = json.loads(_up(vae, dit, tmp_path / "up", tmp_path / "in", extra=["--set", "dit.max_sequence_length=8"]).stdout)
    assert rep["skipped_existing"] == 2 and rep["written"] == []
    # --strength 1 regenerates the base channels too (same seed, same input)
    json.loads(_up(vae, dit, tmp_path / "up1", tmp_path / "in" / "a.png",
                   extra=["--strength", "1", "--save-latents", "--set", "dit.max_sequence_length=8"]).stdout)
    lat_1, _ = load_latent(tmp_path / "up1" / "a.safetensors")
    assert not torch.allclose(lat_1[:16], lat_a[:16], atol=1e-3)


def test_upscale_bad_input_is_one_line_and_writes_nothing(adapted, pipe, tmp_path):  # noqa: F811
    vae, dit = adapted
    _photo(tmp_path / "in" / "a.png", 32, 32)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    cases = [
        ([tmp_path / "in"], [], "broken.png: unreadable image"),
        ([tmp_path / "in" / "a.png"], ["--strength", "1.5"], "--strength 1.5 is outside [0, 1]"),
        ([tmp_path / "in" / "a.png"], ["--class-id", "3"], "--class-id is for class-conditional"),
        ([tmp_path / "nowhere.png"], [], "nowhere.png: not found"),
    ]
    for inputs, extra, fragment in cases:
        r = _up(vae, dit, tmp_path / "out", *inputs, extra=extra, check=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
        assert r.returncode == 1 and len(lines) == 1 and fragment in lines[0], r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    # a DiT adapted for another DA-VAE
    run_cli("train-vae", "--preset", "tiny", "--base-vae", pipe / "vae", "--out", tmp_path / "other", "--steps", "0",
            "--set", "train_vae.seed=7", "--set", "vae.up_conv_init=default")
    r = _up(tmp_path / "other" / "final", dit, tmp_path / "out", tmp_path / "in" / "a.png", check=False)
    assert r.returncode == 1 and "was adapted for the DA-VAE" in r.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ FLUX
def test_upscale_flux(flux_pipe, tmp_path):  # noqa: F811
    r = 64
    run_cli("train-vae", "--preset", "tiny-flux", "--base-vae", flux_pipe / "vae", "--out", tmp_path / "vae", "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny-flux", "--vae", tmp_path / "vae" / "final", "--dit", flux_pipe,
            "--text-encoders", flux_pipe, "--out", tmp_path / "dit", "--steps", "0", "--set", f"adapt_dit.resolution={r}")
    a = _photo(tmp_path / "in" / "a.png", r // 2, r // 2)
    rep = json.loads(_up(tmp_path / "vae" / "final", tmp_path / "dit" / "final", tmp_path / "up", tmp_path / "in",
                         preset="tiny-flux", extra=["--prompt", "a red cube", "--save-latents"]).stdout)
    assert rep["sizes"] == [[r, r]] and len(rep["written"]) == 1
    lat, _ = load_latent(tmp_path / "up" / "a.safetensors")
    assert lat.shape == (32, r // 16, r // 16)  # R / (s f)
    assert torch.equal(lat[:16], _base_of(tmp_path / "vae" / "final", to_tensor(a)))


# ------------------------------------------------------------------------------------------------ LightningDiT
def test_upscale_lightningdit(lightning, tmp_path):
    vae, dit = lightning
    a = _photo(tmp_path / "in" / "a.png", 64, 64)
    for extra in (["--class-id", "3"], []):  # a class, or the null class (unconditional)
        out = tmp_path / f"up{len(extra)}"
        rep = json.loads(_up(vae, dit, out, tmp_path / "in", preset="tiny-imagenet",
                             extra=[*extra, "--save-latents"]).stdout)
        assert rep["sizes"] == [[128, 128]]
        lat, _ = load_latent(out / "a.safetensors")
        assert torch.equal(lat[:16], _base_of(vae, to_tensor(a)))
        with Image.open(out / "a.png") as im:
            assert json.loads(im.text["parameters"]).get("class_id") == (3 if extra else None)
    # --class-from-folders: sorted folder names are the classes (as train-dit labels)
    _photo(tmp_path / "cls" / "b_second" / "x.png", 64, 64)
    _photo(tmp_path / "cls" / "a_first" / "y.png", 64, 64, seed=2)
    _up(vae, dit, tmp_path / "upc", tmp_path / "cls", preset="tiny-imagenet", extra=["--class-from-folders"])
    for name, label in (("x", 1), ("y", 0)):
        with Image.open(tmp_path / "upc" / f"{name}.png") as im:
            assert json.loads(im.text["parameters"])["class_id"] == label
    r = _up(vae, dit, tmp_path / "bad", tmp_path / "in", preset="tiny-imagenet", extra=["--prompt", "x"], check=False)
    assert r.returncode == 1 and "class-conditional: use --class-id" in r.stderr and not (tmp_path / "bad").exists()


def test_the_label_reaches_the_model_and_cfg_uses_the_null_class(lightning):
    """The class label changes the velocity of a (non-degenerate) LightningDiT, and classifier-free guidance
    runs the unconditional branch with the null class (index num_classes), as the model was trained."""
    from davae_cli.config import load_preset
    from davae_cli.dit.lightningdit import LightningDiTBackend
    from davae_cli.generate import Job
    from davae_cli.models import class_conditioner as _class_conditioner
    from davae_cli.sampling import guided_velocity

    _, dit = lightning
    model = LightningDiTBackend(load_preset("tiny-imagenet")).load_adapted(dit)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the step-0 export has zero-initialised heads: give every weight a value
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x, sigma = torch.randn(2, 32, 8, 8, generator=g), torch.full((2,), 0.5)
    vel = LightningDiTBackend.velocity
    with torch.no_grad():
        v = [vel(model, x, sigma, {"labels": torch.tensor([c, c])}) for c in (0, 1, 10)]
    assert not torch.allclose(v[0], v[1]) and not torch.allclose(v[0], v[2])
    uncond, cond = _class_conditioner(10, "cpu")([Job(0, 0, None, 3), Job(1, 1, None, None)])
    assert uncond["labels"].tolist() == [10, 10] and cond["labels"].tolist() == [3, 10]
    calls = []

    class Spy:
        guidance_mode, backend = "cfg", LightningDiTBackend

        def velocity(self, xx, ss, c):
            calls.append(c["labels"].tolist())
            return vel(model, xx, ss, c)

    with torch.no_grad():
        guided = guided_velocity(Spy(), 4.0, uncond, cond, 2, "cpu", torch.float32)(x, sigma, True)
        plain = guided_velocity(Spy(), 4.0, uncond, cond, 2, "cpu", torch.float32)(x, sigma, False)
        v_u = vel(model, x, sigma, uncond)
        v_c = vel(model, x, sigma, cond)
    assert calls == [[10, 10, 3, 10], [3, 10]]  # one doubled batch: null class first, then the labels
    torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u))
    torch.testing.assert_close(plain, v_c)


def test_decode_generated_latents_with_and_without_their_detail(adapted, tmp_path):  # noqa: F811
    """decode --dit maps generate's DiT-space latents back (the same image as generate wrote); --base-only
    decodes the base channels alone with the base VAE at 1/s + bicubic: detail vs drift on the same latents."""
    vae, dit = adapted
    run_cli("generate", "--preset", "tiny", "--vae", vae, "--dit", dit, "--out", tmp_path / "g", "--steps", "3",
            "--set", "dit.max_sequence_length=8", "--prompt", "a red cube", "--save-latents")
    r = run_cli("decode", tmp_path / "g", "--vae", vae, "--out", tmp_path / "d0", check=False)
    assert r.returncode == 1 and "pass --dit" in r.stderr
    run_cli("decode", tmp_path / "g", "--vae", vae, "--dit", dit, "--out", tmp_path / "d")
    run_cli("decode", tmp_path / "g", "--vae", vae, "--dit", dit, "--base-only", "--out", tmp_path / "b")
    gen = np.asarray(Image.open(tmp_path / "g" / "000000.png")).astype(int)
    dec = np.asarray(Image.open(tmp_path / "d" / "000000.png")).astype(int)
    assert np.abs(gen - dec).max() <= 1  # the generated image, from its saved latent
    # the decoded PNG keeps how the latent was made (generate's metadata), and says how it was decoded
    meta_g, meta_d = Image.open(tmp_path / "g" / "000000.png").text, Image.open(tmp_path / "d" / "000000.png").text
    for key in ("davae:prompt", "davae:seed", "davae:steps", "davae:guidance"):
        assert meta_d[key] == meta_g[key], key
    assert meta_d["davae:decoded"] == "davae"
    assert Image.open(tmp_path / "b" / "000000.png").text["davae:decoded"] == "base_only"
    from davae_cli.data import to_uint8
    from davae_cli.dit.backend import read_facts
    from davae_cli.latents import LatentNormalizer

    lat, _ = load_latent(tmp_path / "g" / "000000.safetensors")
    model = DetailAlignedVAE.from_pretrained(str(vae)).eval()
    z = LatentNormalizer.from_facts(read_facts(dit)).inverse(lat[None])
    with torch.no_grad():
        want = to_uint8(model.decode_baseline(z[:, :16])[0]).astype(int)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "000000.png")).astype(int), want)
    # --detail-from-base: the DA-VAE decode of the latent with z_d := its least-squares prediction from z_base,
    # fitted over the latents given (here one); recomputed with numpy's lstsq
    run_cli("decode", tmp_path / "g", "--vae", vae, "--dit", dit, "--detail-from-base", "--out", tmp_path / "p")
    zb = z[0, :16].reshape(16, -1).T.double().numpy()  # (positions, C)
    x1 = np.concatenate([zb, np.ones((zb.shape[0], 1))], 1)
    coef, *_ = np.linalg.lstsq(x1, z[0, 16:].reshape(z.shape[1] - 16, -1).T.double().numpy(), rcond=None)
    zp = torch.cat([z[:, :16], torch.from_numpy(x1 @ coef).T.reshape(1, -1, *z.shape[2:]).float()], 1)
    with torch.no_grad():
        want = model.decode(zp)[0]
    got = np.asarray(Image.open(tmp_path / "p" / "000000.png")).astype(int)
    assert np.abs(got - to_uint8(want).astype(int)).max() <= 1
    assert Image.open(tmp_path / "p" / "000000.png").text["davae:decoded"] == "detail_from_base"
    r = run_cli("decode", tmp_path / "g", "--vae", vae, "--dit", dit, "--base-only", "--detail-from-base",
                "--out", tmp_path / "x", check=False)
    assert r.returncode != 0 and "two different decodes" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
