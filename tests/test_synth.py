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
from davae_cli.synth import read_prompt_list, tar_end, tar_member, whole_samples
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
    # SIGKILLed inside shard 1, after its first batch: shard 0 whole, that batch kept in shard 1's partial file
    cut = tmp_path / "cut"
    k = _synth(prompts, cut, env={"DAVAE_KILL_IN_SHARD": "1"}, check=False)
    assert k.returncode == -9 or k.returncode == 137
    assert sorted(p.name for p in cut.iterdir() if p.name != ".lock") == [
        ".synth-000001.tar.partial", "synth-000000.tar", "synth.json"]
    assert len(whole_samples(cut / ".synth-000001.tar.partial", 2, 2, "png")) - 1 == 1  # sample 2: not lost
    first = (cut / "synth-000000.tar").stat().st_mtime_ns
    r = _synth(prompts, cut, "--json")
    rep = json.loads(r.stdout)
    assert rep["shards_written"] == 2 and rep["shards_skipped"] == 1 and rep["images_resumed"] == 1
    assert rep["images"] == 2  # samples 3 and 4: nothing rendered twice
    assert (cut / "synth-000000.tar").stat().st_mtime_ns == first  # not rewritten
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in full.iterdir())  # no duplicate, no temp
    for tar in full.glob("*.tar"):  # the same bytes: a shard is a function of its prompts and the settings
        assert (cut / tar.name).read_bytes() == tar.read_bytes(), tar.name
    # other settings into the same folder: one line
    r = _synth(prompts, cut, "--seed", "7", check=False)
    assert r.returncode == 1 and "other settings (seed)" in r.stderr and "Traceback" not in r.stderr


def test_an_interrupted_shard_keeps_its_whole_batches_and_resumes_to_the_same_bytes(tmp_path, prompts, monkeypatch):
    """An exception after the first batch (as a crash would): the batch is in the partial shard; a torn write after
    it (a kill during a write) is cut off; the rerun renders only what is missing, into the bytes of a run never
    interrupted."""
    import davae_cli.synth as synth_mod

    ref = tmp_path / "ref"
    _synth(prompts, ref, "--shard-size", "4", "--batch-size", "2")
    real, seen = synth_mod.sample_batch, []

    def failing(model, gs, cond_fn, batch, *a, **k):
        if seen:
            raise RuntimeError("the node went away")
        seen.append([j.index for j in batch])
        return real(model, gs, cond_fn, batch, *a, **k)

    monkeypatch.setattr(synth_mod, "sample_batch", failing)
    cut = tmp_path / "cut"
    r = _synth(prompts, cut, "--shard-size", "4", "--batch-size", "2", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [x for x in r.stderr.splitlines() if "Error" in x] == [
        "Error: RuntimeError: the node went away (rerun with --debug for the traceback)"]
    part = cut / ".synth-000000.tar.partial"
    assert seen == [[0, 1]] and len(whole_samples(part, 0, 4, "png")) - 1 == 2  # the finished batch is on disk
    with open(part, "ab") as f:  # a kill in the middle of the next batch's write
        f.write(tar_member("000000002.png", b"\x89PNG" * 300)[:900])
    def counting(model, gs, cond_fn, batch, *a, **k):
        seen.append([j.index for j in batch])
        return real(model, gs, cond_fn, batch, *a, **k)

    monkeypatch.setattr(synth_mod, "sample_batch", counting)
    rep = json.loads(_synth(prompts, cut, "--shard-size", "4", "--batch-size", "2", "--json").stdout)
    assert seen[1:] == [[2, 3], [4]] and rep["images"] == 3 and rep["images_resumed"] == 2
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in ref.iterdir())
    for tar in ref.glob("*.tar"):
        assert (cut / tar.name).read_bytes() == tar.read_bytes(), tar.name


def test_another_prompt_list_or_setting_is_refused_in_one_line(tmp_path, prompts):
    out = tmp_path / "out"
    _synth(prompts, out, "--limit", "2")
    other = tmp_path / "other.txt"  # the same length, other prompts
    other.write_text("a red cube\na yellow sphere\n")
    r = _synth(other, out, check=False)
    errors = [x for x in r.stderr.splitlines() if x.startswith("Error")]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(errors) == 1
    saved = json.loads((out / "synth.json").read_text())
    assert saved["prompts"] == 2 and len(saved["prompts_sha256"]) == 64 and len(saved["settings_sha256"]) == 64
    assert "another prompt list" in errors[0] and saved["prompts_sha256"][:12] in errors[0]
    for args, what in [(("--set", "dit.max_sequence_length=16"), "max_sequence_length"),
                       (("--format", "jpg"), "format, quality")]:
        r = _synth(prompts, out, "--limit", "2", *args, check=False)
        errors = [x for x in r.stderr.splitlines() if x.startswith("Error")]
        assert r.returncode == 1 and len(errors) == 1 and f"other settings ({what})" in errors[0], r.stderr
    r = _synth(prompts, out, "--limit", "2", "--json")  # the same list and settings: nothing to do
    assert json.loads(r.stdout)["images"] == 0


def test_a_manifest_of_an_earlier_davae_is_checked_against_its_shards_and_upgraded(tmp_path, prompts):
    out = tmp_path / "out"
    _synth(prompts, out, "--limit", "2")
    new = json.loads((out / "synth.json").read_text())
    legacy = {k: new[k] for k in ("prompts", "shard_size", "seed", "res", "steps", "guidance", "sampler", "shift",
                                  "negative_prompt", "format", "model")}
    other = tmp_path / "other.txt"
    other.write_text("a red cube\na yellow sphere\n")
    (out / "synth.json").write_text(json.dumps(legacy))
    r = _synth(other, out, check=False)
    assert r.returncode == 1 and "another prompt list (sample 1 of synth-000000.tar has another prompt)" in r.stderr
    r = _synth(prompts, out, "--limit", "2")
    assert "written by an earlier davae; the prompts in its shards match this list" in r.stderr
    assert json.loads((out / "synth.json").read_text()) == new


def test_tar_members_written_one_by_one_are_the_bytes_tarfile_writes(tmp_path):
    import io

    members = [("000000007.png", b"x" * 1000), ("000000007.txt", b"a cat"), ("000000007.json", b"{}" * 700)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            t.addfile(info, io.BytesIO(data))
    body = b"".join(tar_member(n, d) for n, d in members)
    assert body + tar_end(len(body)) == buf.getvalue()
    part = tmp_path / "p"
    part.write_bytes(body[:-100])  # the last member torn
    assert whole_samples(part, 7, 1, "png") == [0]
    part.write_bytes(body)
    assert whole_samples(part, 7, 1, "png") == [0, len(body)]


def test_two_processes_split_the_shards_and_write_the_same_bytes(tmp_path, prompts):
    one = tmp_path / "one"
    _synth(prompts, one)
    two = tmp_path / "two"
    args = ["synth", "--preset", "tiny", "--random-weights", "--prompts", prompts, "--res", "64", "--shard-size", "2",
            "--sampling-steps", "4", "--out", two, "--json", *TINY]
    from test_streams import launch2

    res = subprocess.run([sys.executable, *launch2(), *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    reports = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]  # one per process
    assert sorted(r["shards_written"] for r in reports) == [1, 2] and sum(r["images"] for r in reports) == 5
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
