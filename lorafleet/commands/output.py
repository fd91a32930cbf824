"""What a long command prints: lorafleet's own lines on the terminal, everything else in a log file.

Exporting, training and emulating a fleet run libraries that talk a lot — PyTorch and ExecuTorch
``FutureWarning``s and deprecation notices, ONNX Runtime's and cpuinfo's C++ log lines. :func:`third_party_log`
sends all of it (Python warnings, log records and whatever is written to file descriptor 2, C++ included) to
``$LORAFLEET_CACHE/logs/<command>-<time>-<pid>.log`` and prints one line saying where it is, if anything was
written; ``--verbose`` leaves it on the terminal. lorafleet's own progress and error lines go to
:func:`terminal`, which is the real stderr in both cases; ``--quiet`` turns the progress lines off.

Tables and lines are laid out for the terminal's width, or 160 columns when the output is a file or a pipe
(:func:`console`), so a log or CI output never wraps a table at 80 columns.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from lorafleet.export.formats.notes import set_sink

Verbose = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Show third-party warnings and runtime logs here instead of in a log file.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print no progress lines: only the result and errors.")]

KEPT_LOGS = 20  # the newest log files kept in the cache
PIPE_WIDTH = 160  # columns when the output is not a terminal

_terminal: TextIO | None = None


def terminal() -> TextIO:
    """Where lorafleet's own stderr lines go: the process's stderr as it was before :func:`third_party_log`."""
    return _terminal or sys.stderr


def say(message: str, *, quiet: bool = False) -> None:
    """A progress line on the terminal (nothing with ``quiet``)."""
    if not quiet:
        print(message, file=terminal(), flush=True)


def console(*, stderr: bool = False, **kwargs: Any) -> Any:
    """A rich console that does not wrap at 80 columns when it writes to a file or a pipe."""
    from rich.console import Console

    stream = terminal() if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(file=stream, width=width, soft_wrap=True, **kwargs)


def log_dir() -> Path:
    from lorafleet.export.formats.cache import cache_dir

    return cache_dir() / "logs"


@contextlib.contextmanager
def third_party_log(command: str, *, verbose: bool = False) -> Iterator[Path | None]:
    """Third-party output of the block into a log file (yields its path; ``None`` with ``verbose``)."""
    global _terminal
    if _terminal is not None:  # nested: the outer block already captures
        yield None
        return
    if verbose:
        set_sink(say)
        try:
            yield None
        finally:
            set_sink(None)
        return
    directory = log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    original = sys.stderr
    on_fd2 = _on_fd2(original)
    with open(path, "wb") as log:
        _terminal = os.fdopen(os.dup(saved_fd), "w", encoding="utf-8", errors="replace", buffering=1) \
            if on_fd2 else original  # a captured sys.stderr (pytest, click's runner) stays the terminal
        # fd 2 is the log: C++ libraries, Python warnings and every logging handler write to sys.stderr, which
        # is fd 2 (a nested redirection such as a package's own export log takes over fd 2 and gives it back)
        os.dup2(log.fileno(), 2)
        if not on_fd2:
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace",
                                          line_buffering=True)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s [%(levelname)s] %(message)s"))
        root.handlers[:] = [handler]  # a library's later logging.basicConfig() is then a no-op
        set_sink(say)  # the library's own progress notes (a model download) stay on the terminal
        try:
            yield path
        finally:
            set_sink(None)
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            if not on_fd2:
                sys.stderr.close()  # the wrapper only: fd 2 stays open (closefd=False)
            sys.stderr = original
            root.handlers[:] = saved_handlers
            terminal_stream, _terminal = _terminal, None
            if path.stat().st_size:
                print(f"third-party warnings and runtime logs: {path} (--verbose shows them here)",
                      file=terminal_stream, flush=True)
            if on_fd2:
                terminal_stream.close()
    if not path.stat().st_size:
        path.unlink()
    _prune(directory)


def _on_fd2(stream: Any) -> bool:
    try:
        return bool(stream.fileno() == 2)
    except (AttributeError, OSError, ValueError):
        return False


def _prune(directory: Path) -> None:
    logs = sorted(directory.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-KEPT_LOGS]:
        with contextlib.suppress(OSError):
            old.unlink()
