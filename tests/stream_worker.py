"""Colour-coded shards for the stream tests, and the script a real multi-process launch runs on them.

Sample i of `color_shards` is a solid 8x8 PNG whose red value is 10 + 20 i, so any crop of it says which
sample it came from (`sample_ids`). Run as a script under `accelerate launch`, each process takes `--steps`
batches from its `ShardStream` and writes the sample ids of each batch to OUT/rank-R.json.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch


def color_png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (10 + 20 * i, 0, 0), np.uint8)).save(buf, "png")
    return buf.getvalue()


def color_shards(root: Path, sizes: list[int], broken: tuple = ()) -> Path:
    """WebDataset shards s-000.tar, ... holding `sizes[k]` samples each, numbered across shards in stored order;
    the numbers in `broken` hold bytes that are no image."""
    root.mkdir(parents=True, exist_ok=True)
    i = 0
    for k, size in enumerate(sizes):
        with tarfile.open(root / f"s-{k:03d}.tar", "w") as t:
            for _ in range(size):
                data = b"not an image" if i in broken else color_png(i)
                info = tarfile.TarInfo(f"sample{i:03d}.png")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
                i += 1
    return root


def sample_ids(x: torch.Tensor) -> list[int]:
    """The sample each crop of a batch (B, 3, h, w) in [-1, 1] of `color_shards` images came from."""
    red = torch.round((x[:, 0, 0, 0] + 1.0) * 127.5).long().tolist()
    return [(r - 10) // 20 for r in red]


def main() -> None:
    from accelerate import Accelerator

    from davae_cli.streams import ShardStream, StreamBatches, list_shards

    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    a = ap.parse_args()
    acc = Accelerator()
    stream = ShardStream(list_shards([a.shards]), crop=4, seed=5, rank=acc.process_index, world=acc.num_processes)
    batches = StreamBatches(stream, a.batch)
    ids = [sample_ids(next(batches)) for _ in range(a.steps)]
    Path(a.out, f"rank-{acc.process_index}.json").write_text(json.dumps({"world": acc.num_processes, "ids": ids}))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
