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
