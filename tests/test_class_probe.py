"""`eval-fid --class-probe`: the linear class probe (metrics.classify) against hand computations, and end to
end on colour-coded classes with a tiny TorchScript feature extractor: labels from PNG metadata and folders,
the known share of wrong-class samples, bad input as one line."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from conftest import run_cli, torchscript_file
from davae_cli.metrics import classify as C

COLOURS = {"apple": (200, 40, 40), "lake": (40, 60, 200), "moss": (40, 180, 60)}  # class folders, sorted = ids


class MeanColour(torch.nn.Module):
    """12-d features: the 2x2 mean colour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAVAE_CACHE_DIR", str(tmp_path_factory.mktemp("probe_cache")))
        yield


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return torchscript_file(MeanColour(), tmp_path_factory.mktemp("extractor") / "colour.pt")


def _image(colour, rng, meta=None) -> Image.Image:
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _save(img: Image.Image, path, class_id=None):
    info = PngInfo()
    if class_id is not None:
        info.add_text("davae:class_id", json.dumps(class_id))
    img.save(path, pnginfo=info)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/<class>/ 10 images each, val/<class>/ 4 each, gen/ 12 flat samples whose metadata names their
    class: 9 drawn in that class's colour, 3 in another's (accuracy 9/12 by construction)."""
    root = tmp_path_factory.mktemp("probe_data")
    rng = np.random.default_rng(0)
    names = sorted(COLOURS)
    for split, n in (("train", 10), ("val", 4)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _save(_image(COLOURS[name], rng), root / split / name / f"{i}.png")
    (root / "gen").mkdir()
    for i in range(12):
        cls = i % 3
        drawn = cls if i < 9 else (cls + 1) % 3
        _save(_image(COLOURS[names[drawn]], rng), root / "gen" / f"{i:06d}.png", class_id=cls)
    return root


# ------------------------------------------------------------------------------ the probe itself
def test_inception_score_formula_by_hand():
    assert C.inception_score(np.eye(4)) == pytest.approx(4.0)            # confident and balanced: K
    assert C.inception_score(np.full((5, 3), 1 / 3)) == pytest.approx(1.0)  # no confidence: 1
    assert C.inception_score(np.array([[1.0, 0.0]] * 3)) == pytest.approx(1.0)  # one class only: 1
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    m = p.mean(0)
    kl = [sum(pi * np.log(pi / mi) for pi, mi in zip(row, m)) for row in p]
    assert C.inception_score(p) == pytest.approx(float(np.exp(np.mean(kl))), rel=1e-9)
    assert C.inception_score(np.zeros((0, 3))) is None


def test_probe_is_the_regularised_logistic_regression_optimum():
    """At the returned weights the gradient of mean cross-entropy + l2 |W|², recomputed with numpy on the
    standardised features, vanishes; separable blobs are classified, probabilities sum to one."""
    rng = np.random.default_rng(1)
    k, d, n = 3, 6, 40
    centres = rng.normal(0, 3, (k, d))
    y = np.repeat(np.arange(k), n)
    x = centres[y] + rng.normal(0, 1, (k * n, d))
    probe = C.fit_probe(x, y, ["a", "b", "c"], l2=1e-2)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    p = probe.probs(x)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
    onehot = np.eye(k)[y]
    grad_w = (p - onehot).T @ z / len(y) + 2 * 1e-2 * probe.weight
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-6 and np.abs(grad_b).max() < 1e-6
    assert probe.train_accuracy > 0.95
    assert probe.describe()["l2"] == 1e-2 and C.fit_probe(x, y, ["a", "b", "c"], l2=0.5).describe()["l2"] == 0.5
    test = centres[y] + rng.normal(0, 1, (k * n, d))
    s = C.probe_scores(probe, test, np.where(np.arange(len(y)) % 10 == 0, -1, y))  # every 10th unlabelled
    assert s["labelled"] == len(y) - len(y) // 10 and s["images"] == len(y)
    assert s["accuracy"] > 0.9 and set(s["per_class"]) == {"a", "b", "c"}
    assert 1.0 < s["probe_is"] <= 3.0


def test_a_cached_probe_is_the_fitted_one_and_its_key_covers_the_inputs(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 8)
    x = (rng.normal(0, 3, (3, 5))[y] + rng.normal(0, 1, (24, 5))).astype(np.float32)
    fitted = C.cached_probe(x, y, ["a", "b", "c"], tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    direct = C.fit_probe(x, y, ["a", "b", "c"])
    np.testing.assert_array_equal(fitted.weight, direct.weight)

    def no_fit(*a, **k):
        raise AssertionError("refitted although cached")

    monkeypatch.setattr(C, "fit_probe", no_fit)
    again = C.cached_probe(x, y, ["a", "b", "c"], tmp_path)
    for f in ("mean", "std", "weight", "bias"):
        np.testing.assert_array_equal(getattr(again, f), getattr(fitted, f))
    assert again.describe() == fitted.describe()
    monkeypatch.undo()
    # other labels, another L2, other features: new entries; a damaged entry is refitted
    C.cached_probe(x, y[::-1].copy(), ["a", "b", "c"], tmp_path)
    C.cached_probe(x, y, ["a", "b", "c"], tmp_path, l2=0.1)
    C.cached_probe(x + 1, y, ["a", "b", "c"], tmp_path)
    entries = sorted(tmp_path.glob("*.npz"))
    assert len(entries) == 4
    for e in entries:
        e.write_bytes(b"damaged")
    np.testing.assert_array_equal(C.cached_probe(x, y, ["a", "b", "c"], tmp_path).weight, direct.weight)
    assert C.cached_probe(x, y, ["a", "b", "c"], None).describe() == direct.describe()  # no cache


# ------------------------------------------------------------------------------ end to end
def test_class_accuracy_of_samples_and_of_real_images(data, extractor):
    r = json.loads(run_cli("eval-fid", data / "gen", data / "val", "--class-probe", data / "train",
                          "--inception", extractor, "--num-workers", 0, "--json").stdout)
    cl = r["classes"]
    assert cl["probe"]["classes"] == sorted(COLOURS) and cl["probe"]["train_images"] == 30
    assert cl["probe"]["train_accuracy"] == 1.0
    assert cl["gen"]["labelled"] == 12 and cl["gen"]["accuracy"] == pytest.approx(9 / 12)
    assert cl["ref"]["labelled"] == 12 and cl["ref"]["accuracy"] == 1.0
    assert 2.0 < cl["gen"]["probe_is"] <= 3.0 and "not the 1000-class" in cl["note"]
    # --probe-per-class: a seeded subset per class
    r2 = json.loads(run_cli("eval-fid", data / "gen", data / "val", "--class-probe", data / "train",
                           "--probe-per-class", 4, "--inception", extractor, "--num-workers", 0, "--json").stdout)
    assert r2["classes"]["probe"]["train_images"] == 12 and r2["fid"] == pytest.approx(r["fid"])
    out = run_cli("eval-fid", data / "gen", data / "val", "--class-probe", data / "train",
                 "--inception", extractor, "--num-workers", 0).stdout
    assert "class accuracy  GEN 75.0% of 12 labelled  REF 100.0%" in out


def test_folder_labels_when_there_is_no_metadata(data, extractor):
    """val/ as GEN: no metadata, the folder names are the classes (as upscale --class-from-folders)."""
    r = json.loads(run_cli("eval-fid", data / "val", data / "gen", "--class-probe", data / "train",
                          "--inception", extractor, "--num-workers", 0, "--json").stdout)
    assert r["classes"]["gen"]["accuracy"] == 1.0 and r["classes"]["gen"]["labelled"] == 12
    assert r["classes"]["ref"]["labelled"] == 0 and r["classes"]["ref"]["accuracy"] is None  # gen/ has no folders


@pytest.mark.parametrize("extra, fragment", [
    (["--class-probe", "{gen}"], "needs one subfolder per class"),
    (["--class-probe", "{root}/nowhere"], "not a folder"),
    (["--probe-per-class", "3"], "--probe-per-class needs --class-probe"),
    (["--class-probe", "{train}", "--probe-per-class", "0"], "--probe-per-class must be at least 1"),
])
def test_bad_input_is_one_line(data, extractor, extra, fragment):
    extra = [a.format(gen=data / "gen", root=data, train=data / "train") for a in extra]
    res = run_cli("eval-fid", data / "gen", data / "val", "--inception", extractor, "--num-workers", 0, *extra, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], res.stderr
    assert res.stdout == ""
