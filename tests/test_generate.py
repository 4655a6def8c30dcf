"""davae generate on a tiny SD3 pipeline built in code (tiny CLIP/CLIP/T5 with local tokenizers, tiny SD3
transformer, tiny KL VAE) and on the tiny LightningDiT path: sizes, seeds, metadata, prompts files,
resume, and the warm start end to end (step-0 adapted model at R == native model at R/2 on the base
channels)."""

from __future__ import annotations

import json

import pytest
import torch

from davae_cli.config import load_preset
from davae_cli.images import tiled_decode

from conftest import run_cli

R = 64  # DA-VAE resolution: 4x4 latent, 2x2 tokens with p = 2; native at R/2 has the same 4x4 base latent
PIPE_SHIFT = 2.5  # the tiny pipeline's scheduler shift


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny SD3 pipeline folder: transformer/, vae/ (KL, C = 16, shift/scale), text encoders, tokenizers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from davae_cli.dit.text_random import save_tiny_sd3_text_components

    d = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    SD3Transformer2DModel(**load_preset("tiny").dit.arch).save_pretrained(d / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  norm_num_groups=4, scaling_factor=1.5, shift_factor=0.1).save_pretrained(d / "vae")
    # not the tiny preset's sample.shift (3.0): --native must follow the pipeline's own scheduler
    FlowMatchEulerDiscreteScheduler(shift=PIPE_SHIFT).save_pretrained(d / "scheduler")
    save_tiny_sd3_text_components(d)
    return d


@pytest.fixture(scope="module")
def adapted(pipe, tmp_path_factory):
    """(DA-VAE folder, step-0 adapted DiT folder) on the tiny pipeline."""
    d = tmp_path_factory.mktemp("adapted")
    common = ["--set", "dit.max_sequence_length=8", "--set", f"adapt_dit.resolution={R}",
              "--set", f"sample.shift={PIPE_SHIFT}"]
    run_cli("train-vae", "--preset", "tiny", "--base-vae", pipe / "vae", "--out", d / "vae", "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny", "--vae", d / "vae" / "final", "--dit", pipe, "--text-encoders", pipe,
            "--out", d / "dit", "--steps", "0", *common)
    return d / "vae" / "final", d / "dit" / "final"


def _gen(adapted, out, *args, check=True):
    vae, dit = adapted
    return run_cli("generate", "--preset", "tiny", "--vae", vae, "--dit", dit, "--out", out, "--steps", "3",
                   "--set", "dit.max_sequence_length=8", *args, "--json", check=check)


def test_sizes_seeds_metadata(adapted, tmp_path):
    from PIL import Image

    r = _gen(adapted, tmp_path / "a", "--prompt", "a red cube", "--num-images", "2", "--seed", "5", "--grid")
    rep = json.loads(r.stdout)
    assert len(rep["written"]) == 2 and rep["res"] == R and rep["tokens"] == 4
    im = Image.open(tmp_path / "a" / "000000.png")
    assert im.size == (R, R)
    meta = json.loads(im.text["parameters"])
    assert meta["prompt"] == "a red cube" and meta["seed"] == 5 and meta["steps"] == 3 and "davae" in meta
    assert json.loads(Image.open(tmp_path / "a" / "000001.png").text["parameters"])["seed"] == 6
    assert (tmp_path / "a-grid.png").is_file() and rep["grid"] == str(tmp_path / "a-grid.png")
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["000000.png", "000001.png"]  # samples only
    _gen(adapted, tmp_path / "b", "--prompt", "a red cube", "--num-images", "2", "--seed", "5")
    same = [(tmp_path / d / "000000.png").read_bytes() for d in ("a", "b")]
    assert same[0] == same[1]  # same seed, same image
    import numpy as np

    a0 = torch.from_numpy(np.asarray(Image.open(tmp_path / "a" / "000000.png"), dtype=np.float32))
    a1 = torch.from_numpy(np.asarray(Image.open(tmp_path / "a" / "000001.png"), dtype=np.float32))
    assert (a0 - a1).abs().mean() > 0  # different seeds differ


def _diffusers_pipeline(pipe):
    """StableDiffusion3Pipeline itself, from the tiny pipeline folder's components."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(pipe / "transformer"),
        vae=AutoencoderKL.from_pretrained(pipe / "vae"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(pipe / "scheduler"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(pipe / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_pretrained(pipe / "tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(pipe / "text_encoder_3"),
        tokenizer_3=T5TokenizerFast.from_pretrained(pipe / "tokenizer_3"),
    )


def _pipeline_latent(pipe, prompt, negative, seed, res, steps, guidance):
    """The final latent of StableDiffusion3Pipeline.__call__, from davae's initial noise for `seed`."""
    from davae_cli.sampling import initial_noise

    sd3 = _diffusers_pipeline(pipe)
    noise = initial_noise(seed, 16, 0, res // 8)
    with torch.no_grad():
        out = sd3(prompt=prompt, negative_prompt=negative, height=res, width=res, num_inference_steps=steps,
                  guidance_scale=guidance, latents=noise, max_sequence_length=8, output_type="latent")
    return out.images[0], sd3.scheduler.sigmas


def _rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_native_is_the_diffusers_pipeline(pipe, tmp_path):
    """generate --native on an SD3 pipeline reproduces StableDiffusion3Pipeline.__call__ (same noise, prompt,
    negative prompt, steps, guidance, max_sequence_length) on the final latent, sampling with the shift of the
    pipeline's own scheduler_config.json, recorded with the sigma grid in the PNG and the JSON report."""
    from PIL import Image

    from davae_cli.latents import load_latent

    rep = json.loads(run_cli("generate", "--preset", "tiny", "--native", "--base-pipeline", pipe, "--res", "128",
                             "--out", tmp_path / "nat", "--steps", "12", "--guidance", "3", "--seed", "5",
                             "--set", "dit.max_sequence_length=8", "--prompt", "the cat", "--negative-prompt",
                             "blurry", "--save-latents", "--json").stdout)
    ours, _ = load_latent(tmp_path / "nat" / "000000.safetensors")
    ref, ref_sigmas = _pipeline_latent(pipe, "the cat", "blurry", 5, 128, 12, 3.0)
    assert _rel_l2(ours, ref) <= 1e-4
    meta = json.loads(Image.open(tmp_path / "nat" / "000000.png").text["parameters"])
    assert meta["shift"] == rep["shift"] == PIPE_SHIFT
    torch.testing.assert_close(torch.tensor(meta["sigmas"]), ref_sigmas.float(), rtol=0, atol=1e-7)
    assert rep["sigmas"] == meta["sigmas"] and len(meta["sigmas"]) == 13 and meta["sigmas"][-1] == 0
    assert 0 < meta["sigmas"][-2] < 0.05  # the pipeline's grid: the last step starts near sigma 0.01, not 0.1+
    # --shift still overrides the pipeline's own
    run_cli("generate", "--preset", "tiny", "--native", "--base-pipeline", pipe, "--res", "32", "--out",
            tmp_path / "s", "--steps", "2", "--shift", "5", "--set", "dit.max_sequence_length=8", "--prompt", "x")
    assert json.loads(Image.open(tmp_path / "s" / "000000.png").text["parameters"])["shift"] == 5.0


def test_warm_start_end_to_end_matches_the_pipeline_at_half_res(adapted, pipe, tmp_path):
    """The step-0 adapted model at R, sampled by generate, gives StableDiffusion3Pipeline's latent at R/2 on
    its base channels (zero-init extension + the same base noise + the same sigma grid)."""
    from davae_cli.latents import load_latent

    _gen(adapted, tmp_path / "da", "--prompt", "a red cube", "--prompt", "two dogs", "--seed", "3",
         "--guidance", "3.0", "--save-latents")
    for stem, prompt in (("000000", "a red cube"), ("000001", "two dogs")):
        da, meta = load_latent(tmp_path / "da" / f"{stem}.safetensors")
        ref, _ = _pipeline_latent(pipe, prompt, "", 3, R // 2, 3, 3.0)
        assert da.shape == (32, 4, 4) and ref.shape == (16, 4, 4)
        assert _rel_l2(da[:16], ref) <= 1e-4
        assert meta["mode"] == "davae" and meta["shift"] == PIPE_SHIFT


# recipe A, stored at adaptation (--set sample.*); every field differs from the tiny preset's sample section (B)
RECIPE_A = {"steps": 3, "guidance": 1.5, "guidance_interval": [0.1, 0.9], "sampler": "heun", "negative_prompt": "blurry"}
FLAGS_A = ["--steps", "3", "--guidance", "1.5", "--guidance-interval", "0.1,0.9", "--sampler", "heun",
           "--negative-prompt", "blurry"]


def test_generate_uses_the_stored_recipe(adapted, pipe, tmp_path):
    """Without sampling flags, generate samples with the recipe stored with the adapted model (A: adapted with
    --set sample.*), not the sample section of the preset it is given (B: the tiny preset's): the report and the
    PNG metadata say A, and the image is the one explicit A flags give (so A is what the sampler ran), not B's."""
    from PIL import Image

    vae, _ = adapted
    smp = load_preset("tiny").sample  # B
    b = {"steps": smp.steps, "guidance": smp.guidance, "guidance_interval": smp.guidance_interval,
         "sampler": smp.sampler, "negative_prompt": smp.negative_prompt}
    assert all(RECIPE_A[k] != b[k] for k in RECIPE_A)  # every field tells A from B
    sets = sum((["--set", f"sample.{k}={json.dumps(v)}"] for k, v in RECIPE_A.items()), [])
    run_cli("adapt-dit", "--preset", "tiny", "--vae", vae, "--dit", pipe, "--text-encoders", pipe, "--out",
            tmp_path / "dit", "--steps", "0", "--set", "dit.max_sequence_length=8", "--set", f"adapt_dit.resolution={R}",
            "--set", f"sample.shift={PIPE_SHIFT}", *sets)
    stored = json.loads((tmp_path / "dit" / "final" / "davae_dit.json").read_text())["sampling"]
    assert stored == RECIPE_A
    dit = tmp_path / "dit" / "final"
    common = ("--prompt", "a red cube", "--seed", "2")
    rep = json.loads(run_cli("generate", "--preset", "tiny", "--vae", vae, "--dit", dit, "--out", tmp_path / "o",
                             "--set", "dit.max_sequence_length=8", *common, "--json").stdout)
    assert (rep["steps"], rep["guidance"], rep["sampler"]) == (3, 1.5, "heun")
    assert list(rep["guidance_interval"]) == [0.1, 0.9] and len(rep["sigmas"]) == 3 + 1
    meta = json.loads(Image.open(tmp_path / "o" / "000000.png").text["parameters"])
    assert {k: meta[k] for k in RECIPE_A} == RECIPE_A
    flags_b = ["--steps", str(smp.steps), "--guidance", str(smp.guidance), "--sampler", smp.sampler,
               "--guidance-interval", "all", "--negative-prompt", smp.negative_prompt]
    run_cli("generate", "--preset", "tiny", "--vae", vae, "--dit", dit, "--out", tmp_path / "a",
            "--set", "dit.max_sequence_length=8", *common, *FLAGS_A)
    run_cli("generate", "--preset", "tiny", "--vae", vae, "--dit", dit, "--out", tmp_path / "b",
            "--set", "dit.max_sequence_length=8", *common, *flags_b)
    png = {k: (tmp_path / k / "000000.png") for k in ("o", "a", "b")}
    pixels = {k: Image.open(p).tobytes() for k, p in png.items()}
    assert pixels["o"] == pixels["a"] and pixels["o"] != pixels["b"]


def test_mismatched_pair_is_refused(adapted, tmp_path):
    """A DA-VAE with the same C + D but other weights than the one the DiT was adapted for: exit 1, one
    line naming both, before any sampling (nothing written)."""
    import shutil

    from safetensors.torch import load_file, save_file

    vae, dit = adapted
    other = tmp_path / "other"
    shutil.copytree(vae, other)
    wfile = next(other.glob("*.safetensors"))
    sd = load_file(wfile)
    k = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[k] = sd[k] + 0.01
    save_file(sd, wfile)
    r = run_cli("generate", "--preset", "tiny", "--vae", other, "--dit", dit, "--out", tmp_path / "o", "--prompt",
                "x", "--set", "dit.max_sequence_length=8", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "adapted for the DA-VAE" in r.stderr and str(other) in r.stderr.replace("\n", "")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,needle", [(["--shift", "0"], "--shift must be positive"),
                                          (["--shift", "-1"], "--shift must be positive"),
                                          (["--steps", "0"], "--sampling-steps must be at least 1"),
                                          (["--sampling-steps", "0"], "--sampling-steps must be at least 1"),
                                          (["--guidance-interval", "0.9,0.1"], "--guidance-interval"),
                                          (["--guidance-interval", "0,1.5"], "--guidance-interval"),
                                          (["--guidance-interval", "a,b"], "--guidance-interval")])
def test_bad_sampling_settings_are_refused(adapted, tmp_path, flags, needle):
    r = _gen(adapted, tmp_path / "o", "--prompt", "x", *flags, check=False)
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_prompts_file_and_resume(adapted, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a cat\n\na dog\na boat\n")
    rep = json.loads(_gen(adapted, tmp_path / "o", "--prompts", pf).stdout)
    assert len(rep["written"]) == 3
    first = (tmp_path / "o" / "000001.png").read_bytes()
    (tmp_path / "o" / "000001.png").unlink()
    rep = json.loads(_gen(adapted, tmp_path / "o", "--prompts", pf).stdout)
    assert rep["skipped_existing"] == 2 and [p.rsplit("/", 1)[1] for p in rep["written"]] == ["000001.png"]
    assert (tmp_path / "o" / "000001.png").read_bytes() == first


def test_generate_errors(adapted, davae_dir, tmp_path):
    r = _gen(adapted, tmp_path / "e1", "--prompt", "x", "--res", "40", check=False)
    assert r.returncode == 1 and "multiple of 32" in r.stderr and "Traceback" not in r.stderr
    r = _gen(adapted, tmp_path / "e2", "--prompts", tmp_path / "missing.txt", check=False)
    assert r.returncode == 1 and "not found" in r.stderr
    r = run_cli("generate", "--preset", "tiny", "--vae", davae_dir, "--dit", adapted[1], "--prompt", "x",
                "--out", tmp_path / "e3", check=False)
    assert r.returncode == 1 and "do not fit together" in r.stderr
    r = _gen(adapted, tmp_path / "e4", "--class-id", "3", check=False)
    assert r.returncode == 1 and "prompts" in r.stderr


def test_lightningdit_generate_matches_native(tmp_path):
    run_cli("train-vae", "--preset", "tiny-imagenet", "--out", tmp_path / "vae", "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny-imagenet", "--vae", tmp_path / "vae" / "final", "--out", tmp_path / "dit",
            "--steps", "0")
    common = ["--preset", "tiny-imagenet", "--class-id", "1", "--class-id", "7", "--steps", "3", "--seed", "2",
              "--guidance", "2.0", "--save-latents", "--json"]
    rep = json.loads(run_cli("generate", *common, "--vae", tmp_path / "vae" / "final", "--dit",
                             tmp_path / "dit" / "final", "--out", tmp_path / "da").stdout)
    assert rep["res"] == 128 and len(rep["written"]) == 2
    run_cli("generate", *common, "--native", "--vae", tmp_path / "vae" / "final", "--res", "64", "--out", tmp_path / "nat")
    from davae_cli.latents import load_latent

    for stem in ("000000", "000001"):
        da, _ = load_latent(tmp_path / "da" / f"{stem}.safetensors")
        nat, _ = load_latent(tmp_path / "nat" / f"{stem}.safetensors")
        torch.testing.assert_close(da[:16], nat, rtol=1e-5, atol=1e-5)


def test_tiled_decode_blends_exactly_for_a_local_decoder():
    """Weights sum to one and tiles land where they belong: a pixel-local decoder is reproduced exactly."""
    conv = torch.nn.Conv2d(4, 3 * 16, 1)

    def decode(z):
        return torch.nn.functional.pixel_shuffle(conv(z), 4)

    z = torch.randn(1, 4, 37, 29)
    with torch.no_grad():
        full = decode(z)
        tiled = tiled_decode(decode, z, tile=12, overlap=4, scale=4)
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)


def test_model_too_large_for_this_cpu_is_refused(tmp_path):
    """A model that cannot fit without a GPU gets a one-line error before anything is loaded."""
    from davae_cli.errors import DavaeError
    from diffusers import SD3Transformer2DModel

    from davae_cli.dit.loader import check_fits_cpu as _check_fits_cpu, params_of_config as _params_of_config

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(load_preset("sd35m-1024").dit.arch))
    n = _params_of_config(cfg, SD3Transformer2DModel)
    assert 2.2e9 < n < 2.3e9  # SD3.5 Medium, counted on the meta device
    with pytest.raises(DavaeError, match="no GPU"):
        _check_fits_cpu(100 * n, torch.device("cpu"), "a 224B model")
    _check_fits_cpu(100 * n, torch.device("cuda"), "on a GPU the check does not apply")


def test_json_timings_use_benchs_names(adapted, tmp_path):
    rep = json.loads(_gen(adapted, tmp_path / "t", "--prompt", "x", "--prompt", "y").stdout)
    for key in ("ms_text", "ms_loop", "ms_decode", "ms_per_image", "images_per_s", "peak_mem_mb"):
        assert key in rep
    assert rep["ms_per_image"] == pytest.approx(rep["ms_text"] + rep["ms_loop"] + rep["ms_decode"])
    assert rep["images_per_s"] == pytest.approx(1000.0 / rep["ms_per_image"])
    assert rep["peak_mem_mb"] is None and rep["compile"] is False  # on a CPU


def test_compiled_dit_gives_the_eager_latents(adapted, tmp_path):
    """generate --compile (inductor, static shapes) on the tiny adapted model: the final latents equal the eager
    ones to 1e-4 (fp32; the compiled kernels reorder float sums)."""
    from davae_cli.latents import load_latent

    args = ("--prompt", "a red cube", "--seed", "4", "--sampling-steps", "2", "--save-latents")
    _gen(adapted, tmp_path / "eager", *args)
    rep = json.loads(_gen(adapted, tmp_path / "compiled", *args, "--compile").stdout)
    assert rep["compile"] == "default" and rep["compile_included"] is True
    a, _ = load_latent(tmp_path / "eager" / "000000.safetensors")
    b, _ = load_latent(tmp_path / "compiled" / "000000.safetensors")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_random_weights_speed_mode(tmp_path):
    """generate --random-weights: the preset's SD3 architectures with random weights on both sides, per-batch and
    steady-state timings; refused for class-conditional presets and next to real model folders."""
    from PIL import Image

    common = ("--preset", "tiny", "--random-weights", "--prompt", "a cat", "--num-images", "3", "--batch-size", "2",
              "--sampling-steps", "2", "--json")
    reps = {}
    for mode, extra in (("davae", ()), ("native", ("--native",))):
        reps[mode] = r = json.loads(run_cli("generate", *common, *extra, "--out", str(tmp_path / mode)).stdout)
        assert r["mode"] == mode and r["res"] == 256 and len(r["written"]) == 3
        assert Image.open(r["written"][0]).size == (256, 256)
        assert [b["images"] for b in r["batches"]] == [2, 1]
        b = r["batches"][1]  # the steady state: every batch after the first
        assert r["ms_per_image_steady"] == pytest.approx(1000.0 * (b["text_s"] + b["sample_s"] + b["decode_s"]))
        assert r["text_s"] == pytest.approx(sum(x["text_s"] for x in r["batches"]))
    assert reps["native"]["tokens"] == 4 * reps["davae"]["tokens"] == 256
    bad = run_cli("generate", "--preset", "tiny-imagenet", "--random-weights", "--class-id", "1", "--out",
                  str(tmp_path / "x"), check=False)
    assert bad.returncode == 1 and "text-to-image presets" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("generate", *common, "--dit", str(tmp_path), "--out", str(tmp_path / "y"), check=False)
    assert bad.returncode == 1 and "--dit" in bad.stderr and "--random-weights" in bad.stderr
