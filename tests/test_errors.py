"""One-line errors quote the first line of an exception's message through one helper, also when the message
is empty (an IndexError inside the error handler used to turn such a failure into a traceback)."""

from __future__ import annotations

import pytest
import typer

from davae_cli.errors import first_line


def test_first_line():
    assert first_line(ValueError("bad value\nsecond line")) == "bad value"
    assert first_line(ValueError("x" * 300), 10) == "x" * 10
    assert first_line(KeyError()) == "KeyError" and first_line(RuntimeError("  ")) == "RuntimeError"
    assert first_line(RuntimeError(""), empty="") == ""


def test_an_exception_without_a_message_is_still_one_line(capsys):
    from davae_cli.cli import common

    with pytest.raises(typer.Exit) as ex:
        with common.errors():
            raise IndexError()
    assert ex.value.exit_code == 1
    err = capsys.readouterr().err
    assert "IndexError" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
