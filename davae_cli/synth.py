"""`davae synth`: the paper's data recipe — a strong native text-to-image pipeline renders a prompt list at the
target resolution, written as WebDataset shards that `train-vae`, `adapt-dit` and `train-dit` read directly
(`--data OUT`).

Shard k holds the prompts k*S .. (k+1)*S - 1 (S = `shard_size`), one sample per prompt: `<index>.png` (or
`.jpg`/`.webp`), `<index>.txt` (the prompt) and `<index>.json` (prompt, seed, model, steps, guidance, sampler,
shift, resolution). Prompt i is rendered from seed `seed + i` whatever the batch size and the number of
processes, so a shard is a pure function of its prompts and the settings. A shard is written to a temporary
file and renamed when whole: a rerun skips every finished shard and redoes an interrupted one, so a kill
never leaves a duplicate or half a shard. Under `accelerate launch`, process r renders shards r, r + W, ...;
`synth.json` in OUT records the settings, and a rerun with other settings is refused.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import Preset, check_sampling
from .errors import DavaeError, first_line
from .dit.backend import get_backend
from .generate import GenerateSettings, Job, load_model, sample_batch
from .sampling import sampling_grid
from .latents import atomic_write_bytes

MANIFEST = "synth.json"
KILL_ENV = "DAVAE_KILL_IN_SHARD"  # tests: SIGKILL the process after the first batch of this shard
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def read_prompt_list(path: str | Path, column: Optional[str] = None) -> list[str]:
    """Prompts from a `.txt` (one per line), `.jsonl` (field `prompt`, `caption` or `text`, or `column`) or
    `.parquet` (the column `column`, else prompt/caption/text). Blank prompts are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DavaeError(f"{path}: file not found", param="prompts")
    names = (column,) if column else ("prompt", "caption", "text")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(p)
        except Exception as e:  # noqa: BLE001
            raise DavaeError(f"{path}: not a readable parquet file ({first_line(e, 100)})", param="prompts") from None
        col = next((n for n in names if n in schema.names), None)
        if col is None:
            raise DavaeError(f"{path}: no {' / '.join(names)} column (it has {', '.join(schema.names[:8])})",
                             param="prompts")
        out = [str(v) for v in pq.read_table(p, columns=[col]).column(col).to_pylist() if v is not None]
    elif p.suffix == ".jsonl":
        out = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DavaeError(f"{path}:{i}: not valid JSON", param="prompts") from None
            val = next((rec[n] for n in names if isinstance(rec, dict) and isinstance(rec.get(n), str)), None)
            if val is None:
                raise DavaeError(f"{path}:{i}: no {' / '.join(names)} field", param="prompts")
            out.append(val)
    else:
        out = p.read_text().splitlines()
    out = [t.strip() for t in out if t and t.strip()]
    if not out:
        raise DavaeError(f"{path}: no prompts in the file", param="prompts")
    return out


@dataclass
class SynthSettings:
    out_dir: Path
    prompts: list[str] = field(default_factory=list)
    res: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    seed: int = 0
    shard_size: int = 1000
    batch_size: int = 1
    image_format: str = "png"
    jpeg_quality: int = 95
    limit: int = 0  # render only the first `limit` prompts (0 = all)
    device: Optional[str] = None
    dtype: Optional[str] = None
    compile: bool = False


def shard_name(k: int) -> str:
    return f"synth-{k:06d}.tar"


def _encode(img: torch.Tensor, fmt: str, quality: int) -> bytes:
    import numpy as np
    from PIL import Image

    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt in ("jpg", "webp") else {}
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=FORMATS[fmt], **kw)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of (name, bytes) in order, written to a temporary file and renamed (whole or absent)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible bytes
            t.addfile(info, io.BytesIO(data))
    atomic_write_bytes(path, buf.getvalue())


def _manifest(s: SynthSettings, gs: GenerateSettings, model, shift: float, count: int) -> dict:
    """What the shards are a function of: a rerun into the same folder must match it."""
    return {"prompts": count, "shard_size": s.shard_size, "seed": s.seed, "res": gs.res, "steps": gs.steps,
            "guidance": gs.guidance, "sampler": gs.sampler, "shift": shift, "negative_prompt": gs.negative_prompt,
            "format": s.image_format, "model": model.identity}


def synth(preset: Preset, s: SynthSettings, *, base_pipeline: Optional[str] = None, random_weights: bool = False,
          use_t5: bool = True, progress: Optional[Callable[[int, int], None]] = None,
          on_message: Callable[[str], None] = lambda t: None) -> dict:
    """Render `s.prompts` into WebDataset shards in `s.out_dir` (see the module doc); returns a summary."""
    from accelerate import PartialState

    from .devices import resolve_device, resolve_dtype

    if s.image_format not in FORMATS:
        raise DavaeError(f"{s.image_format!r}: choose png, jpg or webp", param="format")
    for name in ("shard_size", "batch_size"):
        if getattr(s, name) < 1:
            raise DavaeError("must be at least 1", param=name.replace("_", "-"))
    backend = get_backend(preset)
    if backend.conditioning != "prompt":
        raise DavaeError(f"renders prompts with a text-to-image pipeline; {preset.name} is a {backend.label} "
                         f"preset (use a text-to-image preset)", param="preset")
    check_sampling(s.steps, None, None, None)
    prompts = s.prompts[: s.limit] if s.limit else list(s.prompts)
    if not prompts:
        raise DavaeError("no prompts", param="prompts")
    state = PartialState()
    device = resolve_device(s.device, default=state.device)
    dtype = resolve_dtype(s.dtype, device)
    out = Path(s.out_dir)
    gs = GenerateSettings(out_dir=out, prompts=prompts, res=s.res, steps=s.steps, guidance=s.guidance,
                          seed=s.seed, batch_size=s.batch_size, device=s.device, dtype=s.dtype, compile=s.compile)
    t0 = time.perf_counter()
    model, cond_fn, gs = load_model(preset, gs, base_pipeline=base_pipeline, native=True, use_t5=use_t5,
                                random_weights=random_weights, device=device, dtype=dtype, on_message=on_message)
    load_s = time.perf_counter() - t0
    side, shift, sigmas = sampling_grid(model, gs.res, gs.steps, gs.shift)
    manifest = _manifest(s, gs, model, float(shift), len(prompts))
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        path = out / MANIFEST
        if path.is_file():
            saved = json.loads(path.read_text())
            diff = [k for k in manifest if saved.get(k) != manifest[k]]
            if diff:
                raise DavaeError(f"{out} holds shards made with other settings ({', '.join(diff[:4])}); "
                                 f"use another --out or the same settings")
        else:
            atomic_write_bytes(path, json.dumps(manifest, indent=2).encode())
    state.wait_for_everyone()
    if not (out / MANIFEST).is_file():
        raise DavaeError(f"{out}: the main process refused these settings")

    count = (len(prompts) + s.shard_size - 1) // s.shard_size
    mine = list(range(state.process_index, count, state.num_processes))
    todo = [k for k in mine if not (out / shard_name(k)).is_file()]
    for k in todo:  # an interrupted shard's temporary file is redone, never kept
        for stale in out.glob(f".{shard_name(k)}.*.tmp"):
            stale.unlink(missing_ok=True)
    total = sum(min(s.shard_size, len(prompts) - k * s.shard_size) for k in todo)
    done, images, times = 0, 0, {"text_s": 0.0, "sample_s": 0.0, "decode_s": 0.0, "write_s": 0.0}
    if progress:
        progress(0, total)
    meta_common = {"model": model.identity, "steps": gs.steps, "guidance": gs.guidance, "sampler": gs.sampler,
                   "shift": float(shift), "res": gs.res, "negative_prompt": gs.negative_prompt}
    for k in todo:
        first = k * s.shard_size
        jobs = [Job(i, s.seed + i, prompts[i]) for i in range(first, min(len(prompts), first + s.shard_size))]
        members: list[tuple[str, bytes]] = []
        for b in range(0, len(jobs), s.batch_size):
            if b and os.environ.get(KILL_ENV) == str(k):  # tests: a hard kill inside shard k
                os.kill(os.getpid(), signal.SIGKILL)
            batch = jobs[b : b + s.batch_size]
            imgs, _, t = sample_batch(model, gs, cond_fn, batch, sigmas, side, device=device, dtype=dtype, tile=None)
            for key in t:
                times[key] += t[key]
            tw = time.perf_counter()
            for j, img in zip(batch, imgs):
                key = f"{j.index:09d}"
                members += [(f"{key}.{s.image_format}", _encode(img, s.image_format, s.jpeg_quality)),
                            (f"{key}.txt", j.prompt.encode("utf-8")),
                            (f"{key}.json", json.dumps({"index": j.index, "prompt": j.prompt, "seed": j.seed,
                                                         **meta_common}).encode())]
            times["write_s"] += time.perf_counter() - tw
            done += len(batch)
            images += len(batch)
            if progress:
                progress(done, total)
        tw = time.perf_counter()
        write_tar(out / shard_name(k), members)
        times["write_s"] += time.perf_counter() - tw
    state.wait_for_everyone()
    busy = sum(times.values())
    return {"out": str(out), "shards": count, "shards_written": len(todo), "shards_skipped": len(mine) - len(todo),
            "images": images, "prompts": len(prompts), "processes": state.num_processes,
            "images_per_s": images / busy if images and busy > 0 else None, "load_s": round(load_s, 2),
            **{k: round(v, 3) for k, v in times.items()}, "res": gs.res, "steps": gs.steps, "guidance": gs.guidance,
            "device": str(device), "dtype": str(dtype).replace("torch.", "")}


