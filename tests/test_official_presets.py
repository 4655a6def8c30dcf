"""The `-official` presets (issue 22): `extends` resolves them onto our presets, each official value is what
the preset says, and they train and sample on tiny stand-ins (the architecture replaced, the recipe kept)."""

from __future__ import annotations

import json

import pytest
import yaml

from davae_cli.config import ConfigError, load_preset, read_preset_yaml
from conftest import run_cli


def test_extends_merges_sections_and_replaces_architectures(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": "tiny", "loss": {"align": 0.25},
                                     "dit": {"arch": {"sample_size": 8, "patch_size": 2, "in_channels": 16,
                                                      "out_channels": 16, "num_layers": 1}}}))
    p, tiny = load_preset(str(child)), load_preset("tiny")
    assert p.name == "child" and p.loss.align == 0.25
    assert p.loss.l1 == tiny.loss.l1 and p.train_vae == tiny.train_vae  # the rest of each section inherited
    assert p.dit.arch == {"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1}
    assert p.dit.lora_rank == tiny.dit.lora_rank
    # a child of a child, by relative path
    (tmp_path / "grandchild.yaml").write_text(yaml.safe_dump({"extends": "child.yaml", "loss": {"kl": 0.5}}))
    g = load_preset(str(tmp_path / "grandchild.yaml"))
    assert g.loss.align == 0.25 and g.loss.kl == 0.5
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="more than 8 presets deep"):
        load_preset(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("extends: no-such-preset\n")
    with pytest.raises(ConfigError, match="unknown preset 'no-such-preset'"):
        load_preset(str(tmp_path / "c.yaml"))


def test_official_values():
    sd3 = load_preset("sd35m-1024-official")
    lo, a, s = sd3.loss, sd3.adapt_dit, sd3.sample
    assert (lo.l1, lo.kl, lo.kl_reduction, lo.adv, lo.align, lo.align_on, lo.recon_target, lo.detail_dropout) == \
           (2.0, 1e-7, "sum", 0.0, 0.2, "sample", "base_reconstruction", 0.0)
    assert (a.loss_target, a.loss_weighting, a.loss_weight_gamma, a.grad_clip, a.skip_grad_norm) == ("x0", "snr_ratio", 5.0, 0.5, 10.0)
    assert (s.steps, s.guidance, s.shift, sd3.dit.train_shift) == (30, 2.5, 4.0, 4.0)
    assert s.negative_prompt == " deformed, low quality & bad aesthetics & poor aesthetics "
    assert (sd3.train_vae.betas, sd3.train_vae.weight_decay, sd3.train_vae.lr_schedule, sd3.train_vae.lr_end) == \
           ((0.9, 0.99), 1e-4, "cosine", 1e-5)
    assert sd3.vae == load_preset("sd35m-1024").vae  # the architecture is ours
    img = load_preset("imagenet-512-official")
    assert img.dit.arch["use_qknorm"] is True and img.adapt_dit.cosine_schedule is False
    assert (img.vae.base_resize, img.vae.decoder_base_space, img.loss.align_target) == ("plain", "raw", "raw")
    assert (img.loss.align_mode, img.loss.align_on, img.loss.detail_dropout, img.loss.detail_dropout_rescale) == \
           ("adaptive", "sample", 0.1, True)
    assert read_preset_yaml("imagenet-512-official")["vae"]["base_vae_arch"] == read_preset_yaml("imagenet-512")["vae"]["base_vae_arch"]


def _stand_in(tmp_path, parent: str, tiny: str, res: int) -> str:
    """`parent`'s recipe on `tiny`'s architecture: vae, dit and sizes from the tiny preset, everything else
    (losses, weighting, schedules, sampling) from the official preset."""
    t = load_preset(tiny).to_dict()  # every field, so nothing of the big architecture is inherited
    vae = dict(t["vae"], base_vae="random", base_vae_subfolder=None)
    data = {"extends": parent, "name": f"{parent}-stand-in", "vae": vae, "dit": t["dit"],
            "loss": {"lpips": 0.0},  # LPIPS needs VGG weights from the network
            "train_vae": {"resolution": res, "crop_size": res, "batch_size": 2, "steps": 2, "warmup_steps": 0,
                          "checkpoint_every": 2, "eval_every": 2, "num_val": 2, "stats_images": 2, "log_every": 1,
                          "cache_base": False, "max_images": 0},
            "adapt_dit": {"resolution": res, "batch_size": 2, "steps": 2, "checkpoint_every": 2, "log_every": 1,
                          "detail_stats_latents": 4, "encode_batch_size": 2},
            "sample": {"steps": 2}}
    if t["dit"]["backend"] == "sd3":
        data["dit"] = dict(t["dit"], max_sequence_length=8)
    path = tmp_path / "stand-in.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("parent, tiny, res", [("sd35m-1024-official", "tiny", 64),
                                               ("imagenet-512-official", "tiny-imagenet", 64)])
def test_official_recipes_train_and_sample_on_stand_ins(tmp_path, parent, tiny, res):
    import numpy as np
    from PIL import Image

    images_dir = tmp_path / "data"  # two class folders of captioned images (labels for the class model)
    rng = np.random.default_rng(0)
    for i in range(6):
        d = images_dir / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(9, 11, 3)).astype(np.uint8)).resize((88, 72), Image.BICUBIC).save(d / f"im{i}.png")
        (d / f"im{i}.txt").write_text(f"picture number {i}")
    preset = _stand_in(tmp_path, parent, tiny, res)
    p = load_preset(preset)
    run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "vae", "--json")
    lines = [json.loads(x) for x in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "l1" in x]
    assert steps and all(x["l1"] == x["l1"] and x["loss"] < 1e6 for x in steps)  # finite
    run_cli("adapt-dit", "--preset", preset, "--vae", tmp_path / "vae" / "final", "--data", images_dir,
            "--out", tmp_path / "dit", "--json")
    lines = [json.loads(x) for x in (tmp_path / "dit" / "log.jsonl").read_text().splitlines()]
    assert any("loss_base" in x for x in lines)
    facts = json.loads((tmp_path / "dit" / "final" / "davae_dit.json").read_text())
    assert facts["sample_shift"] == p.sample.shift and facts["sampling"]["negative_prompt"] == p.sample.negative_prompt
    args = ["--prompt", "a cat"] if tiny == "tiny" else ["--class-id", "1"]
    run_cli("generate", "--preset", preset, "--vae", tmp_path / "vae" / "final", "--dit", tmp_path / "dit" / "final",
            "--out", tmp_path / "gen", *args)
    with Image.open(next((tmp_path / "gen").glob("*.png"))) as im:
        meta = dict(im.info)
    if tiny == "tiny":  # the recipe's negative prompt reached the unconditional branch's record; a flag overrides it
        assert meta["davae:negative_prompt"] == p.sample.negative_prompt
        run_cli("generate", "--preset", preset, "--vae", tmp_path / "vae" / "final", "--dit", tmp_path / "dit" / "final",
                "--out", tmp_path / "gen2", *args, "--negative-prompt", "")
        with Image.open(next((tmp_path / "gen2").glob("*.png"))) as im:
            assert im.info["davae:negative_prompt"] == ""


@pytest.mark.parametrize("preset, res", [("sd35m-1024-official", 1024), ("imagenet-512-official", 512)])
def test_bench_flop_model_of_the_official_presets(preset, res):
    r = run_cli("bench", "--preset", preset, "--res", str(res), "--flops-only", "--json")
    out = json.loads(r.stdout)
    assert out["preset"] == preset and out["flop_ratio_end_to_end"] > 3  # ~4.3x for both at these sizes
