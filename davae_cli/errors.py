"""The one exception type for expected failures: the CLI prints its message as a single line."""


class DavaeError(Exception):
    """An expected, user-facing failure (bad input, missing file, incompatible artifact)."""
