"""train-vae's base cache kept on disk (issue 38, item 9): a resume reads the frozen base's outputs instead of
recomputing them, and the cache is keyed by what they depend on (the base VAE, the base-side settings, each image)."""

import os

import torch

from conftest import run_cli, write_preset


def test_a_resume_reads_the_base_cache_and_a_changed_image_recomputes_it(tmp_path, images_dir, tae_base, monkeypatch):
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual", train_vae__steps=2, train_vae__num_val=0,
                          train_vae__cache_base=True, train_vae__checkpoint_every=1)
    run_dir = tmp_path / "run"
    common = ["train-vae", "--preset", preset, "--data", images_dir, "--out", run_dir]
    first = run_cli(*common)
    assert "cached the frozen base's outputs" in first.stderr
    files = list((run_dir / "cache").glob("base-*.pt"))
    assert len(files) == 1
    cached = torch.load(files[0], weights_only=True)
    assert len(cached) > 0 and all(len(item) == 3 for item in cached)  # (x, baseline, z_base) per image

    import davae_cli.train.vae as tv

    def never(*a, **k):
        raise AssertionError("the base cache was recomputed")

    monkeypatch.setattr(tv, "_compute_base_cache", never)
    more = run_cli(*common, "--resume", "--steps", "3")
    assert "read the frozen base's outputs" in more.stderr and "DA-VAE written to" in more.stdout
    monkeypatch.undo()

    # an image changed on disk: another key, the cache made again beside the old one
    img = sorted(p for p in images_dir.rglob("*") if p.is_file() and "broken" not in p.name)[0]
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = run_cli(*common, "--resume", "--steps", "4")
    assert "cached the frozen base's outputs" in again.stderr, again.stderr[-3000:]
    assert len(list((run_dir / "cache").glob("base-*.pt"))) == 2


def test_the_key_follows_the_base_and_the_images(tmp_path, tae_base):
    from davae_cli.config import load_preset
    from davae_cli.data import ImageSource
    from davae_cli.train.vae import base_cache_key
    from davae_cli.vae.base import load_base_vae
    from davae_cli.vae.model import DetailAlignedVAE

    preset = load_preset(write_preset(tmp_path / "p.yaml", tae_base, "residual"))
    model = DetailAlignedVAE.from_base(load_base_vae(str(tae_base)), preset.vae)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    key = base_cache_key(model, ImageSource([str(a), str(b)]))
    assert key == base_cache_key(model, ImageSource([str(a), str(b)]))
    assert key != base_cache_key(model, ImageSource([str(a)]))
    a.write_bytes(b"xx")  # another size
    assert key != base_cache_key(model, ImageSource([str(a), str(b)]))
    with torch.no_grad():
        for t in model.transform.state_dict().values():
            t.add_(1.0)
    assert base_cache_key(model, ImageSource([str(a), str(b)])) != base_cache_key(
        DetailAlignedVAE.from_base(load_base_vae(str(tae_base)), preset.vae), ImageSource([str(a), str(b)]))
