"""train-vae: losses, checkpoints, exact resume after a kill, export."""

import json
import subprocess
import sys

import pytest
import torch

from davae_cli import ConfigError, DavaeError, DetailAlignedVAE, load_base_vae, load_preset
from davae_cli.train.loop import latest_checkpoint
from davae_cli.train.vae import train_vae
from davae_cli.metrics.lpips_weights import build_lpips
from davae_cli.vae.losses import align_loss, grad_norm_ratio, hinge_d_loss, kl_divergence
from conftest import run_cli, write_preset


def test_kl_hinge_and_alignment_against_hand_computation():
    mean = torch.tensor([[[[1.0]], [[0.0]]]])  # (1, 2, 1, 1)
    logvar = torch.tensor([[[[0.0]], [[2.0]]]])
    # 0.5*(1 + 1 - 1 - 0) = 0.5 ; 0.5*(0 + e^2 - 1 - 2) ; averaged over 2 elements
    expected = (0.5 + 0.5 * (torch.e**2 - 3)) / 2
    assert kl_divergence(mean, logvar).item() == pytest.approx(expected, rel=1e-6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25 ; fake: relu(1-2)=0, relu(1.5)=1.5 -> 0.75 ; 0.5*(0.25+0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    z_d = torch.tensor([1.0, 3.0, 5.0, 7.0]).reshape(1, 4, 1, 1)  # r = 2 -> Proj = (2, 6)
    z_b = torch.tensor([1.0, 4.0]).reshape(1, 2, 1, 1)
    assert align_loss(z_d, z_b).item() == pytest.approx(((2 - 1) ** 2 + (6 - 4) ** 2) / 2)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a = (3.0 * w).sum()  # grad (3, 3)
    b = (w**2).sum()  # grad (2, 4)
    ratio = grad_norm_ratio(a, b, w)
    assert ratio.item() == pytest.approx((18**0.5) / (20**0.5 + 1e-4), rel=1e-6)


def test_missing_lpips_weights_give_a_one_line_error(monkeypatch):
    import lpips

    def boom(*a, **k):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(lpips, "LPIPS", boom)
    with pytest.raises(DavaeError, match="--set loss.lpips=0") as e:
        build_lpips("vgg", random_backbone=False)
    assert "\n" not in str(e.value)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if r.get("event") == "train"}


def _cli(args, env=None, check=True):
    return run_cli(*args, env=env, check=check)


@pytest.mark.parametrize("style, base_fixture, extra", [
    ("residual", "tae_base", []),
    # the CPU shortcut: the frozen base's outputs cached per image, a nonlinear detail encoder
    ("residual", "tae_base", ["--set", "train_vae.cache_base=true", "--set", "vae.down_hidden=8"]),
    # the `tiny` preset's deeper residual encoder/decoder
    ("residual", "tae_base", ["--set", "train_vae.cache_base=true", "--set", "vae.down_hidden=8", "--set",
                              "vae.down_blocks=1", "--set", "vae.up_hidden=8", "--set", "vae.up_blocks=1"]),
    # the paper's full loss on the official architecture: LPIPS, a PatchGAN from step 1, adaptive alignment
    ("official", "kl_base", ["--set", "loss.lpips=0.5", "--set", "loss.adv=0.1", "--set", "loss.disc_start=1",
                             "--set", "loss.align_mode=adaptive", "--set", "loss.detail_dropout=0.5"]),
])
def test_resume_after_a_kill_continues_with_the_same_losses(tmp_path, images_dir, request, style, base_fixture, extra):
    preset = write_preset(tmp_path / "p.yaml", request.getfixturevalue(base_fixture), style)
    common = ["train-vae", "--preset", str(preset), "--data", str(images_dir), *extra]
    full = tmp_path / "full"
    _cli([*common, "--out", str(full)])
    killed = tmp_path / "killed"
    res = _cli([*common, "--out", str(killed)], env={"DAVAE_KILL_AFTER_STEP": "2"}, check=False)
    assert res.returncode == 137
    assert latest_checkpoint(killed).name == "step-0000002" and not (killed / "final").exists()
    # a second start without --resume refuses to touch the run
    again = _cli([*common, "--out", str(killed)], check=False)
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr
    _cli([*common, "--out", str(killed), "--resume"])
    a, b = _losses(full), _losses(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    # the exported models are identical
    ma = DetailAlignedVAE.from_pretrained(full / "final")
    mb = DetailAlignedVAE.from_pretrained(killed / "final")
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    # keep_checkpoints = 2: exactly the last two remain
    assert sorted(p.name for p in (full / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000004"]


def test_training_lowers_the_loss_and_logs_evaluations(tmp_path, images_dir, tae_base):
    p = load_preset(str(write_preset(tmp_path / "p.yaml", tae_base, "residual")),
                    ["train_vae.steps=30", "train_vae.eval_every=30", "train_vae.checkpoint_every=30",
                     "train_vae.batch_size=4", "train_vae.lr_new_blocks=3e-3", "loss.align=0"])
    res = train_vae(p, [str(images_dir)], tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r["l1"] for r in recs if r["event"] == "train"]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[0]["davae.psnr"] == pytest.approx(evals[0]["base_half_bicubic.psnr"], abs=1e-4)  # starts as the baseline
    assert {"davae.ssim", "base_full.psnr", "align_mse", "gap_closed", "davae_detail_from_base.psnr",
            "detail_gain_db"} <= set(evals[-1])
    # the decoder starts as the baseline whatever z_d is: z_d predicted from z_base decodes the same at step 0
    assert evals[0]["detail_gain_db"] == pytest.approx(0.0, abs=1e-4)
    # sharpness of every row and of the held-out images; at step 0 the DA-VAE's is the baseline's
    assert {"images.sharpness", "davae.sharpness", "base_half_bicubic.sharpness", "base_full.sharpness",
            "davae_detail_from_base.sharpness"} <= set(evals[-1])
    assert evals[0]["davae.sharpness"] == pytest.approx(evals[0]["base_half_bicubic.sharpness"], abs=1e-5)
    assert evals[0]["base_half_bicubic.sharpness"] < evals[0]["images.sharpness"]  # bicubic x2 is smoother
    assert evals[-1]["detail_gain_db"] == pytest.approx(evals[-1]["davae.psnr"] - evals[-1]["davae_detail_from_base.psnr"])
    assert res.skipped_images == 1  # broken.jpg
    assert (tmp_path / "run" / "samples" / "step-0000030.png").is_file()
    model = DetailAlignedVAE.from_pretrained(tmp_path / "run" / "final")
    assert int(model.detail_stats_images) == 4 and torch.all(model.detail_std > 0)


def test_steps_zero_exports_without_data(tmp_path, kl_base):
    p = load_preset(str(write_preset(tmp_path / "p.yaml", kl_base)), ["train_vae.steps=0"])
    res = train_vae(p, [], tmp_path / "run0")
    m = DetailAlignedVAE.from_pretrained(res.final_dir)
    assert m.latent_channels == 16 and int(m.detail_stats_images) == 0


def test_data_order_is_a_function_of_step_and_rank():
    from davae_cli.data import StepSampler

    # two processes, batch 2: step 0 -> rank 0 takes 0,1 and rank 1 takes 2,3; step 1 -> 4,5 / 6,7
    assert list(StepSampler(0, 2, 2, rank=0, world=2)) == [0, 1, 4, 5]
    assert list(StepSampler(0, 2, 2, rank=1, world=2)) == [2, 3, 6, 7]
    # resuming at step 1 yields exactly the rest of the uninterrupted order
    assert list(StepSampler(1, 3, 3)) == list(StepSampler(0, 3, 3))[3:]
    assert len(StepSampler(5, 9, 4)) == 16


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(tmp_path, images_dir, tae_base):
    import signal
    import time

    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__steps=400,
                          train_vae__checkpoint_every=1000, train_vae__eval_every=1000)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "davae_cli", "train-vae", "--preset", str(preset), "--data", str(images_dir),
            "--out", str(run_dir)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        log = run_dir / "log.jsonl"
        if log.is_file() and '"event": "train"' in log.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    ckpt = latest_checkpoint(run_dir)
    stopped_at = int(ckpt.name.split("-")[1])
    assert 1 <= stopped_at < 400
    # resume and finish early (--steps may change on resume)
    _cli(["train-vae", "--preset", str(preset), "--data", str(images_dir), "--out", str(run_dir), "--resume",
          "--steps", str(stopped_at + 2)])
    assert (run_dir / "final" / "config.json").is_file()
    assert max(_losses(run_dir)) == stopped_at + 2


def test_cached_base_path_equals_the_direct_path(tmp_path, tae_base):
    """forward(x, base_cache=(z_base, baseline) of x) is forward(x): the cache only skips the base VAE."""
    p = load_preset(str(write_preset(tmp_path / "p.yaml", tae_base, "residual", vae__down_hidden=8)))
    model = DetailAlignedVAE.from_base(load_base_vae(str(tae_base)), p.vae)
    with torch.no_grad():
        for prm in model.up.parameters():  # move off the zero init so the decoder output depends on z_d
            prm.add_(0.01)
        x = torch.rand(2, 3, 32, 48) * 2 - 1
        z = model.encode_base(x)
        a = model(x)
        b = model(x, base_cache=(z, model.decode_baseline(z)))
    for key in ("x_hat", "latent", "mean"):
        torch.testing.assert_close(a[key], b[key])
    with pytest.raises(ConfigError, match="cache_base"):
        load_preset(str(write_preset(tmp_path / "q.yaml", tae_base, "official")), ["train_vae.cache_base=true"])


def test_decoder_only_fine_tune_keeps_the_latent_and_adapted_dits_accept_it(tmp_path, images_dir, kl_base):
    """train-vae --init A --decoder-only: the detail encoder, the detail statistics and so the latent identity
    stay those of A bit for bit while the decoder changes; latents encoded by A and DiT facts recorded on A are
    accepted by the result; a latent of another DA-VAE is not. Bad combinations are one line."""
    from davae_cli.codec import check_latent_compatible

    preset = write_preset(tmp_path / "p.yaml", kl_base)
    run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "a", "--steps", "2")
    a = DetailAlignedVAE.from_pretrained(tmp_path / "a" / "final")
    run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "b", "--steps", "3",
            "--init", tmp_path / "a" / "final", "--decoder-only", "--set", "loss.adv=0.1", "--set", "loss.disc_start=0")
    b = DetailAlignedVAE.from_pretrained(tmp_path / "b" / "final")
    sa, sb = a.state_dict(), b.state_dict()
    enc = [k for k in sa if k.startswith(("detail_trunk.", "down.", "transform.", "detail_"))]
    dec = [k for k in sa if k.startswith(("up.", "decoder_trunk."))]
    assert enc and dec and all(torch.equal(sa[k], sb[k]) for k in enc)
    assert any(not torch.equal(sa[k], sb[k]) for k in dec)  # the decoder (and only it) trained
    assert b.latent_identity == a.latent_identity and b.identity != a.identity
    # an adapted DiT's facts on A (with or without the latent identity: older folders lack it)
    assert b.is_recorded({"identity": a.identity, "latent_identity": a.latent_identity})
    assert not b.is_recorded({"identity": a.identity})
    assert a.is_recorded({"identity": a.identity})
    lat = torch.zeros(a.latent_channels, 2, 2)
    assert check_latent_compatible(b, lat, a.describe()) is None  # `davae encode` by A writes these facts
    old = {k: v for k, v in a.describe().items() if k != "latent_identity"}  # a latent written before
    assert "different DA-VAE" in check_latent_compatible(b, lat, old)
    assert check_latent_compatible(b, lat, {**old, "space": "dit"}, dit_space_ok=True,
                                   dit_davae={"identity": a.identity, "latent_identity": a.latent_identity}) is None
    # a fresh DA-VAE (another encoder) has another latent identity
    run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "c", "--steps", "0",
            "--set", "train_vae.seed=5")
    c = DetailAlignedVAE.from_pretrained(tmp_path / "c" / "final")
    assert c.latent_identity != a.latent_identity and "different DA-VAE" in check_latent_compatible(c, lat, a.describe())
    # one-line refusals, nothing trained
    r = run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "x", "--decoder-only",
                check=False)
    assert r.returncode != 0 and "needs train_vae.init_from (--init)" in r.stderr and "Traceback" not in r.stderr
    other = write_preset(tmp_path / "q.yaml", kl_base, vae__up_hidden=8)
    r = run_cli("train-vae", "--preset", other, "--data", images_dir, "--out", tmp_path / "y", "--init",
                tmp_path / "a" / "final", check=False)
    assert r.returncode != 0 and "has vae up_hidden = 0 where the preset has 8" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "y" / "final").exists()


def test_decoder_only_fine_tune_may_change_the_residual_band(tmp_path, images_dir, tae_base):
    """`--decoder-only` may switch vae.residual_band (a decoder setting without parameters): the latent
    identity stays, the result decodes with the high band; a full fine-tune with the same change is refused."""
    preset = write_preset(tmp_path / "p.yaml", tae_base, style="residual")
    run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "a", "--steps", "2")
    a = DetailAlignedVAE.from_pretrained(tmp_path / "a" / "final")
    r = run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "b", "--steps", "2",
                "--init", tmp_path / "a" / "final", "--decoder-only", "--set", "vae.residual_band=high")
    assert "vae residual_band: 'full' in" in r.stderr
    b = DetailAlignedVAE.from_pretrained(tmp_path / "b" / "final")
    assert b.config.residual_band == "high" and a.config.residual_band == "full"
    assert b.latent_identity == a.latent_identity and b.identity != a.identity
    r = run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", tmp_path / "c", "--steps", "2",
                "--init", tmp_path / "a" / "final", "--set", "vae.residual_band=high", check=False)
    assert r.returncode != 0 and "has vae residual_band = 'full' where the preset has 'high'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "c" / "final").exists()
