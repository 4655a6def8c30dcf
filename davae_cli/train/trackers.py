"""Experiment trackers through accelerate (`Accelerator(log_with=...)`, `init_trackers`, `log`): what
`--report-to tensorboard|wandb|trackio|all|none` turns on. `log.jsonl` stays the record of a run; a tracker
gets the same numbers: every numeric field of each log record (the loss terms, lr, grad norm, steps/s, the
evaluations) as `<event>/<field>` at the record's step, the held-out reconstruction grids as images, and the
run's config (flattened) as hyperparameters. Only the main process logs (accelerate's rule). Nothing here
imports a tracker package: accelerate imports the ones named, when the run starts.

Files go under `RUN/trackers/`: TensorBoard's event files (`RUN/trackers/davae/`), wandb's folder, and
`run_id`, the stable name a resumed run reopens its wandb or trackio run by (trackio keeps its data in its own
`TRACKIO_DIR`). A resume continues the same tracker run: TensorBoard appends to its folder and hides
(`purge_step`) what was logged after the checkpoint the run resumes from, as `log.jsonl` drops it; wandb and
trackio reopen the run of `run_id` (`resume="allow"`; wandb keeps the steps it already has, so the steps
trained again after a kill reach it only past the last one it saw). Images go to the trackers whose accelerate
class has `log_images` (TensorBoard, wandb).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..errors import DavaeError
from ..latents import atomic_write_bytes

TRACKERS = ("tensorboard", "wandb", "trackio")
TRACKER_DIR = "trackers"  # RUN/trackers
PROJECT = "davae"  # the wandb / trackio project; TensorBoard's folder under RUN/trackers
RUN_ID_FILE = "run_id"
_NOT_LOGGED = ("start",)  # log events that describe the set-up (device, counts), not the training


def _problem(name: str) -> Optional[str]:
    """Why the tracker `name` cannot run here (its package, or accelerate too old for it), or None."""
    from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "trackio": is_trackio_available}[name]()
    if not available:
        return f"needs the {name} package: pip install \"davae[{name}]\""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if name not in LOGGER_TYPE_TO_CLASS:  # trackio came with accelerate 1.9
        return f"needs a newer accelerate: pip install \"davae[{name}]\""
    return None


def tracker_names(report_to: Union[None, str, Iterable[str]]) -> list[str]:
    """The trackers `report_to` names ("tensorboard", "wandb", "trackio", "all", "none", or a comma-separated
    list of them), each checked to be installed: an unknown name or a missing package is one line naming the
    extra to install. "all" is every one of the three that is installed (at least one must be)."""
    words = [report_to] if report_to is None or isinstance(report_to, str) else list(report_to)
    words = [w.strip().lower() for word in words if word for w in str(word).split(",") if w.strip()]
    unknown = [w for w in words if w not in (*TRACKERS, "all", "none")]
    if unknown:
        raise DavaeError(f"{unknown[0]!r} is not a tracker; pass tensorboard, wandb, trackio, all or none",
                         param="report_to")
    if "all" in words:
        names = [n for n in TRACKERS if _problem(n) is None]
        if not names:
            raise DavaeError("all: no tracker is installed; pip install \"davae[tensorboard]\" (or davae[wandb], "
                             "davae[trackio])", param="report_to")
        return names
    names = list(dict.fromkeys(w for w in words if w != "none"))
    for name in names:
        why = _problem(name)
        if why is not None:
            raise DavaeError(f"{name} {why}", param="report_to")
    return names


def flat_scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record as {"a.b": value}; strings, None, booleans and lists are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def hyperparameters(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of scalars (trackers reject nested dicts; TensorBoard rejects lists, so a
    list becomes its text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(hyperparameters(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value) if isinstance(value, (list, tuple)) else value
    return out


def run_id(run_dir: Path) -> str:
    """The run's stable tracker name (`RUN/trackers/run_id`, made by the first start): the folder's name and a
    random suffix, so two runs in folders of the same name stay two runs."""
    path = Path(run_dir) / TRACKER_DIR / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(run_dir).resolve().name)[:48]
    rid = f"{slug or 'run'}-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, rid.encode())
    return rid


def accelerator_options(names: list[str], run_dir: Path) -> dict:
    """The `Accelerator(...)` arguments for these trackers (none without any)."""
    if not names:
        return {}
    return {"log_with": list(names), "project_dir": str(Path(run_dir) / TRACKER_DIR)}


class Trackers:
    """The accelerator's trackers for one run: `start` (hyperparameters, the same tracker run on resume),
    `log` (a log.jsonl record), `log_image`, `finish`. Inert when the accelerator reports to none."""

    def __init__(self, acc, run_dir: Path):
        self.acc, self.run_dir = acc, Path(run_dir)
        self.names = [str(t) for t in (getattr(acc, "log_with", None) or [])]
        self.started = False

    def start(self, config: dict, job: str, start_step: int, resumed: bool) -> Optional[str]:
        """Start the trackers (main process) with `config` as hyperparameters; `start_step`/`resumed`: where
        a resumed run continues. Returns a line saying where the logs go, or None without trackers."""
        if not self.names or self.started or not self.acc.is_main_process:
            return None
        rid = run_id(self.run_dir)
        folder = self.run_dir / TRACKER_DIR
        kwargs = {
            # a resume hides what was logged after its checkpoint, as log.jsonl drops it; a fresh start everything
            "tensorboard": {"purge_step": start_step + 1 if resumed else 0},
            "wandb": {"id": rid, "name": rid, "resume": "allow", "dir": str(folder), "job_type": job},
            "trackio": {"name": rid, "resume": "allow"},
        }
        self.acc.init_trackers(PROJECT, config=hyperparameters(config),
                               init_kwargs={n: kwargs[n] for n in self.names if n in kwargs})
        self.started = True
        where = {"tensorboard": f"tensorboard --logdir {folder}", "wandb": f"wandb run {rid} (files in {folder})",
                 "trackio": f"trackio project {PROJECT}, run {rid} (trackio show)"}
        return "reporting to " + "; ".join(where[n] for n in self.names if n in where)

    def log(self, record: dict) -> None:
        """A log.jsonl record's numbers as `<event>/<field>` at its step."""
        if not self.started or record.get("event") in _NOT_LOGGED or "step" not in record:
            return
        values = {f"{record.get('event', 'log')}/{k}": v for k, v in flat_scalars(record).items() if k != "step"}
        if values:
            self.acc.log(values, step=int(record["step"]))

    def log_image(self, name: str, image, step: int) -> None:
        """An (H, W, 3) uint8 image, to every tracker that takes images (accelerate's `log_images`)."""
        if not self.started:
            return
        for tracker in self.acc.trackers:
            if hasattr(tracker, "log_images"):
                extra = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
                tracker.log_images({name: image[None]}, step=step, **extra)

    def finish(self) -> None:
        """Close every tracker (what `Accelerator.end_training` does, without also ending the process group the
        caller may still use)."""
        if not self.started:
            return
        for tracker in self.acc.trackers:
            tracker.finish()
        self.acc.trackers.clear()
        self.started = False
