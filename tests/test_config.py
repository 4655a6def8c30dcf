import pytest

from davae_cli.config import ConfigError, available_presets, load_preset, parse_override


def test_bundled_presets_load_and_are_consistent():
    names = available_presets()
    assert {"tiny", "imagenet-512", "sd35m-1024", "sd35m-2048"} <= set(names)
    for n in names:
        p = load_preset(n)
        assert p.vae.detail_channels % p.vae.base_channels == 0
        assert p.train_vae.resolution % p.granularity == 0


def test_recipe_shapes_match_the_paper():
    im = load_preset("imagenet-512")
    assert (im.vae.base_channels, im.vae.detail_channels, im.granularity) == (32, 96, 32)  # f32c128
    sd = load_preset("sd35m-1024")
    assert (sd.vae.base_channels, sd.vae.detail_channels, sd.granularity) == (16, 16, 16)
    assert sd.train_vae.resolution // sd.granularity == 64  # 64x64x32 latent for 1024²
    assert load_preset("sd35m-2048").train_vae.resolution // sd.granularity == 128
    tiny = load_preset("tiny")
    assert tiny.vae.base_vae == "madebyollin/taesd3" and tiny.train_vae.resolution == 256
    assert tiny.loss.lpips == 0  # trains with no download


def test_overrides_are_typed():
    p = load_preset("tiny", ["loss.align=0", "train_vae.betas=[0.5, 0.9]", "vae.base_vae_subfolder=null",
                             "train_vae.steps=7"])
    assert p.loss.align == 0.0 and isinstance(p.loss.align, float)
    assert p.train_vae.betas == (0.5, 0.9)
    assert p.vae.base_vae_subfolder is None and p.train_vae.steps == 7


@pytest.mark.parametrize("override, message", [
    ("loss.algin=1", "unknown key 'loss.algin'"),
    ("nosection.x=1", "unknown key 'nosection'"),
    ("train_vae.steps=ten", "train_vae.steps: expected an integer"),
    ("train_vae.steps=1.5", "train_vae.steps: expected an integer"),
    ("loss.sample_posterior=3", "loss.sample_posterior: expected true or false"),
    ("vae.detail_features=pixels", "vae.detail_features: 'pixels' is not one of"),
    ("vae.detail_channels=24", "D = 24 is not a multiple of C = 16"),
    ("train_vae.resolution=200", "train_vae.resolution: 200 is not divisible by s*f = 16"),
    ("train_vae.crop_size=40", "train_vae.crop_size: 40 is not a positive multiple"),
    ("vae.scale=1", "vae.scale: s must be at least 2"),
    ("vae.scale=16", "vae.up_hidden > 0 and divisible by s² = 256"),
    ("vae.scale=3", "train_vae.resolution: 256 is not divisible by s*f = 24"),
    ("train_vae.betas=[0.9]", "train_vae.betas: expected a list of 2 numbers"),
    ("loss.align", "expected key=value"),
])
def test_bad_overrides_fail_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_preset("tiny", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_preset_from_yaml_path(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("vae:\n  base_vae: random\ntrain_vae:\n  resolution: 64\n")
    p = load_preset(str(f))
    assert p.name == "mine" and p.train_vae.resolution == 64 and p.vae.base_vae == "random"
    with pytest.raises(ConfigError, match="preset file not found"):
        load_preset(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")
    (tmp_path / "bad.yaml").write_text("vae: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_preset(str(tmp_path / "bad.yaml"))


def test_parse_override_values():
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)
    assert parse_override("a.b=madebyollin/taesd3") == ("a.b", "madebyollin/taesd3")
    assert parse_override("a.b=") == ("a.b", "")


def test_the_built_wheel_ships_every_preset_and_package(tmp_path):
    """presets/ at the top of the repository installs as the package data davae_cli.presets: build the wheel,
    import from it (not from the checkout) and load every bundled preset; every subpackage is in it."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(root)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("davae-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    repo_presets = sorted(p.name for p in (root / "presets").glob("*.yaml"))
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("davae_cli/presets/") and n.endswith(".yaml")) \
        == repo_presets
    # every module of the source tree is in the wheel (a package missing from pyproject's list would not be)
    source = sorted(str(f.relative_to(root)) for f in (root / "davae_cli").rglob("*.py") if "__pycache__" not in f.parts)
    assert [f for f in source if f not in names] == []
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("import davae_cli, davae_cli.config as c, davae_cli.train.dit, davae_cli.cli.app; "
             f"assert davae_cli.__file__.startswith({str(tmp_path / 'site')!r}), davae_cli.__file__; "
             "names = c.available_presets(); [c.load_preset(n) for n in names]; print(' '.join(names))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == sorted(n[:-5] for n in repo_presets)


def test_recipes_keep_training_and_sampling_apart():
    """SPEC §6: each recipe's training shift and sampling settings are separate values."""
    im = load_preset("imagenet-512")
    assert im.dit.train_shift == 1.0 and im.adapt_dit.cosine_loss == 1.0
    assert (im.sample.steps, im.sample.guidance, im.sample.guidance_interval, im.sample.sampler) == \
        (250, 4.0, (0.0, 0.8), "euler")
    assert abs(im.sample.shift - 1 / 0.3) < 1e-9
    for name in ("sd35m-1024", "sd35m-2048"):
        p = load_preset(name)
        assert p.dit.train_shift == 4.0 and p.adapt_dit.cosine_loss == 0.0
        assert (p.sample.steps, p.sample.guidance, p.sample.guidance_interval, p.sample.shift) == (30, 2.5, None, 3.0)


@pytest.mark.parametrize("override,needle", [
    ("dit.timestep_shift=3.0", "split in two"), ("sample.shift=0", "sample.shift must be positive"),
    ("sample.steps=0", "sample.steps must be at least 1"), ("sample.guidance_interval=[0.9, 0.1]", "guidance_interval"),
    ("sample.guidance_interval=[0.0, 1.5]", "guidance_interval"), ("sample.sampler=ddim", "sampler"),
    ("dit.train_shift=0", "dit.train_shift must be positive"), ("adapt_dit.cosine_loss=-1", "cosine_loss")])
def test_bad_sampling_recipes_are_one_line(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_preset("tiny", [override])


def test_scale_constraints_of_the_papers_design():
    """s = 4 is accepted; the detail encoder's pixel-unshuffle(s) needs 2D divisible by s²."""
    assert load_preset("sd35m-1024", ["vae.scale=4", "vae.detail_channels=48"]).granularity == 32
    with pytest.raises(ConfigError, match="2D = 32 must be divisible by s² = 64"):
        load_preset("sd35m-1024", ["vae.scale=8"])
