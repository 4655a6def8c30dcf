"""The callback protocol of long-running jobs (torch-free, so the CLI can import it at start-up)."""

from __future__ import annotations


class Callbacks:
    """What a trainer reports while it runs. The CLI subclasses this to draw a rich progress bar."""

    def on_start(self, total_steps: int, start_step: int, info: dict) -> None: ...

    def on_loop_start(self, step: int) -> None:
        """The first step begins now, from `step` (after what `on_start` preceded: an evaluation or a probe
        at the start): a step rate, and the ETA from it, counts from here."""

    def on_step(self, step: int, metrics: dict) -> None: ...

    def on_message(self, text: str) -> None: ...

    def on_progress(self, phase: str, done: int, total: int | None) -> None:
        """A phase before or after the steps (caching the base's outputs, encoding latents, statistics):
        `done` of `total` items finished (`total` None when unknown)."""

    def on_end(self, summary: dict) -> None: ...
