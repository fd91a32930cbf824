"""Resident memory of this process: current, peak, and a resettable peak (Linux ``clear_refs``).

The peak is the kernel's high-water mark ``VmHWM``; writing ``5`` to ``/proc/self/clear_refs`` resets it to
the current RSS (Linux ≥ 4.0), so one process can measure the peak of one phase. Where that is unavailable
the peak is the process-lifetime maximum (``getrusage``), which only over-reports.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS; ``False`` if this system cannot (the peak then stays lifetime)."""
    peak, current = peak_rss_bytes(), current_rss_bytes()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    # Some kernels (sandboxes, gVisor) accept the write and ignore it: only a peak that moved counts as reset.
    return peak <= current + (4 << 20) or peak_rss_bytes() < peak


def peak_rss_bytes(pid: int | None = None) -> int:
    """The peak resident set size since start or the last :func:`reset_peak_rss` (of process ``pid``: its
    ``VmHWM``, else its current RSS)."""
    hwm = _status_kib("VmHWM", pid)
    if hwm is not None:
        return hwm * 1024
    if pid is not None:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int:
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def _status_kib(key: str, pid: int | None = None) -> int | None:
    status = _STATUS if pid is None else Path(f"/proc/{pid}/status")
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", status.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None
