"""Z-Image backend: zero-init extension, sigma grid, native ZImagePipeline reproduction, FLOPs, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from davae_cli.errors import DavaeError
from davae_cli.flow import sample
from davae_cli.dit.zimage import (
    ZIMAGE_SCHEDULER_CONFIG,
    ZImagePromptEncoder,
    build_tiny_zimage_text_components,
    extend_zimage,
    latent_channels,
    load_zimage_transformer,
    token_side,
    zimage_cfg_scale,
    zimage_flops,
    zimage_sigmas,
    zimage_velocity,
)

TINY = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 64, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 32,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": (8, 12, 12), "axes_lens": (256, 64, 64),
}
MAX_LEN = 48  # the prompt encoder's max_sequence_length (512 in the pipeline; shorter keeps the tests fast)


def tiny_model(seed: int = 0):
    model = load_zimage_transformer("random", arch=TINY, seed=seed)
    with torch.no_grad():  # the pad tokens start at zero; random ones exercise their role
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    return model.eval()


def rand_cond(n: int, lengths, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(n, MAX_LEN, TINY["cap_feat_dim"], generator=g)
    mask = torch.zeros(n, MAX_LEN)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
        embeds[i, k:] = 0
    return {"embeds": embeds, "mask": mask}


@pytest.mark.parametrize("detail", [4, 16])
def test_extension_preserves_the_function_and_reloads(detail, tmp_path):
    from diffusers import ZImageTransformer2DModel

    base = tiny_model()
    ext = extend_zimage(copy.deepcopy(base), detail)
    c = latent_channels(base)
    assert latent_channels(ext) == ext.in_channels == ext.out_channels == c + detail
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c + detail, 12, 10, generator=g)
    x[:, c:] *= 10.0  # any detail input
    sigma = torch.tensor([0.9, 0.3])
    cond = rand_cond(2, [5, 11])
    with torch.no_grad():
        ref = zimage_velocity(base, x[:, :c], sigma, cond)
        out = zimage_velocity(ext, x, sigma, cond)
    assert torch.allclose(out[:, :c], ref, atol=1e-5, rtol=0)
    assert torch.equal(out[:, c:], torch.zeros_like(out[:, c:]))

    ext.save_pretrained(tmp_path / "ext")
    back = ZImageTransformer2DModel.from_pretrained(tmp_path / "ext").eval()
    assert back.config.in_channels == back.in_channels == back.out_channels == c + detail
    with torch.no_grad():
        assert torch.equal(zimage_velocity(back, x, sigma, cond), out)


def test_sigma_grid_is_the_pipeline_formula():
    for n, s in ((4, 3.0), (9, 3.0), (5, 1.7)):
        x = torch.linspace(1.0, 1.0 / n, n).double()
        want = torch.cat([s * x / (1 + (s - 1) * x), torch.zeros(1, dtype=torch.float64)])
        got = zimage_sigmas(n, shift=None if s == 3.0 else s, image_tokens=4096)
        assert got.dtype == torch.float32 and got.shape == (n + 1,) and got[-1] == 0
        assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)
    assert torch.equal(zimage_sigmas(4), zimage_sigmas(4, ZIMAGE_SCHEDULER_CONFIG, image_tokens=64))


def test_cfg_scale():
    assert zimage_cfg_scale(0.0) == 1.0 and zimage_cfg_scale(-1.0) == 1.0 and zimage_cfg_scale(2.5) == 3.5


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

    text = build_tiny_zimage_text_components(cap_feat_dim=TINY["cap_feat_dim"])
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32], layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=32)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(ZIMAGE_SCHEDULER_CONFIG), vae=vae,
                          transformer=tiny_model(), **text)
    pipe.set_progress_bar_config(disable=True)
    return pipe, text


def test_prompt_encoder_gives_the_pipeline_features(tiny_pipe, tmp_path):
    pipe, text = tiny_pipe
    enc = ZImagePromptEncoder(text, identity="tiny-random|zimage", max_sequence_length=MAX_LEN)
    prompts = ["a red fox in snow", ""]
    embeds, mask = enc.encode(prompts)
    assert prompts == ["a red fox in snow", ""]  # the caller's list is not rewritten
    want = pipe._encode_prompt(list(prompts), device="cpu", max_sequence_length=MAX_LEN)
    assert embeds.shape == (2, MAX_LEN, TINY["cap_feat_dim"]) and mask.dtype == torch.float32
    for i, ref in enumerate(want):
        k = int(mask[i].sum())
        assert k == len(ref) and torch.equal(embeds[i, :k], ref) and not embeds[i, k:].any()
    text["text_encoder"].save_pretrained(tmp_path / "text_encoder")
    text["tokenizer"].save_pretrained(tmp_path / "tokenizer")
    folder = ZImagePromptEncoder.from_spec(str(tmp_path), max_sequence_length=MAX_LEN)
    from davae_cli.dit.text import spec_identity

    assert folder.identity == spec_identity(str(tmp_path)) + "|zimage"  # what the prompt cache keys on
    assert torch.equal(folder.encode(prompts)[0], embeds)
    assert ZImagePromptEncoder.from_spec("tiny-random").identity == spec_identity("tiny-random") + "|zimage"
    with pytest.raises(DavaeError) as e:
        ZImagePromptEncoder.from_spec(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)
    enc.unload()
    with pytest.raises(DavaeError):
        enc.encode(["x"])


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_reproduces_zimage_pipeline(tiny_pipe, guidance):
    pipe, text = tiny_pipe
    prompt, height, width, steps = "a lighthouse at dusk", 32, 24, 4
    ref = pipe(prompt=prompt, negative_prompt="", height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="latent",
               max_sequence_length=MAX_LEN).images
    used = pipe.scheduler.sigmas.clone()

    model = pipe.transformer
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    noise = torch.randn(1, latent_channels(model), h, w, generator=torch.Generator().manual_seed(0))
    enc = ZImagePromptEncoder(text, identity="tiny-random|zimage", max_sequence_length=MAX_LEN)
    embeds, mask = enc.encode([prompt, ""])
    pos = {"embeds": embeds[:1], "mask": mask[:1]}
    both = {"embeds": embeds, "mask": mask}
    scale = zimage_cfg_scale(guidance)
    sigmas = zimage_sigmas(steps, image_tokens=(h // token_side(model)) * (w // token_side(model)))
    assert torch.equal(sigmas, used)

    def velocity(x, sigma, guided):
        if guidance <= 0 or not guided:
            return zimage_velocity(model, x, sigma, pos)
        v_c, v_u = zimage_velocity(model, x.repeat(2, 1, 1, 1), sigma.repeat(2), both).chunk(2)
        return v_u + scale * (v_c - v_u)

    out = sample(velocity, noise, sigmas)
    assert ref.shape == out.shape
    assert float((out - ref).norm() / ref.norm()) <= 1e-4


def _counted(model, x, sigma, cond) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        zimage_velocity(model, x, sigma, cond)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("size,text,batch", [((8, 8), 7, 1), ((12, 16), 40, 2), ((16, 16), 64, 1)])
def test_flops_match_the_counter(size, text, batch):
    model = tiny_model()
    x = torch.randn(batch, 16, *size)
    cond = rand_cond(batch, [text] * batch)
    with torch.no_grad():
        zimage_velocity(model, x, torch.full((batch,), 0.5), cond)  # builds the RoPE table once
    want = _counted(model, x, torch.full((batch,), 0.5), cond)
    tokens = (size[0] // 2) * (size[1] // 2)
    got = zimage_flops(dict(model.config), tokens, text, batch)
    assert got["total"] == want
    assert got["padded_tokens"] == (-(-tokens // 32) * 32, -(-text // 32) * 32)


def test_bad_input_is_one_line():
    model = tiny_model()
    cond = rand_cond(1, [5])
    for x in (torch.randn(1, 16, 9, 8), torch.randn(1, 12, 8, 8)):
        with pytest.raises(DavaeError) as e:
            zimage_velocity(model, x, torch.tensor([0.5]), cond)
        assert "\n" not in str(e.value)
    long = {"embeds": torch.randn(1, 250, TINY["cap_feat_dim"]), "mask": torch.ones(1, 250)}  # RoPE axis 0: 256
    for bad in (rand_cond(1, [0]), long):
        with pytest.raises(DavaeError):
            zimage_velocity(model, torch.randn(1, 16, 8, 8), torch.tensor([0.5]), bad)
    with pytest.raises(DavaeError):
        extend_zimage(model, 0)
    multi = load_zimage_transformer("random", arch={**TINY, "all_patch_size": (2, 4), "all_f_patch_size": (1, 1)})
    with pytest.raises(DavaeError) as e:
        token_side(multi)
    assert "\n" not in str(e.value) and "2 patch sizes" in str(e.value)


# --------------------------------------------------------------------------- the family through the commands
@pytest.fixture(scope="module")
def zimage_pipe(tmp_path_factory):
    """A tiny Z-Image pipeline folder: transformer/ (the tiny-zimage preset's arch), vae/ (KL, C = 16, its own
    shift/scale), scheduler/ (Z-Image-Turbo's static-shift config), text_encoder/ and tokenizer/ (tiny Qwen3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    from conftest import _tiny_kl
    from davae_cli.config import load_preset

    d = tmp_path_factory.mktemp("zimagepipe")
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**load_preset("tiny-zimage").dit.arch)
    with torch.no_grad():  # random pad tokens, so their role is exercised
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    model.save_pretrained(d / "transformer")
    _tiny_kl(d / "vae", 16, scaling_factor=0.36, shift_factor=0.12)  # its own shift/scale, as FLUX.1's VAE
    FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG).save_pretrained(d / "scheduler")
    for name, comp in build_tiny_zimage_text_components(cap_feat_dim=32).items():
        comp.save_pretrained(str(d / name))
    return d


def _pipeline(folder):
    """diffusers' own ZImagePipeline on the tiny folder's parts (the folder has no model_index.json)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    pipe = ZImagePipeline(transformer=ZImageTransformer2DModel.from_pretrained(folder / "transformer"),
                          vae=AutoencoderKL.from_pretrained(folder / "vae"),
                          scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
                          text_encoder=Qwen3Model.from_pretrained(folder / "text_encoder"),
                          tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_generate_native_is_zimagepipeline(zimage_pipe, tmp_path, guidance):
    """generate --native with a Z-Image preset reproduces ZImagePipeline.__call__ (same noise, prompt, steps,
    guidance scale as the pipeline means it, max_sequence_length, static shift) on the final latent and on
    the decoded image."""
    import json

    import numpy as np
    from PIL import Image

    from conftest import run_cli
    from davae_cli.latents import load_latent

    rep = json.loads(run_cli("generate", "--preset", "tiny-zimage", "--native", "--base-pipeline", zimage_pipe,
                             "--res", "128", "--out", tmp_path / "nat", "--steps", "5", "--guidance", str(guidance),
                             "--seed", "5", "--prompt", "the cat", "--save-latents", "--json").stdout)
    ours, _ = load_latent(tmp_path / "nat" / "000000.safetensors")
    pipe = _pipeline(zimage_pipe)
    kw = dict(height=128, width=128, num_inference_steps=5, guidance_scale=guidance, max_sequence_length=32)
    ref = pipe("the cat", generator=torch.Generator().manual_seed(5), output_type="latent", **kw).images[0]
    assert ours.shape == ref.shape == (16, 16, 16)
    assert float((ours - ref).norm() / ref.norm()) <= 1e-4
    img = pipe("the cat", generator=torch.Generator().manual_seed(5), output_type="np", **kw).images[0]
    png = np.asarray(Image.open(tmp_path / "nat" / "000000.png")).astype(np.float32) / 255
    assert np.abs(png - img).max() <= 2 / 255  # 8-bit rounding (and float noise) only
    assert rep["tokens"] == 64 and rep["steps"] == 5


def test_adapted_zimage_warm_start_training_upscale_and_bench(zimage_pipe, tmp_path):
    """adapt-dit on Z-Image: the step-0 export is a plain ZImageTransformer2DModel folder with C + D channels,
    and generate with it at R gives, on the base channels, exactly ZImagePipeline's latent at R/2 (CFG on);
    two LoRA training steps run and move the extended embedder; upscale --strength 0 keeps the encoded base
    exactly; bench and generate --random-weights take the preset."""
    import json
    import math

    import numpy as np
    from diffusers import ZImageTransformer2DModel
    from PIL import Image

    from conftest import run_cli
    from davae_cli.data import to_tensor
    from davae_cli.latents import load_latent
    from davae_cli.vae.model import DetailAlignedVAE

    r, vae = 64, tmp_path / "vae" / "final"
    common = ["--set", f"adapt_dit.resolution={r}"]
    run_cli("train-vae", "--preset", "tiny-zimage", "--base-vae", zimage_pipe / "vae", "--out", tmp_path / "vae",
            "--steps", "0")
    run_cli("adapt-dit", "--preset", "tiny-zimage", "--vae", vae, "--dit", zimage_pipe, "--text-encoders",
            zimage_pipe, "--out", tmp_path / "dit", "--steps", "0", *common)
    final = tmp_path / "dit" / "final"
    assert ZImageTransformer2DModel.from_pretrained(final).config.in_channels == 16 + 16
    facts = json.loads((final / "davae_dit.json").read_text())
    assert facts["backend"] == "zimage" and facts["patch_size"] == 2 and facts["guidance_mode"] == "cfg"
    run_cli("generate", "--preset", "tiny-zimage", "--vae", vae, "--dit", final, "--out", tmp_path / "g",
            "--steps", "4", "--seed", "3", "--prompt", "a red cube", "--save-latents", "--res", str(r))
    ours, _ = load_latent(tmp_path / "g" / "000000.safetensors")
    out = _pipeline(zimage_pipe)("a red cube", height=r // 2, width=r // 2, num_inference_steps=4, guidance_scale=2.5,
                                 max_sequence_length=32, generator=torch.Generator().manual_seed(3),
                                 output_type="latent").images
    assert ours.shape == (32, 4, 4)
    assert float((ours[:16] - out[0]).norm() / out[0].norm()) <= 1e-4
    # LoRA training (variable-length captions through the prompt cache) runs and moves the extended embedder
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("picture" + " number" * i)
    rep = json.loads(run_cli("adapt-dit", "--preset", "tiny-zimage", "--vae", vae, "--dit", zimage_pipe,
                             "--text-encoders", zimage_pipe, "--data", data, "--out", tmp_path / "t", "--steps", "2",
                             *common, "--set", "adapt_dit.batch_size=2", "--json").stdout)
    assert rep["steps"] == 2
    losses = [json.loads(line)["loss"] for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(math.isfinite(v) for v in losses)
    key = "2-1"
    trained = ZImageTransformer2DModel.from_pretrained(tmp_path / "t" / "final")
    step0 = ZImageTransformer2DModel.from_pretrained(final)
    assert not torch.equal(trained.all_x_embedder[key].weight, step0.all_x_embedder[key].weight)
    # upscale: the base channels held to the encoded input, exactly
    arr = np.random.default_rng(0).integers(0, 255, (r // 2, r // 2, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(arr).save(tmp_path / "in" / "a.png")
    run_cli("upscale", tmp_path / "in", "--preset", "tiny-zimage", "--vae", vae, "--dit", final, "--out",
            tmp_path / "up", "--steps", "3", "--prompt", "a red cube", "--save-latents")
    lat, _ = load_latent(tmp_path / "up" / "a.safetensors")
    z_base = DetailAlignedVAE.from_pretrained(str(vae)).eval().encode_base_image(to_tensor(arr)[None])[0]
    assert lat.shape == (32, r // 16, r // 16) and torch.equal(lat[:16], z_base)
    # bench (CFG batch at the preset's guidance 2.5) and the random-weight generate path
    b = json.loads(run_cli("bench", "--preset", "tiny-zimage", "--steps", "2", "--repeats", "1", "--warmup", "0",
                           "--no-decode", "--json").stdout)
    assert b["cfg"] is True and b["native"]["image_tokens"] == 4 * b["davae"]["image_tokens"] == 256
    g = json.loads(run_cli("generate", "--preset", "tiny-zimage", "--random-weights", "--prompt", "x", "--res", "128",
                           "--steps", "2", "--out", tmp_path / "rw", "--json").stdout)
    assert g["mode"] == "davae" and g["tokens"] == 16 and len(g["written"]) == 1


def test_adapt_dit_zimage_resume_after_kill_is_exact(tmp_path):
    """The kill-9 resume test of the SD3 path, on Z-Image: SIGKILL after step 3 then --resume gives the losses
    and the final weights (LoRA merged) of an uninterrupted run, bit for bit."""
    import json

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from conftest import run_cli

    sets = ["vae.base_vae=random", "vae.base_vae_subfolder=null", "adapt_dit.resolution=64", "adapt_dit.batch_size=2",
            "adapt_dit.log_every=1", "adapt_dit.checkpoint_every=3", "adapt_dit.lr=3e-3"]
    flags = sum((["--set", s] for s in sets), [])
    run_cli("train-vae", "--preset", "tiny-zimage", "--out", tmp_path / "vae", "--steps", "0", *flags)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (72, 88, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("picture" + " number" * i)
    args = ["adapt-dit", "--preset", "tiny-zimage", "--vae", tmp_path / "vae" / "final", "--data", data,
            "--steps", "5", *flags]
    run_cli(*args, "--out", tmp_path / "full", subprocess_=True)  # a process, like the killed run below
    killed = run_cli(*args, "--out", tmp_path / "cut", check=False, env={"DAVAE_KILL_AFTER_STEP": "3"})
    assert killed.returncode != 0 and not (tmp_path / "cut" / "final").exists()
    run_cli(*args, "--out", tmp_path / "cut", "--resume")

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if r.get("event") == "train"]

    assert len(losses(tmp_path / "full")) == 5 and losses(tmp_path / "cut") == losses(tmp_path / "full")
    a = load_file(tmp_path / "full" / "final" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
