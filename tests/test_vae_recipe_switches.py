"""The official tokenizer recipes' differences, each selectable (issue 22) and checked by hand: KL summed per
sample, inverted detail dropout, alignment on the sampled z, and the base VAE's own reconstruction as the
target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from davae_cli import DetailAlignedVAE, load_base_vae, load_preset
from davae_cli.latents import project
from davae_cli.train.vae import VAETrainStep
from davae_cli.vae.losses import kl_divergence
from conftest import write_preset


def build(tmp_path, base_dir, **loss):
    over = {f"loss__{k}": v for k, v in loss.items()}
    p = load_preset(str(write_preset(tmp_path / "p.yaml", base_dir, "official", **over)))
    base = load_base_vae(p.vae.base_vae, None, p.vae.base_channels)
    torch.manual_seed(0)
    model = DetailAlignedVAE.from_base(base, p.vae)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.requires_grad:
                prm.add_(0.05 * torch.randn_like(prm))  # zero-initialised parts must not hide anything
    return model, p


def test_kl_sum_is_the_per_sample_sum():
    mean, logvar = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    per_el = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)
    assert torch.allclose(kl_divergence(mean, logvar), per_el.mean())
    assert torch.allclose(kl_divergence(mean, logvar, "sum"), per_el.sum() / 3)


def test_inverted_detail_dropout(tmp_path, kl_base):
    model, p = build(tmp_path, kl_base)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    c = p.vae.base_channels
    with torch.no_grad():
        plain = model(x, detail_dropout=0.0)["latent"]
        for rescale, factor in ((False, 1.0), (True, 1 / 0.75)):
            got = model(x, detail_dropout=0.25, generator=torch.Generator().manual_seed(3), dropout_rescale=rescale)["latent"]
            keep = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(3)) >= 0.25
            assert 0 < keep.sum() < 8  # some kept, some dropped with this seed
            assert torch.equal(got[:, :c], plain[:, :c])
            torch.testing.assert_close(got[:, c:], plain[:, c:] * keep * factor)


def test_alignment_on_the_sample_and_base_reconstruction_target(tmp_path, kl_base):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for align_on, recon, space in (("mean", "image", "transformed"), ("sample", "base_reconstruction", "raw")):
        model, p = build(tmp_path, kl_base, align_on=align_on, recon_target=recon, sample_posterior=True,
                         kl_reduction="sum", align_target=space)
        step = VAETrainStep(p, model, None, None)
        with torch.no_grad():
            _, parts, x_hat = step.generator_losses(model, model, x, 0, torch.Generator().manual_seed(5))
            enc = model.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
            z = enc.mean if align_on == "mean" else enc.latent[:, p.vae.base_channels:]
            target_base = enc.z_base if space == "transformed" else model.transform.inverse(enc.z_base)
            want_align = F.mse_loss(project(z, p.vae.base_channels), target_base)
            target = x if recon == "image" else model.reconstruct_base_full(x)
            want_l1 = (x_hat - target).abs().mean()
        assert abs(parts["align"] - want_align.item()) < 1e-6
        assert abs(parts["l1"] - want_l1.item()) < 1e-6
        assert abs(parts["kl"] - kl_divergence(enc.mean, enc.logvar, "sum").item()) < 1e-4
    assert not torch.allclose(model.reconstruct_base_full(x), x, atol=0.05)  # the two targets differ
    assert not torch.allclose(model.transform.inverse(enc.z_base), enc.z_base)  # and so do the two spaces


def test_adaptive_alignment_weight_in_the_training_step_by_hand(tmp_path, kl_base):
    """align_mode adaptive: the step's alignment weight is 0.5 ||d L_rec / d W|| / (||d L_align / d W|| + 1e-4) on the
    detail encoder's last conv W, recomputed here with autograd from the same forward pass (same noise)."""
    model, p = build(tmp_path, kl_base, align_mode="adaptive", align=0.5, sample_posterior=True)
    step = VAETrainStep(p, model, None, None)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    total, parts, _ = step.generator_losses(model, model, x, 0, torch.Generator().manual_seed(2))
    out = model(x, sample=True, generator=torch.Generator().manual_seed(2))
    rec = (out["x_hat"] - x).abs().mean()
    al = ((project(out["mean"], 4) - out["z_base"]) ** 2).mean()
    w = model.down.conv.weight
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_al = torch.autograd.grad(al, w)[0]
    lam = 0.5 * g_rec.norm() / (g_al.norm() + 1e-4)
    assert parts["align_weight"] > 0 and abs(parts["align_weight"] - float(lam)) <= 1e-6 * max(1.0, float(lam))
    assert abs(parts["loss"] - float((rec + 1e-6 * parts["kl"] + lam * al).detach())) <= 1e-5
    fixed, pf = build(tmp_path, kl_base, align_mode="fixed", align=0.5)
    _, parts_f, _ = VAETrainStep(pf, fixed, None, None).generator_losses(fixed, fixed, x, 0, torch.Generator())
    assert parts_f["align_weight"] == 0.5


def test_zero_conv_shortcut_starts_at_zero_and_learns(tmp_path, kl_base):
    """detail_shortcut zero_conv: a 1x1 conv from the pixel-unshuffled features (every sub-pixel phase, s²F
    channels) to 2D channels, all zero at the start, so z_d is exactly the conv path's; its gradient is not zero."""
    import torch.nn.functional as F

    p = load_preset(str(write_preset(tmp_path / "z.yaml", kl_base, "official")))
    base = load_base_vae(p.vae.base_vae, None, p.vae.base_channels)
    model = DetailAlignedVAE.from_base(base, p.vae)
    skip = model.down.skip
    f = model.detail_trunk.out_channels
    assert skip.in_channels == 4 * f and skip.out_channels == 2 * 12 and skip.kernel_size == (1, 1)
    assert torch.count_nonzero(skip.weight) == 0 and torch.count_nonzero(skip.bias) == 0
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = model.encode(x)
    conv_only = F.pixel_unshuffle(model.down.conv(enc.features), 2).chunk(2, dim=1)[0]
    torch.testing.assert_close(enc.mean, conv_only)
    enc.mean.square().mean().backward()
    assert skip.weight.grad is not None and skip.weight.grad.abs().sum() > 0
