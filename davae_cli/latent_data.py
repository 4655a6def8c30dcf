"""The DiT's training data: images encoded once into DA-VAE latents (not every epoch), with captions
(SD3) or class labels (LightningDiT).

`--data` is either image files/folders, encoded here into `cache_dir/latents/` (resumable: files that
exist are kept; with several processes each encodes its own share), or folders of latent files written
by `davae encode` (checked against the DA-VAE). Captions come from a JSONL (`{"image": ..., "prompt":
...}`, relative to the folder or by file stem) or from a sidecar `<stem>.txt` beside the image or latent.
Class labels come from a JSONL `{"image": ..., "label": N}` or from ImageNet-style class sub-folders
(sorted folder names -> 0..K-1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import data as D
from .codec import check_latent_compatible
from .errors import DavaeError, first_line
from .latents import atomic_write_bytes, detail_residual, load_latent, save_latent

INDEX = "index.jsonl"


@dataclass
class LatentRecord:
    latent: str  # path of the latent file (C+D, h, w), key `latent`
    source: str  # the image (or latent file) it came from
    prompt: Optional[str] = None
    label: Optional[int] = None


def _read_jsonl(path: Path) -> dict[str, dict]:
    """Caption/label file -> {key: record}, keyed by the image path as written and by its stem."""
    out: dict[str, dict] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DavaeError(f"{path}:{i}: not valid JSON") from None
        if not isinstance(rec, dict) or "image" not in rec:
            raise DavaeError(f"{path}:{i}: each line needs an \"image\" key")
        out[str(rec["image"])] = rec
        out.setdefault(Path(str(rec["image"])).stem, rec)
    return out


def _find_jsonl(inputs: list[str], explicit: Optional[str]) -> Optional[Path]:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise DavaeError(f"{explicit}: file not found", param="captions")
        return p
    for inp in inputs:
        for name in ("captions.jsonl", "metadata.jsonl"):
            if (Path(inp) / name).is_file():
                return Path(inp) / name
    return None


def _lookup(table: dict[str, dict], item: str, roots: list[str]) -> Optional[dict]:
    p = Path(item)
    keys = [str(p), p.name, p.stem]
    for r in roots:
        try:
            keys.append(str(p.relative_to(r)))
        except ValueError:
            pass
    for k in keys:
        if k in table:
            return table[k]
    return None


def attach_conditions(items: list[str], roots: list[str], conditioning: str,
                      captions: Optional[str] = None) -> list[tuple[Optional[str], Optional[int]]]:
    """(prompt, label) per item, or a one-line error that says how many lack one."""
    table = {}
    jl = _find_jsonl(roots, captions)
    if jl is not None:
        table = _read_jsonl(jl)
    out, missing = [], []
    class_dirs: dict[str, int] = {}
    if conditioning == "class" and not table:
        parents = sorted({Path(it).parent.name for it in items})
        if len(parents) < 2:
            raise DavaeError("class labels: put the images in one sub-folder per class (sorted folder names -> "
                             "0..K-1) or give a JSONL with {\"image\": ..., \"label\": N} per line (--captions)")
        class_dirs = {name: i for i, name in enumerate(parents)}
    for it in items:
        rec = _lookup(table, it, roots) if table else None
        if conditioning == "prompt":
            if rec is not None and isinstance(rec.get("prompt", rec.get("text")), str):
                out.append((rec.get("prompt", rec.get("text")), None))
                continue
            side = Path(it).with_suffix(".txt")
            if side.is_file():
                out.append((side.read_text().strip(), None))
                continue
            missing.append(it)
            out.append((None, None))
        else:
            if rec is not None and isinstance(rec.get("label"), int):
                out.append((None, int(rec["label"])))
            elif class_dirs:
                out.append((None, class_dirs[Path(it).parent.name]))
            else:
                missing.append(it)
                out.append((None, None))
    if missing:
        what = "caption (no sidecar .txt and not in a captions JSONL)" if conditioning == "prompt" else "class label"
        raise DavaeError(f"{len(missing)} of {len(items)} training items have no {what}, e.g. {missing[0]}")
    return out


def _latent_files(inputs: list[str]) -> list[Path]:
    files = []
    for inp in inputs:
        p = Path(inp)
        files += [p] if p.is_file() and p.suffix == ".safetensors" else sorted(p.rglob("*.safetensors")) if p.is_dir() else []
    return files


def prepare_latent_dataset(vae, inputs: list[str], cache_dir: Path, *, resolution: int, conditioning: str,
                           batch_size: int = 8, captions: Optional[str] = None, rank: int = 0, world: int = 1,
                           max_images: int = 0, seed: int = 0,
                           barrier: Callable[[], None] = lambda: None,
                           progress: Optional[Callable[[int, int], None]] = None, fields=None,
                           shard_size: int = 1024) -> list[LatentRecord]:
    """Encode `inputs` once into `cache_dir` (or index existing latent files) and return the records.

    `conditioning`: "prompt" or "class". The index is written atomically by rank 0 after every process
    finished its share; a later call with the same cache reuses the latents that exist. Streamed `inputs`
    (shards, `streams.is_stream`) are encoded into latent shards (`encode_shards`).
    """
    from .streams import is_stream

    cache_dir = Path(cache_dir)
    index = cache_dir / INDEX
    if index.is_file():
        recs = [LatentRecord(**json.loads(line)) for line in index.read_text().splitlines() if line.strip()]
        if recs and all(Path(r.latent.split("#")[0]).is_file() for r in recs):
            return recs
    if any(is_stream(i) for i in inputs):
        if max_images:
            raise DavaeError("max_images picks a subset of a folder; with shards, pass fewer shards", param="data")
        count = encode_shards(vae, inputs, cache_dir / "latent-shards", resolution=resolution,
                              conditioning=conditioning, batch_size=batch_size, fields=fields, shard_size=shard_size,
                              rank=rank, world=world, progress=progress)
        barrier()
        recs = shard_records(cache_dir / "latent-shards", count)
        if rank == 0:
            atomic_write_bytes(index, "".join(json.dumps(asdict(r)) + "\n" for r in recs).encode())
        barrier()
        return recs
    for inp in inputs:
        if not Path(inp).exists() and inp != D.SKIMAGE_SOURCE:
            raise DavaeError(f"{inp}: not found", param="data")
    h = resolution // vae.granularity
    lat_files = _latent_files(inputs)
    images = D.list_images(inputs, check=False).subset(max_images, seed) if not lat_files else D.ImageSource()
    if lat_files and len(D.list_images(inputs, check=False)):
        raise DavaeError("mixes images and latent files; pass one kind", param="data")
    if lat_files:
        conds = attach_conditions([str(f) for f in lat_files], inputs, conditioning, captions)
        recs = [_checked_record(vae, f, prompt, label, h, resolution) for f, (prompt, label) in zip(lat_files, conds)]
    else:
        if not len(images):
            raise DavaeError(f"no images or latent files in {', '.join(inputs)}")
        srcs = [it if isinstance(it, str) else f"{it[0]}:{it[1]}" for it in images.items]
        conds = attach_conditions(srcs, inputs, conditioning, captions)
        out = cache_dir / "latents"
        out.mkdir(parents=True, exist_ok=True)
        recs = [LatentRecord(str(out / f"{i:07d}.safetensors"), s, p, lab)
                for i, (s, (p, lab)) in enumerate(zip(srcs, conds))]
        mine = [i for i in range(rank, len(recs), world) if not Path(recs[i].latent).is_file()]
        _encode_images(vae, images, recs, mine, resolution, batch_size, progress)
    barrier()
    if rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(index, "".join(json.dumps(asdict(r)) + "\n" for r in recs).encode())
    barrier()
    return recs


def _checked_record(vae, f: Path, prompt, label, h: int, resolution: int) -> LatentRecord:
    """The record of an existing latent file, after checking it decodes with `vae` at `resolution` (h x h)."""
    lat, meta = load_latent(f)
    why = check_latent_compatible(vae, lat, meta)
    if why:
        raise DavaeError(f"{f}: {why}")
    if tuple(lat.shape[1:]) != (h, h):
        raise DavaeError(f"{f}: latent is {lat.shape[2]}x{lat.shape[1]}, adapt_dit.resolution {resolution} "
                         f"needs {h}x{h} (encode with --res {resolution})")
    return LatentRecord(str(f), str(f), prompt, label)


def _encode_images(vae, images, recs: list[LatentRecord], mine: list[int], resolution: int, batch_size: int,
                   progress: Optional[Callable[[int, int], None]]) -> None:
    """Encode the images of `recs[i]` for i in `mine` (this process's share) into their latent files."""
    ident = vae.describe()
    done = 0
    device = next(vae.parameters()).device
    for k in range(0, len(mine), batch_size):
        chunk = mine[k : k + batch_size]
        arrs = []
        for i in chunk:
            arr = D.read_image(images.items[i])
            arr = D.center_crop(D.resize_short_side(arr, resolution), resolution, resolution)
            arrs.append(D.to_tensor(arr))
        with torch.no_grad():
            lat = vae.encode(torch.stack(arrs).to(device)).latent.float().cpu()
        for j, i in enumerate(chunk):
            meta = {**ident, "source": recs[i].source}
            save_latent(Path(recs[i].latent), lat[j], meta)
        done += len(chunk)
        if progress:
            progress(done, len(mine))


def encode_shards(vae, inputs: list[str], out: Path, *, resolution: int, conditioning: str, batch_size: int,
                  fields=None, shard_size: int = 1024, rank: int = 0, world: int = 1,
                  progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Encode streamed images once into latent shards: input shard k (sorted) -> `out/k-PPP.safetensors`
    (tensor `latents` (N, C+D, h, w), at most `shard_size` rows each) and, written last, `out/k.json` (the
    parts, and per row its key, caption and label). Process r encodes shards r, r + W, ...; a shard whose
    `.json` exists is done (a rerun after a kill redoes only unfinished shards). Returns the number of
    shards (`shard_records` lists them once every process is done)."""
    from safetensors.torch import save

    from .streams import Fields, check_condition, decode_image, list_shards, read_shard

    fields = fields or Fields()
    shards = list_shards(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ident = vae.describe()
    device = next(vae.parameters()).device
    mine = [k for k in range(rank, len(shards), world) if not (out / f"{k:06d}.json").is_file()]
    for done, k in enumerate(mine):
        if progress:
            progress(done, len(mine))
        rows, lats = [], []
        batch: list[torch.Tensor] = []

        def flush():
            if batch:
                with torch.no_grad():
                    lats.append(vae.encode(torch.stack(batch).to(device)).latent.float().cpu())
                batch.clear()

        for s in read_shard(shards[k], fields):
            check_condition(s, conditioning, shards[k].url)
            try:
                arr = decode_image(s.image)
            except Exception:  # noqa: BLE001 - an unreadable image is left out, as in a folder
                continue
            arr = D.center_crop(D.resize_short_side(arr, resolution), resolution, resolution)
            batch.append(D.to_tensor(arr))
            rows.append({"key": s.key, "prompt": s.caption, "label": s.label})
            if len(batch) == batch_size:
                flush()
        flush()
        if not rows:
            raise DavaeError(f"{shards[k].url}: no readable images in this shard", param="data")
        lat = torch.cat(lats)
        parts = []
        for p, i in enumerate(range(0, len(rows), shard_size)):
            name = f"{k:06d}-{p:03d}.safetensors"
            meta = {**{a: (b if isinstance(b, str) else json.dumps(b)) for a, b in ident.items()},
                    "source": shards[k].url}
            atomic_write_bytes(out / name, save({"latents": lat[i : i + shard_size].contiguous()}, metadata=meta))
            parts.append(name)
        atomic_write_bytes(out / f"{k:06d}.json", json.dumps({"source": shards[k].url, "parts": parts,
                                                              "shard_size": shard_size, "rows": rows}).encode())
    if progress:
        progress(len(mine), len(mine))
    return len(shards)


def shard_records(out: Path, count: int) -> list[LatentRecord]:
    """The records of `count` encoded shards in `out` (see `encode_shards`), rows addressed as `path#row`."""
    recs = []
    for k in range(count):
        path = out / f"{k:06d}.json"
        if not path.is_file():
            raise DavaeError(f"{path}: missing (a process did not finish encoding its shards)")
        info = json.loads(path.read_text())
        size = int(info["shard_size"])
        for j, row in enumerate(info["rows"]):
            part = out / info["parts"][j // size]
            recs.append(LatentRecord(f"{part}#{j % size}", f"{info['source']}#{row['key']}", row["prompt"],
                                     row["label"]))
    return recs


def load_record_latent(latent: str) -> torch.Tensor:
    """A record's latent (C+D, h, w): a latent file, or row `i` of a latent shard (`path#i`)."""
    if "#" not in latent:
        return load_latent(Path(latent))[0]
    from safetensors import safe_open

    path, row = latent.rsplit("#", 1)
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_slice("latents")[int(row) : int(row) + 1][0]
    except Exception as e:
        raise DavaeError(f"{path}: not a readable latent shard ({first_line(e, 120)})") from None


class LatentDataset(torch.utils.data.Dataset):
    """Global sample counter n -> (latent, record index), a pure function of (seed, n): epoch e visits
    the records in a permutation seeded by (seed, e)."""

    def __init__(self, records: list[LatentRecord], seed: int, length: int):
        if not records:
            raise DavaeError("no training latents")
        self.records, self.seed, self.length = records, seed, length

    def __len__(self) -> int:
        return self.length

    def index(self, n: int) -> int:
        count = len(self.records)
        epoch, k = divmod(n, count)
        return int(np.random.default_rng([self.seed, epoch, 13]).permutation(count)[k])

    def __getitem__(self, n: int):
        i = self.index(n)
        return load_record_latent(self.records[i].latent).float(), i


def detail_statistics(records: list[LatentRecord], base_channels: int, limit: int = 0,
                      seed: int = 0, residual: bool = False) -> tuple[list[float], list[float], int]:
    """Per-channel mean and std of the detail channels over the training latents (SPEC §6: measured on the
    DiT's own data): all of them, or a seeded random `limit` of them; with `residual`, of z_d minus the base
    channels it is aligned to (`LatentNormalizer(residual=True)`). Returns (mean, std, latents read)."""
    if not records:
        raise DavaeError("no training latents to measure the detail statistics on")
    idx = np.arange(len(records))
    if limit and len(records) > limit:
        idx = np.sort(np.random.default_rng([seed, 17]).choice(len(records), limit, replace=False))
    s = s2 = None
    count = 0
    for i in idx:
        lat = load_record_latent(records[int(i)].latent)
        if lat.shape[0] <= base_channels:
            raise DavaeError(f"{records[int(i)].latent}: no detail channels after the first {base_channels}")
        lat = lat.double()
        zd = (detail_residual(lat[None], base_channels)[0] if residual else lat[base_channels:]).flatten(1)  # (D, h*w)
        s = zd.sum(1) if s is None else s + zd.sum(1)
        s2 = zd.pow(2).sum(1) if s2 is None else s2 + zd.pow(2).sum(1)
        count += zd.shape[1]
    mean = s / count
    var = (s2 / count - mean.pow(2)).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-6)
    return [float(v) for v in mean], [float(v) for v in std], len(idx)


def cached_detail_statistics(records: list[LatentRecord], base_channels: int, cache_dir: Path, limit: int, seed: int,
                             is_main: bool, barrier, on_message=lambda s: None, residual: bool = False) -> dict:
    """`detail_statistics` measured once by the main process into `cache_dir/detail_stats.json` (keyed by the
    latents, `limit` and `seed`) and read by every process and by --resume: {mean, std, latents, source}."""
    path = Path(cache_dir) / "detail_stats.json"
    key = {"latents": sorted(r.latent for r in records), "limit": limit, "seed": seed}
    if residual:
        key["view"] = "residual"
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    if is_main:
        saved = json.loads(path.read_text()) if path.is_file() else None
        if not saved or saved.get("key") != digest:
            on_message(f"measuring the detail channels' statistics on {min(len(records), limit or len(records))} "
                       f"training latent(s)")
            mean, std, n = detail_statistics(records, base_channels, limit, seed, residual)
            atomic_write_bytes(path, json.dumps({"key": digest, "mean": mean, "std": std, "latents": n,
                                                 "source": "adapt-dit training latents"}).encode())
    barrier()
    saved = json.loads(path.read_text())
    return {**{k: saved[k] for k in ("mean", "std", "latents", "source")},
            "view": "residual" if residual else "raw"}


@dataclass
class TrainingLatents:
    """A DiT trainer's data, as one object: the latent records (encoded once, with their conditions) and the
    detail channels' statistics measured on them."""

    records: list[LatentRecord]
    detail_stats: dict  # mean, std, latents, source

    def loader(self, seed: int, start_step: int, total: int, batch_size: int, rank: int, world: int):
        """(dataset, loader) drawing the global sample order of (seed, step), this process's share."""
        dataset = LatentDataset(self.records, seed, (total * world + world) * batch_size)
        return dataset, D.step_loader(dataset, start_step, total, batch_size, rank, world)


def training_latents(vae, inputs: list[str], cache_dir: Path, *, resolution: int, conditioning: str,
                     encode_batch_size: int, captions: Optional[str], stats_limit: int, seed: int, acc,
                     on_message=lambda s: None, max_images: int = 0, residual: bool = False,
                     progress: Optional[Callable[[int, int], None]] = None, fields=None,
                     shard_size: int = 1024) -> TrainingLatents:
    """Encode (or index) `inputs` once into `cache_dir` and measure the detail statistics on them."""
    on_message("preparing the latent dataset (encoded once, reused by --resume)")
    records = prepare_latent_dataset(vae, list(map(str, inputs)), cache_dir, resolution=resolution,
                                     conditioning=conditioning, batch_size=encode_batch_size, captions=captions,
                                     rank=acc.process_index, world=acc.num_processes, barrier=acc.wait_for_everyone,
                                     max_images=max_images, seed=seed, progress=progress, fields=fields,
                                     shard_size=shard_size)
    stats = cached_detail_statistics(records, vae.config.base_channels, cache_dir, stats_limit, seed,
                                     acc.is_main_process, acc.wait_for_everyone, on_message, residual)
    return TrainingLatents(records, stats)
