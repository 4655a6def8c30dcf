"""metrics.latent_stats.detail_structure against hand-made latents whose statistics are known."""

import math

import pytest
import torch

from davae_cli.metrics.latent_stats import detail_structure


def _smooth(n, k, h, w, g):
    """Smooth fields: white noise upsampled 2x by repetition (each value fills a 2x2 block)."""
    return torch.randn(n, k, h // 2, w // 2, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)


def test_detail_that_is_a_function_of_the_base_plus_white_noise():
    g = torch.Generator().manual_seed(0)
    base = _smooth(64, 4, 16, 16, g)  # (64, 4, 16, 16), unit variance
    a = torch.randn(4, 8, generator=g)
    noise = 0.5 * torch.randn(64, 8, 16, 16, generator=g)
    detail = torch.einsum("nchw,cd->ndhw", base, a) + 2.0 + noise
    r = detail_structure([torch.cat([base, detail], 1)], 4)
    assert r["latents"] == 64
    # the unexplained part is the white noise: its share of the variance is 0.25 / (0.25 + |a_d|^2) summed
    expected = (8 * 0.25) / float((a.pow(2).sum(0) + 0.25).sum())
    assert r["detail_unexplained"]["variance_share"] == pytest.approx(expected, rel=0.03)
    assert r["detail_unexplained"]["std"] == pytest.approx(0.5, rel=0.02)
    assert abs(r["detail_unexplained"]["neighbour_corr"]) < 0.02  # white
    assert r["detail_unexplained"]["kurtosis"] == pytest.approx(3.0, abs=0.1)  # Gaussian
    # base: with the 2x repetition, 8 of the 15 right (or below) neighbour pairs of a 16-wide row are one value
    # twice, the other 7 independent values: corr 8/15
    assert r["base"]["neighbour_corr"] == pytest.approx(8 / 15, abs=0.02)
    assert r["base"]["std"] == pytest.approx(1.0, rel=0.03)


def test_heavy_tails_and_latents_of_different_sizes():
    g = torch.Generator().manual_seed(1)
    lap = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(12345)  # not the generator's seed: the two streams would be correlated
    items = []
    for h, w in ((8, 8), (8, 12), (12, 8)):
        base = torch.randn(2, 2, h, w, generator=g)
        items.append(torch.cat([base, lap.sample((2, 2, h, w))], 1))  # detail independent of the base
    r = detail_structure(items, 2)
    assert r["latents"] == 6
    assert r["detail_unexplained"]["variance_share"] == pytest.approx(1.0, abs=0.05)  # nothing explained
    assert r["detail"]["kurtosis"] == pytest.approx(6.0, rel=0.35)  # Laplace: 6
    assert math.isfinite(r["detail"]["neighbour_corr"]) and abs(r["detail"]["neighbour_corr"]) < 0.15
    with pytest.raises(ValueError, match="no detail channels"):
        detail_structure([torch.zeros(1, 2, 4, 4)], 2)


def test_detail_from_base_recovers_a_linear_map_and_predicts_the_mean_of_independent_detail():
    """DetailFromBase: where z_d = A z_base + b exactly, the prediction is z_d itself (any latent, any size);
    where z_d is independent of z_base, the prediction is z_d's mean; the base channels are never touched."""
    from davae_cli.metrics.latent_stats import DetailFromBase

    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 3, 6, 6, generator=g)
    a, b = torch.randn(3, 6, generator=g), torch.randn(6, generator=g)
    lat = torch.cat([base, torch.einsum("nchw,cd->ndhw", base, a) + b.view(1, -1, 1, 1)], 1)
    pred = DetailFromBase.fit([lat], 3)
    torch.testing.assert_close(pred.coef[:3].float(), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.coef[3].float(), b, atol=1e-5, rtol=0)
    other = torch.randn(2, 3, 4, 10, generator=g)  # another size: the map is per position
    other = torch.cat([other, torch.einsum("nchw,cd->ndhw", other, a) + b.view(1, -1, 1, 1)], 1)
    torch.testing.assert_close(pred.predict(other), other, atol=1e-5, rtol=0)
    noise = 2.0 + torch.randn(4000, 2, 1, 1, generator=g)  # independent of the base
    ind = torch.cat([torch.randn(4000, 3, 1, 1, generator=g), noise], 1)
    out = DetailFromBase.fit([ind], 3).predict(ind)
    assert torch.equal(out[:, :3], ind[:, :3])
    assert out[:, 3:].std() < 0.1 and out[:, 3:].mean() == pytest.approx(2.0, abs=0.05)
