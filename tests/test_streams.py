"""Streamed training data (WebDataset shards, parquet): the global order rule (every sample once per epoch, in one
and two real processes), exact resume (one and two processes), shards against the same images in a folder, and
one-line errors for bad streams."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from davae_cli import DavaeError, load_preset
from davae_cli.data import StepCropDataset, StepSampler, list_images
from davae_cli.streams import (Fields, Position, ShardStream, expand_braces, is_stream, list_shards, read_shard,
                               resume_position)
from davae_cli.train.loop import latest_checkpoint
from conftest import run_cli, write_preset
from stream_worker import color_shards, sample_ids

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
# the shipped two-CPU-process config (torchrun + gloo), as the README tells users to run it: launch2()
def launch2() -> list[str]:
    """`accelerate launch` with the two-CPU-process config, on a free rendezvous port (two such tests may run at
    once under pytest-xdist; both on the default port 29500 would collide)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu-2proc.yaml"),
            "--main_process_port", str(port), "-m", "davae_cli"]


def write_shard(path: Path, files: list, captions: bool = True, labels: bool = False) -> Path:
    """A WebDataset tar: per image `<stem>.png` (its bytes as stored), `<stem>.txt`, `<stem>.cls`."""
    with tarfile.open(path, "w") as t:
        for i, f in enumerate(files):
            stem = Path(f).stem
            parts = [(Path(f).suffix.lstrip("."), Path(f).read_bytes())]
            if captions:
                parts.append(("txt", f"a photo of {stem}".encode()))
            if labels:
                parts.append(("cls", str(i % 3).encode()))
            for ext, data in parts:
                ti = tarfile.TarInfo(f"{stem}.{ext}")
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path, images_dir):
    """The readable images of `images_dir` (sorted as a folder lists them) as one-image shards and as three
    shards of three, two and three images."""
    items = list_images([images_dir]).items
    one, multi = tmp_path / "one", tmp_path / "multi"
    one.mkdir()
    multi.mkdir()
    for i, f in enumerate(items):
        write_shard(one / f"s-{i:03d}.tar", [f])
    for k, (a, b) in enumerate([(0, 3), (3, 5), (5, 8)]):
        write_shard(multi / f"s-{k:03d}.tar", items[a:b])
    return {"items": items, "one": one, "multi": multi}


def test_brace_patterns():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}/s{0..1}.tar") == ["x/s0.tar", "x/s1.tar", "y/s0.tar", "y/s1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_what_counts_as_a_stream(tmp_path, shards, images_dir):
    assert is_stream(str(shards["multi"])) and is_stream(str(shards["multi"] / "s-000.tar"))
    assert is_stream(str(shards["multi"]) + "/s-{000..002}.tar") and is_stream("https://host/a.tar")
    assert is_stream(str(shards["multi"] / "*.tar"))
    assert not is_stream(str(images_dir))
    assert [Path(s.url).name for s in list_shards([str(shards["multi"]) + "/s-{000..001}.tar"])] == \
        ["s-000.tar", "s-001.tar"]
    for bad, why in [(str(tmp_path / "none-*.tar"), "no shards match"), (str(tmp_path / "s-{0..1}.tar"), "not found")]:
        with pytest.raises(DavaeError, match=why):
            list_shards([bad])


def test_records_carry_image_bytes_caption_and_label(shards):
    recs = list(read_shard(list_shards([str(shards["multi"] / "s-000.tar")])[0]))
    assert [r.key for r in recs] == [Path(f).stem for f in shards["items"][:3]]
    assert recs[0].image == Path(shards["items"][0]).read_bytes() and recs[0].caption.startswith("a photo of")


def _global_ids(root: Path, world: int, batch: int, steps: int, **kw) -> tuple[list[int], list[ShardStream]]:
    """The sample ids of `steps` training steps of `world` processes (in this process), in the global order:
    by step, then process, then place in the batch."""
    sh = list_shards([str(root)])
    streams = [ShardStream(sh, crop=4, seed=5, rank=r, world=world, **kw) for r in range(world)]
    per = []
    for s in streams:
        it = s.batches(batch)
        per.append([sample_ids(next(it)[0]) for _ in range(steps)])
    return [i for step in range(steps) for r in range(world) for i in per[r][step]], streams


def _epochs(ids: list[int], n: int) -> list[list[int]]:
    """The whole epochs of a global sequence of sample ids over `n` samples."""
    return [ids[e * n:(e + 1) * n] for e in range(len(ids) // n)]


def test_every_sample_once_per_epoch_whatever_the_shard_sizes(tmp_path):
    """However many shards of whatever sizes (fewer shards than processes too), the processes' batches, taken
    step by step, read every sample exactly once per epoch, in a new order each epoch."""
    for k, (sizes, world, batch) in enumerate([([5, 3, 1], 2, 2), ([4, 1, 2, 6], 3, 3), ([2, 2], 2, 3),
                                               ([3], 2, 1), ([1, 1], 3, 2)]):
        n = sum(sizes)
        ids, _ = _global_ids(color_shards(tmp_path / f"c{k}", sizes), world, batch, -(-3 * n // (world * batch)))
        epochs = _epochs(ids, n)
        assert len(epochs) == 3 and all(sorted(e) == list(range(n)) for e in epochs), (sizes, world, batch, ids)
        assert n < 4 or len({tuple(e) for e in epochs}) > 1, (sizes, ids)  # shuffled anew per epoch


def test_one_image_shards_give_the_folders_crops_with_two_processes(shards, images_dir):
    """The folder loader's rule (step s, process r: global samples (s*W + r)*B ...) is the stream's: the same
    crops, process by process, from one-image shards as from the folder."""
    folder = StepCropDataset(list_images([images_dir]), crop=16, seed=3, length=1000)
    for rank in range(2):
        stream = ShardStream(list_shards([str(shards["one"])]), crop=16, seed=3, rank=rank, world=2).batches(3)
        want = [folder[n] for n in StepSampler(0, 6, 3, rank, 2)]
        got = [x for _ in range(6) for x in next(stream)[0]]
        assert len(got) == len(want) == 18 and all(torch.equal(a, b) for a, b in zip(got, want)), rank


def test_positions_resume_each_process_mid_shard(shards):
    """A stream restarted at a stored position (inside a shard, inside an epoch) continues with the same crops
    and positions, for each of two processes."""
    sh = list_shards([str(shards["multi"])])
    for rank in range(2):
        s = ShardStream(sh, crop=16, seed=3, rank=rank, world=2)
        it = s.batches(2)
        full = [next(it) for _ in range(7)]
        # after step s, process r has passed global samples up to (s*W + r + 1)*B: all processes in step
        assert [p.counter for _, p in full] == [(step * 2 + rank + 1) * 2 for step in range(7)]
        inside = [i for i, (_, p) in enumerate(full[:5])
                  if 0 < p.sample < len(s.shard_order(s.epoch_shards(p.epoch)[p.shard], p.epoch))]
        rest = s.batches(2, full[inside[0]][1])
        for x, pos in full[inside[0] + 1:]:
            y, pos2 = next(rest)
            assert torch.equal(x, y) and pos == pos2


def test_an_unreadable_image_is_replaced_by_the_next_sample_and_processes_stay_in_step(tmp_path):
    """Sample 1 holds no image: its place is taken by the next decodable sample (2, unshuffled), counted once per
    epoch by the process that met it; the other process and the epochs are untouched. A stream without one
    decodable image is one line."""
    root = color_shards(tmp_path / "c", [3, 1], broken=(1,))
    ids, streams = _global_ids(root, 2, 1, 8, shuffle_within_shard=False)
    assert [sorted(e) for e in _epochs(ids, 4)] == [[0, 2, 2, 3]] * 4, ids
    assert sum(s.read_failures for s in streams) == 4
    with pytest.raises(DavaeError, match="none of the training images can be decoded"):
        next(ShardStream(list_shards([str(color_shards(tmp_path / "bad", [2], broken=(0, 1)))]), crop=4,
                         seed=0).batches(1))


_LEFT_AT_EXIT = """
import atexit, sys, threading
import datasets  # noqa: F401 - threads of its own, if any, are not the stream's
from davae_cli.streams import ShardStream, list_shards
before = set(threading.enumerate())
atexit.register(lambda: print("left:", [t.name for t in threading.enumerate()
                                       if t not in before and t.is_alive() and t.name != "tqdm_monitor"]))
it = ShardStream(list_shards([sys.argv[1]]), crop=4, seed=0).batches(1)
next(it)  # and exit, the stream still open and its thread reading ahead
"""


def test_no_stream_thread_outlives_its_stream_or_the_interpreter(tmp_path):
    """A stream's read-ahead thread is joined when the stream is closed, and before the interpreter finalizes
    when it never was (a thread torn down by finalization inside datasets/pyarrow's C++ aborts the process:
    SIGABRT after a run that succeeded)."""
    import subprocess
    import sys
    import threading

    root = color_shards(tmp_path / "c", [40, 40])
    before = set(threading.enumerate())
    it = ShardStream(list_shards([str(root)]), crop=4, seed=0).batches(1)
    next(it)
    it.close()
    assert [t.name for t in threading.enumerate() if t not in before and t.name != "tqdm_monitor"] == []
    res = subprocess.run([sys.executable, "-c", _LEFT_AT_EXIT, str(root)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "left: []", (res.stdout, res.stderr[-2000:])


def test_resume_position_needs_the_same_number_of_processes(tmp_path):
    assert resume_position(None, None, 0, 2) == Position()
    with pytest.raises(DavaeError, match="with 2 process"):
        resume_position([{"epoch": 0, "shard": 0, "sample": 0, "counter": 0}] * 2, tmp_path, 0, 1)
    with pytest.raises(DavaeError, match="image folder"):
        resume_position(None, tmp_path / "step-1", 0, 1)
    # positions of a checkpoint written before the global order: one process read the same sequence, two did not
    old = {"epoch": 1, "shard": 2, "sample": 3, "taken": 9}
    assert resume_position([old], tmp_path / "step-1", 0, 1) == Position(1, 2, 3, 9)
    with pytest.raises(DavaeError, match="restart the run"):
        resume_position([old, old], tmp_path / "step-1", 1, 2)


def _model_state(run: Path) -> dict:
    return torch.load(latest_checkpoint(run) / "state.pt", map_location="cpu", weights_only=False)


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _model_state(a)["model"], _model_state(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_one_image_shards_train_exactly_as_the_folder(tmp_path, shards, images_dir, tae_base):
    """The order rule with one image per shard is the folder's: same crops, same weights (bit for bit)."""
    from davae_cli.train.vae import train_vae

    preset = load_preset(str(write_preset(tmp_path / "p.yaml", tae_base, "residual")), ["train_vae.num_val=0"])
    train_vae(preset, [str(images_dir)], tmp_path / "folder")
    train_vae(preset, [str(shards["one"])], tmp_path / "shards")
    _assert_same_weights(tmp_path / "folder", tmp_path / "shards")
    assert _model_state(tmp_path / "shards")["data_positions"] == [{"epoch": 0, "shard": 7, "sample": 1, "counter": 8}]


def test_kill_mid_shard_and_resume_gives_identical_weights(tmp_path, shards, tae_base):
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual")
    common = ["train-vae", "--preset", preset, "--data", shards["multi"]]
    run_cli(*common, "--out", tmp_path / "full")
    cut = run_cli(*common, "--out", tmp_path / "cut", env={"DAVAE_KILL_AFTER_STEP": "2"}, check=False)
    assert cut.returncode == 137
    mid = _model_state(tmp_path / "cut")["data_positions"][0]
    assert 0 < mid["sample"]  # stopped inside a shard
    run_cli(*common, "--out", tmp_path / "cut", "--resume")
    _assert_same_weights(tmp_path / "full", tmp_path / "cut")
    assert _model_state(tmp_path / "full")["data_positions"] == _model_state(tmp_path / "cut")["data_positions"]


def _launch2(*args, env=None, check=True, script=None):
    """`davae ARGS` (or `python SCRIPT ARGS`) in two CPU processes under `accelerate launch`."""
    import subprocess
    import sys

    cmd = launch2() if script is None else [*launch2()[:-2], str(script)]
    res = subprocess.run([sys.executable, *cmd, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(res.stderr[-3000:])
    return res


def test_two_launched_processes_read_every_sample_once_per_epoch(tmp_path):
    """Shards of 5, 3 and 1 samples read by two processes of a real `accelerate launch` (gloo): the 36 crops of
    9 steps of 2 + 2 are 4 epochs, each of them every sample exactly once."""
    root = color_shards(tmp_path / "c", [5, 3, 1])
    _launch2(root, tmp_path, "--steps", 9, "--batch", 2, script=Path(__file__).with_name("stream_worker.py"))
    runs = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in runs] == [2, 2]
    ids = [i for step in range(9) for r in range(2) for i in runs[r]["ids"][step]]
    assert [sorted(e) for e in _epochs(ids, 9)] == [list(range(9))] * 4, ids


def test_two_processes_kill_and_resume_give_identical_weights(tmp_path, shards, tae_base):
    """accelerate with two CPU processes (gloo): each keeps its own place in the stream; SIGKILL after step 2 and
    --resume give the uninterrupted run's weights; resuming with one process is refused in one line."""
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual")
    common = ["train-vae", "--preset", preset, "--data", shards["multi"], "--set", "train_vae.num_val=0"]
    _launch2(*common, "--out", tmp_path / "full")
    full = _model_state(tmp_path / "full")
    assert len(full["data_positions"]) == 2 and full["data_positions"][0] != full["data_positions"][1]
    _launch2(*common, "--out", tmp_path / "cut", env={"DAVAE_KILL_AFTER_STEP": "2"}, check=False)
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000002"
    one = run_cli(*common, "--out", tmp_path / "cut", "--resume", check=False)
    assert one.returncode == 1 and "with 2 process(es)" in one.stderr and "Traceback" not in one.stderr
    _launch2(*common, "--out", tmp_path / "cut", "--resume")
    _assert_same_weights(tmp_path / "full", tmp_path / "cut")


def test_davae_shuts_the_process_group_down_after_a_command_that_succeeded(tmp_path, monkeypatch):
    """`davae`'s main() destroys the process group after a command that succeeded (left to interpreter exit,
    gloo's threads can abort the finished process), and keeps it after one that failed (another process may
    still be inside a collective)."""
    import sys

    import torch.distributed as dist

    from davae_cli.cli.app import main

    try:
        for k, (argv, ok) in enumerate([(["presets"], True), (["presets", "--no-such-option"], False)]):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'pg{k}'}", rank=0, world_size=1)
            monkeypatch.setattr(sys, "argv", ["davae", *argv])
            with pytest.raises(SystemExit) as done:
                main()
            assert (done.value.code in (0, None)) == ok and dist.is_initialized() != ok, argv
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_bad_streams_are_one_line_and_write_nothing(tmp_path, shards, tae_base, images_dir):
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual")
    no_images = tmp_path / "noimg"
    no_images.mkdir()
    with tarfile.open(no_images / "s-000.tar", "w") as t:
        ti = tarfile.TarInfo("a.txt")
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"abc"))
    cases = [
        (str(tmp_path / "empty-{000..003}.tar"), "not found"),
        (str(tmp_path / "none-*.tar"), "no shards match"),
        (str(no_images), "has no image"),
        ("http://127.0.0.1:9/shard-000.tar", "cannot read this shard"),
    ]
    from davae_cli.train.vae import train_vae

    for i, (spec, why) in enumerate(cases):  # in-process (the CLI's rendering of the same error is checked once)
        out = tmp_path / f"run{i}"
        with pytest.raises(DavaeError, match=why):
            train_vae(load_preset(str(preset)), [spec], out)
        assert not out.exists()
    r = run_cli("train-vae", "--preset", preset, "--data", cases[-1][0], "--out", tmp_path / "cli", check=False)
    assert r.returncode == 1 and "cannot read this shard" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "cli").exists()


def test_adapt_dit_on_shards_equals_the_folder_and_needs_captions(tmp_path, images_dir, shards):
    """Multi-image shards with .txt captions and the same images with sidecar .txt files in a folder: the same
    latents, records and trained weights. Shards without captions: one line, nothing written."""
    from safetensors.torch import load_file

    from test_adapt_dit import TINY

    vae = tmp_path / "vae"
    run_cli("train-vae", "--preset", "tiny", *sum((["--set", s] for s in TINY), []), "--steps", "0", "--out", vae)
    folder = tmp_path / "capfolder"
    folder.mkdir()
    for f in shards["items"]:
        (folder / Path(f).name).write_bytes(Path(f).read_bytes())
        (folder / f"{Path(f).stem}.txt").write_text(f"a photo of {Path(f).stem}")
    flat = sorted(folder.glob("*.png"))
    cap = tmp_path / "capshards"
    cap.mkdir()
    for k, (a, b) in enumerate([(0, 3), (3, 5), (5, 8)]):
        write_shard(cap / f"s-{k:03d}.tar", flat[a:b])
    args = ["adapt-dit", "--preset", "tiny", "--vae", vae / "final", "--steps", "3",
            *sum((["--set", s] for s in TINY + ["data.latent_shard_size=2"]), [])]
    run_cli(*args, "--data", folder, "--out", tmp_path / "af")
    run_cli(*args, "--data", cap, "--out", tmp_path / "as")
    recs_f = [json.loads(x) for x in (tmp_path / "af" / "cache" / "index.jsonl").read_text().splitlines()]
    recs_s = [json.loads(x) for x in (tmp_path / "as" / "cache" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs_f] == [r["prompt"] for r in recs_s]
    assert recs_s[2]["latent"].endswith("000000-001.safetensors#0")  # 3 latents in parts of 2
    a = load_file(tmp_path / "af" / "final" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "as" / "final" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bare = tmp_path / "bare"
    bare.mkdir()
    write_shard(bare / "s-000.tar", flat[:2], captions=False)
    r = run_cli(*args, "--data", bare, "--out", tmp_path / "ab", check=False)
    assert r.returncode == 1 and "has no caption" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ab").exists()


def test_parquet_files_are_shards(tmp_path, shards):
    """A parquet file with an image column (bytes) and a caption column reads as the tar shards do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = shards["items"][:3]
    table = pa.table({"image": [{"bytes": Path(f).read_bytes(), "path": None} for f in items],
                      "caption": [f"a photo of {Path(f).stem}" for f in items]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    recs = list(read_shard(list_shards([str(tmp_path / "part-0.parquet")])[0]))
    assert [r.image for r in recs] == [Path(f).read_bytes() for f in items]
    assert [r.caption for r in recs] == [f"a photo of {Path(f).stem}" for f in items]
    with pytest.raises(DavaeError, match="no image"):
        list(read_shard(list_shards([str(tmp_path / "part-0.parquet")])[0], Fields(image="jpg")))


def test_the_shipped_accelerate_configs_load():
    """configs/accelerate/*.yaml parse with accelerate's own loader and say what their names say."""
    from accelerate.commands.config.config_args import load_config_from_file

    got = {p.stem: load_config_from_file(str(p)) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert set(got) == {"cpu-2proc", "one-node-8gpu", "two-nodes-16gpu"}
    assert (got["one-node-8gpu"].num_processes, got["one-node-8gpu"].num_machines) == (8, 1)
    assert (got["two-nodes-16gpu"].num_processes, got["two-nodes-16gpu"].num_machines) == (16, 2)
    assert got["cpu-2proc"].num_processes == 2


def test_a_saved_dataset_folder_is_shards(tmp_path, shards):
    """`datasets.Dataset.save_to_disk` output: its .arrow files are the shards, images and captions as written."""
    import datasets

    items = shards["items"][:4]
    ds = datasets.Dataset.from_dict({"image": items, "caption": [f"c{i}" for i in range(4)]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    assert is_stream(str(tmp_path / "saved"))
    sh = list_shards([str(tmp_path / "saved")])
    assert [s.kind for s in sh] == ["arrow", "arrow"]
    recs = [r for s in sh for r in read_shard(s)]
    assert [r.caption for r in recs] == ["c0", "c1", "c2", "c3"]
    assert [r.image for r in recs] == [Path(f).read_bytes() for f in items]
