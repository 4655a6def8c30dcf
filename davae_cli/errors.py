"""The one exception type for expected failures: the CLI prints its message as a single line."""

from __future__ import annotations

from typing import Optional


class DavaeError(Exception):
    """An expected, user-facing failure (bad input, missing file, incompatible artifact).

    `param`: the library parameter the message is about (e.g. "batch_size"); the message then reads
    "batch_size must be >= 1" from the library and the command line shows the flag, "--batch-size must be
    >= 1" (`as_flag`)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message, self.param = message, param

    @staticmethod
    def _join(name: str, message: str) -> str:
        return name + ("" if message.startswith((":", ",")) else " ") + message

    def __str__(self) -> str:
        return self._join(self.param, self.message) if self.param else self.message

    def as_flag(self) -> str:
        """The message with the parameter written as the command-line flag."""
        if not self.param:
            return self.message
        return self._join("--" + self.param.replace("_", "-"), self.message)


def first_line(e: BaseException, limit: int = 160, empty: "str | None" = None, whole: bool = False) -> str:
    """The first line of an exception's message, at most `limit` characters: what one-line errors quote
    (`whole`: every line joined by spaces, for messages whose useful part is not on the first line, ending in
    "..." when cut). An empty message gives `empty`, or the exception's type name."""
    text = " ".join(str(e).split()) if whole else str(e).strip()
    if not text:
        return type(e).__name__ if empty is None else empty
    if whole:
        return text[:limit] + "..." if len(text) > limit else text
    return text.splitlines()[0][:limit]
