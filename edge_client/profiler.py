"""The profiler: measure what training each packaged rank costs here, predict every rank, choose one.

With a package, real training steps of the packaged program run at two ranks (by default the smallest and the
largest, which conditions the fit best), each in a fresh process so that its peak RSS is that rank's alone.
Peak memory and step time are fitted as ``a + b·r`` (rank enters the LoRA training-memory formula linearly,
docs/device-sources.md §3b; slopes are clamped at ≥ 0 against timing noise), every packaged rank is predicted, and
:func:`lorafleet.edge_client.rank_choice.choose_rank` selects. If the larger measurement fails (e.g. out of memory on a
small device) the slope comes from the manifest's formula estimates instead, and the reasons say so.

The fixed terms — batch size and sequence length — are compiled into the package's programs: the profiler
reports them rather than choosing them; they dominate the activation and logits memory, rank does not.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.edge_client.device import DeviceReport
from lorafleet.edge_client.rank_choice import Budgets, RankDecision, RankPrediction, choose_rank, fmt_bytes
from lorafleet.export.formats.errors import LorafleetError
from lorafleet.export.formats.manifest import DEVICE_MEMORY_SOURCE
from lorafleet.export.formats.package import Package


@dataclass(frozen=True)
class RankMeasurement:
    rank: int
    device_memory_bytes: int  # peak RSS of a fresh process loading the program and training, above its RSS
    #                           just before the load (interpreter and runtime libraries excluded: a device's
    #                           app has its own; what is left is the program's planned memory, the foundation
    #                           bytes it maps and the runtime's own allocations)
    step_seconds: float  # median wall seconds over the timed steps, on this host
    cpu_seconds: float = 0.0  # median CPU seconds of the process per step (all threads; insensitive to load)


@dataclass(frozen=True)
class LinearFit:
    """``y = intercept + slope · r``."""

    intercept: float
    slope: float

    def __call__(self, r: float) -> float:
        return self.intercept + self.slope * r


@dataclass
class ProfileResult:
    device: DeviceReport
    decision: RankDecision
    measurements: list[RankMeasurement] = field(default_factory=list)
    predictions: list[RankPrediction] = field(default_factory=list)  # on this host, before device scaling

    @property
    def selected_rank(self) -> int | None:
        return self.decision.selected_rank

    def to_json(self) -> dict[str, Any]:
        """Exactly what ``lorafleet profile --json`` prints."""
        return {"device": self.device.to_json(), **self.decision.to_json()}


def profile_device(device: DeviceReport, package: Package | None, backend: str, budgets: Budgets, *,
                   measure_ranks: tuple[int, int] | None = None, steps: int = 3) -> ProfileResult:
    """Profile ``package``'s ranks on ``backend`` for ``device`` (measured here, or emulated from a profile)."""
    if package is None:
        reason = "no package given: the device was measured, no rank was evaluated (use --package)"
        return ProfileResult(device, RankDecision([], None, [reason]))
    lo, hi = measure_ranks or (min(package.ranks), max(package.ranks))
    measured = [measure_rank(package.path, lo, backend, steps=steps)]
    notes = []
    if hi != lo:
        try:
            measured.append(measure_rank(package.path, hi, backend, steps=steps))
        except LorafleetError as exc:
            notes.append(f"measuring rank {hi} failed ({exc}); rank slopes come from the manifest's estimates")
    mem_fit, time_fit = fit_growth(package, measured, backend)
    predictions = predict(package, mem_fit, time_fit)
    decision = choose_rank(device, predictions, budgets)
    runtime = "executorch" if backend == "native" else backend  # the native trainer runs the ExecuTorch programs
    if device.runtimes is not None and runtime not in device.runtimes:
        notes.append(f"{device.name} does not list {backend} among its runtimes ({', '.join(device.runtimes)}): "
                     f"these figures are {backend}'s, measured here")
    notes += program_memory_notes(package, backend, measured)
    decision.reasons[:0] = fixed_term_reasons(package, backend, measured, mem_fit, time_fit) + notes
    return ProfileResult(device, decision, measured, predictions)


def program_memory_notes(package: Package, backend: str, measured: list[RankMeasurement]) -> list[str]:
    """The manifest's device memory of each measured rank's step for ``backend``'s runtime (read from the program
    or measured at export, :data:`DEVICE_MEMORY_SOURCE`) beside the measurement, where the package has one."""
    from lorafleet.edge_client.backends import package_runtime

    runtime = package_runtime(backend)
    out = []
    for m in measured:
        est = package.manifest.rank(m.rank).estimates
        if runtime in est.device_memory:
            how = DEVICE_MEMORY_SOURCE.get(runtime, "recorded")
            out.append(f"rank {m.rank}: the package's {runtime} training step needs "
                       f"{fmt_bytes(est.device_memory_bytes(runtime))} of device memory ({how}; measured here: "
                       f"{fmt_bytes(m.device_memory_bytes)})")
    return out


def fit_growth(package: Package, measured: list[RankMeasurement],
               backend: str | None = None) -> tuple[LinearFit, LinearFit]:
    """Peak bytes and step seconds as linear functions of rank (one measurement: the manifest's slopes, from
    the device memory of ``backend``'s runtime where the package records it)."""
    if len(measured) >= 2:
        rs = [float(m.rank) for m in measured]
        mem = fit_linear(rs, [float(m.device_memory_bytes) for m in measured])
        sec = fit_linear(rs, [m.step_seconds for m in measured])
        return mem, sec
    m = measured[0]
    mem_slope, flop_share = _manifest_slopes(package, backend)
    mem = LinearFit(m.device_memory_bytes - mem_slope * m.rank, mem_slope)
    sec_slope = m.step_seconds * flop_share
    return mem, LinearFit(m.step_seconds - sec_slope * m.rank, sec_slope)


def fit_linear(xs: list[float], ys: list[float]) -> LinearFit:
    """Least-squares line through ``(xs, ys)``, slope clamped at ≥ 0 (rank never makes training cheaper)."""
    if len(set(xs)) < 2:
        raise ValueError("fit_linear needs at least two distinct x values")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 0.0)
    return LinearFit(my - slope * mx, slope)


def predict(package: Package, mem: LinearFit, sec: LinearFit) -> list[RankPrediction]:
    """Every packaged rank's predicted peak, step time (this host) and adapter size (fp32 A and B)."""
    out = []
    for r in sorted(package.ranks):
        params = package.manifest.rank(r).trainable_parameters
        out.append(RankPrediction(r, max(int(mem(r)), 0), max(sec(r), 0.0), 4 * params))
    return out


def fixed_term_reasons(package: Package, backend: str, measured: list[RankMeasurement], mem: LinearFit,
                       sec: LinearFit) -> list[str]:
    m = package.manifest
    ranks = " and ".join(str(x.rank) for x in measured)
    return [
        f"fixed terms: batch {m.batch_size} × seq_len {m.seq_len} tokens, compiled into the package's programs "
        f"(chosen at export; activations and logits grow with them, rank only adds its LoRA term)",
        f"measured ranks {ranks} on {backend} ({len(measured)} fresh processes): peak ≈ {fmt_bytes(mem.intercept)}"
        f" + {fmt_bytes(mem.slope)}/rank, step ≈ {sec.intercept * 1e3:.1f} ms + {sec.slope * 1e3:.3f} ms/rank "
        f"on this host",
    ]


def _manifest_slopes(package: Package, backend: str | None = None) -> tuple[float, float]:
    """Bytes per rank and the per-rank share of step FLOPs, from the manifest's estimates (memory: ``backend``'s
    runtime's recorded device memory where the package has it, else the formula)."""
    from lorafleet.edge_client.backends import package_runtime

    ranks = sorted(package.ranks)
    est = [package.manifest.rank(r).estimates for r in ranks]
    if len(ranks) < 2:
        return 0.0, 0.0
    dr = ranks[-1] - ranks[0]
    runtime = package_runtime(backend)
    mem = (est[-1].device_memory_bytes(runtime) - est[0].device_memory_bytes(runtime)) / dr
    flops = (est[-1].flops_per_step - est[0].flops_per_step) / dr / max(est[0].flops_per_step, 1)
    return max(mem, 0.0), max(flops, 0.0)


# --- measuring one rank in a fresh process --------------------------------------------------------------

def measure_rank(package_path: str | Path, rank: int, backend: str, *, steps: int = 3, warmup: int = 1,
                 timeout: float = 900) -> RankMeasurement:
    """Train ``steps`` (+ ``warmup``) steps of ``rank`` in a child process; its peak RSS and median step time."""
    cmd = [sys.executable, "-m", "lorafleet.edge_client.profiler", str(package_path), str(rank), backend, str(steps),
           str(warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LorafleetError(f"measuring rank {rank} on {backend} took over {timeout:.0f} s") from exc
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise LorafleetError(f"measuring rank {rank} on {backend} failed: {tail}")
    data = json.loads(lines[-1])
    return RankMeasurement(int(data["rank"]), int(data["device_memory_bytes"]), float(data["step_seconds"]),
                           float(data["cpu_seconds"]))


def _measure_here(package_path: str, rank: int, backend: str, steps: int, warmup: int) -> dict[str, Any]:
    """The child's side: build the backend, train on random tokens (every position labelled), report."""
    import numpy as np

    from lorafleet.edge_client.backends import OptimizerConfig, make_backend
    from lorafleet.edge_client.data import Batch
    from lorafleet.export.formats.package import open_package
    from lorafleet.export.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    pkg = open_package(package_path, verify=False)  # the parent verified it
    m = pkg.manifest
    rng = np.random.default_rng(rank)
    ids = rng.integers(0, m.model.vocab_size, size=(m.batch_size, m.seq_len), dtype=np.int64)
    batch = Batch(ids, ids.copy())
    _import_runtime(backend)
    baseline = current_rss_bytes()
    reset_peak_rss()
    be = make_backend(backend, pkg, rank, OptimizerConfig())
    for _ in range(warmup):
        be.step(batch)
    # the native backend trains in its own process (the device's): its CPU time and peak are that process's
    cpu_clock = getattr(be, "cpu_seconds", time.process_time)
    seconds, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), cpu_clock()
        loss = be.step(batch)
        seconds.append(time.perf_counter() - start)
        cpu.append(cpu_clock() - start_cpu)
    if not math.isfinite(loss):
        raise LorafleetError(f"rank {rank} on {backend}: non-finite loss {loss}")
    device = be.peak_rss_bytes() if hasattr(be, "peak_rss_bytes") else max(0, peak_rss_bytes() - baseline)
    return {"rank": rank, "device_memory_bytes": device,
            "step_seconds": statistics.median(seconds),
            "cpu_seconds": statistics.median(cpu)}


def _import_runtime(backend: str) -> None:
    """Load ``backend``'s runtime libraries (what a device app links) before the memory baseline is taken."""
    import importlib

    modules = {"executorch": ["executorch.extension.training", "executorch.runtime"],
               "onnxruntime": ["onnxruntime", "onnxruntime.training.api"],
               "torch": ["torch", "transformers", "peft"]}
    for name in modules.get(backend, []):
        importlib.import_module(name)


if __name__ == "__main__":
    _path, _rank, _backend, _steps, _warmup = sys.argv[1:6]
    print(json.dumps(_measure_here(_path, int(_rank), _backend, int(_steps), int(_warmup))))
