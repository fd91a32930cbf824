"""What this device can give a training run: memory, cores, matmul throughput, memory bandwidth.

:func:`measure_device` measures the host (psutil memory with cgroup v1/v2 limits respected, CPU affinity and
CPU quota, a sustained fp32 matmul probe at given layer shapes, a STREAM-like copy probe, as docs/device-sources.md §4
describes). :func:`emulate` turns a device profile into a report for an emulated device: memory, cores, speed
and network come from the profile, and the host's measured throughput is kept so that times measured here can
be scaled by ``host_gflops / gflops``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lorafleet.edge_client.profiles import DeviceProfile
from lorafleet.export.formats.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
DEFAULT_SHAPES = ((256, 576, 1536), (256, 1536, 576))  # (tokens, in, out): SmolLM2-135M MLP at 256 tokens
_NO_LIMIT = 1 << 60  # cgroup v1 writes ~2^63 for "unlimited"


@dataclass(frozen=True)
class DeviceReport:
    """A device's resources. ``gflops`` is sustained fp32 matmul GFLOP/s; ``host_gflops`` is what the machine
    running this code measured (equal to ``gflops`` unless the device is emulated from a profile)."""

    name: str
    source: Literal["measured", "profile"]
    memory_total_bytes: int
    memory_available_bytes: int
    cpu_count: int
    gflops: float
    memory_bandwidth_gbs: float
    network_up_mbps: float | None = None  # None: not known (a measured host); transfers are not timed
    network_down_mbps: float | None = None
    host_gflops: float | None = None
    runtimes: tuple[str, ...] | None = None  # training runtimes the device runs; None: not known (measured)

    def __post_init__(self) -> None:
        for name in ("memory_total_bytes", "memory_available_bytes", "cpu_count"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"DeviceReport.{name} must be positive, got {getattr(self, name)}")
        for name in ("gflops", "memory_bandwidth_gbs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"DeviceReport.{name} must be a positive number, got {value}")

    @property
    def time_scale(self) -> float:
        """Multiply a step time measured on the host by this to get the device's (1.0 when measured)."""
        return (self.host_gflops / self.gflops) if self.host_gflops else 1.0

    def to_json(self) -> dict[str, Any]:
        """Exactly the ``device`` object of ``lorafleet profile --json``."""
        return {"name": self.name, "source": self.source, "memory_total_bytes": self.memory_total_bytes,
                "memory_available_bytes": self.memory_available_bytes, "cpu_count": self.cpu_count,
                "gflops": round(self.gflops, 2), "memory_bandwidth_gbs": round(self.memory_bandwidth_gbs, 2)}


def measure_device(shapes: tuple[tuple[int, int, int], ...] | list[tuple[int, int, int]] = DEFAULT_SHAPES,
                   *, min_seconds: float = 0.5, name: str | None = None) -> DeviceReport:
    """Measure this machine. ``shapes`` are ``(tokens, in, out)`` matmuls, e.g. a package's layers."""
    total, available = memory_bytes()
    gflops = matmul_gflops(shapes, min_seconds=min_seconds)
    return DeviceReport(name=name or f"this device ({os.uname().nodename})", source="measured",
                        memory_total_bytes=total, memory_available_bytes=available, cpu_count=cpu_count(),
                        gflops=gflops, memory_bandwidth_gbs=memory_bandwidth_gbs(), host_gflops=gflops)


def emulate(profile: DeviceProfile, host_gflops: float) -> DeviceReport:
    """The report of a device emulated from ``profile``; ``host_gflops`` was measured on this machine."""
    return DeviceReport(name=profile.name, source="profile", memory_total_bytes=profile.memory_total_bytes,
                        memory_available_bytes=profile.app_memory_bytes, cpu_count=profile.cpu_cores,
                        gflops=profile.sustained_gflops, memory_bandwidth_gbs=profile.memory_bandwidth_gbs,
                        network_up_mbps=profile.network_up_mbps, network_down_mbps=profile.network_down_mbps,
                        host_gflops=host_gflops, runtimes=profile.runtimes)


# --- memory ---------------------------------------------------------------------------------------------

def memory_bytes(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int, int]:
    """``(total, available)``: psutil's figures, lowered to the cgroup's limit and headroom when one is set."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    limit, usage = cgroup_memory(cgroup_root, proc_cgroup)
    if limit is not None and limit < total:
        total = limit
        available = min(available, max(limit - (usage or 0), 0))
    return total, max(available, 1)


def cgroup_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int | None, int | None]:
    """``(limit, usage)`` in bytes of this process's memory cgroup (v2 or v1); ``None`` where unlimited/unknown.

    The limit is the smallest set on the cgroup or any ancestor (v2), or v1's ``hierarchical_memory_limit``.
    Paths are looked up under ``root`` at the process's cgroup path, falling back to ``root`` itself (inside a
    container the namespace root is mounted there).
    """
    v2_path, v1_path = _own_cgroup_paths(proc_cgroup)
    if (root / "cgroup.controllers").exists():  # unified (v2) hierarchy
        dirs = _existing_ancestors(root, v2_path)
        limits = [_read_int(d / "memory.max") for d in dirs]
        usage = next((u for d in dirs if (u := _read_int(d / "memory.current")) is not None), None)
        known = [x for x in limits if x is not None]
        return (min(known) if known else None), usage
    base = root / "memory"
    dirs = _existing_ancestors(base, v1_path)
    for d in dirs:
        limit = _v1_hierarchical_limit(d / "memory.stat") or _read_int(d / "memory.limit_in_bytes")
        if limit is not None or _read_int(d / "memory.usage_in_bytes") is not None:
            return limit, _read_int(d / "memory.usage_in_bytes")
    return None, None


def _own_cgroup_paths(proc_cgroup: Path) -> tuple[str, str]:
    v2, v1 = "/", "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _existing_ancestors(base: Path, cgroup_path: str) -> list[Path]:
    """``base/<path>``, its parents up to ``base``, that exist — leaf first; ``base`` always last."""
    parts = [p for p in cgroup_path.strip("/").split("/") if p]
    dirs = [base.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [d for d in dirs if d.is_dir()] + [base]


def _read_int(path: Path) -> int | None:
    """An integer cgroup file; ``None`` for missing, ``max`` or v1's near-2^63 "unlimited"."""
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= _NO_LIMIT else value


def _v1_hierarchical_limit(stat: Path) -> int | None:
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "hierarchical_memory_limit" and value.strip().isdigit():
                v = int(value)
                return None if v >= _NO_LIMIT else v
    except OSError:
        pass
    return None


# --- CPUs -----------------------------------------------------------------------------------------------

def cpu_count(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, lowered by a cgroup CPU quota (v2 ``cpu.max``, v1 CFS)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cpu_quota(cgroup_root)
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _cpu_quota(root: Path) -> float | None:
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    q, p = _read_signed(root / "cpu" / "cpu.cfs_quota_us"), _read_signed(root / "cpu" / "cpu.cfs_period_us")
    if q is not None and p and q > 0:
        return q / p
    return None


def _read_signed(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --- speed probes ---------------------------------------------------------------------------------------

def matmul_gflops(shapes: Any = DEFAULT_SHAPES, *, min_seconds: float = 0.5, repeats: int = 5) -> float:
    """Sustained fp32 GFLOP/s over ``(tokens, in, out)`` matmuls: 2·t·i·o FLOPs each.

    Each shape is warmed up, then timed ``repeats`` times for at least ``min_seconds / repeats`` each; the
    median time per shape counts. The result is total FLOPs / total median time (one call of each shape), so
    it weighs shapes as a forward pass through those layers would.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    flops, seconds = 0.0, 0.0
    for t, i, o in shapes:
        x = rng.standard_normal((t, i), dtype=np.float32)
        w = rng.standard_normal((i, o), dtype=np.float32)
        out = np.empty((t, o), dtype=np.float32)
        np.matmul(x, w, out=out)  # warm-up
        seconds += _median_seconds(lambda x=x, w=w, out=out: np.matmul(x, w, out=out), min_seconds / repeats,
                                   repeats)
        flops += 2.0 * t * i * o
    return flops / seconds / 1e9


def memory_bandwidth_gbs(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """STREAM-style copy bandwidth in GB/s over an array far larger than the caches (bytes counted 2N·w)."""
    import numpy as np

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    return 2 * src.nbytes / _median_seconds(lambda: np.copyto(dst, src), 0.0, repeats) / 1e9


def _median_seconds(fn: Any, min_seconds: float, repeats: int) -> float:
    """Median over ``repeats`` samples of seconds per call; each sample loops until ``min_seconds``."""
    samples = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)
