"""The run report: one self-contained HTML page for a run folder (`davae report RUN`).

It reads what a trainer leaves in its run folder (`log.jsonl`, `config.yaml`, `samples/`, `checkpoints/`,
`final/`, and `run.json` where there is one) and writes nothing there. The page holds the loss curves and the
learning rate of the `train` records, the `eval` metrics over steps (plots and a table), the other events
(start, resume, probe, export), the latest sample grid, the checkpoint list and the settings. Images are inline
`data:` PNGs and the style is inline, so the page opens from disk in a browser with no server and can be mailed
as one file. A run still training can be reported: a line cut short at the end of the log is skipped and
counted. Plots need matplotlib (the `plot` extra).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import DavaeError
from ..jsonl import read_jsonl

NOT_CURVES = {"step", "event", "elapsed_s"}  # numbers in a train record that are not a curve over steps
MAX_SAMPLE_SIDE = 2048  # a larger sample grid is shown downscaled (the page stays a few MB)
PANELS_PER_ROW = 3


@dataclass
class RunLog:
    """The records of `log.jsonl` in file order, and how many lines could not be read."""
    records: list[dict] = field(default_factory=list)
    bad_lines: int = 0

    def of(self, event: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == event]


@dataclass
class ReportResult:
    path: Path
    train_records: int
    eval_records: int
    images: int
    bytes: int


def read_log(path: Path) -> RunLog:
    """Every JSON object line of `path` (none when it is absent); a torn or foreign line is counted, not fatal."""
    records, bad = read_jsonl(path)
    return RunLog(records=records, bad_lines=bad)


def _flat(rec: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record, nested dicts joined with dots (`detail_structure.base.std`)."""
    out = {}
    for k, v in rec.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


def series(records: list[dict], skip: set[str] = NOT_CURVES) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} of every number the records log, in the order names first appear. A step logged
    twice (a resumed run repeats the steps after its checkpoint) keeps its last value."""
    by_name: dict[str, dict[int, float]] = {}
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)):
            continue
        for name, v in _flat(rec).items():
            if name not in skip:
                by_name.setdefault(name, {})[int(step)] = v
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_name.items()}


# ------------------------------------------------------------------ plots
def _panel_grid(n: int, width: float = 4.2, height: float = 2.7):
    from ..plotting import new_figure

    cols = min(PANELS_PER_ROW, n)
    rows = math.ceil(n / cols)
    fig = new_figure(width * cols, height * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _draw_curve(ax, steps: list[int], values: list[float], color: str = "#1f5fa8", label: Optional[str] = None):
    """Raw values, and over 50 points a running mean on top (the raw line faint)."""
    many = len(values) > 50
    ax.plot(steps, values, color=color, lw=0.8 if many else 1.5, alpha=0.35 if many else 1.0,
            marker="" if len(values) > 1 else "o", label=None if many else label)
    if many:
        ax.plot(steps, _smooth(values, max(2, len(values) // 25)), color=color, lw=1.6, label=label)
    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and max(positive) / min(positive) > 30:  # spans decades: a log axis
        from ..plotting import plain_log_ticks

        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis, math.log10(max(positive) / min(positive)))


def curves_figure(curves: dict[str, tuple[list, list]], resumes: list[int], title: str):
    """One small panel per curve (its own scale: losses differ by orders of magnitude), resumes marked."""
    fig, axes = _panel_grid(len(curves))
    for ax, (name, (steps, values)) in zip(axes, curves.items()):
        _draw_curve(ax, steps, values)
        for step in resumes:
            ax.axvline(step, color="#999999", lw=0.8, ls=":")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def eval_groups(evals: dict[str, tuple[list, list]]) -> dict[str, dict[str, tuple[list, list]]]:
    """Eval metrics grouped by their last dotted part (`davae.psnr` and `base_full.psnr` share the psnr panel);
    a group whose every series is constant (an image count, a fixed reference alone) is left to the table."""
    groups: dict[str, dict] = {}
    for name, s in evals.items():
        head, _, tail = name.rpartition(".")
        groups.setdefault(tail, {})[head or name] = s
    return {g: members for g, members in groups.items()
            if any(len(set(v)) > 1 for _, v in members.values())}


def eval_figure(groups: dict[str, dict[str, tuple[list, list]]]):
    colors = ["#1f5fa8", "#c05a10", "#2a8a3a", "#8a2a8a", "#7a7a20", "#207a7a", "#a02a2a", "#555555"]
    fig, axes = _panel_grid(len(groups))
    for ax, (metric, members) in zip(axes, groups.items()):
        for i, (who, (steps, values)) in enumerate(members.items()):
            ax.plot(steps, values, marker="o", ms=3, lw=1.4, color=colors[i % len(colors)],
                    label=who if who != metric else None)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(members) > 1:
            ax.legend(fontsize=6)
    fig.suptitle("evaluation (held-out images) over steps", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ HTML pieces
def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _num(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}" if isinstance(v, float) else _e(v)


def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{_e(alt)}">'


def _fig_img(fig, alt: str) -> str:
    from ..plotting import png_bytes

    return _img(png_bytes(fig), alt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _none(text: str) -> str:
    return f'<p class="none">{_e(text)}</p>'


def _summary_rows(curves: dict[str, tuple[list, list]]) -> list[list[str]]:
    rows = []
    for name, (steps, values) in curves.items():
        i_min = min(range(len(values)), key=values.__getitem__)
        rows.append([f"<code>{_e(name)}</code>", _num(values[0]), _num(values[-1]),
                     f"{_num(values[i_min])} (step {steps[i_min]})", str(len(values))])
    return rows


def training_section(log: RunLog) -> str:
    train = log.of("train")
    if not train:
        return "<h2>Training</h2>" + _none("No train records in log.jsonl: the run has not logged a step yet.")
    curves = series(train)
    lr = {k: curves.pop(k) for k in [k for k in curves if k == "lr" or k.startswith("lr_") or k.endswith(("_lr", ".lr"))]}
    resumes = [int(r.get("start_step", 0)) for r in log.of("start") if r.get("start_step")]
    parts = ["<h2>Training</h2>"]
    if curves:
        parts.append(_fig_img(curves_figure(curves, resumes, "losses and training signals per logged step"
                                            + (" (dotted: resumed)" if resumes else "")), "loss curves"))
    if lr:
        parts.append("<h3>Learning rate</h3>" + _fig_img(curves_figure(lr, resumes, "learning rate"), "learning rate"))
    else:
        parts.append("<h3>Learning rate</h3>" + _none("No learning rate (lr) in the train records."))
    parts.append("<h3>Every logged value</h3>")
    parts.append(_table(["name", "first", "last", "lowest", "records"], _summary_rows({**curves, **lr})))
    return "\n".join(parts)


def evaluation_section(log: RunLog) -> str:
    evals = log.of("eval")
    if not evals:
        return "<h2>Evaluation</h2>" + _none("No eval records in log.jsonl (this run evaluated nothing yet, or "
                                              "its recipe has no held-out images).")
    metrics = series(evals, skip={"step", "event"})
    parts = ["<h2>Evaluation</h2>"]
    groups = eval_groups(metrics) if len(evals) > 1 else {}
    if groups:
        parts.append(_fig_img(eval_figure(groups), "evaluation metrics over steps"))
    steps = sorted({int(r["step"]) for r in evals if isinstance(r.get("step"), (int, float))})
    rows = []
    for name, (s, v) in metrics.items():
        at = dict(zip(s, v))
        rows.append([f"<code>{_e(name)}</code>"] + [_num(at[k]) if k in at else "" for k in steps])
    parts.append(_table(["metric"] + [f"step {k}" for k in steps], rows))
    return "\n".join(parts)


def events_section(log: RunLog) -> str:
    rows = []
    for r in log.records:
        if r.get("event") in ("train", "eval"):
            continue
        rest = {k: v for k, v in r.items() if k not in ("step", "event")}
        rows.append([_e(r.get("step", "")), _e(r.get("event", "(none)")), f"<code>{_e(json.dumps(rest))}</code>"])
    if not rows:
        return ""
    return "<h2>Events</h2>" + _table(["step", "event", "details"], rows)


# ------------------------------------------------------------------ the folder's files
def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB"


def _when(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def _sample_png(path: Path) -> tuple[bytes, str]:
    """The sample's PNG bytes (downscaled when a side exceeds MAX_SAMPLE_SIDE) and a note on its size."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if max(w, h) <= MAX_SAMPLE_SIDE and im.format == "PNG":
            return path.read_bytes(), f"{w}x{h}"
        im = im.convert("RGB")
        im.thumbnail((MAX_SAMPLE_SIDE, MAX_SAMPLE_SIDE))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue(), f"{w}x{h}, shown at {im.size[0]}x{im.size[1]}"


def samples_section(run: Path, log: RunLog) -> str:
    files = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
    if not files:
        return "<h2>Samples</h2>" + _none("No sample images (samples/*.png) in this run.")
    latest = max(files, key=lambda p: (p.stem, p.stat().st_mtime))  # step-NNNNNNN: the name sorts by step
    try:
        png, size = _sample_png(latest)
    except OSError as e:
        return "<h2>Samples</h2>" + _none(f"samples/{latest.name} could not be read: {e}")
    vae = any("davae.psnr" in r for r in log.of("eval"))
    cols = ("<p>Rows: held-out images; columns: input | base VAE at 1/s + bicubic | DA-VAE.</p>" if vae else "")
    others = ", ".join(f"<code>{_e(p.name)}</code>" for p in files if p != latest)
    return ("<h2>Samples</h2>" + f"<p>The latest: <code>samples/{_e(latest.name)}</code> ({_e(size)}).</p>" + cols
            + _img(png, f"samples/{latest.name}") + (f"<p>Also in samples/: {others}</p>" if others else ""))


def checkpoints_section(run: Path) -> str:
    ck = run / "checkpoints"
    steps = sorted(p for p in ck.glob("step-*") if p.is_dir()) if ck.is_dir() else []
    pointer = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else None
    parts = ["<h2>Checkpoints</h2>"]
    if steps:
        parts.append(_table(["checkpoint", "size", "written", ""],
                            [[f"<code>{_e(p.name)}</code>", _mb(_size(p)), _when(p),
                              "latest" if p.name == pointer else ""] for p in steps]))
    else:
        parts.append(_none("No checkpoints (checkpoints/step-*)."))
    final = run / "final"
    if final.is_dir():
        files = sorted(p for p in final.rglob("*") if p.is_file())
        parts.append("<h3>final/ (the exported model)</h3>")
        parts.append(_table(["file", "size", "written"], [[f"<code>{_e(p.relative_to(final))}</code>", _mb(_size(p)),
                                                           _when(p)] for p in files]))
    else:
        parts.append(_none("No final/ folder: the run has not exported its model yet."))
    return "\n".join(parts)


def settings_section(run: Path) -> str:
    parts = ["<h2>Settings</h2>"]
    for name, what in (("config.yaml", "the resolved preset"), ("run.json", "the run's inputs")):
        path = run / name
        if path.is_file():
            parts.append(f"<h3><code>{name}</code> ({what})</h3><pre>{_e(path.read_text(errors='replace'))}</pre>")
    if len(parts) == 1:
        parts.append(_none("No config.yaml in this run folder."))
    return "\n".join(parts)


# ------------------------------------------------------------------ the page
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
img { max-width: 100%; height: auto; display: block; margin: .8em 0; }
table { border-collapse: collapse; font-size: .85em; } .scroll { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; } thead th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .8em; }
.none { color: #777; font-style: italic; } .meta { color: #555; }
"""


def _header(run: Path, log: RunLog) -> str:
    import yaml

    from .. import __version__

    name = run.resolve().name
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    except yaml.YAMLError:
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    steps = [r["step"] for r in log.of("train") if isinstance(r.get("step"), (int, float))]
    start = (log.of("start") or [{}])[-1]
    state = ("finished (exported to final/)" if log.of("export") and (run / "final").is_dir()
             else "stopped at its time limit" if log.of("time_limit") else "not finished (or still training)")
    facts = [f"preset <code>{_e(cfg.get('name', '?'))}</code>", f"last logged step {max(steps) if steps else 0}",
             _e(state)]
    if start.get("device"):
        facts.append(f"device {_e(start['device'])} x {_e(start.get('world_size', 1))}")
    lines = [f"<h1>Run report: {_e(name)}</h1>", f"<p class=\"meta\"><code>{_e(run.resolve())}</code><br>",
             " · ".join(facts) + "<br>"]
    if cfg.get("description"):
        lines.append(f"{_e(cfg['description'])}<br>")
    lines.append(f"written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by davae {_e(__version__)}</p>")
    if log.bad_lines:
        lines.append(_none(f"{log.bad_lines} line(s) of log.jsonl could not be read and were skipped "
                           "(a line cut short by a kill, or one still being written)."))
    return "\n".join(lines)


def build_report(run_dir: str | Path) -> tuple[str, dict]:
    """The page for `run_dir` as one HTML string, and counts of what it holds (train and eval records,
    images). A folder with neither log.jsonl nor config.yaml is not a run folder: one-line error."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DavaeError(f"{run}: no such folder (give a run folder: the --out of train-vae, adapt-dit or "
                         "train-dit)")
    if not (run / "log.jsonl").is_file() and not (run / "config.yaml").is_file():
        raise DavaeError(f"{run} is not a run folder: it has no log.jsonl nor config.yaml")
    log = read_log(run / "log.jsonl")
    body = [_header(run, log), training_section(log), evaluation_section(log), samples_section(run, log),
            events_section(log),
            checkpoints_section(run), settings_section(run)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>davae run report: {_e(run.resolve().name)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")
    return page, {"train_records": len(log.of("train")), "eval_records": len(log.of("eval")),
                  "images": page.count("<img ")}


def write_report(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> ReportResult:
    """Write `build_report(run_dir)` to `out` atomically; an existing `out` is refused unless `overwrite`."""
    from ..plotting import check_output, require_matplotlib, write_output

    check_output(out, overwrite)
    require_matplotlib()
    page, counts = build_report(run_dir)
    data = page.encode("utf-8")
    path = write_output(out, data, overwrite)
    return ReportResult(path=path, bytes=len(data), **counts)
