"""`davae synth`: the paper's data recipe — a strong native text-to-image pipeline renders a prompt list at the
target resolution, written as WebDataset shards that `train-vae`, `adapt-dit` and `train-dit` read directly
(`--data OUT`).

Shard k holds the prompts k*S .. (k+1)*S - 1 (S = `shard_size`), one sample per prompt: `<index>.png` (or
`.jpg`/`.webp`), `<index>.txt` (the prompt) and `<index>.json` (prompt, seed, model, steps, guidance, sampler,
shift, resolution). Prompt i is rendered from seed `seed + i` whatever the batch size and the number of
processes, so a shard is a pure function of its prompts and the settings.

A shard is written as it is made: each batch is appended to `.synth-K.tar.partial` (and synced), and the
whole tar is renamed to `synth-K.tar` when its last batch is in, so readers only ever see whole shards and a
kill loses at most the batch in flight. A rerun skips the finished shards and continues a partial one after
its last whole batch (a torn tail is cut off), which gives the same bytes as an uninterrupted run. Under
`accelerate launch`, process r renders shards r, r + W, ... `synth.json` in OUT records the prompt count, a
sha256 of the prompt list and of the settings (and the settings themselves); a rerun with another list or
other settings is refused in one line. The main process holds OUT's lock (`train/lock.py`) while it runs.
"""

from __future__ import annotations

import hashlib
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

from .config import check_sampling
from .config_schema import Preset
from .errors import DavaeError, first_line
from .dit.backend import get_backend
from .pipeline import GenerateSettings, Job, load_model, sample_batch
from .sampling import sampling_grid
from .latents import atomic_write_bytes
from .train.lock import lock_run, unlock_run

MANIFEST = "synth.json"
KILL_ENV = "DAVAE_KILL_IN_SHARD"  # tests: SIGKILL the process once the first batch of this shard is written
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


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

    from .data import to_uint8

    arr = to_uint8(img)
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt in ("jpg", "webp") else {}
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=FORMATS[fmt], **kw)
    return buf.getvalue()


def partial_name(k: int) -> str:
    """Shard k while it is being written (hidden, and not a `.tar`: no reader takes it for a shard)."""
    return f".{shard_name(k)}.partial"


def sample_names(index: int, fmt: str) -> list[str]:
    """The members of sample `index`, in the order they are written."""
    key = f"{index:09d}"
    return [f"{key}.{fmt}", f"{key}.txt", f"{key}.json"]


def tar_member(name: str, data: bytes) -> bytes:
    """One member as `tarfile` writes it (USTAR, mtime 0, mode 644: reproducible bytes): header, data, padding."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % _BLOCK)


def tar_end(size: int) -> bytes:
    """What `tarfile` writes when it closes an archive of `size` bytes: two zero blocks, then zeros to a record."""
    return b"\0" * (2 * _BLOCK + (-(size + 2 * _BLOCK) % _RECORD))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of (name, bytes) in order, written to a temporary file and renamed (whole or absent)."""
    data = b"".join(tar_member(name, d) for name, d in members)
    atomic_write_bytes(path, data + tar_end(len(data)))


def whole_samples(path: Path, first: int, count: int, fmt: str) -> list[int]:
    """`ends[n]`: the byte where the first n samples of the partial shard `path` end (`ends[0]` = 0), for every
    n whose samples are whole (their members in order, each header intact and its data all there); what follows
    the last is a write a kill tore. Only the headers are read."""
    ends, j, names = [0], 0, sample_names(first, fmt)
    size = path.stat().st_size
    with open(path, "rb") as f:
        while len(ends) <= count:
            head = f.read(_BLOCK)
            if len(head) < _BLOCK:
                break
            try:
                info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                break
            end = f.tell() + info.size + (-info.size % _BLOCK)
            if info.name != names[j] or end > size:
                break
            f.seek(end)
            j += 1
            if j == len(names):
                ends.append(end)
                j, names = 0, sample_names(first + len(ends) - 1, fmt)
    return ends


# ---------------------------------------------------------------------------------------------- manifest
def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _manifest(s: SynthSettings, gs: GenerateSettings, model, shift: float, prompts: list[str], *, dtype,
              use_t5: bool, preset: Preset) -> dict:
    """What the shards are a function of: a rerun into the same folder must match it. The settings are kept as
    they read back from JSON (a tuple as a list), so a comparison with a saved manifest is exact."""
    gi = gs.guidance_interval
    settings = json.loads(json.dumps({
        "shard_size": s.shard_size, "seed": s.seed, "res": gs.res, "steps": gs.steps, "guidance": gs.guidance,
        "guidance_interval": list(gi) if isinstance(gi, (list, tuple)) else gi, "sampler": gs.sampler,
        "shift": shift, "negative_prompt": gs.negative_prompt, "format": s.image_format,
        "quality": s.jpeg_quality if s.image_format != "png" else None, "dtype": str(dtype).replace("torch.", ""),
        "use_t5": use_t5, "max_sequence_length": preset.dit.max_sequence_length, "model": model.identity}))
    return {"prompts": len(prompts), "prompts_sha256": _sha256(prompts), "settings_sha256": _sha256(settings),
            **settings}


_HASHES = ("prompts", "prompts_sha256", "settings_sha256")
# what an earlier davae's synth.json held besides the prompt count (no hashes, no dtype, quality, T5, tokens)
_LEGACY = ("shard_size", "seed", "res", "steps", "guidance", "sampler", "shift", "negative_prompt", "format", "model")


def _other_list(out: Path, why: str) -> DavaeError:
    return DavaeError(f"{out} holds shards of another prompt list ({why}); use another --out or the prompt file "
                      f"it was made with")


def _legacy_prompts_match(out: Path, saved: dict, prompts: list[str]) -> None:
    """A synth.json of an earlier davae records only the prompt count: the prompts stored in its finished
    shards (`<index>.txt`) must be this list's."""
    if saved.get("prompts") != len(prompts):
        raise _other_list(out, f"{saved.get('prompts')} prompts; this list has {len(prompts)}")
    for tar in sorted(out.glob("synth-*.tar")):
        try:
            with tarfile.open(tar) as t:
                for m in t:
                    if m.name.endswith(".txt"):
                        i = int(m.name.split(".")[0])
                        if i >= len(prompts) or t.extractfile(m).read().decode() != prompts[i]:
                            raise _other_list(out, f"sample {i} of {tar.name} has another prompt")
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DavaeError(f"{tar}: unreadable ({first_line(e, 80)}); move it aside and rerun") from None


def check_manifest(out: Path, manifest: dict, prompts: list[str], on_message: Callable[[str], None]) -> None:
    """Write `synth.json` into a new folder, or check that the one there describes the same prompt list and
    settings (one-line refusal otherwise). A manifest of an earlier davae (no hashes) is checked against the
    prompts in its shards and rewritten with them."""
    path = out / MANIFEST
    if not path.is_file():
        atomic_write_bytes(path, json.dumps(manifest, indent=2).encode())
        return
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise DavaeError(f"{path}: not readable JSON; it records what {out} holds: restore it or use another --out") from None
    legacy = "prompts_sha256" not in saved
    if legacy:
        _legacy_prompts_match(out, saved, prompts)
    elif saved["prompts_sha256"] != manifest["prompts_sha256"]:
        raise _other_list(out, f"{saved.get('prompts')} prompts, sha256 {str(saved['prompts_sha256'])[:12]}; this "
                               f"list: {len(prompts)}, {manifest['prompts_sha256'][:12]}")
    names = _LEGACY if legacy else sorted((set(saved) | set(manifest)) - set(_HASHES))
    diff = [k for k in names if saved.get(k) != manifest.get(k)]
    if not diff and not legacy and saved.get("settings_sha256") != manifest["settings_sha256"]:
        diff = ["settings_sha256"]
    if diff:
        raise DavaeError(f"{out} holds shards made with other settings ({', '.join(diff[:4])}); "
                         f"use another --out or the same settings")
    if legacy:
        atomic_write_bytes(path, json.dumps(manifest, indent=2).encode())
        on_message(f"{path}: written by an earlier davae; the prompts in its shards match this list, and it now "
                   f"records the sha256 of the prompt list and of the settings")


# --------------------------------------------------------------------------------------------- rendering
@dataclass
class _Renderer:
    """What rendering a batch needs (the loaded model, the resolved settings) and the time each part took."""

    model: object
    gs: GenerateSettings
    cond_fn: Callable
    sigmas: object
    side: int
    device: object
    dtype: object
    s: SynthSettings
    meta: dict
    times: dict = field(default_factory=lambda: {"text_s": 0.0, "sample_s": 0.0, "decode_s": 0.0, "write_s": 0.0})

    def batch_bytes(self, batch: list[Job]) -> bytes:
        """The tar members of a batch's samples (image, prompt, metadata each), rendered now."""
        imgs, _, t = sample_batch(self.model, self.gs, self.cond_fn, batch, self.sigmas, self.side,
                                  device=self.device, dtype=self.dtype, tile=None)
        for key in t:
            self.times[key] += t[key]
        tw = time.perf_counter()
        out = []
        for j, img in zip(batch, imgs):
            image, txt, meta = sample_names(j.index, self.s.image_format)
            out += [tar_member(image, _encode(img, self.s.image_format, self.s.jpeg_quality)),
                    tar_member(txt, j.prompt.encode("utf-8")),
                    tar_member(meta, json.dumps({"index": j.index, "prompt": j.prompt, "seed": j.seed,
                                                 **self.meta}).encode())]
        self.times["write_s"] += time.perf_counter() - tw
        return b"".join(out)


@dataclass
class _Shard:
    k: int
    jobs: list[Job]
    kept: int  # samples of a partial shard kept (whole batches), ending at byte `offset`
    offset: int


def _plan(out: Path, mine: list[int], prompts: list[str], s: SynthSettings) -> list[_Shard]:
    """This process's shards that are not finished, each with what its partial file already holds."""
    plan = []
    for k in mine:
        part = out / partial_name(k)
        if (out / shard_name(k)).is_file():
            part.unlink(missing_ok=True)
            continue
        for stale in out.glob(f".{shard_name(k)}.*.tmp"):  # an earlier davae's temporary shard: redone
            stale.unlink(missing_ok=True)
        first = k * s.shard_size
        jobs = [Job(i, s.seed + i, prompts[i]) for i in range(first, min(len(prompts), first + s.shard_size))]
        ends = whole_samples(part, first, len(jobs), s.image_format) if part.is_file() else [0]
        whole = len(ends) - 1
        # whole batches only: the batches after a resume are those of an uninterrupted run
        kept = whole if whole == len(jobs) else whole - whole % s.batch_size
        plan.append(_Shard(k, jobs, kept, ends[kept]))
    return plan


def _render_shard(r: _Renderer, out: Path, sh: _Shard, step: Callable[[int], None]) -> int:
    """Render shard `sh.k` from its `kept` samples on, each batch appended to the partial file (cut to `offset`
    first) and synced; the whole tar renamed into place. Returns the samples rendered."""
    fd = os.open(out / partial_name(sh.k), os.O_RDWR | os.O_CREAT, 0o666)
    with os.fdopen(fd, "r+b") as f:
        f.truncate(sh.offset)
        f.seek(sh.offset)
        for b in range(sh.kept, len(sh.jobs), r.s.batch_size):
            if b and os.environ.get(KILL_ENV) == str(sh.k):  # tests: a hard kill inside shard k
                os.kill(os.getpid(), signal.SIGKILL)
            batch = sh.jobs[b : b + r.s.batch_size]
            data = r.batch_bytes(batch)
            tw = time.perf_counter()
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            r.times["write_s"] += time.perf_counter() - tw
            step(len(batch))
        f.write(tar_end(f.tell()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(out / partial_name(sh.k), out / shard_name(sh.k))
    return len(sh.jobs) - sh.kept


def _check(preset: Preset, s: SynthSettings) -> list[str]:
    """The prompts to render, once the settings are checked."""
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
    return prompts


def _render_all(r: _Renderer, out: Path, plan: list[_Shard], progress) -> int:
    total, done = sum(len(sh.jobs) - sh.kept for sh in plan), 0
    if progress:
        progress(0, total)

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    return sum(_render_shard(r, out, sh, step) for sh in plan)


def synth(preset: Preset, s: SynthSettings, *, base_pipeline: Optional[str] = None, random_weights: bool = False,
          use_t5: bool = True, progress: Optional[Callable[[int, int], None]] = None,
          on_message: Callable[[str], None] = lambda t: None) -> dict:
    """Render `s.prompts` into WebDataset shards in `s.out_dir` (see the module doc); returns a summary."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .devices import resolve_device, resolve_dtype

    prompts = _check(preset, s)
    # PartialState, unlike the Accelerator, reads no ACCELERATE_USE_CPU: without it, each process of a CPU launch
    # took itself for the only one and rendered every shard (unseen while the bytes were the same)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
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
    manifest = _manifest(s, gs, model, float(shift), prompts, dtype=dtype, use_t5=use_t5, preset=preset)
    if state.is_main_process:
        lock_run(out, on_message)
    try:
        if state.is_main_process:
            check_manifest(out, manifest, prompts, on_message)
        state.wait_for_everyone()
        if not (out / MANIFEST).is_file():
            raise DavaeError(f"{out}: the main process refused these settings")
        count = (len(prompts) + s.shard_size - 1) // s.shard_size
        mine = list(range(state.process_index, count, state.num_processes))
        plan = _plan(out, mine, prompts, s)
        meta = {"model": model.identity, "steps": gs.steps, "guidance": gs.guidance, "sampler": gs.sampler,
                "shift": float(shift), "res": gs.res, "negative_prompt": gs.negative_prompt}
        r = _Renderer(model, gs, cond_fn, sigmas, side, device, dtype, s, meta)
        images = _render_all(r, out, plan, progress)
        state.wait_for_everyone()
    finally:
        if state.is_main_process:
            unlock_run(out)
    busy = sum(r.times.values())
    return {"out": str(out), "shards": count, "shards_written": len(plan), "shards_skipped": len(mine) - len(plan),
            "images": images, "images_resumed": sum(sh.kept for sh in plan), "prompts": len(prompts),
            "processes": state.num_processes, "images_per_s": images / busy if images and busy > 0 else None,
            "load_s": round(load_s, 2), **{k: round(v, 3) for k, v in r.times.items()}, "res": gs.res,
            "steps": gs.steps, "guidance": gs.guidance, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
