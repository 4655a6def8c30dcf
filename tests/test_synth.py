"""`davae synth`: shards with captions and generation metadata, deterministic per prompt index, resumable after
a kill without duplicates, split across processes, and read by adapt-dit as they are."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from davae_cli import DavaeError
from davae_cli.synth import read_prompt_list
from conftest import run_cli

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a cat on a mat", "a dog in the snow"]
TINY = ["--set", "vae.base_vae=random", "--set", "vae.base_vae_subfolder=null", "--set", "adapt_dit.resolution=64",
        "--set", "dit.max_sequence_length=8"]


def _synth(prompts: Path, out: Path, *extra, env=None, check=True):
    return run_cli("synth", "--preset", "tiny", "--random-weights", "--prompts", prompts, "--res", "64",
                   "--shard-size", "2", "--sampling-steps", "4", "--out", out, *TINY, *extra, env=env, check=check)


@pytest.fixture
def prompts(tmp_path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n")
    return p


def _members(tar: Path) -> dict:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_shards_hold_image_caption_and_metadata_and_a_killed_run_resumes_without_duplicates(tmp_path, prompts):
    full = tmp_path / "full"
    r = _synth(prompts, full, "--json")
    rep = json.loads(r.stdout)
    assert rep["shards"] == 3 and rep["images"] == 5 and rep["images_per_s"] > 0
    assert sorted(p.name for p in full.glob("*.tar")) == ["synth-000000.tar", "synth-000001.tar", "synth-000002.tar"]
    m = _members(full / "synth-000001.tar")
    assert sorted(m) == ["000000002.json", "000000002.png", "000000002.txt", "000000003.json", "000000003.png",
                         "000000003.txt"]
    assert m["000000003.txt"].decode() == "a cat on a mat"
    meta = json.loads(m["000000003.json"])
    assert meta["seed"] == 3 and meta["steps"] == 4 and meta["res"] == 64 and meta["model"]["weights"] == "random"
    # killed inside shard 1: shard 0 whole, nothing of shard 1 on disk
    cut = tmp_path / "cut"
    k = _synth(prompts, cut, env={"DAVAE_KILL_IN_SHARD": "1"}, check=False)
    assert k.returncode == -9 or k.returncode == 137
    assert sorted(p.name for p in cut.iterdir()) == ["synth-000000.tar", "synth.json"]
    first = (cut / "synth-000000.tar").stat().st_mtime_ns
    r = _synth(prompts, cut, "--json")
    rep = json.loads(r.stdout)
    assert rep["shards_written"] == 2 and rep["shards_skipped"] == 1 and rep["images"] == 3
    assert (cut / "synth-000000.tar").stat().st_mtime_ns == first  # not rewritten
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in full.iterdir())  # no duplicate, no temp
    for tar in full.glob("*.tar"):  # the same bytes: a shard is a function of its prompts and the settings
        assert (cut / tar.name).read_bytes() == tar.read_bytes(), tar.name
    # other settings into the same folder: one line
    r = _synth(prompts, cut, "--seed", "7", check=False)
    assert r.returncode == 1 and "other settings (seed)" in r.stderr and "Traceback" not in r.stderr


def test_two_processes_split_the_shards_and_write_the_same_bytes(tmp_path, prompts):
    one = tmp_path / "one"
    _synth(prompts, one)
    two = tmp_path / "two"
    args = ["synth", "--preset", "tiny", "--random-weights", "--prompts", prompts, "--res", "64", "--shard-size", "2",
            "--sampling-steps", "4", "--out", two, *TINY]
    from test_streams import launch2

    res = subprocess.run([sys.executable, *launch2(), *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    for tar in one.glob("*.tar"):
        assert (two / tar.name).read_bytes() == tar.read_bytes(), tar.name


def test_adapt_dit_reads_the_shards_directly(tmp_path, prompts):
    out = tmp_path / "synth"
    _synth(prompts, out)
    vae = tmp_path / "vae"
    run_cli("train-vae", "--preset", "tiny", *TINY, "--steps", "0", "--out", vae)
    run_cli("adapt-dit", "--preset", "tiny", "--vae", vae / "final", "--data", out, "--steps", "2", *TINY,
            "--set", "adapt_dit.batch_size=2", "--out", tmp_path / "dit")
    recs = [json.loads(x) for x in (tmp_path / "dit" / "cache" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs] == PROMPTS
    assert (tmp_path / "dit" / "final").is_dir()


def test_prompt_lists_and_bad_input(tmp_path, prompts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert read_prompt_list(prompts) == PROMPTS
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"caption": "one"}\n{"caption": "two"}\n')
    assert read_prompt_list(jl) == ["one", "two"]
    pq.write_table(pa.table({"text": ["x", None, "y"]}), tmp_path / "p.parquet")
    assert read_prompt_list(tmp_path / "p.parquet") == ["x", "y"]
    with pytest.raises(DavaeError, match="no prompt / caption / text column"):
        pq.write_table(pa.table({"other": ["x"]}), tmp_path / "q.parquet")
        read_prompt_list(tmp_path / "q.parquet")
    for args, why in [(["--prompts", tmp_path / "missing.txt"], "file not found"),
                      (["--prompts", prompts, "--format", "gif"], "choose png, jpg or webp"),
                      (["--prompts", prompts, "--preset", "tiny-imagenet"], "text-to-image pipeline")]:
        base = ["synth", "--random-weights", "--res", "64", "--out", tmp_path / "o"]
        if "--preset" not in args:
            base += ["--preset", "tiny"]
        r = run_cli(*base, *args, check=False)
        assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
