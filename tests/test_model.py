"""The properties that define the DA-VAE tokenizer."""

import pytest
import torch
import torch.nn.functional as F

from davae_cli import DavaeError, DetailAlignedVAE, load_base_vae, load_preset
from davae_cli.latents import project
from conftest import TAESD3, write_preset


def build(tmp_path, base_dir, style="official", **kw):
    p = load_preset(str(write_preset(tmp_path / "p.yaml", base_dir, style, **kw)))
    base = load_base_vae(p.vae.base_vae, None, p.vae.base_channels)
    return DetailAlignedVAE.from_base(base, p.vae), base, p


@pytest.mark.parametrize("style, base_fixture", [("official", "kl_base"), ("residual", "tae_base")])
def test_base_channels_are_the_transformed_base_posterior_mean_of_the_downsampled_image(tmp_path, request, style, base_fixture):
    base_dir = request.getfixturevalue(base_fixture)
    model, base, p = build(tmp_path, base_dir, style)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x)
        # independent reference: antialiased bicubic 1/2, clamp, base posterior mean, SD3-style transform
        x_half = F.interpolate(x, size=(32, 24), mode="bicubic", antialias=True).clamp(-1, 1)
        vae = base.vae
        if style == "official":
            mean = vae.encode(x_half).latent_dist.mean
            ref = (mean - 0.1) * 1.5  # the tiny KL base's shift_factor / scaling_factor
        else:
            ref = vae.encode(x_half).latents
        out = model.decode(enc.latent)
    c = p.vae.base_channels
    assert enc.latent.shape == (2, c + p.vae.detail_channels, 4, 3)
    torch.testing.assert_close(enc.latent[:, :c], ref, rtol=1e-5, atol=1e-5)
    assert out.shape == x.shape


def test_projection_is_the_group_average_of_contiguous_channels():
    # D = 6, C = 2, r = 3: Proj[0] = mean(z[0], z[1], z[2]), Proj[1] = mean(z[3], z[4], z[5])
    z = torch.tensor([1.0, 2.0, 6.0, -3.0, 0.0, 9.0]).reshape(1, 6, 1, 1) * torch.ones(1, 6, 2, 2)
    p = project(z, 2)
    assert p.shape == (1, 2, 2, 2)
    assert torch.all(p[0, 0] == 3.0) and torch.all(p[0, 1] == 2.0)
    with pytest.raises(ValueError):
        project(torch.zeros(1, 5, 1, 1), 2)


def test_save_load_round_trip_and_base_identity(tmp_path, kl_base, tae_base):
    model, base, _ = build(tmp_path, kl_base)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.01 * torch.randn_like(prm))  # not just the initial values
    model.set_detail_stats(torch.arange(12.0), torch.ones(12) * 2, 5)
    model.save_pretrained(str(tmp_path / "davae"))
    loaded = DetailAlignedVAE.from_pretrained(tmp_path / "davae")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x).latent), model.decode(model.encode(x).latent))
    assert torch.equal(loaded.detail_mean, torch.arange(12.0)) and int(loaded.detail_stats_images) == 5
    assert loaded.config.base_vae_hash == base.content_hash
    assert loaded.config.base_vae_source == str(kl_base.resolve())
    # a different base VAE is refused, a missing one gives a clear error
    with pytest.raises(DavaeError, match="is a different model"):
        DetailAlignedVAE.from_pretrained(tmp_path / "davae", base_vae=str(tae_base))
    with pytest.raises(DavaeError, match="cannot be loaded"):
        DetailAlignedVAE.from_pretrained(tmp_path / "davae", base_vae=str(tmp_path / "nowhere"))
    with pytest.raises(DavaeError, match="not a DA-VAE folder"):
        DetailAlignedVAE.from_pretrained(tmp_path / "nothing")


def test_residual_decoder_starts_as_exactly_the_baseline(tmp_path, tae_base):
    model, _, _ = build(tmp_path, tae_base, "residual", vae__detail_conv_init="zero")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x)
        torch.testing.assert_close(model.decode(enc.latent), model.decode_baseline(enc.z_base), rtol=0, atol=0)
        # the `base` shortcut with a zero-initialised conv: z_d starts as z_base, the alignment loss at 0
        torch.testing.assert_close(project(enc.mean, 4), enc.z_base)


def test_shape_mismatches_are_refused(tmp_path, kl_base):
    p = load_preset(str(write_preset(tmp_path / "p.yaml", kl_base)), ["vae.base_channels=8", "vae.detail_channels=16"])
    base = load_base_vae(str(kl_base))
    with pytest.raises(DavaeError, match="C = 8, the base VAE .* has 4"):
        DetailAlignedVAE.from_base(base, p.vae)
    model, _, _ = build(tmp_path, kl_base)
    with pytest.raises(DavaeError, match="not a multiple of s\\*f = 16"):
        model.encode(torch.zeros(1, 3, 40, 32))


def test_only_the_recipe_parts_train(tmp_path, kl_base, tae_base):
    model, _, _ = build(tmp_path, kl_base, vae__train_detail_trunk=False)
    assert not any(p.requires_grad for p in model.detail_trunk.parameters())
    assert all(p.requires_grad for p in model.decoder_trunk.parameters())
    assert all(p.requires_grad for p in model.down.parameters())
    tiny, _, _ = build(tmp_path, tae_base, "residual")
    assert tiny.detail_trunk is None and tiny.decoder_trunk is None
    assert all(p.requires_grad for p in tiny.parameters())
    assert not any(p.requires_grad for p in tiny.base.vae.parameters())


def test_random_base_is_deterministic():
    a, b = load_base_vae("random"), load_base_vae("random")
    assert a.content_hash == b.content_hash


@pytest.mark.skipif(not TAESD3.is_dir(), reason="../shared/weights/taesd3 not present")
def test_tiny_preset_on_real_taesd3_is_the_baseline_at_step_0():
    p = load_preset("tiny", [f"vae.base_vae={TAESD3}"])
    base = load_base_vae(str(TAESD3))
    model = DetailAlignedVAE.from_base(base, p.vae).eval()
    import skimage.data

    img = torch.from_numpy(skimage.data.astronaut()[128:384, 128:384].copy()).permute(2, 0, 1).float() / 127.5 - 1
    x = img[None]
    with torch.no_grad():
        enc = model.encode(x)
        rec = model.decode(enc.latent).clamp(-1, 1)
        a = model.decode_baseline(enc.z_base)
        c = model.reconstruct_base_full(x)
    assert enc.latent.shape == (1, 32, 16, 16)
    torch.testing.assert_close(rec, a)
    from davae_cli.metrics import psnr

    assert psnr(c, x).item() > psnr(a, x).item()  # the full-res base is the upper reference


def test_stats_transform_requires_the_file_and_uses_it(tmp_path, kl_base):
    with pytest.raises(DavaeError, match="vae.base_latent_stats is required"):
        build(tmp_path, kl_base, vae__base_latent_transform="stats")
    mean, std = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([2.0, 0.5, 1.0, 4.0])
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")
    model, base, _ = build(tmp_path, kl_base, vae__base_latent_transform="stats",
                           vae__base_latent_stats=str(tmp_path / "latents_stats.pt"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        raw = base.vae.encode(F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True).clamp(-1, 1)).latent_dist.mean
        z = model.encode(x).z_base
    torch.testing.assert_close(z, (raw - mean[None, :, None, None]) / std[None, :, None, None], rtol=1e-5, atol=1e-5)


def test_nonlinear_detail_encoder_option(tae_base, tmp_path):
    """vae.down_hidden > 0: a conv-SiLU-conv detail encoder; shapes unchanged, the residual design still
    starts as exactly the baseline, and it round-trips through save/load."""
    from davae_cli.config import load_preset
    from davae_cli.vae.base import load_base_vae
    from davae_cli.vae.model import DetailAlignedVAE
    from conftest import write_preset

    preset = load_preset(write_preset(tmp_path / "p.yaml", tae_base, style="residual", vae__down_hidden=8))
    model = DetailAlignedVAE.from_base(load_base_vae(str(tae_base)), preset.vae)
    assert isinstance(model.down.conv, torch.nn.Sequential) and model.down.conv[0].out_channels == 8
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x)
        assert enc.latent.shape == (2, 8, 2, 2)
        torch.testing.assert_close(model.decode(enc.latent), model.decode_baseline(enc.z_base))
    model.save_pretrained(tmp_path / "m")
    again = DetailAlignedVAE.from_pretrained(tmp_path / "m", base_vae=str(tae_base))
    assert again.config.down_hidden == 8


def _deep_residual_model(tae_base, tmp_path, **extra):
    from davae_cli.config import load_preset
    from davae_cli.vae.base import load_base_vae
    from davae_cli.vae.model import DetailAlignedVAE
    from conftest import write_preset

    overrides = dict(vae__down_hidden=8, vae__down_blocks=2, vae__up_hidden=8, vae__up_blocks=2, **extra)
    preset = load_preset(write_preset(tmp_path / "p.yaml", tae_base, style="residual", **overrides))
    return DetailAlignedVAE.from_base(load_base_vae(str(tae_base)), preset.vae)


def test_deep_residual_design_starts_as_baseline_and_round_trips(tae_base, tmp_path):
    """vae.down_blocks / vae.up_blocks (the `tiny` preset's networks): the decoder starts as exactly the
    baseline, the encoder's mean is z_base + its output, and save/load gives the same function."""
    from davae_cli.vae.blocks import ResidualDetailDecoder, ResidualDetailEncoder
    from davae_cli.vae.model import DetailAlignedVAE

    model = _deep_residual_model(tae_base, tmp_path)
    assert isinstance(model.down, ResidualDetailEncoder) and isinstance(model.up, ResidualDetailDecoder)
    assert len(model.down.blocks) == 2 and len(model.up.blocks) == 2
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x)
        assert enc.latent.shape == (2, 8, 2, 2)
        assert not torch.equal(enc.mean, enc.z_base)  # the encoder's last conv is not zero-initialised
        # with the last conv zeroed, the mean is exactly z_base (the `base` shortcut)
        model.down.conv_out.weight.zero_()
        model.down.conv_out.bias.zero_()
        torch.testing.assert_close(model.encode(x).mean, enc.z_base, rtol=0, atol=0)
        torch.testing.assert_close(model.decode(enc.latent), model.decode_baseline(enc.z_base), rtol=0, atol=0)
        for p in model.up.parameters():  # make the decoder a non-trivial function for the round trip
            p.add_(0.01 * torch.randn_like(p))
        for p in model.down.parameters():
            p.add_(0.01 * torch.randn_like(p))
        before = model.decode(model.encode(x).latent)
    model.save_pretrained(tmp_path / "m")
    again = DetailAlignedVAE.from_pretrained(tmp_path / "m", base_vae=str(tae_base))
    assert again.config.down_blocks == 2 and again.config.up_blocks == 2
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x).latent), before)


@pytest.mark.parametrize("deep", [False, True])
def test_high_band_residual_keeps_the_baselines_block_means(tae_base, tmp_path, deep):
    """vae.residual_band = high: whatever the decoder's weights, the decode's s x s block means are the
    baseline's (it adds only what the base resolution cannot hold); the added part is recomputed by hand
    from the full-band decode of the same weights; the setting round-trips and needs the residual design."""
    from davae_cli.config import ConfigError, load_preset
    from davae_cli.vae.model import DetailAlignedVAE
    from conftest import write_preset

    if deep:
        model = _deep_residual_model(tae_base, tmp_path, vae__residual_band="high")
    else:
        model, _, _ = build(tmp_path, tae_base, "residual", vae__residual_band="high")
    assert model.config.residual_band == "high"
    s = model.config.scale
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for p in model.up.parameters():  # a decoder that changes the image (the last conv is zero at init)
            p.add_(0.05 * torch.randn_like(p))
        enc = model.encode(x)
        baseline = model.decode_baseline(enc.z_base)
        out = model.decode(enc.latent)
        pool = torch.nn.functional.avg_pool2d
        torch.testing.assert_close(pool(out, s), pool(baseline, s), rtol=0, atol=1e-6)
        assert (out - baseline).abs().max() > 1e-3  # it does add something
        model.register_to_config(residual_band="full")
        full = model.decode(enc.latent)
        r = full - baseline
        by_hand = r - pool(r, s).repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)
        torch.testing.assert_close(out, baseline + by_hand, rtol=0, atol=1e-6)
        model.register_to_config(residual_band="high")
    model.save_pretrained(tmp_path / "m")
    again = DetailAlignedVAE.from_pretrained(tmp_path / "m", base_vae=str(tae_base))
    assert again.config.residual_band == "high"
    with torch.no_grad():
        torch.testing.assert_close(again.decode(enc.latent), out)
    with pytest.raises(ConfigError, match="residual_band = high needs vae.decoder_input = residual"):
        load_preset(write_preset(tmp_path / "q.yaml", tae_base, vae__residual_band="high"))


def test_deep_residual_decoder_pixel_layout(tae_base, tmp_path):
    """The decoder's output channel c*f*f + i*f + j lands on pixel (c, i, j) of every f x f cell: the
    inverse of the pixel_unshuffle(baseline, f) it reads."""
    model = _deep_residual_model(tae_base, tmp_path)
    f = model.config.downsample
    with torch.no_grad():
        model.up.conv_out.bias.copy_(torch.arange(3 * f * f, dtype=torch.float32))
        z = torch.randn(1, 8, 2, 2)
        baseline = torch.zeros(1, 3, 32, 32)
        out = model.up(z, baseline)
    for c, i, j in [(0, 0, 0), (0, 0, 5), (1, 3, 2), (2, 7, 7)]:
        expected = float(c * f * f + i * f + j)
        assert torch.all(out[0, c, i::f, j::f] == expected), (c, i, j)


def test_deep_residual_design_encoder_gets_gradient_after_one_step(tae_base, tmp_path):
    """The decoder's last conv starts at zero, so step 0 gives the encoder no gradient; the encoder's own
    last conv is not zero, so after one optimizer step the reconstruction loss reaches the encoder (both
    zero-initialised would leave the detail path dead)."""
    model = _deep_residual_model(tae_base, tmp_path)
    opt = torch.optim.SGD(model.new_block_parameters(), lr=0.1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for _ in range(2):
        opt.zero_grad()
        out = model(x)
        (out["x_hat"] - x).abs().mean().backward()
        grads.append((model.down.conv_out.weight.grad.abs().sum().item(), model.up.conv_out.weight.grad.abs().sum().item()))
        opt.step()
    assert grads[0][0] == 0 and grads[0][1] > 0
    assert grads[1][0] > 0


@pytest.mark.parametrize("overrides, key", [
    (dict(vae__up_blocks=2, vae__up_hidden=10), "vae.up_hidden"),
    (dict(vae__down_blocks=2, vae__down_hidden=0), "vae.down_hidden"),
    (dict(vae__down_blocks=-1), "vae.down_blocks"),
])
def test_deep_residual_design_bad_options(tae_base, tmp_path, overrides, key):
    from davae_cli.config import ConfigError, load_preset
    from conftest import write_preset

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_preset(write_preset(tmp_path / "p.yaml", tae_base, style="residual", **overrides))


def test_deep_residual_design_needs_residual_paths(kl_base, tmp_path):
    from davae_cli.config import ConfigError, load_preset
    from conftest import write_preset

    with pytest.raises(ConfigError, match="up_blocks > 0 needs vae.decoder_input = residual"):
        load_preset(write_preset(tmp_path / "p.yaml", kl_base, vae__up_blocks=1, vae__up_hidden=8))
    with pytest.raises(ConfigError, match="down_blocks > 0 needs vae.detail_features = residual"):
        load_preset(write_preset(tmp_path / "q.yaml", kl_base, vae__down_blocks=1, vae__down_hidden=8))


@pytest.mark.parametrize("style, base_fixture, d, extra", [
    ("official", "kl_base", 8, dict(vae__up_shortcut="none")),  # C = 4: no D makes s²G = 256 a multiple of C+D
    ("residual", "tae_base", 8, {}),
    ("residual", "tae_base", 12, dict(vae__down_hidden=16, vae__down_blocks=1, vae__up_blocks=1)),  # the tiny design, D = 3C
])
def test_scale_4_base_at_a_quarter_and_detail_at_full_resolution(tmp_path, request, style, base_fixture, d, extra):
    """s = 4: the base channels are the transformed base posterior mean of the image at 1/4 (antialiased
    bicubic), the latent grid is H / (4 f); the residual design starts as exactly the baseline (base at 1/4 +
    bicubic x4) with z_d = z_base repeated D/C times; save/load keeps the function."""
    base_dir = request.getfixturevalue(base_fixture)
    model, base, p = build(tmp_path, base_dir, style, vae__scale=4, vae__detail_channels=d,
                           train_vae__resolution=64, train_vae__crop_size=64, **extra)
    assert model.granularity == 32
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        enc = model.encode(x)
        x_q = F.interpolate(x, size=(16, 24), mode="bicubic", antialias=True).clamp(-1, 1)
        if style == "official":
            ref = (base.vae.encode(x_q).latent_dist.mean - 0.1) * 1.5
        else:
            ref = base.vae.encode(x_q).latents
        c = p.vae.base_channels
        assert enc.latent.shape == (2, c + d, 2, 3)
        torch.testing.assert_close(enc.latent[:, :c], ref, rtol=1e-5, atol=1e-5)
        out = model.decode(enc.latent)
        assert out.shape == x.shape
        if style == "residual":
            baseline = F.interpolate(base.vae.decode(ref).sample.clamp(-1, 1), scale_factor=4.0, mode="bicubic").clamp(-1, 1)
            torch.testing.assert_close(model.decode_baseline(enc.z_base), baseline, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out, model.decode_baseline(enc.z_base), rtol=0, atol=0)  # zero last conv
            down = model.down.conv_out if hasattr(model.down, "conv_out") else model.down.skip
            down.weight.zero_()
            down.bias.zero_()
            if hasattr(model.down, "conv"):
                model.down.conv.weight.zero_()
                model.down.conv.bias.zero_()
            mean = model.encode(x).mean
            torch.testing.assert_close(mean, ref.repeat_interleave(d // c, 1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(project(mean, c), ref, rtol=1e-5, atol=1e-5)
        for prm in model.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
        before = model.decode(model.encode(x).latent)
    model.save_pretrained(tmp_path / "m")
    again = DetailAlignedVAE.from_pretrained(tmp_path / "m", base_vae=str(base_dir))
    assert again.config.scale == 4
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x).latent), before)
