"""The FLUX.1 backend (davae_cli/dit/flux.py) on a tiny FluxTransformer2DModel built in code: packing as
FluxPipeline packs, the zero-init extension in the packed layout (function preservation at step 0, plain
diffusers export), FluxPipeline's sigma grid, and the FLOP model against torch's counter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from davae_cli.dit.flux import extend_flux, flux_sigmas, flux_velocity, image_ids, pack, unpack
from davae_cli.errors import DavaeError
from davae_cli.flops import flux_flops

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))


def _tiny(seed=0, **kw):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_FLUX, **kw}).eval()


def _cond(batch=2, guidance=3.5):
    g = torch.Generator().manual_seed(1)
    return {"embeds": torch.randn(batch, 5, 12, generator=g), "pooled": torch.randn(batch, 10, generator=g),
            "guidance": torch.full((batch,), guidance)}


def test_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 6, 8, 10)
    ref = FluxPipeline._pack_latents(x, 2, 6, 8, 10)
    assert torch.equal(pack(x), ref)
    assert torch.equal(unpack(ref, 8, 10), x)
    # FluxPipeline._unpack_latents takes the image size: a 64x80 image with vae_scale_factor 8 is this latent
    assert torch.equal(FluxPipeline._unpack_latents(ref, 64, 80, 8), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(8, 10), ids)
    # the packed feature c * 4 + 2 i + j is channel c at (i, j) of the token's 2x2 cell
    assert pack(x)[1, 0, 3 * 4 + 2 * 1 + 0] == x[1, 3, 1, 0]
    with pytest.raises(DavaeError, match="even sides"):
        pack(torch.zeros(1, 4, 3, 4))


@pytest.mark.parametrize("d", [4, 12])
def test_extension_preserves_the_function_and_exports_a_plain_folder(tmp_path, d):
    """Step 0: the base outputs of the extended model equal the pretrained model's on the base channels for
    any detail input, the detail outputs are exactly zero; the export reloads with from_pretrained."""
    from diffusers import FluxTransformer2DModel

    native = _tiny()
    ext = extend_flux(_tiny(), d)
    assert ext.config.in_channels == ext.config.out_channels == 4 * (4 + d)
    torch.manual_seed(3)
    base, detail = torch.randn(2, 4, 8, 6), 5 * torch.randn(2, d, 8, 6)
    sigma, cond = torch.tensor([0.3, 0.9]), _cond()
    with torch.no_grad():
        ref = flux_velocity(native, base, sigma, cond)
        out = flux_velocity(ext, torch.cat([base, detail], 1), sigma, cond)
    torch.testing.assert_close(out[:, :4], ref, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(out[:, 4:]) == 0
    ext.save_pretrained(tmp_path / "t")
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "t").eval()
    with torch.no_grad():
        assert torch.equal(flux_velocity(again, torch.cat([base, detail], 1), sigma, cond), out)
    with pytest.raises(DavaeError, match="guidance-distilled"):
        flux_velocity(native, base, sigma, {k: v for k, v in cond.items() if k != "guidance"})


@pytest.mark.parametrize("tokens", [64, 1024, 4096, 16384])
def test_sigma_grid_is_fluxpipelines_dynamic_shift(tokens):
    """linspace(1, 1/N, N) sigmas, time-shifted by exp(mu) with mu linear in the token count (256 -> 0.5,
    4096 -> 1.15), then 0: recomputed by hand."""
    steps = 7
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    raw = np.linspace(1.0, 1 / steps, steps)
    ref = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in raw] + [0.0]
    got = flux_sigmas(steps, image_tokens=tokens)
    assert got.shape == (steps + 1,)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, dict(guidance_embeds=False, num_single_layers=3)])
def test_flop_model_matches_torchs_counter(kw):
    m = _tiny(**kw)
    cond = _cond()
    if not m.config.guidance_embeds:
        cond.pop("guidance")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        flux_velocity(m, torch.randn(2, 4, 8, 6), torch.tensor([0.5, 0.5]), cond)
    assert flux_flops(dict(m.config), 12, 5, 2)["total"] == c.get_total_flops()
