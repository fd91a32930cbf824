"""Run a memory-hungry step in a forked child process, so that what it allocates goes back to the OS.

ExecuTorch's lowering keeps about three copies of the frozen weights alive after it returns, so an export
that lowers every rank in one process grows by that much per rank (docs/BENCHMARKS.md has the figures). A
forked child starts with the parent's model (pages shared
copy-on-write, nothing is re-loaded), writes its results to files and exits; its memory is freed whole.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from lorafleet.export.formats.errors import ExportError, LorafleetError

_MAX_MESSAGE = 4096


def run_forked(fn: Callable[[], None], what: str) -> None:
    """Run ``fn()`` in a forked child and wait for it; its exception comes back as an error naming ``what``.

    ``fn`` must leave its results in files. Without ``os.fork`` (not POSIX) it runs in this process.
    """
    if not hasattr(os, "fork"):
        fn()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        code = 0
        try:
            import torch

            torch.set_num_threads(1)  # the parent's OpenMP pool does not exist here; lowering is single-threaded
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
            kind = "" if isinstance(exc, LorafleetError) else f"{type(exc).__name__}: "
            os.write(write_end, f"{kind}{exc}".encode(errors="replace")[:_MAX_MESSAGE])
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        raise ExportError(f"{what}: the process doing it was killed by {signal.Signals(sig).name}{hint}")
    if os.WEXITSTATUS(status) != 0:
        first = message.splitlines()[0] if message else f"exit status {os.WEXITSTATUS(status)}"
        raise ExportError(f"{what} failed: {first}")
