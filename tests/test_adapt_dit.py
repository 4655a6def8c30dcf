"""adapt-dit: the zero-init extension is the pretrained function, the loss schedule by hand, LoRA targets,
a short run lowers the loss, exact --resume, the exported folder loads with plain diffusers."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from davae_cli import flow
from davae_cli.config import load_preset
from davae_cli.dit.extend import extend_output_head, extend_patch_embed, output_row_index
from davae_cli.errors import DavaeError

from conftest import run_cli

TINY = ["vae.base_vae=random", "vae.base_vae_subfolder=null", "adapt_dit.resolution=64", "adapt_dit.batch_size=2",
        "adapt_dit.log_every=1", "adapt_dit.checkpoint_every=3", "dit.max_sequence_length=8"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """An untrained tiny-preset DA-VAE on a random f8 C=16 base (D = 16)."""
    from davae_cli.train.vae import train_vae

    d = tmp_path_factory.mktemp("tinyvae")
    train_vae(load_preset("tiny", TINY + ["train_vae.steps=0"]), [], d / "run")
    return d / "run" / "final"


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    from PIL import Image
    import numpy as np

    d = tmp_path_factory.mktemp("capt")
    rng = np.random.default_rng(0)
    for i in range(6):
        arr = rng.integers(0, 255, size=(9, 11, 3)).astype(np.uint8)
        Image.fromarray(arr).resize((88, 72), Image.BICUBIC).save(d / f"im{i}.png")
        (d / f"im{i}.txt").write_text(f"picture number {i}")
    return d


def _sd3_inputs(model, c_total, n=2, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(x=torch.randn(n, c_total, hw, hw, generator=g),
                eh=torch.randn(n, 11, cfg.joint_attention_dim, generator=g),
                pool=torch.randn(n, cfg.pooled_projection_dim, generator=g),
                t=torch.rand(n, generator=g) * 1000)


def _run(model, x, inp):
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=inp["eh"], pooled_projections=inp["pool"],
                     timestep=inp["t"], return_dict=False)[0]


def test_output_rows_interleave_per_patch_position():
    # p = 2, C = 2, D = 2: old rows (pq, c) -> pq * 4 + c, by hand
    assert output_row_index(2, 2, 2).tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    lin = torch.nn.Linear(3, 8)
    new = extend_output_head(lin, 2, 2, 2)
    assert torch.equal(new.weight[[0, 1, 4, 5, 8, 9, 12, 13]], lin.weight)
    assert new.weight[[2, 3, 6, 7, 10, 11, 14, 15]].abs().sum() == 0 and new.bias[[2, 3, 6, 7]].abs().sum() == 0
    conv = torch.nn.Conv2d(2, 5, 2, 2)
    ext = extend_patch_embed(conv, 3)
    assert ext.in_channels == 5 and torch.equal(ext.weight[:, :2], conv.weight) and ext.weight[:, 2:].abs().sum() == 0
    with pytest.raises(DavaeError, match="p\\*p\\*C"):
        extend_output_head(torch.nn.Linear(3, 16), 2, 2, 2)


@pytest.mark.parametrize("detail", [16, 48])
def test_sd3_warm_start_is_the_pretrained_function(detail):
    from davae_cli.dit.sd3 import extend_sd3, load_sd3_transformer

    arch = load_preset("tiny").dit.arch
    ref = load_sd3_transformer("random", arch=arch, seed=3)
    ext = extend_sd3(copy.deepcopy(ref), detail)
    assert ext.config.in_channels == ext.config.out_channels == 16 + detail
    inp = _sd3_inputs(ref, 16 + detail)
    out = _run(ext, inp["x"], inp)
    base = _run(ref, inp["x"][:, :16], inp)
    assert (out[:, :16] - base).abs().max() <= 1e-6
    assert torch.count_nonzero(out[:, 16:]) == 0
    # the test can fail: once the new rows move, detail outputs are no longer zero
    with torch.no_grad():
        ext.proj_out.weight.add_(0.01)
    assert torch.count_nonzero(_run(ext, inp["x"], inp)[:, 16:]) > 0


def test_sd35_medium_architecture_warm_start():
    """SD3.5 Medium's real config (full width, dual attention, RMS QK-norm), depth reduced for CPU time."""
    from davae_cli.dit.sd3 import extend_sd3, load_sd3_transformer

    arch = dict(load_preset("sd35m-1024").dit.arch, num_layers=2, dual_attention_layers=[0])
    ref = load_sd3_transformer("random", arch=arch, seed=0)
    ext = extend_sd3(copy.deepcopy(ref), 16)
    inp = _sd3_inputs(ref, 32, n=1, hw=8)
    out = _run(ext, inp["x"], inp)
    assert (out[:, :16] - _run(ref, inp["x"][:, :16], inp)).abs().max() <= 1e-6
    assert torch.count_nonzero(out[:, 16:]) == 0


def test_lora_targets_exactly_the_named_modules():
    from davae_cli.dit.sd3 import SD3Backend
    from davae_cli.dit.diffusers_family import lora_module_names

    preset = load_preset("tiny")
    backend = SD3Backend(preset)
    model = backend.extend(backend.load("random"), 16)
    plain_names = [n for n, _ in model.named_modules()]
    trainable = backend.prepare_training(model)
    pattern = re.compile(r"^transformer_blocks\.\d+\.(attn|attn2)\.(to_q|to_k|to_v|to_out\.0)$|"
                         r"^transformer_blocks\.\d+\.(ff\.net\.2|norm1\.linear)$")
    expected = sorted(n for n in plain_names if pattern.match(n))
    assert lora_module_names(model) == expected
    assert not any("context" in n or "add_" in n for n in expected)  # the text stream is not adapted
    heads = {n.rsplit(".", 1)[0] for n in trainable if "lora_" not in n}
    assert heads == {"pos_embed.proj", "proj_out", "norm_out.linear"}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_detail_weight_and_loss_normalisation_by_hand():
    assert flow.detail_weight(0, 100) == 0.0
    assert flow.detail_weight(50, 100) == pytest.approx(0.5)
    assert flow.detail_weight(25, 100) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert flow.detail_weight(100, 100) == 1.0 and flow.detail_weight(10_000, 100) == 1.0
    # 1 sample, C = 1, D = 2, 1x1: base error 2^2 = 4, detail errors 1 and 3 -> 1 + 9 = 10
    pred = torch.tensor([[[[2.0]], [[1.0]], [[3.0]]]])
    target = torch.zeros_like(pred)
    assert float(flow.flow_loss(pred, target, 1, 0.0)) == pytest.approx(4.0)
    assert float(flow.flow_loss(pred, target, 1, 0.5)) == pytest.approx((4 + 0.5 * 10) / (1 + 0.5 * 2))
    assert float(flow.flow_loss(pred, target, 1, 1.0)) == pytest.approx(14 / 3)


def test_shift_and_noising():
    assert float(flow.shift_sigma(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    assert float(flow.shift_sigma(torch.tensor(0.0), 3.0)) == 0.0 and float(flow.shift_sigma(torch.tensor(1.0), 3.0)) == 1.0
    x0, eps = torch.ones(1, 2, 1, 1), torch.full((1, 2, 1, 1), 3.0)
    xt, u = flow.noisy(x0, eps, torch.tensor([0.25]))
    assert torch.allclose(xt, torch.full_like(xt, 0.75 + 0.75)) and torch.allclose(u, torch.full_like(u, 2.0))
    s = flow.sampling_sigmas(4, 1.0)
    assert s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_step0_export_reloads_with_plain_diffusers(tiny_vae, tmp_path):
    from diffusers import SD3Transformer2DModel

    from davae_cli.dit.sd3 import load_sd3_transformer
    from davae_cli.train.dit import adapt_dit

    preset = load_preset("tiny", TINY + ["adapt_dit.steps=0"])
    res = adapt_dit(preset, tiny_vae, tmp_path / "run")
    loaded = SD3Transformer2DModel.from_pretrained(res.final_dir)
    assert loaded.config.in_channels == loaded.config.out_channels == 32
    ref = load_sd3_transformer("random", arch=preset.dit.arch, seed=preset.adapt_dit.seed)
    inp = _sd3_inputs(ref, 32, hw=4)
    out = _run(loaded, inp["x"], inp)
    assert (out[:, :16] - _run(ref, inp["x"][:, :16], inp)).abs().max() <= 1e-6
    assert torch.count_nonzero(out[:, 16:]) == 0
    facts = json.loads((tmp_path / "run" / "final" / "davae_dit.json").read_text())
    assert facts["train_shift"] == preset.dit.train_shift == 4.0 and facts["sample_shift"] == preset.sample.shift
    assert facts["sampling"] == {"steps": preset.sample.steps, "guidance": preset.sample.guidance,
                                 "guidance_interval": None, "sampler": "euler", "negative_prompt": ""}
    assert facts["detail_channels"] == 16 and len(facts["detail_std"]) == 16
    assert facts["detail_stats"]["source"] == "davae"  # no training data: the DA-VAE's own statistics


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if r.get("event") == "train"]


def _events(run, event):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("event") == event]


def _trainable(ckpt):
    """The trainable weights a checkpoint folder holds."""
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)["trainable"]


def test_short_run_lowers_loss_and_resume_is_exact(tiny_vae, captioned, tmp_path):
    from safetensors.torch import load_file

    args = ["adapt-dit", "--preset", "tiny", "--vae", tiny_vae, "--data", captioned, "--steps", "6",
            *sum((["--set", s] for s in TINY + ["adapt_dit.lr=3e-3"]), []), "--json"]
    full = run_cli(*args, "--out", tmp_path / "full", subprocess_=True)  # a process, like the killed run below
    m = json.loads(full.stdout)
    assert m["probe_loss_end"] < m["probe_loss_start"]
    cut = tmp_path / "cut"
    killed = run_cli(*args, "--out", cut, check=False, env={"DAVAE_KILL_AFTER_STEP": "3"})
    assert killed.returncode != 0 and not (cut / "final").exists()
    # the kill came right after step 3's checkpoint: it is there, `latest` names it, no later step ran, and it
    # holds the uninterrupted run's weights of step 3
    ck = cut / "checkpoints" / "step-0000003"
    assert (cut / "checkpoints" / "latest").read_text().strip() == ck.name
    assert sorted(p.name for p in (cut / "checkpoints").glob("step-*")) == [ck.name]
    assert _losses(cut) == _losses(tmp_path / "full")[:3]
    at_kill = _trainable(ck)
    ref = _trainable(tmp_path / "full" / "checkpoints" / ck.name)
    assert at_kill.keys() == ref.keys() and all(torch.equal(at_kill[k], ref[k]) for k in ref)
    run_cli(*args, "--out", cut, "--resume")
    # the resume began at that checkpoint (a restart from 0 would log start at step 0 and redo steps 1-3) ...
    assert [(r["step"], r["start_step"]) for r in _events(cut, "start")] == [(0, 0), (3, 3)]
    # ... and continued from its weights and optimiser state: the steps after it are the uninterrupted run's
    assert _losses(cut) == _losses(tmp_path / "full")
    a = load_file(tmp_path / "full" / "final" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_adapt_dit_errors(tiny_vae, captioned, tmp_path, davae_dir):
    r = run_cli("adapt-dit", "--preset", "tiny", "--vae", tiny_vae, "--out", tmp_path / "a", check=False)
    assert r.returncode == 1 and "--data is required" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("adapt-dit", "--preset", "tiny", "--vae", tmp_path / "nope", "--out", tmp_path / "b", "--steps", "0",
                check=False)
    assert r.returncode == 1 and "not a DA-VAE folder" in r.stderr
    # a DA-VAE with C = 4 and the tiny DiT (C = 16) do not belong together
    r = run_cli("adapt-dit", "--preset", "tiny", "--vae", davae_dir, "--out", tmp_path / "c", "--steps", "0",
                "--set", "adapt_dit.resolution=64", check=False)
    assert r.returncode == 1 and "do not belong together" in r.stderr
    uncaptioned = tmp_path / "nocap"
    uncaptioned.mkdir()
    (uncaptioned / "x.png").write_bytes((captioned / "im0.png").read_bytes())
    r = run_cli("adapt-dit", "--preset", "tiny", "--vae", tiny_vae, "--out", tmp_path / "d", "--data", uncaptioned,
                "--steps", "2", *sum((["--set", s] for s in TINY), []), check=False)
    assert r.returncode == 1 and "no caption" in r.stderr


def test_lightningdit_path_class_folders(tmp_path, captioned):
    """tiny-imagenet: class sub-folders -> labels; step-0 export is the pretrained function through the
    backend's velocity; a short run lowers the fixed-noise loss."""
    import shutil

    from davae_cli.dit.lightningdit import LightningDiTBackend
    from davae_cli.train.dit import adapt_dit
    from davae_cli.train.vae import train_vae

    train_vae(load_preset("tiny-imagenet", ["train_vae.steps=0"]), [], tmp_path / "vae")
    data = tmp_path / "cls"
    for i, name in enumerate(sorted(p.name for p in captioned.glob("*.png"))):
        (data / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        shutil.copy(captioned / name, data / ("a" if i % 2 else "b") / name)
    preset = load_preset("tiny-imagenet", ["adapt_dit.steps=0"])
    res0 = adapt_dit(preset, tmp_path / "vae" / "final", tmp_path / "r0")
    backend = LightningDiTBackend(preset)
    ref = backend.load("random", seed=preset.adapt_dit.seed)
    adapted = backend.load_adapted(res0.final_dir)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, 8, 8, generator=g)
    sigma = torch.rand(3, generator=g)
    cond = {"labels": torch.tensor([0, 3, 10])}  # 10 = the null class
    with torch.no_grad():
        v = backend.velocity(adapted, x, sigma, cond)
        v_ref = backend.velocity(ref, x[:, :16], sigma, cond)
    assert (v[:, :16] - v_ref).abs().max() <= 1e-6 and torch.count_nonzero(v[:, 16:]) == 0
    res = adapt_dit(load_preset("tiny-imagenet", ["adapt_dit.steps=12"]), tmp_path / "vae" / "final",
                    tmp_path / "r1", data=[str(data)])
    assert res.metrics["probe_loss_end"] < res.metrics["probe_loss_start"]
    labels = {json.loads(line)["label"] for line in (tmp_path / "r1" / "cache" / "index.jsonl").read_text().splitlines()}
    assert labels == {0, 1}
    # a flat folder has no classes: refused, not silently labelled 0
    with pytest.raises(DavaeError, match="one sub-folder per class"):
        adapt_dit(load_preset("tiny-imagenet", ["adapt_dit.steps=2"]), tmp_path / "vae" / "final", tmp_path / "r2",
                  data=[str(captioned)])
    # labels from a JSONL must be valid class ids
    (data / "labels.jsonl").write_text("".join(json.dumps({"image": p.name, "label": 10}) + "\n"
                                               for p in sorted(data.rglob("*.png"))))
    with pytest.raises(DavaeError, match="outside 0..9"):
        adapt_dit(load_preset("tiny-imagenet", ["adapt_dit.steps=2"]), tmp_path / "vae" / "final", tmp_path / "r3",
                  data=[str(data)], captions=str(data / "labels.jsonl"))


def test_cosine_velocity_term_by_hand():
    """1 - cos over channels per token, mean over tokens; detail channels weighted by sqrt(w) inside both
    vectors: w = 0 -> the base channels' term, w = 1 -> all channels'."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 3, 2, generator=g), torch.randn(2, 5, 3, 2, generator=g)

    def by_hand(p, t):
        vals = []
        for b in range(p.shape[0]):
            for i in range(p.shape[2]):
                for j in range(p.shape[3]):
                    a, c = p[b, :, i, j].tolist(), t[b, :, i, j].tolist()
                    dot = sum(x * y for x, y in zip(a, c))
                    na, nc = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in c))
                    vals.append(1 - dot / (na * nc))
        return sum(vals) / len(vals)

    assert flow.cosine_loss(pred, target, 2, 0.0).item() == pytest.approx(by_hand(pred[:, :2], target[:, :2]), abs=1e-6)
    assert flow.cosine_loss(pred, target, 2, 1.0).item() == pytest.approx(by_hand(pred, target), abs=1e-6)
    w = 0.3
    scale = torch.tensor([1, 1] + [math.sqrt(w)] * 3).view(1, -1, 1, 1)
    assert flow.cosine_loss(pred, target, 2, w).item() == pytest.approx(by_hand(pred * scale, target * scale), abs=1e-6)


def test_step_loss_uses_the_training_shift_and_the_cosine_term(monkeypatch):
    """flow_step_loss draws sigmas with dit.train_shift (not the sampling shift) and adds
    adapt_dit.cosine_loss x the cosine term to the scheduled MSE."""
    from davae_cli.train.flow_trainer import flow_step_loss

    preset = load_preset("tiny-imagenet", ["dit.train_shift=2.5", "sample.shift=7.0", "adapt_dit.cosine_loss=0.7"])
    seen = {}
    orig = flow.sample_sigmas

    def spy(n, **kw):
        seen["shift"] = kw["shift"]
        return orig(n, **kw)

    monkeypatch.setattr(flow, "sample_sigmas", spy)
    pred_holder = {}

    class Backend:
        @staticmethod
        def velocity(model, x, sigma, cond):
            pred_holder["pred"] = torch.sin(x * 3)  # any deterministic function
            return pred_holder["pred"]

    x0 = torch.randn(3, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(5)
    loss, parts = flow_step_loss(Backend, None, x0, {}, 10, preset, 16, gen)
    assert seen["shift"] == 2.5
    # recompute the target with the same random draws
    g2 = torch.Generator().manual_seed(5)
    sigma = orig(3, mean=0.0, std=1.0, shift=2.5, generator=g2)
    eps = torch.randn(x0.shape, generator=g2)
    _, target = flow.noisy(x0, eps, sigma)
    w = flow.detail_weight(10, preset.adapt_dit.detail_ramp_steps)
    want = flow.flow_loss(pred_holder["pred"], target, 16, w) + 0.7 * flow.cosine_loss(pred_holder["pred"], target, 16, w)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and "loss_cos" in parts


def test_detail_statistics_come_from_the_dits_own_latents(tiny_vae, captioned, tmp_path):
    """adapt-dit measures the detail channels' mean/std on its cached training latents and stores them with
    the adapted model: over those latents the normalised detail channels have mean 0 and std 1 per channel,
    although the DA-VAE's own statistics (from other images) differ."""
    from davae_cli.latents import LatentNormalizer, load_latent
    from davae_cli.vae.model import DetailAlignedVAE

    run_cli("adapt-dit", "--preset", "tiny", "--vae", tiny_vae, "--data", captioned, "--steps", "0",
            *sum((["--set", s] for s in TINY), []), "--out", tmp_path / "run")
    facts = json.loads((tmp_path / "run" / "final" / "davae_dit.json").read_text())
    assert facts["detail_stats"] == {"source": "adapt-dit training latents", "latents": 6}
    lats = torch.stack([load_latent(f)[0] for f in sorted((tmp_path / "run" / "cache" / "latents").rglob("*.safetensors"))])
    assert lats.shape[0] == 6
    z = LatentNormalizer.from_facts(facts)(lats)[:, 16:].double()
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-4
    vae = DetailAlignedVAE.from_pretrained(str(tiny_vae))
    own = LatentNormalizer.from_vae(vae)(lats)[:, 16:].double().transpose(0, 1).flatten(1)
    assert (own.std(1, unbiased=False) - 1).abs().max() > 0.05  # the fallback would not have standardised them


def test_residual_detail_view_by_hand(tmp_path):
    """adapt_dit.detail_view = residual: the DiT sees (z_d - repeat(z_base, D/C) - m) / s, inverted exactly,
    with m and s measured on that difference."""
    from davae_cli.latent_data import LatentRecord, detail_statistics
    from davae_cli.latents import LatentNormalizer, save_latent

    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, 4 + 8, 5, 5, generator=g)  # C = 4, D = 8 (r = 2)
    m, s = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    norm = LatentNormalizer(4, m, s, residual=True)
    zb, zd = lat[:, :4], lat[:, 4:]
    aligned = torch.stack([zb[:, 0], zb[:, 0], zb[:, 1], zb[:, 1], zb[:, 2], zb[:, 2], zb[:, 3], zb[:, 3]], 1)
    want = torch.cat([zb, (zd - aligned - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)], 1)
    assert torch.allclose(norm(lat), want, atol=1e-6)
    assert torch.allclose(norm.inverse(norm(lat)), lat, atol=1e-5)
    raw = LatentNormalizer(4, m, s)
    assert torch.allclose(raw(lat)[:, 4:], (zd - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1), atol=1e-6)
    recs = []
    for i in range(3):
        save_latent(tmp_path / f"{i}.safetensors", lat[i], {})
        recs.append(LatentRecord(str(tmp_path / f"{i}.safetensors"), str(i)))
    mean, std, n = detail_statistics(recs, 4, residual=True)
    diff = (zd - aligned).double().transpose(0, 1).flatten(1)  # (D, N h w)
    assert n == 3
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), diff.mean(1), atol=1e-6)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), diff.std(1, unbiased=False), atol=1e-6)


def test_detail_noise_in_the_dit_loss_by_hand():
    """adapt_dit.detail_noise adds N(0, sigma^2) to the detail channels of x0 (not the base) before the flow
    noising; 0 leaves the objective exactly as before. Checked against the same draws made by hand."""
    from davae_cli.train.flow_trainer import flow_step_loss

    x0 = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    got = flow.with_detail_noise(x0, 2, 0.25, torch.Generator().manual_seed(7))
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got[:, :2], x0[:, :2])
    assert torch.allclose(got[:, 2:], x0[:, 2:] + 0.25 * noise, atol=0, rtol=0)
    assert x0.shape == got.shape and not torch.equal(got, x0)

    class Recorder:  # a backend whose velocity is the zero field and that keeps what it was given
        seen = []

        def velocity(self, model, xt, sigma, cond):
            self.seen.append((xt.clone(), sigma.clone()))
            return torch.zeros_like(xt)

    preset = load_preset("tiny", ["adapt_dit.detail_ramp_steps=10", "adapt_dit.cosine_loss=0"])
    a = preset.adapt_dit
    for std in (0.0, 0.5):
        a.detail_noise = std
        rec = Recorder()
        rec.seen = []
        loss, parts = flow_step_loss(rec, None, x0, {}, 5, preset, 2, torch.Generator().manual_seed(3), section=a)
        # by hand: the same generator draws (detail noise first when on), then sigmas, then eps
        g = torch.Generator().manual_seed(3)
        x = flow.with_detail_noise(x0, 2, std, g) if std > 0 else x0
        sigma = flow.sample_sigmas(3, mean=a.logit_mean, std=a.logit_std, shift=preset.dit.train_shift, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        xt, target = flow.noisy(x, eps, sigma)
        assert torch.allclose(rec.seen[0][0], xt) and torch.allclose(rec.seen[0][1], sigma)
        w = flow.detail_weight(5, 10)  # the ramp: halfway, w = 0.5
        assert parts["w"] == pytest.approx(0.5) == pytest.approx(w)
        base_err = target[:, :2].pow(2).sum(1).mean()  # the zero prediction's squared error per pixel
        det_err = target[:, 2:].pow(2).sum(1).mean()
        assert float(loss) == pytest.approx(float((base_err + w * det_err) / (2 + w * 4)), rel=1e-5)
    r = pytest.raises(Exception, load_preset, "tiny", ["adapt_dit.detail_noise=-1"])
    assert "detail_noise" in str(r.value)
