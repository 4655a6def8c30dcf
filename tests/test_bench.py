"""davae bench: shapes and tokens per preset, JSON fields and their consistency, FLOPs against an
independent count, one-line errors, a tiny CPU run in seconds."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from davae_cli.bench import plan
from davae_cli.config import load_preset
from davae_cli.dit.sd3 import SD35_MEDIUM_CONFIG

from conftest import run_cli


@pytest.mark.parametrize("name,res,native,davae", [
    ("sd35m-1024", 1024, [16, 128, 128], [32, 64, 64]),
    ("sd35m-2048", 2048, [16, 256, 256], [32, 128, 128]),
    ("tiny", 256, [16, 32, 32], [32, 16, 16]),
    ("imagenet-512", 512, [32, 32, 32], [128, 16, 16]),
])
def test_plan_shapes_and_tokens(name, res, native, davae):
    pl = plan(load_preset(name), res)
    assert pl["native"]["latent"] == native and pl["davae"]["latent"] == davae
    assert pl["native"]["image_tokens"] == 4 * pl["davae"]["image_tokens"]  # s = 2: 4x fewer tokens
    if name.startswith("sd35m"):
        assert pl["davae"]["image_tokens"] == (res // 32) ** 2  # 1024 at 1024², 4096 at 2048² (SPEC §2)


def test_sd35m_preset_is_the_sd35_medium_config():
    arch = load_preset("sd35m-1024").dit.arch
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in arch.items()} == SD35_MEDIUM_CONFIG


def _flop_count_tiny_sd3(in_channels: int, side: int, text_tokens: int, batch: int) -> int:
    """FLOPs of one forward counted by torch's FlopCounterMode (math attention, so SDPA is counted)."""
    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    arch = dict(load_preset("tiny").dit.arch, in_channels=in_channels, out_channels=in_channels)
    model = SD3Transformer2DModel(**arch).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(hidden_states=torch.randn(batch, in_channels, side, side),
              encoder_hidden_states=torch.randn(batch, text_tokens, arch["joint_attention_dim"]),
              pooled_projections=torch.randn(batch, arch["pooled_projection_dim"]), timestep=torch.ones(batch))
    return fc.get_total_flops()


def test_tiny_bench_json_is_consistent():
    r = run_cli("bench", "--steps", "3", "--repeats", "2", "--warmup", "1", "--text-encoders", "--json")
    out = json.loads(r.stdout)
    for key in ("res", "device", "dtype", "native", "davae", "speedup_step", "speedup_end_to_end", "flop_ratio"):
        assert key in out
    assert out["res"] == 256 and out["dtype"] == "fp32" and out["cfg"] is True
    n, d = out["native"], out["davae"]
    for side in (n, d):
        for key in ("image_tokens", "ms_per_step", "ms_per_image", "peak_mem_mb", "tflops_per_step"):
            assert key in side
        assert side["ms_per_step"] > 0 and side["ms_loop"] == pytest.approx(3 * side["ms_per_step"])
        assert side["ms_text"] > 0  # --text-encoders: the tiny preset's CLIP/CLIP/T5, prompt + negative prompt
        assert side["ms_per_image"] == pytest.approx(side["ms_loop"] + side["ms_decode"] + side["ms_text"])
        assert len(side["loop_ms_repeats"]) == 2
    assert n["image_tokens"] == 4 * d["image_tokens"] == 256
    assert out["speedup_step"] == pytest.approx(n["ms_per_step"] / d["ms_per_step"])
    assert out["speedup_end_to_end"] == pytest.approx(n["ms_per_image"] / d["ms_per_image"])
    # the analytic FLOPs of one CFG step (batch 2) agree with torch's own count of a real forward
    text = out["text_tokens"]
    assert n["tflops_per_step"] * 1e12 == pytest.approx(_flop_count_tiny_sd3(16, 32, text, 2), rel=1e-9)
    assert d["tflops_per_step"] * 1e12 == pytest.approx(_flop_count_tiny_sd3(32, 16, text, 2), rel=1e-9)
    assert out["flop_ratio"] == pytest.approx(n["tflops_per_step"] / d["tflops_per_step"])
    # end to end per image = 3 steps + text (2 prompts) + decode, each part recomputed here
    e = out["tflops_per_image"]
    assert e["native"] == pytest.approx(3 * n["tflops_per_step"] + e["text"] + e["decode_native"], rel=1e-9)
    assert e["davae"] == pytest.approx(3 * d["tflops_per_step"] + e["text"] + e["decode_davae"], rel=1e-9)
    assert out["flop_ratio_end_to_end"] == pytest.approx(e["native"] / e["davae"])
    assert out["flop_ratio_end_to_end"] < out["flop_ratio"]  # the decode is not reduced (tiny: it costs more than 3 steps)
    assert out["text_included"] is True
    # --flops-only gives the same model without running anything
    f = json.loads(run_cli("bench", "--steps", "3", "--flops-only", "--json").stdout)
    assert f["flop_ratio"] == pytest.approx(out["flop_ratio"], rel=1e-12)
    assert f["flop_ratio_end_to_end"] == pytest.approx(out["flop_ratio_end_to_end"], rel=1e-12)
    assert f["tflops_per_image"] == pytest.approx(e, rel=1e-12)


def test_lightningdit_bench_runs():
    r = run_cli("bench", "--preset", "tiny-imagenet", "--steps", "2", "--repeats", "1", "--warmup", "0",
                "--no-cfg", "--json")
    out = json.loads(r.stdout)
    assert out["native"]["image_tokens"] == 4 * out["davae"]["image_tokens"] == 256
    assert out["cfg"] is False and out["text_tokens"] == 0
    assert any("single repeat" in w for w in out["warnings"])


def test_lightningdit_bench_loads_one_trunk_for_both_grids(monkeypatch):
    """LightningDiT computes the position tables of any grid, so bench loads it once and the DA-VAE side is a
    view with widened heads; each side computes what a model built for its grid (extended, for DA-VAE) does."""
    import davae_cli.bench as B
    from davae_cli.dit.backend import get_backend
    from davae_cli.dit.lightningdit import LightningDiTBackend, extend_lightningdit

    real, loads = LightningDiTBackend.load, []

    def spy(self, *args, **kw):
        loads.append(kw)
        return real(self, *args, **kw)

    monkeypatch.setattr(LightningDiTBackend, "load", spy)
    p = load_preset("tiny-imagenet")
    r = B.run_bench(p, B.BenchSettings(res=128, steps=1, repeats=1, warmup=0, decode=False, cfg=False))
    assert len(loads) == 1 and r["native"]["image_tokens"] == 4 * r["davae"]["image_tokens"] == 256

    backend, loads[:] = get_backend(p), []
    models = backend.bench_models("random", 0, "cpu", torch.float32, 128)
    native, davae = models["native"], models["davae"]
    assert len(loads) == 1 and davae.blocks is native.blocks and davae.pos_embed is native.pos_embed
    c, d = p.vae.base_channels, p.vae.detail_channels
    assert native.in_channels == c and davae.in_channels == davae.out_channels == c + d
    g = torch.Generator().manual_seed(0)
    for model, built, side in ((native, real(backend, "random", seed=0, latent_side=16), 16),
                               (davae, extend_lightningdit(real(backend, "random", seed=0, latent_side=8), d), 8)):
        x = torch.randn(2, model.in_channels, side, side, generator=g)
        t, y = torch.rand(2, generator=g), torch.tensor([1, 10])
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, y), built.eval()(x, t, y), rtol=0, atol=1e-6)
    # the view left the loaded model alone (p = 1)
    assert native.x_embedder.proj.in_channels == native.final_layer.linear.out_features == c


def test_human_table_and_errors():
    r = run_cli("bench", "--steps", "2", "--repeats", "1", "--warmup", "0", "--no-decode")
    assert "image tokens" in r.stdout and "ideal" in r.stdout and "sd35m-1024" in r.stdout  # says what to run next
    for args, msg in [(["--res", "100"], "multiple of"), (["--steps", "0"], "--sampling-steps"),
                      (["--attention", "magic"], "--attention"),
                      (["--preset", "tiny-imagenet", "--text-encoders"], "no text encoders")]:
        bad = run_cli("bench", *args, check=False)
        assert bad.returncode == 1 and msg in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("bench", "--dtype", "int8", check=False)  # a choice Typer validates: its usage error, exit 2
    assert bad.returncode == 2 and "int8" in bad.stderr and "bf16" in bad.stderr and "Traceback" not in bad.stderr


def test_compile_builds_one_static_graph_per_configuration_and_never_recompiles(monkeypatch):
    """--compile: each configuration is its own module (shared trunk, own heads) compiled with static shapes
    in the warm-up; the timed repeats add no graph. (Dynamo's eager backend: the guards and recompiles are
    the same as inductor's, without the C++ compile.)"""
    from torch._dynamo.utils import counters

    import davae_cli.bench as B

    real = torch.compile
    calls = []

    def spy(module, **kw):
        calls.append(kw)
        return real(module, **{**kw, "backend": "eager", "mode": None})

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    counters.clear()
    seen = []
    B.run_bench(load_preset("tiny"), B.BenchSettings(res=256, steps=2, repeats=3, warmup=1, compile=True, decode=False),
                progress=lambda t: seen.append((t, counters["stats"]["unique_graphs"])))
    assert len(calls) == 2 and all(kw.get("dynamic") is False for kw in calls)
    timed = [g for t, g in seen if t.startswith("repeat")]
    assert timed[0] == 2 and set(timed) == {2} and counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_bench_uses_the_presets_sampling_recipe():
    """Steps and guidance default to the preset's sample section; with a guidance interval, CFG (a doubled
    batch) runs only on the steps inside it, and the FLOPs are those of the average step."""
    import davae_cli.bench as B
    from davae_cli.dit.lightningdit import LightningDiTBackend

    p = load_preset("tiny-imagenet", ["sample.steps=4"])
    r = B.run_bench(p, B.BenchSettings(res=128, repeats=1, warmup=0, decode=False))
    assert r["steps"] == 4 and r["guidance"] == p.sample.guidance and r["guidance_interval"] == [0.0, 0.8]
    sig = LightningDiTBackend.sigma_grid(4, p.sample.shift, None, None)
    want = sum(1 for i in range(4) if float(sig[i]) <= 0.8)
    assert r["guided_steps"] == want and 0 < want < 4
    r1 = B.run_bench(p, B.BenchSettings(res=128, repeats=1, warmup=0, decode=False, cfg=False))
    assert r1["guided_steps"] == 0 and r1["steps"] == 4
    for side in ("native", "davae"):  # FLOPs are linear in the batch: the average step is (1 + guided/steps) x
        assert r[side]["tflops_per_step"] == pytest.approx(r1[side]["tflops_per_step"] * (1 + want / 4), rel=1e-9)


def test_several_res_in_one_call_and_the_plot(tmp_path, monkeypatch):
    """Two --res in one call: one report each under "results", and a PNG of both whose title (also the PNG's
    Title text, readable without OCR) names the preset, the machine and today's date."""
    import datetime

    from PIL import Image

    out = tmp_path / "speedup.png"
    days = {datetime.date.today().isoformat()}
    r = run_cli("bench", "--preset", "tiny-imagenet", "--res", "64", "--res", "128", "--steps", "1", "--repeats", "1",
                "--warmup", "0", "--no-cfg", "--no-decode", "--plot", out, "--json")
    days.add(datetime.date.today().isoformat())  # a run across midnight may carry either date
    got = json.loads(r.stdout)
    assert [x["res"] for x in got["results"]] == [64, 128] and got["plot"] == str(out)
    assert [x["native"]["image_tokens"] for x in got["results"]] == [64, 256]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 1000
        im.load()
        title = im.text["Title"]
    assert "tiny-imagenet" in title and got["results"][0]["device"] in title and any(d in title for d in days)
    # the file is there: a second call refuses before measuring anything, in one line
    import davae_cli.bench as B

    monkeypatch.setattr(B, "run_bench", lambda *a, **k: pytest.fail("measured before checking --plot"))
    bad = run_cli("bench", "--preset", "tiny-imagenet", "--res", "64", "--plot", out, check=False)
    assert bad.returncode == 1 and "exists" in bad.stderr and "--overwrite" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli("bench", "--preset", "tiny-imagenet", "--res", "64", "--res", "100", check=False)  # all checked first
    assert bad.returncode == 1 and "100" in bad.stderr and "multiple of" in bad.stderr


def test_plot_needs_matplotlib_and_measurements(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the `plot` extra were not installed
    import davae_cli.bench as B

    monkeypatch.setattr(B, "run_bench", lambda *a, **k: pytest.fail("measured without a way to plot"))
    bad = run_cli("bench", "--plot", tmp_path / "p.png", check=False)
    assert bad.returncode == 1 and 'pip install "davae[plot]"' in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "p.png").exists()
    bad = run_cli("bench", "--flops-only", "--plot", tmp_path / "p.png", check=False)
    assert bad.returncode == 1 and "--flops-only" in bad.stderr
    # the FLOP model of several resolutions needs neither
    f = json.loads(run_cli("bench", "--flops-only", "--res", "128", "--res", "256", "--json").stdout)
    assert [x["res"] for x in f["results"]] == [128, 256]
    assert f["results"][1]["flop_ratio"] > f["results"][0]["flop_ratio"]  # attention grows faster than linear
