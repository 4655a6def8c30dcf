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
