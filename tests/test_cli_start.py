"""The command line starts at once: `davae --help`, every `davae <command> --help` and `davae presets`
import neither torch nor diffusers (PEP 562 lazy names in the package face, imports inside commands)."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["train-vae", "encode", "decode", "train-dit", "adapt-dit", "generate", "bench", "report", "eval-fid", "presets"]

PROBE = """
import sys
from typer.testing import CliRunner
import davae_cli.cli.app as cli
assert "torch" not in sys.modules, "importing the app pulled in torch"
runner = CliRunner()
for args in {argsets!r}:
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 0, (args, r.output)
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate", "peft") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_help_and_presets_do_not_import_torch():
    argsets = [["--help"], ["presets"], ["presets", "tiny"]] + [[c, "--help"] for c in COMMANDS]
    r = subprocess.run([sys.executable, "-c", PROBE.format(argsets=argsets)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "none"


def test_package_face_is_lazy_and_complete():
    r = subprocess.run([sys.executable, "-c", "import sys, davae_cli; assert 'torch' not in sys.modules; "
                        "import davae_cli.generate; from davae_cli import generate, DetailAlignedVAE, run_bench, "
                        "adapt_dit, train_vae, load_preset, DavaeError; print(callable(generate), "
                        "davae_cli.generate is generate)"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("args,needle", [(["bench", "--dtype", "bf17"], "bf17"),
                                         (["generate", "--out", "x", "--dtype", "fp8"], "fp8")])
def test_dtype_is_a_choice_typer_validates(args, needle):
    from typer.testing import CliRunner

    from davae_cli.cli.app import app

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and needle in r.output and "bf16" in r.output
