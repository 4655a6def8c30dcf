"""Side-by-side speed of the native DiT and its DA-VAE configuration (SPEC §7).

Both configurations use the same DiT architecture; the DA-VAE one reads and writes C + D channels on a
latent with 1/s the side, so it has 1/s^2 the image tokens. With random weights nothing is downloaded
(speed does not depend on the weights). The two configurations share one trunk where the family allows it
(`Backend.bench_models`: each a view of it with its own patch embedder and output head), so the SD3.5 Medium
architecture is held once (fp32 fits a 24 GB CPU machine). Measurements alternate native / DA-VAE, repeat, and report medians: the denoising loop (Euler,
CFG doubling the batch unless disabled), the VAE decode (the base VAE at full resolution for native, the
DA-VAE decoder for DA-VAE), end to end per image, peak GPU memory, and the analytic FLOPs with achieved
TFLOP/s against the device's peak where known. Text encoding is identical for both; by default it is not
timed (the prompt embeddings are random tensors of the right shape); `text_encoders=True` runs the preset's
text encoders too (those of the preset's family with random weights of their real architecture, on random
token ids of the pipeline's lengths, prompt and negative prompt) and adds their time to end to end. The
end-to-end FLOP ratio always counts everything: the steps, the text encoders and the decode.
`run_bench_sweep` measures several resolutions in one call and `plot_bench` draws them (matplotlib, the `plot`
extra): the measured speedups against resolution with the FLOP ratios as the ideal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import flops as F
from . import flow
from .config_schema import Preset
from .devices import DTYPES, resolve_device, resolve_dtype
from .dit.backend import get_backend, latent_channels_native, token_patch
from .errors import DavaeError
from .sampling import sample_latents

NOISY_SPREAD = 0.10  # warn when (max - min) / median of the repeats exceeds this


@dataclass
class BenchSettings:
    res: int
    steps: Optional[int] = None  # None: the preset's sample.steps
    batch_size: int = 1
    repeats: int = 3
    warmup: int = 1
    dtype: Optional[str] = None  # bf16 on GPU, fp32 on CPU
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    cfg: bool = True
    guidance: Optional[float] = None  # None: the preset's sample.guidance (CFG runs only inside sample.guidance_interval)
    decode: bool = True
    attention: str = "default"  # SDPA backend: default, flash, efficient, cudnn, math
    weights: str = "random"
    device: Optional[str] = None
    seed: int = 0
    text_encoders: bool = False  # also time the text encoders (SD3 presets; random weights of their architecture)


def check_settings(preset: Preset, s: BenchSettings) -> None:
    g = preset.granularity
    p = token_patch(preset)
    if s.res <= 0 or s.res % (g * p):
        note = get_backend(preset).token_note or "p: latent pixels per token side"
        raise DavaeError(f"{s.res}: must be a positive multiple of s*f*p = {g}*{p} = {g * p} for this preset ({note})",
                         param="res")
    for name in ("steps", "batch_size", "repeats"):
        if getattr(s, name) is not None and getattr(s, name) < 1:
            raise DavaeError("must be at least 1", param="sampling_steps" if name == "steps" else name)
    if s.warmup < 0:
        raise DavaeError("must be >= 0", param="warmup")
    if s.attention not in ("default", "flash", "efficient", "cudnn", "math"):
        raise DavaeError(f"{s.attention}: choose default, flash, efficient, cudnn or math", param="attention")
    if s.text_encoders and get_backend(preset).conditioning != "prompt":
        raise DavaeError(f"the {preset.name} preset is class-conditional: it has no text encoders to time",
                         param="text_encoders")


def plan(preset: Preset, res: int) -> dict:
    """Latent shapes and image-token counts of both configurations at `res`, without building anything."""
    c = latent_channels_native(preset)
    p = token_patch(preset)
    d = preset.vae.detail_channels
    f, g = preset.vae.downsample, preset.granularity
    out = {}
    for name, ch, side in (("native", c, res // f), ("davae", c + d, res // g)):
        out[name] = {"latent": [ch, side, side], "image_tokens": (side // p) ** 2, "patch_size": p}
    return out


class _Clock:
    """Wall time on CPU; CUDA events (after a synchronize) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0


def _sdpa(attention: str):
    if attention == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[attention])


class _Config:
    """One side of the comparison: how to run its DiT and its decoder."""

    def __init__(self, name: str, channels: int, latent_side: int, tokens: int, flops: dict,
                 activate: Callable[[], torch.nn.Module], decode: Optional[Callable[[torch.Tensor], torch.Tensor]]):
        self.name, self.channels, self.latent_side, self.tokens, self.flops = name, channels, latent_side, tokens, flops
        self.activate, self.decode = activate, decode
        self.loop_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.text_ms: list[float] = []
        self.peak_mb: Optional[float] = None


def _maybe_compiled(cache: dict, key: str, module: torch.nn.Module, s: BenchSettings):
    """`module`, or its torch.compile'd wrapper (made once per configuration) with --compile. Static shapes
    (`dynamic=False`): each configuration gets its own graph specialised to its latent shape, compiled in the
    warm-up; nothing recompiles during the timed repeats (tested by counting graphs)."""
    if not s.compile:
        return module
    if key not in cache:
        cache[key] = torch.compile(module, mode=s.compile_mode, dynamic=False)
    return cache[key]


class _Pair:
    """Both configurations of the preset's family, ready to time: `activate(name)` gives the (possibly
    compiled) module, `velocity(net, batch)` its velocity on random conditioning of the right shapes,
    `flops(tokens, batch, channels)` the FLOP model of one forward."""

    def __init__(self, preset: Preset, s: BenchSettings, device, dtype):
        self.backend = backend = get_backend(preset)
        spec = "random" if s.weights == "random" else s.weights
        self.models = backend.bench_models(spec, s.seed, device, dtype, s.res)
        native = self.models["native"]
        self.config = dict(native.config)
        self.channels, self.patch = backend.channels(native), backend.patch_size(native)
        self.text_tokens = backend.text_tokens()
        self.s, self.device, self.dtype = s, device, dtype
        self._compiled: dict = {}

    def activate(self, which: str) -> Callable[[], torch.nn.Module]:
        return lambda: _maybe_compiled(self._compiled, which, self.models[which], self.s)

    def velocity(self, net, batch: int):
        g = torch.Generator(device="cpu").manual_seed(self.s.seed)
        cond = self.backend.random_condition(self.config, batch, self.device, self.dtype, g)
        return lambda x, sigma: self.backend.velocity(net, x, sigma, cond)

    def flops(self, tokens: int, batch: int, channels: int) -> dict:
        return self.backend.flops(self.backend.widen_config(self.config, channels), tokens, self.text_tokens, batch)


def _uses_cfg(preset: Preset, guidance: Optional[float]) -> bool:
    """Whether sampling runs a CFG batch: not for a guidance-distilled or unguided family, nor at a guidance
    whose CFG weight is 1 (e.g. SD3 at 1.0, Z-Image-Turbo at 0)."""
    backend = get_backend(preset)
    g = preset.sample.guidance if guidance is None else guidance
    return backend.guidance_mode(dict(preset.dit.arch)) == "cfg" and backend.cfg_weight(g) != 1.0


def build_decoders(preset: Preset, device, dtype):
    """(native decode fn, DA-VAE decode fn) on random weights with the preset's architectures; on the meta
    device (for FLOP counts) nothing is allocated."""
    from .models import random_davae
    from .vae.base import base_decode

    davae = random_davae(preset, device, dtype)

    def native(z):
        return base_decode(davae.base.vae, davae.transform.inverse(z))

    return native, davae.decode


def _mean_step_flops(flops_for: Callable, shape: dict, s: BenchSettings, n_guided: int) -> dict:
    """FLOPs of the average step of a batch: guided steps run the DiT on a batch of 2 x batch_size."""
    ch, tokens = shape["latent"][0], shape["image_tokens"]
    f2, f1 = flops_for(tokens, 2 * s.batch_size, ch), flops_for(tokens, s.batch_size, ch)
    return {k: (n_guided * f2[k] + (s.steps - n_guided) * f1[k]) / s.steps if isinstance(f2[k], (int, float))
            else f2[k] for k in f2}


def _end_to_end(preset: Preset, shapes: dict, step_flops: dict, s: BenchSettings, n_guided: int) -> dict:
    """Everything a user waits for, per image (counted, not timed): the steps, the text encoders (the prompt
    and, with CFG, the negative prompt) and the decode."""
    dec = decode_flops(preset, shapes)
    prompts = 2 if s.cfg and n_guided else 1
    text = prompts * get_backend(preset).text_flops()
    e2e = F.end_to_end_flops(*({"step": step_flops[k]["total"] / s.batch_size, "decode": dec[k]}
                               for k in ("native", "davae")), steps=s.steps, text=text)
    return {"flop_ratio_end_to_end": e2e["ratio"],
            "tflops_per_image": {"native": e2e["native"] / 1e12, "davae": e2e["davae"] / 1e12, "text": text / 1e12,
                                 "decode_native": dec["native"] / 1e12, "decode_davae": dec["davae"] / 1e12}}


def flop_report(preset: Preset, s: BenchSettings) -> dict:
    """The FLOP model of both configurations at `s.res` with the preset's architecture and recipe, without
    running anything (every model is built on the meta device): per step, per image end to end, and ratios."""
    check_settings(preset, s)
    s = dataclasses.replace(s, steps=s.steps or preset.sample.steps, cfg=s.cfg and _uses_cfg(preset, s.guidance))
    shapes = plan(preset, s.res)
    sigmas, interval = _grid(preset, s, shapes)
    n_guided = sum(s.cfg and flow.in_interval(float(sigmas[i]), interval) for i in range(s.steps))
    backend = get_backend(preset)
    cfg, text_tokens = backend.arch_config(), backend.text_tokens()

    def flops_for(tokens, batch, channels):
        return backend.flops(backend.widen_config(cfg, channels), tokens, text_tokens, batch)
    step = {k: _mean_step_flops(flops_for, shapes[k], s, n_guided) for k in ("native", "davae")}
    out = {"res": s.res, "preset": preset.name, "steps": s.steps, "batch_size": s.batch_size, "cfg": s.cfg,
           "guided_steps": n_guided}
    for k in ("native", "davae"):
        out[k] = {"image_tokens": shapes[k]["image_tokens"], "latent": shapes[k]["latent"],
                  "tflops_per_step": step[k]["total"] / 1e12}
    out["flop_ratio"] = F.flop_ratio(step["native"], step["davae"])
    out.update(_end_to_end(preset, shapes, step, s, n_guided))
    return out


def decode_flops(preset: Preset, shapes: dict) -> dict:
    """FLOPs of decoding one image on each side (native: the base VAE at full resolution; DA-VAE: its
    decoder), counted on the meta device."""
    native, davae = build_decoders(preset, "meta", torch.float32)
    out = {}
    for name, fn in (("native", native), ("davae", davae)):
        ch, side = shapes[name]["latent"][0], shapes[name]["latent"][1]
        out[name] = F.counted_flops(fn, torch.zeros(1, ch, side, side, device="meta"))
    return out


def _grid(preset: Preset, s: BenchSettings, shapes: dict):
    """The preset's sampling grid and guidance interval (FLUX: its dynamic shift at the native token count;
    the step count, not the grid, sets the time)."""
    return (get_backend(preset).sigma_grid(s.steps, preset.sample.shift, None, shapes["native"]["image_tokens"]),
            preset.sample.guidance_interval)


def _side_report(cfg: "_Config", s: BenchSettings, peak_tflops: Optional[float], warnings: list[str]) -> dict:
    """The medians of one configuration's repeats, per step and per image, with its FLOPs and achieved rate;
    noisy or single repeats add a warning."""
    loop = statistics.median(cfg.loop_ms)
    dec = statistics.median(cfg.decode_ms) if cfg.decode_ms else None
    txt = statistics.median(cfg.text_ms) if cfg.text_ms else None
    step_ms = loop / s.steps
    tflops = cfg.flops["total"] / 1e12
    achieved = tflops / (step_ms / 1000.0)
    spread = (max(cfg.loop_ms) - min(cfg.loop_ms)) / loop if len(cfg.loop_ms) > 1 else None
    if spread is not None and spread > NOISY_SPREAD:
        warnings.append(f"{cfg.name}: repeats spread {100 * spread:.0f}% of the median; "
                        f"use more --repeats / --warmup or a quieter machine")
    if len(cfg.loop_ms) == 1:
        warnings.append(f"{cfg.name}: a single repeat cannot show noise (use --repeats 3)")
    return {
        "image_tokens": cfg.tokens, "latent": [cfg.channels, cfg.latent_side, cfg.latent_side],
        "ms_per_step": step_ms, "ms_loop": loop, "ms_decode": dec, "ms_text": txt,
        "ms_per_image": (loop + (dec or 0.0) + (txt or 0.0)) / s.batch_size,
        "images_per_s": 1000.0 * s.batch_size / (loop + (dec or 0.0) + (txt or 0.0)),
        "peak_mem_mb": cfg.peak_mb, "tflops_per_step": tflops, "achieved_tflops": achieved,
        "pct_of_peak": 100.0 * achieved / peak_tflops if peak_tflops else None,
        "floor_ms_per_step": F.step_floor_ms(cfg.flops, peak_tflops) if peak_tflops else None,
        "loop_ms_repeats": cfg.loop_ms, "spread": spread,
    }


def _time_once(cfg: "_Config", pair: _Pair, s: BenchSettings, sigmas, interval, text, n_guided: int, clock: "_Clock",
               device, dtype, record: bool) -> None:
    """One timed run of a configuration: text encoders (when timed), the denoising loop (generate's loop and
    guidance), the decode; with `record`, appended to the configuration's repeats."""
    net = cfg.activate()
    v2, v1 = pair.velocity(net, 2 * s.batch_size), pair.velocity(net, s.batch_size)
    w = pair.backend.cfg_weight(s.guidance)
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    noise = torch.randn(s.batch_size, cfg.channels, cfg.latent_side, cfg.latent_side, generator=gen).to(device, dtype)

    cfg_velocity = flow.guided_velocity(lambda x, sigma: v2(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2), w)

    def velocity(x, sigma, guided_step):  # generate's guidance: one doubled batch where guided
        return cfg_velocity(x, sigma, True) if s.cfg and guided_step else v1(x, sigma)

    result = {}

    def loop():
        result["x"] = sample_latents(velocity, noise, sigmas, guidance_interval=interval)  # generate's loop

    with torch.inference_mode(), _sdpa(s.attention):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tms = None
        if text is not None:  # the prompt and, with CFG, the negative prompt of every image of the batch
            g = torch.Generator().manual_seed(s.seed)
            prompts = s.batch_size * (2 if s.cfg and n_guided else 1)
            tms = clock.time(lambda: text(prompts, g))
        ms = clock.time(loop)
        dms = clock.time(lambda: cfg.decode(result["x"])) if cfg.decode is not None else None
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            cfg.peak_mb = max(cfg.peak_mb or 0.0, peak)
    if record:
        cfg.loop_ms.append(ms)
        if dms is not None:
            cfg.decode_ms.append(dms)
        if tms is not None:
            cfg.text_ms.append(tms)


def run_bench(preset: Preset, s: BenchSettings, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measure both configurations; returns the report dict (see `davae bench --json`)."""
    check_settings(preset, s)
    s = dataclasses.replace(s, steps=s.steps or preset.sample.steps, cfg=s.cfg and _uses_cfg(preset, s.guidance),
                            guidance=preset.sample.guidance if s.guidance is None else s.guidance)
    say = progress or (lambda text: None)
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    if device.type == "cpu" and dtype != torch.float32:
        say(f"warning: {dtype_name} on a CPU is usually far slower than fp32")
    torch.manual_seed(s.seed)
    say("building the models (random weights)" if s.weights == "random" else f"loading {s.weights}")
    pair = _Pair(preset, s, device, dtype)
    c, p, text_tokens = pair.channels, pair.patch, pair.text_tokens
    dec_native = dec_davae = None
    if s.decode:
        dec_native, dec_davae = build_decoders(preset, device, dtype)
    text = None
    if s.text_encoders:
        say("building the text encoders (random weights)")
        text = pair.backend.random_text_encoders(device, dtype)
    # the preset's sampling grid; CFG (a doubled batch) only on the steps inside its guidance interval
    shapes = plan(preset, s.res)
    sigmas, interval = _grid(preset, s, shapes)
    n_guided = sum(s.cfg and flow.in_interval(float(sigmas[i]), interval) for i in range(s.steps))
    if shapes["native"]["latent"][0] != c or shapes["native"]["patch_size"] != p:
        raise DavaeError(f"the DiT reads {c} channels with patch {p}; the preset's dit.arch says "
                         f"{shapes['native']['latent'][0]} / {shapes['native']['patch_size']}")
    configs = []
    for name, dec in (("native", dec_native), ("davae", dec_davae)):
        ch, side = shapes[name]["latent"][0], shapes[name]["latent"][1]
        tokens = shapes[name]["image_tokens"]
        configs.append(_Config(name, ch, side, tokens, _mean_step_flops(pair.flops, shapes[name], s, n_guided),
                               pair.activate(name), dec))
    clock = _Clock(device)

    for i in range(s.warmup):
        for cfg in configs:
            say(f"warm-up {i + 1}/{s.warmup}: {cfg.name}")
            _time_once(cfg, pair, s, sigmas, interval, text, n_guided, clock, device, dtype, record=False)
    for r in range(s.repeats):
        for cfg in (configs if r % 2 == 0 else configs[::-1]):  # alternate A/B, and the order within a repeat
            say(f"repeat {r + 1}/{s.repeats}: {cfg.name} ({cfg.tokens} image tokens, {s.steps} steps)")
            _time_once(cfg, pair, s, sigmas, interval, text, n_guided, clock, device, dtype, record=True)
            gc.collect()

    peak_tflops = F.device_peak_tflops(torch.cuda.get_device_name(device), dtype_name) if device.type == "cuda" else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    out = {"res": s.res, "preset": preset.name, "device": device_name, "dtype": dtype_name, "steps": s.steps,
           "batch_size": s.batch_size, "cfg": s.cfg, "guidance": s.guidance,
           "guidance_interval": list(interval) if interval else None, "guided_steps": n_guided,
           "shift": preset.sample.shift, "repeats": s.repeats, "warmup": s.warmup,
           "compile": s.compile and s.compile_mode, "attention": s.attention, "weights": s.weights, "text_tokens": text_tokens,
           "peak_tflops": peak_tflops, "warnings": []}
    for cfg in configs:
        out[cfg.name] = _side_report(cfg, s, peak_tflops, out["warnings"])
    n, dv = out["native"], out["davae"]
    out["speedup_step"] = n["ms_per_step"] / dv["ms_per_step"]
    out["speedup_end_to_end"] = n["ms_per_image"] / dv["ms_per_image"]
    out["flop_ratio"] = F.flop_ratio(configs[0].flops, configs[1].flops)
    out.update(_end_to_end(preset, shapes, {c.name: c.flops for c in configs}, s, n_guided))
    out["decode_included"] = s.decode
    out["text_included"] = s.text_encoders
    return out


def _cpu_name() -> str:
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run_bench_sweep(preset: Preset, s: BenchSettings, resolutions: list[int],
                    progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """`run_bench` at each resolution in turn (repeats dropped); every one is checked before the first is
    measured, so a bad last `--res` fails at once rather than after minutes."""
    runs = [dataclasses.replace(s, res=r) for r in dict.fromkeys(resolutions)]
    for one in runs:
        check_settings(preset, one)
    say = progress or (lambda text: None)
    reports = []
    for i, one in enumerate(runs):
        prefix = f"{one.res}² ({i + 1}/{len(runs)}): " if len(runs) > 1 else ""
        reports.append(run_bench(preset, one, progress=lambda text, p=prefix: say(p + text)))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next resolution's models start from a clean allocator
    return reports


def plot_bench(reports: list[dict], out, overwrite: bool = False, date: Optional[str] = None):
    """A PNG of `run_bench` reports against resolution: left, the measured speedups (per step and end to end)
    with the FLOP ratios as their ideal lines; right, the milliseconds behind them. The title names the preset,
    the machine, the recipe and the date (`date`, default today). Written atomically; an existing `out` is
    refused unless `overwrite`. Returns the path."""
    import datetime
    import math

    from .plotting import new_figure, plain_log_ticks, png_bytes, write_output

    rs = sorted(reports, key=lambda r: r["res"])
    x = [r["res"] for r in rs]
    fig = new_figure(11.5, 5.2)
    ax, ax_ms = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    e2e = "end to end" + ("" if rs[0]["decode_included"] else " (no decode)")
    for key, ideal, label, color, dy in (("speedup_step", "flop_ratio", "per DiT step", "#1f5fa8", 7),
                                         ("speedup_end_to_end", "flop_ratio_end_to_end", e2e, "#c05a10", -14)):
        y = [r[key] for r in rs]
        ax.plot(x, y, "o-", color=color, lw=2, label=f"measured, {label}")
        ax.plot(x, [r[ideal] for r in rs], "--", color=color, lw=1.2, alpha=0.8, label=f"FLOP ratio (ideal), {label}")
        for xi, yi in zip(x, y):  # per step above its point, end to end below: the two never overlap
            ax.annotate(f"{yi:.2f}x", (xi, yi), xytext=(0, dy), textcoords="offset points", ha="center",
                        fontsize=8, color=color)
    ax.axhline(1.0, color="#888888", lw=0.8, ls=":")
    ax.set_ylabel("speedup: native time / DA-VAE time")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")
    for side, marker, label in (("native", "o", "native"), ("davae", "s", "DA-VAE")):
        ax_ms.plot(x, [r[side]["ms_per_step"] for r in rs], marker + "-", color="#1f5fa8",
                   mfc="white" if side == "davae" else None, label=f"{label}, ms / step")
        ax_ms.plot(x, [r[side]["ms_per_image"] for r in rs], marker + "-", color="#c05a10",
                   mfc="white" if side == "davae" else None, label=f"{label}, ms / image ({e2e})")
    ax_ms.set_yscale("log")
    ms = [r[side][k] for r in rs for side in ("native", "davae") for k in ("ms_per_step", "ms_per_image")]
    plain_log_ticks(ax_ms.yaxis, math.log10(max(ms) / min(ms)))
    ax_ms.set_ylabel("milliseconds (median)")
    ax_ms.legend(fontsize=8)
    for a in (ax, ax_ms):
        _resolution_axis(a, rs)
    r0 = rs[0]
    cfg = f"CFG on {r0['guided_steps']} of {r0['steps']} steps" if r0["cfg"] else f"{r0['steps']} steps, no CFG"
    title = (f"DA-VAE speedup over native: {r0['preset']} on {r0['device']}, {r0['dtype']}, "
             f"{date or datetime.date.today().isoformat()}\n{cfg}, batch {r0['batch_size']}, "
             f"median of {r0['repeats']}, {r0['weights']} weights")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return write_output(out, png_bytes(fig, title=title), overwrite, param="plot")


def _resolution_axis(ax, reports: list[dict]) -> None:
    """Resolutions on a log2 axis, each tick naming its image tokens (native -> DA-VAE)."""
    x = [r["res"] for r in reports]
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['res']}²\n{r['native']['image_tokens']}->{r['davae']['image_tokens']} tok"
                        for r in reports], fontsize=8)
    ax.minorticks_off()
    if len(x) == 1:
        ax.set_xlim(x[0] / 1.5, x[0] * 1.5)
    else:
        ax.set_xlim(min(x) / 1.25, max(x) * 1.25)
    ax.set_xlabel("image resolution (image tokens: native -> DA-VAE)")
    ax.grid(alpha=0.3)
