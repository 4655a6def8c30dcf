"""The `davae` command line: a thin Typer app over the library.

Each command module exports a plain function and its examples; this module registers them and maps the
library's errors to one line and an exit code once, for every command. Nothing here, nor in the command
modules at import time, loads torch or diffusers: `davae --help` and `davae <command> --help` start at once.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import typer

from . import (adapt_dit, bench, ceilings, codec, common, convert, eval_fid, generate, presets, report, synth,
               train_dit, train_vae, upscale)

app = typer.Typer(
    name="davae",
    help="DA-VAE: generate at 2x the resolution for the token count of the base resolution.\n\n"
         "Train a detail-aligned VAE on a pretrained base VAE, encode/decode latents, adapt a DiT, generate, and "
         "measure the speedup.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    """`--version`, eager: handled while the options are parsed, so it needs no command after it."""
    if value:
        from .. import __version__

        print(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (also DAVAE_DEBUG=1)."),
          version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                       callback=_print_version)) -> None:
    if debug:
        common.STATE["debug"] = True
        os.environ["DAVAE_DEBUG"] = "1"


def _one_line_errors(fn: Callable) -> Callable:
    """Run a command inside `common.errors()`: expected failures become one line on stderr and exit 1."""
    @functools.wraps(fn)
    def command(*args, **kwargs):
        with common.errors():
            return fn(*args, **kwargs)

    return command


COMMANDS: list[tuple[str, Callable, str | None]] = [
    ("train-vae", train_vae.train_vae_cmd, train_vae.EXAMPLES),
    ("encode", codec.encode_cmd, codec.ENCODE_EXAMPLES),
    ("decode", codec.decode_cmd, codec.DECODE_EXAMPLES),
    ("train-dit", train_dit.train_dit_cmd, train_dit.EXAMPLES),
    ("adapt-dit", adapt_dit.adapt_dit_cmd, adapt_dit.EXAMPLES),
    ("generate", generate.generate_cmd, generate.EXAMPLES),
    ("upscale", upscale.upscale_cmd, upscale.EXAMPLES),
    ("synth", synth.synth_cmd, synth.EXAMPLES),
    ("bench", bench.bench_cmd, bench.EXAMPLES),
    ("report", report.report_cmd, report.EXAMPLES),
    ("eval-fid", eval_fid.eval_fid_cmd, eval_fid.EXAMPLES),
    ("ceilings", ceilings.ceilings_cmd, ceilings.EXAMPLES),
    ("convert", convert.convert_cmd, convert.EXAMPLES),
    ("presets", presets.presets_cmd, None),
]
for _name, _fn, _examples in COMMANDS:
    app.command(_name, epilog=_examples)(_one_line_errors(_fn))


def _close_process_group() -> None:
    """Under `accelerate launch`, shut the process group down while the interpreter is still whole: left to the
    interpreter's exit, gloo's worker threads can free their last tensors during finalization and abort a run
    that succeeded (SIGABRT, "terminate called without an active exception"). Never imports torch."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    # keep library chatter (diffusers/transformers config notices, hub progress bars) off the user's terminal,
    # without importing either library here
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app(prog_name="davae")
    except SystemExit as done:
        if done.code in (None, 0):  # after a failure another process may still be in a collective: no teardown
            _close_process_group()
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
