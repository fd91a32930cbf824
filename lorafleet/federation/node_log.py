"""What ``lorafleet client`` shows a device's owner: its own events, and Flower's output cut to what matters.

Flower's SuperNode logs every message it pulls and pushes (``Receiving: train message (ID: 9f0c…)``) with ANSI
colours. The owner wants one line per round (:func:`lorafleet.edge_client.events.render`) and Flower's warnings
and errors. :class:`FlowerFilter` keeps those (all of it with ``verbose``), strips the colours unless the output
is a terminal, and never shows message ids unless ``verbose``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lorafleet.edge_client.events import RoundEvent, read_events, render

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LEVEL = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(?P<text>.*)$")
MESSAGE_ID = re.compile(r"\s*\(ID: [0-9a-f]+\)")
QUIET_LEVELS = ("DEBUG", "INFO")
RETRYING = "Connection attempt failed"  # repeated every few seconds while the server is away: shown once
RECONNECTED = "Connection successful"  # ... until the node reaches the server again
# after the run's last round the server goes away: the node's attempts to reach it are expected, not shown
GONE = re.compile(r"Connection attempt failed|Giving up reconnection|Connection refused|failed to connect|"
                  r"StatusCode\.UNAVAILABLE", re.I)


@dataclass
class FlowerFilter:
    """Decides, line by line, what of a SuperNode's output the owner sees (``None``: nothing)."""

    verbose: bool = False
    color: bool = False  # keep ANSI colours (the output is a terminal)
    finished: bool = False  # the run's last round is done (connection failures are then expected)
    _showing: bool = True  # lines without a level belong to the last line that had one
    _retrying: bool = field(default=False, repr=False)

    def __call__(self, raw: str) -> str | None:
        line = raw.rstrip("\r\n")
        plain = ANSI.sub("", line)
        if not self.verbose:
            plain = MESSAGE_ID.sub("", plain)
            m = LEVEL.match(plain)
            if m is not None:
                retry = m["text"].startswith(RETRYING)
                quiet = m["level"] in QUIET_LEVELS or (self.finished and GONE.search(m["text"]) is not None)
                self._showing = not quiet and not (retry and self._retrying)
                if retry and self._showing:
                    self._retrying = True
                    return "flower: the server cannot be reached; retrying"
                if m["text"].startswith(RECONNECTED):
                    self._retrying = False
            if not self._showing or not plain.strip():
                return None
            return plain if m is None else f"flower: {m['level'].lower()}: {m['text']}"
        return line if self.color else plain


EXIT_WAIT = 15.0  # --exit-on-finish: seconds the SuperNode keeps trying to reach a server that went away
FINISH_GRACE = 60.0  # --exit-on-finish: seconds after the last round before the node is stopped regardless


def follow_node(node: subprocess.Popen[bytes], events: Path, echo: Callable[[str], None], *,
                exit_on_finish: bool, verbose: bool) -> int:
    """Echo ``node``'s filtered output and its events until it exits (or, with ``exit_on_finish``, the run
    is over); the exit status (0 when the run finished)."""
    reader: threading.Thread | None = None
    keep: FlowerFilter | None = None
    if node.stdout is not None:
        keep = FlowerFilter(verbose=verbose, color=sys.stdout.isatty())

        def pump(stream: IO[bytes]) -> None:
            for raw in stream:
                line = keep(raw.decode("utf-8", errors="replace"))
                if line is not None:
                    echo(line)

        reader = threading.Thread(target=pump, args=(node.stdout,), daemon=True)
        reader.start()
    offset, finished_at = 0, None
    while True:
        code = node.poll()
        new, offset = read_events(events, offset)
        for event in new:
            echo(f"lorafleet: {render(event)}")
            if isinstance(event, RoundEvent) and event.final:
                finished_at = time.monotonic()
                if keep is not None:
                    keep.finished = True
        if exit_on_finish and finished_at is not None and (
                code is not None or time.monotonic() - finished_at > FINISH_GRACE):
            echo("lorafleet: the run is over (its last round is trained); stopping")
            return 0
        if code is not None:
            if reader is not None:
                reader.join(5.0)  # the node's last lines
            return code
        time.sleep(0.5)
