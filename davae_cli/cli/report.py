"""`davae report`: one self-contained HTML page for a run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import JsonOpt, err, print_json

EXAMPLES = """
Examples:

  davae report runs/tiny                                   # writes report.html here; open it in a browser

  davae report runs/tiny --out runs/tiny-report.html --overwrite   # replace the page while the run trains

  davae report runs/sd3-adapt --out adapt.html --json      # {"report": ..., "train_records": ..., ...}

The page (no server, images inline): the loss curves and learning rate from log.jsonl, the evaluation metrics
over steps, the latest sample grid, the events (starts, resumes, export), the checkpoints and final/, and the
settings (config.yaml). It only reads the run folder. Plots need matplotlib: pip install "davae\\[plot]".
"""


def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder: the --out of train-vae, adapt-dit or train-dit."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    json_out: bool = JsonOpt,
) -> None:
    """Write an HTML report of a run: loss curves, learning rate, evaluations, samples, checkpoints, settings."""
    from ..metrics.report import write_report

    if json_out:
        r = write_report(run_dir, out, overwrite=overwrite)
    else:
        with err.status("writing the report"):
            r = write_report(run_dir, out, overwrite=overwrite)
    if json_out:
        print_json({"report": str(r.path), "train_records": r.train_records, "eval_records": r.eval_records,
                    "images": r.images, "bytes": r.bytes})
        return
    typer.echo(f"{r.path}: {r.train_records} train and {r.eval_records} eval records, {r.images} images, "
               f"{r.bytes / 2**20:.1f} MB (open it in a browser)")
