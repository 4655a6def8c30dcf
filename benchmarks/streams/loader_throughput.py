"""Samples/s of the streamed loader (WebDataset shards through `datasets`) against the folder loader, on the
same photos, crops and batch size; and of the DiT's latent reads (latent shards against one file per latent).

    python benchmarks/streams/loader_throughput.py ../shared/data/sun_hays80 --crop 256 --batch 16

The photos are packed into shards of `--per-shard` images in a temporary folder (outside the project)."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from davae_cli import data as D
from davae_cli.latents import save_latent
from davae_cli.latent_data import LatentDataset, LatentRecord
from davae_cli.streams import ShardStream, StreamBatches, list_shards


def pack(files: list[str], out: Path, per_shard: int) -> None:
    for k in range(0, len(files), per_shard):
        with tarfile.open(out / f"s-{k // per_shard:05d}.tar", "w") as t:
            for f in files[k : k + per_shard]:
                data = Path(f).read_bytes()
                info = tarfile.TarInfo(f"{Path(f).stem}{Path(f).suffix.lower()}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def rate(batches, n_batches: int, batch: int) -> float:
    next(batches)  # warm-up: worker start, first shard opened
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    return n_batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--per-shard", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    a = ap.parse_args()
    src = D.list_images([a.folder])
    out: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "images": len(src), "crop": a.crop, "batch": a.batch, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        pack(src.items, shards, a.per_shard)
        for w in a.workers:
            ds = D.StepCropDataset(src, a.crop, 0, (a.batches + 2) * a.batch)
            folder = iter(D.step_loader(ds, 0, a.batches + 2, a.batch, 0, 1, num_workers=w))
            stream = StreamBatches(ShardStream(list_shards([str(shards)]), crop=a.crop, seed=0, num_workers=w), a.batch)
            row = {"workers": w, "folder_samples_per_s": round(rate(folder, a.batches, a.batch), 1),
                   "stream_samples_per_s": round(rate(stream, a.batches, a.batch), 1)}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        # the DiT side: 4096 latents (32, 32, 32) as one file each against latent shards of 1024
        from safetensors.torch import save

        lat = torch.randn(32, 32, 32)
        files, recs_f, recs_s = Path(tmp) / "files", [], []
        files.mkdir()
        for i in range(1024):
            save_latent(files / f"{i:06d}.safetensors", lat, {})
            recs_f.append(LatentRecord(str(files / f"{i:06d}.safetensors"), ""))
        (Path(tmp) / "ls").mkdir()
        (Path(tmp) / "ls" / "000000-000.safetensors").write_bytes(save({"latents": lat.expand(1024, -1, -1, -1).contiguous()}))
        recs_s = [LatentRecord(f"{Path(tmp) / 'ls' / '000000-000.safetensors'}#{i}", "") for i in range(1024)]
        for name, recs in (("latent_files", recs_f), ("latent_shards", recs_s)):
            ds = LatentDataset(recs, 0, 4096)
            t0 = time.perf_counter()
            for n in range(2048):
                ds[n]
            out[f"{name}_per_s"] = round(2048 / (time.perf_counter() - t0), 1)
        print(json.dumps({k: out[k] for k in ("latent_files_per_s", "latent_shards_per_s")}))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
