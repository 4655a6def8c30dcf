"""The `davae` command line: a thin Typer app over the library."""

from __future__ import annotations

import os
import sys

import typer

from . import common

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


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (also DAVAE_DEBUG=1)."),
          version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if debug:
        common.STATE["debug"] = True
        os.environ["DAVAE_DEBUG"] = "1"
    if version:
        from .. import __version__

        print(__version__)
        raise typer.Exit(0)


from . import adapt_dit as _adapt_dit  # noqa: E402,F401
from . import bench as _bench  # noqa: E402,F401
from . import codec as _codec  # noqa: E402,F401  (registers encode/decode)
from . import eval_fid as _eval_fid  # noqa: E402,F401
from . import generate as _generate  # noqa: E402,F401
from . import presets as _presets  # noqa: E402,F401
from . import train_vae as _train_vae  # noqa: E402,F401


def main() -> None:
    # keep library chatter (diffusers config notices, tqdm bars) off the user's terminal
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    app(prog_name="davae")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
