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
from davae_cli.dit.flux import flux_flops

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


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    """A tiny FLUX.1 pipeline folder: transformer/ (the tiny-flux preset's arch), vae/ (KL, C = 16, its own
    shift/scale), scheduler/ (FLUX.1's dynamic-shift config), text_encoder(_2)/ and tokenizer(_2)/."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from davae_cli.config import load_preset
    from davae_cli.dit.flux import FLUX1_SCHEDULER_CONFIG
    from davae_cli.dit.text_random import build_tiny_flux_text_components

    d = tmp_path_factory.mktemp("fluxpipe")
    torch.manual_seed(0)
    FluxTransformer2DModel(**load_preset("tiny-flux").dit.arch).save_pretrained(d / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  norm_num_groups=4, scaling_factor=0.36, shift_factor=0.12).save_pretrained(d / "vae")
    FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULER_CONFIG).save_pretrained(d / "scheduler")
    for name, comp in build_tiny_flux_text_components().items():
        comp.save_pretrained(str(d / name))
    return d


def _pipeline(folder):
    """diffusers' own FluxPipeline on the tiny folder's parts (the folder has no model_index.json)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    pipe = FluxPipeline(transformer=FluxTransformer2DModel.from_pretrained(folder / "transformer"),
                        vae=AutoencoderKL.from_pretrained(folder / "vae"),
                        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
                        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
                        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
                        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
                        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_native_is_fluxpipeline(flux_pipe, tmp_path):
    """generate --native with a FLUX preset reproduces FluxPipeline.__call__ (same noise, prompt, steps,
    guidance embedding, max_sequence_length, dynamic shift) on the final latent and on the decoded image."""
    import json

    from PIL import Image

    from conftest import run_cli
    from davae_cli.latents import load_latent

    rep = json.loads(run_cli("generate", "--preset", "tiny-flux", "--native", "--base-pipeline", flux_pipe,
                             "--res", "128", "--out", tmp_path / "nat", "--steps", "6", "--guidance", "3.5",
                             "--seed", "5", "--prompt", "the cat", "--save-latents", "--json").stdout)
    ours, _ = load_latent(tmp_path / "nat" / "000000.safetensors")
    pipe = _pipeline(flux_pipe)
    out = pipe("the cat", height=128, width=128, num_inference_steps=6, guidance_scale=3.5, max_sequence_length=16,
               generator=torch.Generator().manual_seed(5), output_type="latent").images
    ref = unpack(out, 16, 16)[0]
    assert ours.shape == ref.shape == (16, 16, 16)
    assert float((ours - ref).norm() / ref.norm()) <= 1e-4
    img = pipe("the cat", height=128, width=128, num_inference_steps=6, guidance_scale=3.5, max_sequence_length=16,
               generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    png = np.asarray(Image.open(tmp_path / "nat" / "000000.png")).astype(np.float32) / 255
    assert np.abs(png - img).max() <= 2 / 255  # 8-bit rounding (and float noise) only
    assert rep["tokens"] == 64 and rep["steps"] == 6
    np.testing.assert_allclose(rep["sigmas"], flux_sigmas(6, image_tokens=64).numpy(), atol=1e-7)


def test_flux_commands_and_bad_input(flux_pipe, tmp_path):
    """bench and generate --random-weights take FLUX presets (guidance-distilled: no CFG batch); a FLUX
    checkpoint given to an SD3 preset, an SD3 one to a FLUX preset, and a resolution FLUX cannot pack are
    one-line errors."""
    import json

    from conftest import run_cli

    b = json.loads(run_cli("bench", "--preset", "tiny-flux", "--steps", "2", "--repeats", "1", "--warmup", "0",
                           "--no-decode", "--json").stdout)
    assert b["cfg"] is False and b["native"]["image_tokens"] == 4 * b["davae"]["image_tokens"] == 256
    assert b["native"]["latent"] == [16, 32, 32] and b["davae"]["latent"] == [32, 16, 16]
    g = json.loads(run_cli("generate", "--preset", "tiny-flux", "--random-weights", "--prompt", "x", "--res", "128",
                           "--steps", "2", "--out", tmp_path / "r", "--json").stdout)
    assert g["mode"] == "davae" and g["tokens"] == 16 and len(g["written"]) == 1
    for args, needle in [
        (["generate", "--preset", "tiny", "--native", "--base-pipeline", str(flux_pipe), "--res", "64", "--prompt", "x"],
         "FluxTransformer2DModel"),
        (["generate", "--preset", "tiny-flux", "--native", "--base-pipeline", str(_sd3_folder(tmp_path)), "--res", "64",
          "--prompt", "x"], "not a FluxTransformer2DModel"),
        (["bench", "--preset", "tiny-flux", "--res", "48"], "FLUX packs 2x2"),
        (["generate", "--preset", "tiny-flux", "--native", "--base-pipeline", str(flux_pipe), "--res", "64", "--prompt",
          "x", "--shift", "2"], "dynamic shift"),
    ]:
        bad = run_cli(*args, "--out", str(tmp_path / "bad"), check=False) if args[0] != "bench" else run_cli(*args, check=False)
        assert bad.returncode != 0 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def _sd3_folder(tmp_path):
    from diffusers import SD3Transformer2DModel

    from davae_cli.config import load_preset

    d = tmp_path / "sd3pipe"
    SD3Transformer2DModel(**load_preset("tiny").dit.arch).save_pretrained(d / "transformer")
    return d


def test_adapted_flux_warm_start_is_fluxpipeline_at_half_resolution(flux_pipe, tmp_path):
    """adapt-dit on FLUX: the step-0 export is a plain FluxTransformer2DModel folder with 4(C+D) channels, and
    generate with it at R gives, on the base channels, exactly FluxPipeline's latent at R/2 (same seed, same
    token count hence the same dynamic shift, the guidance embedding); two LoRA training steps run, and the run
    killed after step 1's checkpoint resumes from it with --resume to the uninterrupted run's losses and weights."""
    import json

    from diffusers import FluxTransformer2DModel

    from conftest import run_cli
    from davae_cli.latents import load_latent

    r = 64
    common = ["--set", f"adapt_dit.resolution={r}"]
    run_cli("train-vae", "--preset", "tiny-flux", "--base-vae", flux_pipe / "vae", "--out", tmp_path / "vae", "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny-flux", "--vae", tmp_path / "vae" / "final", "--dit", flux_pipe,
            "--text-encoders", flux_pipe, "--out", tmp_path / "dit", "--steps", "0", *common)
    final = tmp_path / "dit" / "final"
    assert FluxTransformer2DModel.from_pretrained(final).config.in_channels == 4 * (16 + 16)
    facts = json.loads((final / "davae_dit.json").read_text())
    assert facts["backend"] == "flux" and facts["patch_size"] == 2 and facts["guidance_mode"] == "distilled"
    run_cli("generate", "--preset", "tiny-flux", "--vae", tmp_path / "vae" / "final", "--dit", final, "--out",
            tmp_path / "g", "--steps", "4", "--seed", "3", "--prompt", "a red cube", "--save-latents", "--res", str(r))
    ours, _ = load_latent(tmp_path / "g" / "000000.safetensors")
    pipe = _pipeline(flux_pipe)
    out = pipe("a red cube", height=r // 2, width=r // 2, num_inference_steps=4, guidance_scale=3.5,
               max_sequence_length=16, generator=torch.Generator().manual_seed(3), output_type="latent").images
    ref = unpack(out, 4, 4)[0]
    assert ours.shape == (32, 4, 4)
    assert float((ours[:16] - ref).norm() / ref.norm()) <= 1e-4
    # LoRA training on FLUX runs (guidance fed to the embedding) and resumes
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}")
    train = ["adapt-dit", "--preset", "tiny-flux", "--vae", tmp_path / "vae" / "final", "--dit", flux_pipe,
             "--text-encoders", flux_pipe, "--data", data, "--steps", "2", *common, "--set", "adapt_dit.batch_size=2",
             "--set", "adapt_dit.checkpoint_every=1", "--set", "adapt_dit.log_every=1", "--json"]
    rep = json.loads(run_cli(*train, "--out", tmp_path / "t").stdout)
    assert rep["steps"] == 2
    losses = _train_losses(tmp_path / "t")
    assert [s for s, _ in losses] == [1, 2] and all(math.isfinite(v) for _, v in losses)
    trained = FluxTransformer2DModel.from_pretrained(tmp_path / "t" / "final")
    step0 = FluxTransformer2DModel.from_pretrained(final)
    assert not torch.equal(trained.x_embedder.weight, step0.x_embedder.weight)  # the extended embedder trained
    # the same run killed right after step 1's checkpoint, then --resume: it continues from that checkpoint
    cut = tmp_path / "cut"
    killed = run_cli(*train, "--out", cut, check=False, env={"DAVAE_KILL_AFTER_STEP": "1"})
    assert killed.returncode != 0 and not (cut / "final").exists()
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step-0000001"
    assert _train_losses(cut) == losses[:1]  # step 1 done, step 2 not
    rep = json.loads(run_cli(*train, "--out", cut, "--resume").stdout)
    assert rep["steps"] == 2
    starts = [(r["step"], r["start_step"]) for r in map(json.loads, (cut / "log.jsonl").read_text().splitlines())
              if r.get("event") == "start"]
    assert starts == [(0, 0), (1, 1)]  # resumed at step 1, not restarted
    assert _train_losses(cut) == losses  # step 2 from step 1's weights and optimiser state: the uninterrupted run's
    resumed = FluxTransformer2DModel.from_pretrained(cut / "final")
    a, b = trained.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_losses(run):
    """(step, loss) of a training run's log."""
    import json

    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if r.get("event") == "train"]
