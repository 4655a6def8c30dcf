"""The official VA-VAE checkpoint loads as published: one LDM/taming-layout file (`.pt` with a
`state_dict`, training-only entries beside the VAE) converted in memory (`davae_cli.vae.ldm`) with the
preset's `vae.base_vae_arch`; its identity is the file's sha256. Tested with a randomly initialised
AutoencoderKL that, like VA-VAE f16d32 (`attn_resolutions: [16]`), has attention inside its last encoder
level and its first decoder level, written in the LDM key layout by hand; a VAE weight of the file that
the architecture has no place for is an error (it used to be dropped silently)."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
import yaml

from conftest import run_cli

ARCH = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
            block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)


def to_ldm(sd: dict, n_blocks: int) -> dict:
    """diffusers AutoencoderKL keys -> the LDM/taming layout of the VA-VAE release (written out by hand: the
    up blocks are numbered in reverse, attention projections are 1x1 convolutions)."""
    out = {}
    for k, v in sd.items():
        m = k
        for part in ("encoder", "decoder"):
            m = m.replace(f"{part}.conv_norm_out", f"{part}.norm_out")
            m = m.replace(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
            m = m.replace(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
            m = m.replace(f"{part}.mid_block.attentions.0.group_norm", f"{part}.mid.attn_1.norm")
            for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                m = m.replace(f"{part}.mid_block.attentions.0.{a}", f"{part}.mid.attn_1.{b}")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            m = re.sub(rf"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.{re.escape(a)}\.",
                       rf"encoder.down.\1.attn.\2.{b}.", m)
            m = re.sub(rf"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.{re.escape(a)}\.",
                       lambda g: f"decoder.up.{n_blocks - 1 - int(g[1])}.attn.{g[2]}.{b}.", m)
        m = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", m)
        m = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", m)
        m = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda g: f"decoder.up.{n_blocks - 1 - int(g[1])}.block.{g[2]}", m)
        m = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda g: f"decoder.up.{n_blocks - 1 - int(g[1])}.upsample", m)
        m = m.replace("conv_shortcut", "nin_shortcut")
        if (".mid.attn_1." in m or ".attn." in m) and m.endswith("weight") and v.dim() == 2:
            v = v[:, :, None, None]
        out[m] = v.clone()
    return out


@pytest.fixture(scope="module")
def vavae_file(tmp_path_factory):
    """(checkpoint path, the diffusers model it holds)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    ref = AutoencoderKL(**{k: v for k, v in ARCH.items() if k != "_class_name"})
    ldm = to_ldm(ref.state_dict(), len(ARCH["block_out_channels"]))
    assert not any("down_blocks" in k or "up_blocks" in k or "attentions" in k for k in ldm)
    assert "encoder.down.3.attn.0.q.weight" in ldm and ldm["decoder.up.3.attn.1.proj_out.weight"].dim() == 4
    ldm["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # training-only entries of the release
    ldm["foundation_model.blocks.0.weight"] = torch.randn(5)
    path = tmp_path_factory.mktemp("vavae") / "vavae-f16d32.pt"
    torch.save({"state_dict": ldm, "epoch": 50, "global_step": 123}, path)
    return path, ref


def test_ldm_checkpoint_converts_exactly(vavae_file):
    from davae_cli.vae.base import load_base_vae

    path, ref = vavae_file
    base = load_base_vae(str(path), arch=ARCH)
    got, want = base.vae.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert base.content_hash == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_level_attention_is_loaded_and_used(vavae_file):
    """The attention weights of the last encoder level and first decoder level arrive, and they matter: the
    converted model encodes and decodes exactly like the reference, and not like it with them reset."""
    from davae_cli.vae.base import load_base_vae

    path, ref = vavae_file
    base = load_base_vae(str(path), arch=ARCH)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = base.vae.encode(x).latent_dist.mean
        assert torch.equal(z, ref.encode(x).latent_dist.mean)
        torch.testing.assert_close(base.vae.decode(z).sample, ref.decode(z).sample, rtol=1e-5, atol=1e-5)
        attn = base.vae.encoder.down_blocks[3].attentions[0]
        attn.to_v.weight.zero_()
        attn.to_v.bias.zero_()
        assert (base.vae.encode(x).latent_dist.mean - z).abs().max() > 1e-4


def test_unused_and_missing_weights_are_refused(tmp_path, vavae_file):
    """A file with level attention against an architecture without it (the old silent drop) names the first
    unused weight; a file that lacks one of the architecture's weights names it too."""
    from davae_cli.errors import DavaeError
    from davae_cli.vae.base import load_base_vae

    path, _ = vavae_file
    no_attn = {**ARCH, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    with pytest.raises(DavaeError, match=r"weight decoder\.up\.3\.attn\.0\.k\.bias has a level attention"):
        load_base_vae(str(path), arch=no_attn)
    sd = torch.load(path, weights_only=True)["state_dict"]
    del sd["encoder.down.3.attn.0.v.weight"]
    short = tmp_path / "short.pt"
    torch.save({"state_dict": sd}, short)
    with pytest.raises(DavaeError, match=r"1 weights .* not in the file \(first: encoder\.down_blocks\.3\.attentions\.0\.to_v\.weight\)"):
        load_base_vae(str(short), arch=ARCH)
    sd = torch.load(path, weights_only=True)["state_dict"]
    sd["encoder.down.3.attn.0.bogus.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, short)
    with pytest.raises(DavaeError, match=r"encoder\.down\.3\.attn\.0\.bogus\.weight"):
        load_base_vae(str(short), arch=ARCH)
    sd = torch.load(path, weights_only=True)["state_dict"]
    sd["encoder.conv_in.weight"] = torch.zeros(1, 3, 3, 3)
    torch.save({"state_dict": sd}, short)
    with pytest.raises(DavaeError, match=r"encoder\.conv_in\.weight has shape \(1, 3, 3, 3\)"):
        load_base_vae(str(short), arch=ARCH)


def test_first_stage_model_prefix(tmp_path, vavae_file):
    """A whole latent-diffusion checkpoint keeps its autoencoder under `first_stage_model.`: it loads too."""
    from davae_cli.vae.base import load_base_vae

    path, ref = vavae_file
    sd = torch.load(path, weights_only=True)["state_dict"]
    full = {f"first_stage_model.{k}": v for k, v in sd.items()}
    full["model.diffusion_model.input_blocks.0.weight"] = torch.zeros(3)
    p = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": full}, p)
    got = load_base_vae(str(p), arch=ARCH).vae.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


def test_bad_single_files_get_one_line(tmp_path, vavae_file):
    from davae_cli.errors import DavaeError
    from davae_cli.vae.base import load_base_vae

    path, _ = vavae_file
    with pytest.raises(DavaeError, match="base_vae_arch"):
        load_base_vae(str(path), arch=None)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DavaeError, match="not a readable checkpoint"):
        load_base_vae(str(junk), arch=ARCH)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, other)
    with pytest.raises(DavaeError, match="no LDM-layout VAE weights"):
        load_base_vae(str(other), arch=ARCH)


def test_train_vae_on_the_checkpoint_file_and_reload(vavae_file, tmp_path):
    """`--base-vae FILE` with the preset's base_vae_arch: no conversion step for the user; the DA-VAE
    folder reloads its base from the same file and records the file's hash."""
    from davae_cli.vae.model import DetailAlignedVAE

    path, ref = vavae_file
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "vavae-test",
        "vae": dict(base_vae=str(path), base_vae_arch=ARCH, base_channels=4, detail_channels=12, downsample=8,
                    detail_features="trunk", detail_shortcut="zero_conv", decoder_input="trunk", up_hidden=0),
        "loss": dict(lpips=0.0, adv=0.0),
        "train_vae": dict(resolution=32, batch_size=2),
    }))
    run_cli("train-vae", "--preset", preset, "--out", tmp_path / "run", "--steps", "0")
    vae = DetailAlignedVAE.from_pretrained(str(tmp_path / "run" / "final"))
    assert vae.config.base_vae_hash == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    got, want = vae.base.vae.state_dict(), ref.state_dict()
    assert set(got) == set(want)  # by name: every weight of the file's VAE, none missing or extra
    assert all(torch.equal(got[k], want[k]) for k in want)
