"""Training images read as streams: WebDataset tar shards, parquet files and saved Hugging Face datasets.

Every format is read through Hugging Face `datasets` (its packaged `webdataset`, `parquet` and `arrow`
builders in streaming mode, one shard at a time): nothing is copied to local disk, local paths and remote
URLs (`https://`, `s3://`, ... through fsspec) work alike, and no tar or parquet reader is written here.

`--data` names a stream when it is a URL, a `.tar`/`.parquet` file, a brace pattern or glob of them
(`shards/train-{000000..000099}.tar`), a folder holding `.tar` or `.parquet` files, or a folder written
by `datasets.Dataset.save_to_disk` (its `.arrow` files). Anything else is a folder of image files (`data.py`).

The order: one global sequence, dealt to the processes (exact and resumable; the folder loader's rule):
- epoch e visits the shards (sorted by name) in a permutation seeded by (seed, e), each shard's samples (held-out
  keys dropped) in a permutation seeded by (seed, e, shard) (`shuffle_within_shard`; a shard's samples are read
  into memory as encoded bytes, so keep shards to a few hundred MB); the epochs, one after another, are the
  global sequence, whose n-th sample is global sample n;
- the sequence is dealt in blocks of `batch_size` consecutive samples, round robin: process r of W takes the
  blocks r, r + W, r + 2W, ..., so training step s reads global samples s*W*B .. (s+1)*W*B - 1 and every sample
  is read once per epoch by exactly one process, whatever the number and sizes of the shards (one shard for
  eight processes works), with all processes in step. Every process reads every shard's bytes (shards are not
  split by size beforehand, so no index of them is needed, remote or local) and decodes only its own samples;
- global sample n is cropped with the generator seeded as in `data.py` (seed, n); an image that cannot be
  decoded is counted and its place taken by the next decodable sample after it in the sequence.
A folder of N images is this rule with N one-image shards, so one-image shards train exactly as the folder,
with any number of processes. The position (epoch, shard, sample, counter) rides with every batch and is stored
per process in each checkpoint, so `--resume` after a kill continues bit for bit (with the same number of
processes and batch size).
"""

from __future__ import annotations

import atexit
import glob
import io
import json
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from . import data as D
from .errors import DavaeError, first_line

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image", "img")
CAPTION_KEYS = ("txt", "caption", "prompt", "text")
LABEL_KEYS = ("cls", "label", "class")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
PREFETCH_THREAD = "davae-stream-prefetch"


def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace patterns, left to right: `{000..012}` (zero-padded to the first bound's width)
    and `{a,b}`, repeated; a pattern without braces is itself."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = _RANGE.fullmatch(m.group(0))
    if r:
        width = len(r.group(1))
        alts = [str(v).zfill(width) for v in range(int(r.group(1)), int(r.group(2)) + 1)]
    elif "," in body:
        alts = body.split(",")
    else:
        return [head + m.group(0) + t for t in expand_braces(tail)]
    return [head + a + t for a in alts for t in expand_braces(tail)]


def _kind(name: str) -> Optional[str]:
    low = name.lower().split("?")[0]
    for ext, kind in ((".tar", "webdataset"), (".tar.gz", "webdataset"), (".tgz", "webdataset"),
                      (".parquet", "parquet"), (".arrow", "arrow")):
        if low.endswith(ext):
            return kind
    return None


def is_stream(spec: str) -> bool:
    """Whether a --data entry names a stream (see the module doc) rather than a folder of image files."""
    s = str(spec)
    if _URL.match(s) or _kind(s) or "{" in s:
        return True
    p = Path(s).expanduser()
    if any(c in s for c in "*?[") and not p.exists():
        return any(_kind(f) for f in glob.glob(s))
    if p.is_dir():
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
            return True
        return any(_kind(f.name) for f in p.iterdir() if f.is_file())
    return False


@dataclass(frozen=True)
class Shard:
    url: str
    kind: str  # webdataset | parquet | arrow


def list_shards(specs: list[str]) -> list[Shard]:
    """The shards named by the --data entries, sorted by name within each entry. One-line errors for a
    pattern that matches nothing or a folder without shards."""
    out: list[Shard] = []
    for spec in map(str, specs):
        urls: list[str] = []
        for pat in expand_braces(spec):
            p = Path(pat).expanduser()
            if _URL.match(pat):
                urls.append(pat)
            elif p.is_dir():
                urls += sorted(str(f) for f in p.iterdir() if f.is_file() and _kind(f.name))
            elif any(c in pat for c in "*?["):
                urls += sorted(f for f in glob.glob(str(p)) if _kind(f))
            elif p.is_file():
                urls.append(str(p))
            else:
                raise DavaeError(f"{pat}: not found", param="data")
        if not urls:
            raise DavaeError(f"{spec}: no shards match (expected .tar, .parquet or .arrow files)", param="data")
        for u in urls:
            kind = _kind(u)
            if kind is None:
                raise DavaeError(f"{u}: not a shard (expected .tar, .parquet or .arrow)", param="data")
            out.append(Shard(u, kind))
    return out


@dataclass
class Sample:
    """One record of a shard: its key, the encoded image, and its caption and class label when present."""

    key: str
    image: bytes
    caption: Optional[str] = None
    label: Optional[int] = None


def _image_bytes(v) -> Optional[bytes]:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, dict) and v.get("bytes") is not None:
        return bytes(v["bytes"])
    if isinstance(v, dict) and v.get("path"):
        with open(v["path"], "rb") as f:
            return f.read()
    return None


@dataclass(frozen=True)
class Fields:
    """Which field of a record is the image, the caption and the class label (None: the usual names)."""

    image: Optional[str] = None
    caption: Optional[str] = None
    label: Optional[str] = None


def _pick(ex: dict, key: Optional[str], names: tuple) -> tuple[Optional[str], object]:
    if key is not None:
        return (key, ex[key]) if key in ex and ex[key] is not None else (None, None)
    for k in names:
        if ex.get(k) is not None:
            return k, ex[k]
    return None, None


def to_sample(ex: dict, index: int, fields: Fields, where: str) -> Sample:
    """A `datasets` record (images not decoded) -> Sample. One-line error when it has no image."""
    meta = ex.get("json")
    meta = json.loads(meta) if isinstance(meta, (str, bytes)) else meta if isinstance(meta, dict) else {}
    name, img = _pick(ex, fields.image, IMAGE_KEYS)
    data = _image_bytes(img) if name else None
    if data is None:
        looked = fields.image or ", ".join(IMAGE_KEYS)
        raise DavaeError(f"{where}: a record has no image (looked for {looked}; it has {', '.join(sorted(ex))})",
                         param="data")
    _, cap = _pick(ex, fields.caption, CAPTION_KEYS)
    if cap is None and fields.caption is None:
        cap = next((meta[k] for k in ("caption", "prompt", "text") if isinstance(meta.get(k), str)), None)
    _, lab = _pick(ex, fields.label, LABEL_KEYS)
    if lab is None and fields.label is None:
        lab = next((meta[k] for k in ("label", "class") if meta.get(k) is not None), None)
    if isinstance(cap, bytes):
        cap = cap.decode("utf-8")
    if isinstance(lab, (bytes, str)):
        lab = int(lab.decode() if isinstance(lab, bytes) else lab)
    return Sample(str(ex.get("__key__", index)), data, cap.strip() if isinstance(cap, str) else None,
                  None if lab is None else int(lab))


def read_shard(shard: Shard, fields: Fields = Fields()) -> Iterator[Sample]:
    """The records of one shard, in their stored order, images as encoded bytes (streamed by `datasets`)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(shard.kind, data_files=[shard.url], split="train", streaming=True).decode(False)
        it = iter(ds)
        i = 0
        while True:
            try:
                ex = next(it)
            except StopIteration:
                return
            yield to_sample(ex, i, fields, shard.url)
            i += 1
    except DavaeError:
        raise
    except Exception as e:  # unreachable URL, truncated tar, not a parquet file, ...
        raise DavaeError(f"{shard.url}: cannot read this shard ({first_line(e, 160)})", param="data") from None


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB, as `data.read_image` reads a file."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _try_decode(data: bytes) -> Optional[np.ndarray]:
    """`decode_image`, or None for bytes that are not a readable image (counted and replaced by the caller)."""
    try:
        return decode_image(data)
    except Exception:  # noqa: BLE001 - any decoder failure is an unreadable image
        return None


@dataclass(frozen=True)
class Position:
    """Where a process stands in the global sequence: the epoch, the index into that epoch's shard order, the
    samples of that shard passed (every process's), and the global number of the next sample."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0
    counter: int = 0


def _prefetch(gen: Iterator, depth: int) -> Iterator:
    """Run a generator in a background thread, `depth` items ahead; exceptions surface in the consumer.

    The thread is stopped and joined when the consumer is closed, and at the latest at interpreter exit (an
    `atexit` hook, which runs while the interpreter is whole): a daemon thread still reading a shard when the
    interpreter finalizes is torn down inside `datasets`/pyarrow's C++ and aborts a run that succeeded
    (SIGABRT, "terminate called without an active exception")."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in gen:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
        finally:
            gen.close()  # in this thread, so a thread pool inside `gen` is shut down here

    def halt():
        stop.set()
        t.join(timeout=120)

    t = threading.Thread(target=work, name=PREFETCH_THREAD, daemon=True)
    t.start()
    atexit.register(halt)
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        atexit.unregister(halt)
        halt()


class ShardStream:
    """Training crops from shards, in the order of the module doc, for process `rank` of `world`.

    `batches(batch_size, position)` yields (crops (B, 3, crop, crop), position after the batch).
    `exclude`: sample keys left out of training (the held-out images). Images that cannot be decoded are
    counted in `read_failures` and replaced by the next decodable sample of the sequence."""

    def __init__(self, shards: list[Shard], *, crop: int, seed: int, rank: int = 0, world: int = 1,
                 fields: Fields = Fields(), shuffle_within_shard: bool = True, num_workers: int = 0,
                 exclude: frozenset = frozenset()):
        if not shards:
            raise DavaeError("no training shards", param="data")
        self.shards, self.crop, self.seed, self.rank, self.world = shards, crop, seed, rank, world
        self.fields, self.shuffle, self.num_workers, self.exclude = fields, shuffle_within_shard, num_workers, exclude
        self.read_failures = 0

    def epoch_shards(self, epoch: int) -> list[int]:
        """The shard indices in the order epoch `epoch` visits them (the same on every process)."""
        return [int(i) for i in np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.shards))]

    def shard_order(self, index: int, epoch: int) -> list[Sample]:
        """A shard's samples (held-out keys dropped) in the order epoch `epoch` visits them."""
        url = self.shards[index].url
        recs = [s for s in read_shard(self.shards[index], self.fields) if (url, s.key) not in self.exclude]
        if self.shuffle and len(recs) > 1:
            perm = np.random.default_rng([self.seed, epoch, index, 19]).permutation(len(recs))
            recs = [recs[int(i)] for i in perm]
        return recs

    def records(self, start: Position) -> Iterator[tuple[Sample, int, Position]]:
        """(sample, its global number, position after it): the global sequence of every process, forever,
        from `start`. One-line error when an epoch holds no samples."""
        epoch, k, i, n = start.epoch, start.shard, start.sample, start.counter
        while True:
            order = self.epoch_shards(epoch)
            whole, seen = k == 0 and i == 0, 0
            while k < len(order):
                recs = self.shard_order(order[k], epoch)
                for j in range(i, len(recs)):
                    seen += 1
                    n += 1
                    yield recs[j], n - 1, Position(epoch, k, j + 1, n)
                k, i = k + 1, 0
            if whole and not seen:
                names = ", ".join(self.shards[m].url for m in order[:3])
                raise DavaeError(f"no samples in the shards ({names}{', ...' if len(order) > 3 else ''})",
                                 param="data")
            epoch, k, i = epoch + 1, 0, 0

    def owned(self, start: Position, block: int) -> Iterator[tuple[Sample, int, Position]]:
        """`records` of this process alone: the blocks of `block` consecutive global samples dealt to it."""
        for s, n, pos in self.records(start):
            if (n // block) % self.world == self.rank:
                yield s, n, pos

    def _decoded(self, start: Position, block: int) -> Iterator[tuple[Optional[np.ndarray], int, Position]]:
        recs = self.owned(start, block)
        if self.num_workers <= 0:
            for s, n, pos in recs:
                yield _try_decode(s.image), n, pos
            return
        pending: list = []
        with ThreadPoolExecutor(self.num_workers) as pool:  # PIL decodes with the GIL released
            for s, n, pos in recs:
                pending.append((pool.submit(_try_decode, s.image), n, pos))
                if len(pending) >= 4 * self.num_workers:
                    fut, m, p = pending.pop(0)
                    yield fut.result(), m, p
            for fut, m, p in pending:
                yield fut.result(), m, p

    def substitute(self, after: Position) -> np.ndarray:
        """The first decodable image after `after` in the global sequence: what takes an unreadable sample's
        place (whichever process that image belongs to). One line when a whole epoch cannot be decoded."""
        for s, _, pos in self.records(after):
            arr = _try_decode(s.image)
            if arr is not None:
                return arr
            if pos.epoch > after.epoch + 1:
                raise DavaeError("none of the training images can be decoded", param="data")
        raise AssertionError("unreachable: records() is endless")

    def batches(self, batch_size: int, start: Position = Position()) -> Iterator[tuple[torch.Tensor, Position]]:
        """(crops (B, 3, crop, crop) in [-1, 1], the position after the batch), forever."""
        batch: list[np.ndarray] = []
        for arr, n, pos in _prefetch(self._decoded(start, batch_size), 4 * batch_size):
            if arr is None:
                self.read_failures += 1
                arr = self.substitute(pos)
            rng = np.random.default_rng([self.seed, n, 11])
            batch.append(D.random_crop(arr, self.crop, rng))  # uint8 numpy: no torch work per sample
            if len(batch) == batch_size:
                # one conversion per batch, element for element `data.to_tensor`'s
                x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
                yield x, pos
                batch = []


class StreamBatches:
    """The iterator a trainer's loop takes: `next()` gives a batch; `position` is where the process stands
    after the batches taken so far (what a checkpoint stores)."""

    def __init__(self, stream: ShardStream, batch_size: int, start: Position = Position()):
        self.stream, self.position = stream, start
        self._it = stream.batches(batch_size, start)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        x, self.position = next(self._it)
        return x

    def state(self) -> dict:
        return asdict(self.position)


def first_samples(shards: list[Shard], count: int, fields: Fields = Fields()) -> list[tuple[str, str, np.ndarray]]:
    """The first `count` readable images of the shards in their stored order: (shard url, key, image)."""
    out: list[tuple[str, str, np.ndarray]] = []
    if count <= 0:
        return out
    for shard in shards:
        for s in read_shard(shard, fields):
            try:
                out.append((shard.url, s.key, decode_image(s.image)))
            except Exception:  # noqa: BLE001 - unreadable images are skipped
                continue
            if len(out) >= count:
                return out
    return out


def probe_shards(specs: list[str], fields: Fields = Fields(), conditioning: Optional[str] = None) -> list[Shard]:
    """List the shards and read the first record of the first one: a missing file, an unreachable URL, a
    shard without images, or (`conditioning` "prompt"/"class") a record without its caption/label is a
    one-line error before anything is written."""
    shards = list_shards(specs)
    first = next(iter(read_shard(shards[0], fields)), None)
    if first is None:
        raise DavaeError(f"{shards[0].url}: the shard holds no records", param="data")
    check_condition(first, conditioning, shards[0].url)
    return shards


def check_condition(sample: Sample, conditioning: Optional[str], where: str) -> None:
    """One line when a sample lacks what `conditioning` ("prompt", "class" or None) needs."""
    if conditioning == "prompt" and sample.caption is None:
        raise DavaeError(f"{where}: sample {sample.key} has no caption (a .txt, or caption/prompt/text in its .json; "
                         f"or name the field with data.caption_key)", param="data")
    if conditioning == "class" and sample.label is None:
        raise DavaeError(f"{where}: sample {sample.key} has no class label (a .cls, or label in its .json; or name "
                         f"the field with data.label_key)", param="data")


@dataclass
class StreamedImages:
    """train-vae's streamed data: the shards, how to read their records, the held-out images (in memory, or
    files of a --val-data folder) and the (shard, key) pairs held out of training."""

    shards: list[Shard]
    fields: Fields
    val: D.ImageSource
    exclude: frozenset


def streamed_training_images(data: list[str], val_data: Optional[list[str]], num_val: int, max_val: int,
                             fields: Fields, seed: int) -> StreamedImages:
    """The shards of `data`; held out: a --val-data folder (a seeded `max_val` of it) or stream (its first
    `max_val`, or `num_val`, images), else the first `num_val` images of `data` in stored order."""
    if not all(is_stream(d) for d in data):
        raise DavaeError("mixes shards and image folders; pass one kind", param="data")
    shards = probe_shards(data, fields)
    exclude: frozenset = frozenset()
    if val_data and all(is_stream(v) for v in val_data):
        held = first_samples(list_shards(val_data), max_val or num_val, fields)
        val = D.ImageSource([D.MemoryImage(f"{Path(u).stem}/{k}", a) for u, k, a in held])
    elif val_data:
        val = D.list_images(val_data).subset(max_val, seed)
    else:
        held = first_samples(shards, num_val, fields)
        val = D.ImageSource([D.MemoryImage(f"{Path(u).stem}/{k}", a) for u, k, a in held])
        exclude = frozenset((u, k) for u, k, _ in held)
    return StreamedImages(shards, fields, val, exclude)


def crops_of_stream(images: "StreamedImages", size: int, seed: int, count: int) -> Iterator[torch.Tensor]:
    """`count` training crops from a fresh single-process stream (for measuring statistics)."""
    stream = ShardStream(images.shards, crop=size, seed=seed, fields=images.fields, exclude=images.exclude)
    n = 0
    for x, _ in stream.batches(1):
        yield x[0]
        n += 1
        if n >= count:
            return


def resume_position(positions: Optional[list], ckpt_path, rank: int, world: int) -> Position:
    """This process's stream position from a checkpoint's `data_positions` (the start when there is none)."""
    if ckpt_path is None:
        return Position()
    if positions is None:
        raise DavaeError(f": checkpoint {Path(ckpt_path).name} was trained on an image folder, not on shards",
                         param="resume")
    if len(positions) != world:
        raise DavaeError(f": the run read its shards with {len(positions)} process(es); resume it with the same "
                         f"number (each process continues its own place in the stream), not {world}", param="resume")
    pos = dict(positions[rank])
    if "taken" in pos:  # written before the global order: one process read the same sequence, several did not
        if world > 1:
            raise DavaeError(f": checkpoint {Path(ckpt_path).name} was written when each process read its own "
                             f"shards (before davae's global stream order); restart the run", param="resume")
        pos["counter"] = pos.pop("taken")
    return Position(**pos)
