"""The selectable DiT objectives (issue 22): x0 target, the official SD3 trainer's ratio weighting, min-SNR,
and the cosine term without w(n); each against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from davae_cli import flow


def test_weights_by_hand():
    sigma = torch.tensor([0.1, 0.25, 0.5, 0.8])
    assert torch.equal(flow.sample_loss_weight(sigma), torch.ones(4))
    # (1 - s) / s = 9, 3, 1, 0.25 -> clipped at 5
    got = flow.sample_loss_weight(sigma, weighting="snr_ratio")
    assert torch.allclose(got, torch.tensor([5.0, 3.0, 1.0, 0.25]))
    # squared: 81, 9, 1, 0.0625 -> clipped at 5
    got = flow.sample_loss_weight(sigma, weighting="min_snr")
    assert torch.allclose(got, torch.tensor([5.0, 5.0, 1.0, 0.0625]))
    got = flow.sample_loss_weight(sigma, target="x0", weighting="snr_ratio", gamma=2.0)
    assert torch.allclose(got, torch.tensor([0.01 * 2, 0.0625 * 2, 0.25 * 1, 0.64 * 0.25]))
    with pytest.raises(ValueError, match="weighting"):
        flow.sample_loss_weight(sigma, weighting="snr")


def test_x0_loss_is_the_error_of_the_predicted_clean_latent():
    """x0_hat = x_sigma - sigma u_hat; the weighted loss equals the plain MSE of x0_hat - x0 (w = 1)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 6, 4, 4, generator=g), torch.randn(3, 6, 4, 4, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    xt, u = flow.noisy(x0, eps, sigma)
    u_hat = u + 0.3 * torch.randn(u.shape, generator=g)
    x0_hat = xt - sigma.view(-1, 1, 1, 1) * u_hat
    want = (x0_hat - x0).pow(2).mean()
    k = flow.sample_loss_weight(sigma, target="x0")
    assert torch.allclose(flow.flow_loss(u_hat, u, 2, 1.0, k), want, rtol=1e-5)
    # with the official weighting, each sample's x0 error times min((1 - s)/s, 5), over the same count
    r = ((1 - sigma) / sigma).clamp_max(5.0)
    want = ((x0_hat - x0).pow(2) * r.view(-1, 1, 1, 1)).mean()
    k = flow.sample_loss_weight(sigma, target="x0", weighting="snr_ratio")
    assert torch.allclose(flow.flow_loss(u_hat, u, 2, 1.0, k), want, rtol=1e-5)
    # at w = 0 the detail channels do not count, whatever the weighting
    u_far = u_hat.clone()
    u_far[:, 2:] += 100.0
    assert torch.allclose(flow.flow_loss(u_far, u, 2, 0.0, k), flow.flow_loss(u_hat, u, 2, 0.0, k))


def test_flow_step_loss_follows_the_preset():
    """adapt-dit's step loss with the x0/ratio recipe equals the hand computation on the same noise; the
    default recipe is the plain velocity MSE; cosine_schedule false counts the detail channels at step 0."""
    from davae_cli.config import load_preset
    from davae_cli.train.flow_trainer import flow_step_loss

    class Echo:  # a "model" whose velocity is a fixed function of its input, so the loss is computable
        def velocity(self, model, xt, sigma, cond):
            return 0.5 * xt

    x0 = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(1))

    def by_hand(preset, step):
        g = torch.Generator().manual_seed(7)
        a = preset.adapt_dit
        sigma = flow.sample_sigmas(4, mean=a.logit_mean, std=a.logit_std, shift=preset.dit.train_shift, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        xt, u = flow.noisy(x0, eps, sigma)
        return sigma, xt, u

    base = load_preset("tiny", ["adapt_dit.detail_ramp_steps=10"])
    sigma, xt, u = by_hand(base, 10)
    loss, _ = flow_step_loss(Echo(), None, x0, {}, 10, base, 4, torch.Generator().manual_seed(7))
    assert torch.allclose(loss, (0.5 * xt - u).pow(2).mean(), rtol=1e-5)

    off = load_preset("tiny", ["adapt_dit.detail_ramp_steps=10", "adapt_dit.loss_target=x0",
                               "adapt_dit.loss_weighting=snr_ratio"])
    loss, _ = flow_step_loss(Echo(), None, x0, {}, 10, off, 4, torch.Generator().manual_seed(7))
    x0_hat = xt - sigma.view(-1, 1, 1, 1) * 0.5 * xt
    r = ((1 - sigma) / sigma).clamp_max(5.0).view(-1, 1, 1, 1)
    assert torch.allclose(loss, ((x0_hat - x0).pow(2) * r).mean(), rtol=1e-5)

    def cos_term(preset, step):
        loss, parts = flow_step_loss(Echo(), None, x0, {}, step, preset, 4, torch.Generator().manual_seed(7))
        return parts["loss_cos"]

    sched = load_preset("tiny", ["adapt_dit.cosine_loss=1", "adapt_dit.detail_ramp_steps=10"])
    flat = load_preset("tiny", ["adapt_dit.cosine_loss=1", "adapt_dit.detail_ramp_steps=10", "adapt_dit.cosine_schedule=false"])
    pred = 0.5 * xt
    cos_all = 1 - (pred * u).sum(1) / (pred.norm(dim=1) * u.norm(dim=1))
    cos_base = 1 - (pred[:, :4] * u[:, :4]).sum(1) / (pred[:, :4].norm(dim=1) * u[:, :4].norm(dim=1))
    assert math.isclose(cos_term(flat, 0), cos_all.mean().item(), rel_tol=1e-5)
    assert math.isclose(cos_term(sched, 0), cos_base.mean().item(), rel_tol=1e-5)
