"""`davae convert imagenet-davae` (issue 22): an official ImageNet DA-VAE checkpoint, built here in its documented
key layout from a tiny random model (LDM encoder/decoder keys under `da.`, the frozen base under
`base_encoder.`/`base_quant_conv.`, `da_down.shortcut_proj` without bias), converts into a davae folder whose
weights are the file's and whose encode/decode follow the official computation (checked by hand: plain bicubic
base image, raw base latent into the up block); mismatched files are refused in one line. The equivalence
with the official modules themselves: benchmarks/official/check_imagenet_davae.py (BENCHMARKS.md)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import yaml

from davae_cli.errors import DavaeError
from test_base_single_file import ARCH, to_ldm
from conftest import run_cli

C, D = 4, 12


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(folder, preset path, source DA-VAE model, its base diffusers VAE): the checkpoint, VA-VAE file and
    statistics written in the official layout."""
    from davae_cli.config import load_preset
    from davae_cli.vae.base import load_base_vae
    from davae_cli.vae.model import DetailAlignedVAE

    d = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    from diffusers import AutoencoderKL

    ref = AutoencoderKL(**{k: v for k, v in ARCH.items() if k != "_class_name"})
    n = len(ARCH["block_out_channels"])
    torch.save({"state_dict": to_ldm(ref.state_dict(), n)}, d / "vavae.pt")
    stats = {"mean": torch.randn(C + D) * 0.2, "std": torch.rand(C + D) + 0.5}
    torch.save(stats, d / "latents_stats.pt")
    torch.save({"mean": stats["mean"][:C], "std": stats["std"][:C]}, d / "base_stats.pt")
    preset = d / "p.yaml"
    preset.write_text(yaml.safe_dump({"name": "tiny-official-layout", "vae": dict(
        base_vae=str(d / "vavae.pt"), base_vae_arch=ARCH, base_channels=C, detail_channels=D, downsample=8,
        base_latent_transform="stats", base_latent_stats=str(d / "base_stats.pt"), detail_features="trunk",
        detail_shortcut="zero_conv", decoder_input="trunk", up_shortcut="repeat")}))
    p = load_preset(str(preset))
    src = DetailAlignedVAE.from_base(load_base_vae(str(d / "vavae.pt"), arch=ARCH), p.vae)
    with torch.no_grad():
        for prm in src.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
        src.down.skip.bias.zero_()  # the official shortcut has no bias
    # the official checkpoint, key by key from the documented layout
    sd = {}
    for k, v in to_ldm({f"encoder.{k}": v for k, v in src.detail_trunk.encoder.state_dict().items()}, n).items():
        sd[f"da.{k}"] = v
    for k, v in to_ldm({f"decoder.{k}": v for k, v in src.decoder_trunk.decoder.state_dict().items()}, n).items():
        sd[f"da.{k}"] = v
    sd["da.da_down.conv.weight"], sd["da.da_down.conv.bias"] = src.down.conv.weight, src.down.conv.bias
    sd["da.da_down.shortcut_proj.weight"] = src.down.skip.weight
    sd["da.da_up.conv.weight"], sd["da.da_up.conv.bias"] = src.up.conv.weight, src.up.conv.bias
    for k, v in to_ldm(ref.state_dict(), n).items():
        if k.startswith("encoder."):
            sd["base_" + k] = v
        elif k.startswith("quant_conv."):
            sd["base_" + k] = v
    sd["loss.discriminator.main.0.weight"] = torch.randn(2, 3, 4, 4)  # training-only entries stay behind
    sd = {k: v.detach().clone() for k, v in sd.items()}
    torch.save({"state_dict": sd, "global_step": 7}, d / "davae.ckpt")
    return d, preset, src, ref


def test_converts_weights_and_follows_the_official_computation(official, tmp_path):
    from davae_cli.config import load_preset
    from davae_cli.dit.official import convert_imagenet_davae
    from davae_cli.vae.model import DetailAlignedVAE

    d, preset, src, ref = official
    rep = convert_imagenet_davae(d / "davae.ckpt", d / "vavae.pt", d / "latents_stats.pt", tmp_path / "out",
                                 load_preset(str(preset)))
    assert rep["checkpoint_prefix"] == "da."
    got = DetailAlignedVAE.from_pretrained(tmp_path / "out").eval()
    assert (got.config.base_resize, got.config.decoder_base_space) == ("plain", "raw")
    want = src.state_dict()
    for k, v in got.state_dict().items():
        if k.startswith(("detail_trunk.", "decoder_trunk.", "down.", "up.")):
            assert torch.equal(v, want[k]), k
    stats = torch.load(d / "latents_stats.pt", weights_only=True)
    assert torch.allclose(got.detail_mean, stats["mean"][C:]) and torch.allclose(got.detail_std, stats["std"][C:])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = got.encode(x)
        # by hand, as the official DAVAE computes: bicubic 1/2 without antialias or clamp, base posterior mode
        x_half = F.interpolate(x, scale_factor=0.5, mode="bicubic", align_corners=False)
        z_raw = ref.encode(x_half).latent_dist.mean
        torch.testing.assert_close(got.transform.inverse(enc.latent[:, :C]), z_raw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc.latent[:, :C], (z_raw - stats["mean"][:C, None, None]) / stats["std"][:C, None, None],
                                   rtol=1e-5, atol=1e-5)
        # the decoder: the up block reads cat([raw base, detail])
        lat = enc.latent
        want_img = src.decoder_trunk(src.up(torch.cat([z_raw, lat[:, C:]], 1)))
        torch.testing.assert_close(got.decode(lat), want_img, rtol=1e-5, atol=1e-5)


def test_cli_and_refusals(official, tmp_path):
    d, preset, src, _ = official
    args = ["--base-vae", d / "vavae.pt", "--stats", d / "latents_stats.pt", "--preset", preset]
    r = run_cli("convert", "imagenet-davae", d / "davae.ckpt", *args, "--out", tmp_path / "ok", "--json")
    assert '"decoder_base_space": "raw"' in r.stdout
    from PIL import Image  # the converted folder works with the other commands

    Image.new("RGB", (40, 32), (120, 30, 200)).save(tmp_path / "im.png")
    run_cli("encode", tmp_path / "im.png", "--vae", tmp_path / "ok", "--out", tmp_path / "lat", "--res", "32")
    run_cli("decode", tmp_path / "lat", "--vae", tmp_path / "ok", "--out", tmp_path / "dec")
    assert len(list((tmp_path / "dec").glob("*.png"))) == 1
    r = run_cli("convert", "imagenet-davae", d / "davae.ckpt", *args, "--out", tmp_path / "ok", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr and "Traceback" not in r.stderr
    # the refusals in-process (the CLI's one-line rendering of DavaeError is checked above and in test_cli)
    from davae_cli.config import load_preset
    from davae_cli.dit.official import convert_imagenet_davae

    p = load_preset(str(preset))
    sd = torch.load(d / "davae.ckpt", weights_only=True)["state_dict"]
    cases = [({**sd, "da.da_up.extra.weight": torch.zeros(1)}, r"da\.da_up\.extra\.weight has no place"),
             ({**sd, "base_encoder.conv_in.weight": sd["base_encoder.conv_in.weight"] + 1},
              r"base encoder differs .*encoder\.conv_in\.weight"),
             ({k: v for k, v in sd.items() if not k.startswith("da.decoder.mid.attn_1.q")},
              r"decoder weights are missing \(first: mid_block\.attentions\.0\.to_q"),
             ({"model.x": torch.zeros(1)}, "not an official DA-VAE checkpoint")]
    for i, (state, why) in enumerate(cases, 1):
        torch.save({"state_dict": state}, tmp_path / f"bad{i}.ckpt")
        with pytest.raises(DavaeError, match=why):
            convert_imagenet_davae(tmp_path / f"bad{i}.ckpt", d / "vavae.pt", d / "latents_stats.pt", tmp_path / f"x{i}", p)
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 5))  # nothing written on refusal
    r = run_cli("convert", "sd3-davae", d / "davae.ckpt", "--base-vae", d / "vavae.pt", "--stats", d / "latents_stats.pt",
                "--out", tmp_path / "x5", check=False)
    assert r.returncode == 1 and "--stats does not apply to `convert sd3-davae`" in r.stderr


def test_convert_lightningdit(tmp_path):
    """`davae convert lightningdit`: an official-layout LightningDiT checkpoint ({"model", "ema"}, QK-norm, the
    patch embedder and head already C + D wide) lands in an adapted-DiT folder with exactly its weights, the
    converted DA-VAE's statistics and the preset's recipe; `generate` then runs on the pair. Refused in one line:
    a DA-VAE without detail statistics, a checkpoint of another architecture."""
    from davae_cli.config import load_preset
    from davae_cli.dit.backend import get_backend, read_facts
    from davae_cli.dit.lightningdit import build_lightningdit, extend_lightningdit
    from davae_cli.train.vae import export_davae
    from davae_cli.vae.model import DetailAlignedVAE

    sets = ["--set", "dit.arch.use_qknorm=true"]
    run_cli("train-vae", "--preset", "tiny-imagenet", "--out", tmp_path / "v", "--steps", "0")
    vae = DetailAlignedVAE.from_pretrained(tmp_path / "v" / "final")
    plain_vae = tmp_path / "v" / "final"
    vae.set_detail_stats(torch.linspace(-0.5, 0.5, 16), torch.linspace(0.5, 2.0, 16), 0)
    export_davae(vae, tmp_path / "vae")
    torch.manual_seed(1)
    dit = extend_lightningdit(build_lightningdit("tiny", input_size=8, in_channels=16, num_classes=10,
                                                 use_qknorm=True), 16)
    with torch.no_grad():
        for name, prm in dit.named_parameters():
            if name != "pos_embed":  # the fixed sin-cos table, as the released checkpoints hold it (checked on load)
                prm.add_(0.05 * torch.randn_like(prm))
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
    torch.save({"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd, "steps": 3}, tmp_path / "off.pt")
    run_cli("convert", "lightningdit", tmp_path / "off.pt", "--vae", tmp_path / "vae", "--out", tmp_path / "dit",
            "--preset", "tiny-imagenet", *sets)
    preset = load_preset("tiny-imagenet", ["dit.arch.use_qknorm=true"])
    got = get_backend(preset).load_adapted(tmp_path / "dit")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in sd.items())  # the EMA weights, all of them
    facts = read_facts(tmp_path / "dit")
    assert facts["detail_mean"] == pytest.approx(torch.linspace(-0.5, 0.5, 16).tolist())
    assert facts["sample_shift"] == preset.sample.shift and facts["detail_view"] == "raw"
    run_cli("generate", "--preset", "tiny-imagenet", "--vae", tmp_path / "vae", "--dit", tmp_path / "dit",
            "--class-id", "3", "--steps", "2", "--out", tmp_path / "gen")
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1
    from PIL import Image

    Image.new("RGB", (64, 64), (20, 140, 90)).save(tmp_path / "small.png")
    run_cli("upscale", tmp_path / "small.png", "--preset", "tiny-imagenet", "--vae", tmp_path / "vae", "--dit",
            tmp_path / "dit", "--class-id", "2", "--steps", "2", "--out", tmp_path / "up")
    with Image.open(tmp_path / "up" / "small.png") as im:
        assert im.size == (128, 128)
    from davae_cli.dit.official import convert_lightningdit

    with pytest.raises(DavaeError, match="no detail statistics"):
        convert_lightningdit(tmp_path / "off.pt", plain_vae, tmp_path / "x1", preset)
    with pytest.raises(DavaeError, match="unexpected"):  # QK-norm off: the checkpoint's q/k norms are unexpected
        convert_lightningdit(tmp_path / "off.pt", tmp_path / "vae", tmp_path / "x2", load_preset("tiny-imagenet"))
    r = run_cli("convert", "lightningdit", tmp_path / "off.pt", "--out", tmp_path / "x3", "--preset", "tiny-imagenet",
                check=False)
    assert r.returncode == 1 and "--vae is required" in r.stderr
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 4))


def test_convert_sd3_davae(tmp_path, kl_base):
    """`davae convert sd3-davae`: the official SD3 tokenizer's state dict (diffusers-named `vae.encoder/decoder`,
    `dc_down`/`dc_up` convs, the teacher under `original_vae_model.vae.`) converts with its weights; the folder
    encodes as the official code does (detail: conv + pixel-unshuffle + the group mean of s²F/2D channels added
    to mean and logvar; base: bicubic without antialias, clamped) and its up block reads [detail, base]; the latent
    stays base first. A teacher that is not the base VAE is refused."""
    from davae_cli.vae.model import DetailAlignedVAE

    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"extends": "sd35m-1024-official", "name": "sd3-layout",
                                      "vae": {"base_channels": 4, "detail_channels": 4, "base_vae_arch": {}}}))
    from diffusers import AutoencoderKL

    base = AutoencoderKL.from_pretrained(str(kl_base))
    torch.manual_seed(2)
    enc, dec = copy_perturbed(base.encoder), copy_perturbed(base.decoder)
    down = torch.nn.Conv2d(16, 2, 3, padding=1)  # 2D / s² = 2 channels, then pixel-unshuffle -> 2D = 8
    up = torch.nn.Conv2d(8, 64, 3, padding=1)  # C + D = 8 -> s²G = 64
    sd = {**{f"vae.encoder.{k}": v for k, v in enc.state_dict().items()},
          **{f"vae.decoder.{k}": v for k, v in dec.state_dict().items()},
          **{f"dc_down.conv.{k}": v for k, v in down.state_dict().items()},
          **{f"dc_up.conv.{k}": v for k, v in up.state_dict().items()},
          **{f"original_vae_model.vae.{k}": v for k, v in base.state_dict().items()}}
    torch.save({k: v.detach().clone() for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    r = run_cli("convert", "sd3-davae", tmp_path / "pytorch_model.bin", "--base-vae", kl_base, "--preset", preset,
                "--out", tmp_path / "out", "--json")
    assert '"teacher_checked": true' in r.stdout
    got = DetailAlignedVAE.from_pretrained(tmp_path / "out").eval()
    assert (got.config.detail_shortcut, got.config.up_input_order, got.config.base_resize) == \
           ("group_mean_moments", "detail_first", "plain_clamp")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        lat = got.encode(x).latent
        # by hand: the base channels
        xb = F.interpolate(x, scale_factor=0.5, mode="bicubic", align_corners=False).clamp(-1, 1)
        z = (base.encode(xb).latent_dist.mean - 0.1) * 1.5
        torch.testing.assert_close(lat[:, :4], z, rtol=1e-5, atol=1e-5)
        # the detail channels: the official down block on the official encoder's features
        e = enc
        h = e.conv_act(e.conv_norm_out(e.mid_block(e.down_blocks[3](e.down_blocks[2](e.down_blocks[1](e.down_blocks[0](e.conv_in(x))))))))
        moments = F.pixel_unshuffle(down(h), 2) + F.pixel_unshuffle(h, 2).unflatten(1, (8, -1)).mean(2)
        torch.testing.assert_close(lat[:, 4:], moments[:, :4], rtol=1e-5, atol=1e-5)
        # the decoder input, detail first: conv + pixel-shuffle + repeat-interleave shortcut, then the decoder trunk
        zin = torch.cat([lat[:, 4:], lat[:, :4]], 1)
        g = F.pixel_shuffle(up(zin), 2) + F.pixel_shuffle(zin.repeat_interleave(8, dim=1), 2)
        want = dec.conv_out(dec.conv_act(dec.conv_norm_out(functools.reduce(lambda t, b: b(t, None), dec.up_blocks, dec.mid_block(g, None)))))
        torch.testing.assert_close(got.decode(lat), want, rtol=1e-5, atol=1e-5)
    from PIL import Image  # the folder works with the commands

    Image.new("RGB", (48, 40), (200, 100, 30)).save(tmp_path / "im.png")
    run_cli("encode", tmp_path / "im.png", "--vae", tmp_path / "out", "--out", tmp_path / "lat", "--res", "32")
    run_cli("decode", tmp_path / "lat", "--vae", tmp_path / "out", "--out", tmp_path / "dec")
    assert len(list((tmp_path / "dec").glob("*.png"))) == 1
    other = dict(sd)
    other["original_vae_model.vae.encoder.conv_in.bias"] = other["original_vae_model.vae.encoder.conv_in.bias"] + 1
    torch.save(other, tmp_path / "other.bin")
    r = run_cli("convert", "sd3-davae", tmp_path / "other.bin", "--base-vae", kl_base, "--preset", preset,
                "--out", tmp_path / "x", check=False)
    assert r.returncode == 1 and "teacher VAE differs" in r.stderr and not (tmp_path / "x").exists()


def copy_perturbed(module):
    import copy

    m = copy.deepcopy(module)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


class _SplitAdd(torch.nn.Module):  # the documented official input branch: detail channels first, two convs summed
    def __init__(self, base_conv, extra_conv, c):
        super().__init__()
        self.base_conv, self.extra_conv, self.c = base_conv, extra_conv, c

    def forward(self, x):
        return self.base_conv(x[:, -self.c:]) + self.extra_conv(x[:, : x.shape[1] - self.c])


class _ConcatHead(torch.nn.Module):  # the documented official output branch: per patch position [detail, base]
    def __init__(self, base_linear, extra_linear, p):
        super().__init__()
        self.base_linear, self.extra_linear, self.p2 = base_linear, extra_linear, p * p

    def forward(self, x):
        b, n, _ = x.shape
        yb = self.base_linear(x).view(b, n, self.p2, -1)
        ye = self.extra_linear(x).view(b, n, self.p2, -1)
        return torch.cat([ye, yb], -1).view(b, n, -1)


def test_convert_sd3_dit(tmp_path):
    """`davae convert sd3-dit`: the official heads checkpoint (`step_N.pt`: split-add input conv and concat output
    head, detail first) + the LoRA folder (diffusers' `save_lora_adapter`) on the pretrained transformer become
    one plain SD3 transformer whose outputs, base first, equal the official model's (built here from the
    documented layout, LoRA active) with its input and output reordered; generate runs on it. A LoRA of another
    architecture is refused in one line."""
    import copy

    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from davae_cli.config import load_preset

    preset = load_preset("tiny")
    arch = dict(preset.dit.arch)
    torch.manual_seed(3)
    base = SD3Transformer2DModel(**arch).eval()
    base.save_pretrained(str(tmp_path / "pipe" / "transformer"))
    off = copy.deepcopy(base)
    proj, head = off.pos_embed.proj, off.proj_out
    extra_conv = torch.nn.Conv2d(16, proj.out_channels, 2, 2)
    extra_linear = torch.nn.Linear(head.in_features, head.out_features)
    off.pos_embed.proj = _SplitAdd(proj, extra_conv, 16)
    off.proj_out = _ConcatHead(head, extra_linear, 2)
    off.out_channels = 32  # as the official wrapper sets it, so the transformer unpatchifies 32 channels
    off.register_to_config(in_channels=32, out_channels=32)
    off.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(preset.dit.lora_targets)))
    with torch.no_grad():
        for n, prm in off.named_parameters():
            if "lora_" in n or n.startswith(("pos_embed.proj.", "proj_out.")):
                prm.add_(0.05 * torch.randn_like(prm))
    off.save_lora_adapter(str(tmp_path / "lora_step_5"), adapter_name="default")
    heads = {f"tokenizer_patch_embed.proj.{k}": v for k, v in off.pos_embed.proj.state_dict().items()}
    heads["tokenizer_patch_embed.pos_embed"] = off.pos_embed.pos_embed
    heads.update({f"project_out.{k}": v for k, v in off.proj_out.state_dict().items()})
    torch.save({"global_step": 5, "model_state_dict": {k: v.detach().clone() for k, v in heads.items()}}, tmp_path / "step_5.pt")
    run_cli("train-vae", "--preset", "tiny", "--base-vae", "random", "--set", "vae.base_vae_subfolder=null",
            "--out", tmp_path / "v", "--steps", "0")
    args = ["--lora", tmp_path / "lora_step_5", "--vae", tmp_path / "v" / "final", "--dit", tmp_path / "pipe",
            "--preset", "tiny", "--lora-alpha", "8"]
    r = run_cli("convert", "sd3-dit", tmp_path / "step_5.pt", *args, "--out", tmp_path / "dit", "--json")
    assert '"lora_rank": 4' in r.stdout
    ours = SD3Transformer2DModel.from_pretrained(str(tmp_path / "dit")).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 8, 8, generator=g)
    eh, pool = torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g)
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        ref = off(hidden_states=torch.cat([x[:, 16:], x[:, :16]], 1), encoder_hidden_states=eh, pooled_projections=pool,
                  timestep=t, return_dict=False)[0]
        got = ours(hidden_states=x, encoder_hidden_states=eh, pooled_projections=pool, timestep=t, return_dict=False)[0]
    torch.testing.assert_close(got, torch.cat([ref[:, 16:], ref[:, :16]], 1), rtol=1e-4, atol=1e-5)
    run_cli("generate", "--preset", "tiny", "--vae", tmp_path / "v" / "final", "--dit", tmp_path / "dit",
            "--prompt", "a cat", "--steps", "2", "--out", tmp_path / "gen")
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1
    # a LoRA for another model: one line, nothing written
    from safetensors.torch import load_file, save_file

    lsd = load_file(str(tmp_path / "lora_step_5" / "pytorch_lora_weights.safetensors"))
    lsd["transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)
    lsd["transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    save_file(lsd, str(tmp_path / "bad.safetensors"))
    bad = ["--lora", tmp_path / "bad.safetensors"] + args[2:]
    r = run_cli("convert", "sd3-dit", tmp_path / "step_5.pt", *bad, "--out", tmp_path / "x", check=False)
    assert r.returncode == 1 and "transformer_blocks.7.attn.to_q, which the transformer" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
