"""The fleet's progress bar (rich): the current stage, devices answering in this round, rounds done."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from lorafleet.fleet.records import RoundRecord
from lorafleet.fleet.server import FleetProgress

SHOWN = (("heldout/rouge_l", "held-out Rouge-L"), ("seen/rouge_l", "seen Rouge-L"), ("seen/loss", "seen loss"))


def progress_for(rounds: int, *, quiet: bool = False) -> Any:
    """The CLI's progress display for a run of ``rounds`` rounds (a context manager); ``quiet``: none."""
    import contextlib

    return contextlib.nullcontext(FleetProgress()) if quiet else RichProgress(rounds)


class RichProgress(FleetProgress):
    """A live rich display; use as a context manager around :func:`lorafleet.fleet.run_fleet`."""

    def __init__(self, rounds: int, console: Any = None):
        import os
        import sys

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console or Console(soft_wrap=True, width=None if sys.stdout.isatty() or
                                          os.environ.get("COLUMNS") else 160)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=False)
        self.rounds = self.progress.add_task("rounds", total=rounds)
        self.devices = self.progress.add_task("preparing", total=None)

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()

    def stage(self, text: str) -> None:
        self.progress.update(self.devices, description=text, total=None, completed=0)
        if not self.console.is_terminal:  # a log file: no live display, one line per stage instead
            self.console.print(text)

    def replies(self, done: int, total: int) -> None:
        self.progress.update(self.devices, total=max(total, 1), completed=done)

    def round_done(self, record: RoundRecord) -> None:
        scores = ", ".join(f"{label} {record.metrics[k]:.4f}" for k, label in SHOWN if k in record.metrics)
        if record.round == 0:
            self.console.print(f"round 0 (untrained): {scores}")
            return
        self.progress.advance(self.rounds)
        scores = f"{scores}; " if scores else ""  # a round that is not evaluated has none
        self.console.print(f"round {record.round}: {scores}{len(record.participants)} of {len(record.sampled)} "
                           f"sampled devices aggregated ({record.online} online, {len(record.dropped)} dropped), "
                           f"emulated round {record.round_time_s:.1f} s")
