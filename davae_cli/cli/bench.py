"""`davae bench`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from .common import (DeviceOpt, Dtype, DtypeOpt, JsonOpt, PresetOpt, SetOpt, dtype_name, err, fail, print_json,
                     resolve_preset)

EXAMPLES = """
Examples:

  davae bench                                              # tiny preset on this machine, a few seconds

  davae bench --preset sd35m-1024 --res 1024               # SD3.5 Medium architecture, random weights (GPU: bf16)

  davae bench --preset sd35m-2048 --res 2048 --compile --json > bench-2048.json

  davae bench --preset sd35m-1024 --res 512 --steps 1 --repeats 1 --warmup 0 --no-decode   # CPU, one step

  davae bench --preset sd35m-1024 --res 1024 --batch-size 10 --text-encoders   # GPU: the paper's batch, with
                                                           # CLIP-L/CLIP-G/T5-XXL (random weights) timed too

  davae bench --preset sd35m-1024 --res 512 --res 1024 --res 2048 --plot speedup.png   # several resolutions,
                                                           # one plot (pip install "davae\\[plot]")

  davae bench --res 128 --res 256 --steps 2 --plot tiny.png --overwrite   # CPU, under a minute; replaces tiny.png
"""


def _fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def bench_cmd(
    res: Optional[list[int]] = typer.Option(None, "--res", help="Target image resolution (default: the preset's adapt_dit.resolution); repeat it to measure several in one call."),
    preset: str = PresetOpt,
    weights: str = typer.Option("random", "--weights", help="`random` (no download) or a local DiT folder / checkpoint."),
    steps: Optional[int] = typer.Option(None, "--sampling-steps", "--steps", help="Denoising (sampling) steps per image (default: the preset's sample.steps)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per batch."),
    repeats: int = typer.Option(3, "--repeats", help="Measured repeats per configuration (medians are reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured runs per configuration first."),
    dtype: Optional[Dtype] = DtypeOpt,
    compile_: bool = typer.Option(False, "--compile", help="torch.compile both DiT configurations."),
    compile_mode: str = typer.Option("default", "--compile-mode", help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune."),
    no_cfg: bool = typer.Option(False, "--no-cfg", help="No classifier-free guidance (batch not doubled)."),
    no_decode: bool = typer.Option(False, "--no-decode", help="Skip the VAE decode timing."),
    attention: str = typer.Option("default", "--attention", help="SDPA backend: default, flash, efficient, cudnn, math."),
    flops_only: bool = typer.Option(False, "--flops-only", help="Print the FLOP model only (per step, per image with text encoders and decode; the preset's architecture on the meta device: instant, no memory) and run nothing."),
    text_encoders: bool = typer.Option(False, "--text-encoders", help="Also time the text encoders (SD3: CLIP-L, CLIP-G, T5-XXL with random weights of their architecture; about 11 GB in bf16) and count them in end to end."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG: speedup per step and end to end against resolution, the FLOP ratio as the ideal, the machine and date in the title (matplotlib: the `plot` extra)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --plot file."),
    device: Optional[str] = DeviceOpt,
    sets: Optional[list[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Measure the DA-VAE speedup: native vs DA-VAE latent on the same DiT, side by side.

    The preset's sampling recipe (steps, guidance, interval, shift; --steps overrides); alternating runs,
    medians, CUDA events on GPU; the analytic FLOP ratio is shown as the ideal. Several --res are measured one
    after the other; --json then prints {"results": [...]} (one --res: the report itself)."""
    from ..bench import BenchSettings, flop_report, plot_bench, run_bench_sweep

    p = resolve_preset(preset, sets)
    resolutions = list(dict.fromkeys(res or [p.adapt_dit.resolution]))
    s = BenchSettings(res=resolutions[0], steps=steps, batch_size=batch_size, repeats=repeats,
                      warmup=warmup, dtype=dtype_name(dtype), compile=compile_, compile_mode=compile_mode, cfg=not no_cfg, decode=not no_decode,
                      attention=attention, weights=weights, device=device,
                      text_encoders=text_encoders)
    if flops_only:
        if plot is not None:
            fail("--plot draws measured speedups: drop --flops-only (or --plot)")
        _emit([flop_report(p, dataclasses.replace(s, res=r)) for r in resolutions], json_out, _render_flops)
        return
    if plot is not None:  # before minutes of measuring: matplotlib is there and the file may be written
        from ..plotting import check_output, require_matplotlib

        require_matplotlib()
        check_output(plot, overwrite, param="plot")
    if json_out:
        reports = run_bench_sweep(p, s, resolutions)
    else:
        with err.status("measuring") as status:
            reports = run_bench_sweep(p, s, resolutions, progress=lambda text: status.update(text))
    written = plot_bench(reports, plot, overwrite=overwrite) if plot is not None else None
    _emit(reports, json_out, _render, plot=written)


def _emit(reports: list[dict], json_out: bool, render, plot: Optional[Path] = None) -> None:
    """One report as before (its JSON object, or its table); several: {"results": [...]}, or a table each and
    a summary; then the plot's path."""
    if json_out:
        obj = reports[0] if len(reports) == 1 else {"results": reports}
        print_json({**obj, "plot": str(plot)} if plot is not None else obj)
        return
    for r in reports:
        render(r)
    if len(reports) > 1:
        _render_summary(reports)
    if plot is not None:
        typer.echo(f"plot: {plot}")


def _render_summary(reports: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    measured = "speedup_step" in reports[0]
    t = Table(title=f"{reports[0]['preset']}: " + ("speedups" if measured else "FLOP ratios") + " by resolution",
              title_justify="left")
    cols = (["speedup / step", "FLOP ratio / step", "speedup end to end", "FLOP ratio end to end"] if measured
            else ["FLOP ratio / step", "FLOP ratio end to end"])
    t.add_column("resolution")
    for col in cols:
        t.add_column(col, justify="right")
    for r in reports:
        vals = ([r["speedup_step"], r["flop_ratio"], r["speedup_end_to_end"], r["flop_ratio_end_to_end"]]
                if measured else [r["flop_ratio"], r["flop_ratio_end_to_end"]])
        t.add_row(f"{r['res']}²", *(f"{v:.2f}x" for v in vals))
    Console(highlight=False).print(t)


def _render_flops(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    n, d, e = r["native"], r["davae"], r["tflops_per_image"]
    t = Table(title=f"{r['preset']} at {r['res']}²: FLOP model ({r['steps']} steps, CFG on {r['guided_steps']}, "
                    f"batch {r['batch_size']})", title_justify="left")
    for col, j in (("", "left"), ("native", "right"), ("DA-VAE", "right"), ("native / DA-VAE", "right")):
        t.add_column(col, justify=j)
    t.add_row("image tokens", str(n["image_tokens"]), str(d["image_tokens"]), f"{n['image_tokens'] / d['image_tokens']:.1f}x")
    t.add_row("TFLOP / step", f"{n['tflops_per_step']:.4g}", f"{d['tflops_per_step']:.4g}", f"{r['flop_ratio']:.2f}x")
    t.add_row("TFLOP text encoders / image", f"{e['text']:.4g}", f"{e['text']:.4g}", "")
    t.add_row("TFLOP decode / image", f"{e['decode_native']:.4g}", f"{e['decode_davae']:.4g}", "")
    t.add_row("TFLOP / image (end to end)", f"{e['native']:.4g}", f"{e['davae']:.4g}", f"{r['flop_ratio_end_to_end']:.2f}x")
    Console(highlight=False).print(t)


def _render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    n, d = r["native"], r["davae"]
    cfg = (f"CFG (batch x2) on {r['guided_steps']} of {r['steps']} steps" if r["cfg"] else "no CFG")
    title = (f"{r['preset']} at {r['res']}², {r['device']}, {r['dtype']}, {r['steps']} steps, {cfg}, "
             f"batch {r['batch_size']}, median of {r['repeats']}")
    t = Table(title=title, title_justify="left")
    t.add_column("")
    t.add_column("native", justify="right")
    t.add_column("DA-VAE", justify="right")
    t.add_column("native / DA-VAE", justify="right")

    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    t.add_row("latent (C x h x w)", "x".join(map(str, n["latent"])), "x".join(map(str, d["latent"])), "")
    t.add_row("image tokens", str(n["image_tokens"]), str(d["image_tokens"]),
              _fmt(ratio(n["image_tokens"], d["image_tokens"]), ".1f") + "x")
    t.add_row("DiT ms / step", _fmt(n["ms_per_step"]), _fmt(d["ms_per_step"]), f"[bold]{r['speedup_step']:.2f}x[/]")
    t.add_row("denoising loop ms", _fmt(n["ms_loop"], ".1f"), _fmt(d["ms_loop"], ".1f"), "")
    if r["text_included"]:
        t.add_row("text encoders ms", _fmt(n["ms_text"], ".1f"), _fmt(d["ms_text"], ".1f"), "")
    t.add_row("VAE decode ms", _fmt(n["ms_decode"], ".1f", "skipped"), _fmt(d["ms_decode"], ".1f", "skipped"),
              _fmt(ratio(n["ms_decode"], d["ms_decode"]), ".2f", "") + ("x" if n["ms_decode"] else ""))
    t.add_row("end to end ms / image", _fmt(n["ms_per_image"], ".1f"), _fmt(d["ms_per_image"], ".1f"),
              f"[bold]{r['speedup_end_to_end']:.2f}x[/]")
    t.add_row("images / s", _fmt(n["images_per_s"], ".3f"), _fmt(d["images_per_s"], ".3f"), "")
    t.add_row("peak GPU memory MB", _fmt(n["peak_mem_mb"], ".0f", "n/a (CPU)"), _fmt(d["peak_mem_mb"], ".0f", "n/a (CPU)"), "")
    t.add_row("TFLOP / step (analytic)", _fmt(n["tflops_per_step"], ".4g"), _fmt(d["tflops_per_step"], ".4g"),
              f"{r['flop_ratio']:.2f}x ideal")
    e = r["tflops_per_image"]
    t.add_row("TFLOP / image (steps + text + decode)", _fmt(e["native"], ".4g"), _fmt(e["davae"], ".4g"),
              f"{r['flop_ratio_end_to_end']:.2f}x ideal")
    t.add_row("achieved TFLOP/s", _fmt(n["achieved_tflops"], ".3g"), _fmt(d["achieved_tflops"], ".3g"), "")
    if r["peak_tflops"]:
        t.add_row(f"% of {r['peak_tflops']:.0f} TFLOP/s peak", _fmt(n["pct_of_peak"], ".1f"), _fmt(d["pct_of_peak"], ".1f"), "")
        t.add_row("FLOP floor ms / step", _fmt(n["floor_ms_per_step"]), _fmt(d["floor_ms_per_step"]), "")
    out.print(t)
    for w in r["warnings"]:
        err.print(f"[yellow]warning:[/] {w}")
    if not r["decode_included"]:
        out.print("end to end excludes the VAE decode (--no-decode)")
    w = "random weights" if r["weights"] == "random" else f"weights from {r['weights']}"
    if not r["text_tokens"]:
        text = ""
    elif r["text_included"]:
        text = f", {r['text_tokens']} text tokens (text encoders with random weights, timed)"
    else:
        text = f", {r['text_tokens']} text tokens (random embeddings; text encoding is not timed: --text-encoders)"
    out.print(f"Measured: the {r['preset']} preset's DiT ({w}) on the native latent and on the DA-VAE latent "
              f"at {r['res']}²{text}.")
    if r["native"]["peak_mem_mb"] is None:  # measured on a CPU
        out.print("On a GPU, measure the real recipe: davae bench --preset sd35m-1024 --res 1024 "
                  "(and --preset sd35m-2048 --res 2048); the paper reports ~4x and 6.04x.")
