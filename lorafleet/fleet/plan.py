"""Who is in the fleet: each device's profile, and the rank the profiler's selection rule gives it.

Every profile gets its rank from the same rule a real device applies,
:func:`lorafleet.edge_client.rank_choice.choose_rank`, under the fleet's budgets — the memory fraction, and the
round deadline as the time budget of ``local_steps`` steps plus the adapter down and up — on per-rank
predictions of memory and step time that come, by the fleet's ``emulation``, from

* ``flops`` (the default): the package itself — each rank's estimated training peak memory and FLOPs per step
  (the manifest), the step time on the device being FLOPs ÷ (sustained GFLOP/s × efficiency)
  (:func:`flops_predictions`). Nothing is measured on this host, so the plan is the same on any machine at
  any load;
* ``measured``: this machine, profiled once (:func:`lorafleet.edge_client.profiler.profile_device`: its matmul
  throughput at the package's layer shapes, and real training steps of the smallest and largest packaged rank,
  each in a fresh process, fitted as ``a + b·r``), scaled to the profile
  (:func:`lorafleet.edge_client.device.emulate`: step times × host GFLOP/s ÷ device GFLOP/s). Predictions are
  made plausible first (:func:`plausible`): no step faster than the host's own throughput allows, no rank cheaper
  than a smaller one.

A device whose profile fits no packaged rank gets none, and is dropped whenever it is sampled. With a
``rank_distribution`` other than ``profiler``, devices draw their ranks from that distribution instead
(:func:`lorafleet.fleet.emulation.draw_ranks`), as the FlexLoRA paper's experiments assign them; their speed,
network and availability still come from their profiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.edge_client.profiles import DeviceProfile, list_profiles, load_profile
from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.emulation import TRAINING_EFFICIENCY, assign_profiles, draw_ranks, flops_step_seconds

if TYPE_CHECKING:
    from lorafleet.edge_client.profiler import ProfileResult
    from lorafleet.edge_client.rank_choice import Budgets, RankDecision, RankPrediction
    from lorafleet.export.formats.package import Package


@dataclass(frozen=True)
class HostProfile:
    """This machine, measured once per fleet: the profiler's result (device, per-rank measurements and
    predictions on this host, and the rank this machine itself would train)."""

    result: ProfileResult
    backend: str

    @property
    def gflops(self) -> float:
        return self.result.device.gflops

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {"backend": self.backend, "device": r.device.to_json(),
                "measurements": [{"rank": m.rank, "device_memory_bytes": m.device_memory_bytes,
                                  "step_seconds": round(m.step_seconds, 6)} for m in r.measurements],
                "predictions": [{"rank": p.rank, "peak_bytes": p.peak_bytes, "step_seconds": round(p.step_seconds, 6),
                                 "adapter_bytes": p.adapter_bytes} for p in r.predictions],
                "selected_rank": r.selected_rank}


@dataclass(frozen=True)
class EmulatedDevice:
    """What the server needs to emulate one device (all devices of a profile share it)."""

    profile: str
    rank: int | None  # None: no packaged rank fits the profile
    time_scale: float  # host GFLOP/s / device GFLOP/s
    down_mbps: float
    up_mbps: float
    availability: float
    unable_seconds: float | None  # no rank: its predicted round at the smallest rank (None: memory-bound)
    unable_reason: str = ""
    step_seconds: dict[int, float] = field(default_factory=dict)  # flops emulation: rank -> device step time


@dataclass(frozen=True)
class FleetPlan:
    host: HostProfile | None  # None: flops emulation measures nothing here
    profiles: dict[str, DeviceProfile]  # profile id -> profile (those in the mix)
    decisions: dict[str, RankDecision]  # profile id -> the rank rule's decision
    devices: list[EmulatedDevice]  # index = device id

    @property
    def device_ranks(self) -> list[int | None]:
        return [d.rank for d in self.devices]

    emulation: str = "measured"
    efficiency: float = TRAINING_EFFICIENCY
    predictions: dict[str, list[RankPrediction]] = field(default_factory=dict)  # profile id -> what it was judged on
    rank_distribution: str = "profiler"
    memory: str = "measured"  # where the predicted peaks came from: measured, or the manifest's <runtime> / formula

    def rank_choice_json(self, budgets: Budgets) -> dict[str, Any]:
        """What the report records: how times were emulated (and the host figures used, if any), the budgets,
        each profile's predictions and decision."""
        return {"host": None if self.host is None else self.host.to_json(),
                "emulation": {"mode": self.emulation, "rank_distribution": self.rank_distribution,
                              **({"efficiency": self.efficiency} if self.emulation == "flops" else {}),
                              "memory": self.memory},
                "budgets": {"memory_fraction": budgets.memory_fraction,
                            "time_budget_seconds": budgets.time_budget_seconds,
                            "steps_per_round": budgets.steps_per_round},
                "profiles": {pid: {"file": str(p.path), "name": p.name, "gflops": p.sustained_gflops,
                                   "availability": p.availability,
                                   "predictions": [_prediction_json(x) for x in self.predictions.get(pid, [])],
                                   **self.decisions[pid].to_json()}
                             for pid, p in sorted(self.profiles.items())}}


def _prediction_json(p: RankPrediction) -> dict[str, Any]:
    return {"rank": p.rank, "peak_bytes": p.peak_bytes, "step_seconds": p.step_seconds,
            "adapter_bytes": p.adapter_bytes}


def load_mix(profiles_dir: Path, mix: Mapping[str, float] | None) -> dict[str, DeviceProfile]:
    """The profiles the mix names (every profile in the directory for ``None``); unknown names are an error."""
    available = {p.stem: p for p in list_profiles(profiles_dir)}
    if not available:
        raise ConfigError(f"no device profiles (*.toml) in {profiles_dir}")
    names = sorted(available) if mix is None else sorted(mix)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"--mix names unknown profile {unknown[0]!r} (profiles in {profiles_dir}: "
                          f"{', '.join(sorted(available))})")
    return {n: load_profile(available[n]) for n in names if mix is None or mix[n] > 0}


def profile_host(pkg: Package, backend: str, budgets: Budgets, *, steps: int = 3) -> HostProfile:
    """Measure this machine at the package's shapes and train its smallest and largest rank (fresh processes)."""
    from lorafleet.edge_client.device import measure_device
    from lorafleet.edge_client.profiler import profile_device

    tokens = pkg.manifest.batch_size * pkg.manifest.seq_len
    # samples of ≥ 0.2 s, like a training step, so that a shared host's contention weighs on both alike
    host = measure_device(tuple((tokens, i, o) for o, i in pkg.manifest.model.module_shapes.values()),
                          min_seconds=1.0)
    return HostProfile(profile_device(host, pkg, backend, budgets, steps=steps), backend)


def flops_predictions(pkg: Package, profile: DeviceProfile, efficiency: float = TRAINING_EFFICIENCY, *,
                      backend: str | None = None) -> list[RankPrediction]:
    """Every packaged rank on ``profile``, from the package alone: the manifest's predicted training peak (the
    device memory of ``backend``'s runtime where the package records it, else the formula's) and
    FLOPs per step, the step on the device at ``efficiency`` × its sustained GFLOP/s, the fp32 adapter."""
    from lorafleet.edge_client.backends import package_runtime
    from lorafleet.edge_client.rank_choice import RankPrediction

    runtime = package_runtime(backend)
    out = []
    for r in sorted(pkg.ranks):
        rank = pkg.manifest.rank(r)
        out.append(RankPrediction(r, rank.estimates.device_memory_bytes(runtime),
                                  flops_step_seconds(rank.estimates.flops_per_step, profile.sustained_gflops,
                                                     efficiency), 4 * rank.trainable_parameters))
    return out


def plausible(predictions: Sequence[RankPrediction], pkg: Package, host_gflops: float) -> list[RankPrediction]:
    """Measured host predictions, made physically plausible: a step is never faster than the host's measured
    throughput allows for its FLOPs, and a rank never costs less time or memory than a smaller one (noise
    and a loaded host can otherwise make rank 4 look slower than rank 64)."""
    out: list[RankPrediction] = []
    for p in sorted(predictions, key=lambda p: p.rank):
        floor = flops_step_seconds(pkg.manifest.rank(p.rank).estimates.flops_per_step, host_gflops, 1.0) \
            if p.rank in pkg.ranks else 0.0
        step, peak = max(p.step_seconds, floor), p.peak_bytes
        if out:
            step, peak = max(step, out[-1].step_seconds), max(peak, out[-1].peak_bytes)
        out.append(replace(p, step_seconds=step, peak_bytes=peak))
    return out


def plan_fleet(host: HostProfile | None, profiles: Mapping[str, DeviceProfile], mix: Mapping[str, float] | None,
               num_devices: int, budgets: Budgets, seed: int, *, pkg: Package | None = None,
               emulation: str = "measured", rank_distribution: str = "profiler",
               efficiency: float = TRAINING_EFFICIENCY, backend: str | None = None) -> FleetPlan:
    """Give every device a profile (by the mix's weights) and every profile its rank (the profiler's rule on
    the ``emulation``'s predictions; see the module docstring), or every device a rank drawn from
    ``rank_distribution``."""
    from lorafleet.edge_client.device import emulate
    from lorafleet.edge_client.rank_choice import choose_rank

    weights = {pid: (1.0 if mix is None else float(mix[pid])) for pid in profiles}
    if emulation == "flops":
        if pkg is None:
            raise ConfigError("flops emulation needs the package (its per-rank FLOPs and memory estimates)")
        predictions = {pid: flops_predictions(pkg, p, efficiency, backend=backend) for pid, p in profiles.items()}
        memory = memory_source(pkg, backend)
        reports = {pid: emulate(p, p.sustained_gflops) for pid, p in profiles.items()}  # time scale 1
        scale_from = {pid: p.sustained_gflops for pid, p in profiles.items()}
    elif emulation == "measured":
        if host is None:
            raise ConfigError("measured emulation needs this host's profile")
        memory = "measured"
        preds = plausible(host.result.predictions, pkg, host.gflops) if pkg is not None else \
            list(host.result.predictions)
        predictions = {pid: preds for pid in profiles}
        reports = {pid: emulate(p, host.gflops) for pid, p in profiles.items()}
        scale_from = {pid: host.gflops for pid in profiles}
    else:
        raise ConfigError(f"emulation must be flops or measured, got {emulation!r}")
    decisions = {pid: choose_rank(reports[pid], predictions[pid], budgets) for pid in profiles}
    per_profile = {pid: _emulated(pid, p, decisions[pid], scale_from[pid],
                                  {x.rank: x.step_seconds for x in predictions[pid]} if emulation == "flops" else {})
                   for pid, p in profiles.items()}
    devices = [per_profile[pid] for pid in assign_profiles(num_devices, weights, seed)]
    if rank_distribution != "profiler":
        ranks = sorted(pkg.ranks) if pkg is not None else sorted(x.rank for x in next(iter(predictions.values())))
        devices = [replace(d, rank=r, unable_seconds=None, unable_reason="")
                   for d, r in zip(devices, draw_ranks(num_devices, ranks, rank_distribution, seed), strict=True)]
    return FleetPlan(host, dict(profiles), decisions, devices, emulation, efficiency, predictions, rank_distribution,
                     memory)


def memory_source(pkg: Package, backend: str | None) -> str:
    """``"<runtime> program"`` when every rank of ``pkg`` records the device memory of ``backend``'s runtime
    (read from its program or measured at export; what :func:`flops_predictions` then uses), else ``"formula"``."""
    from lorafleet.edge_client.backends import package_runtime

    runtime = package_runtime(backend)
    has = runtime is not None and all(runtime in pkg.manifest.rank(r).estimates.device_memory for r in pkg.ranks)
    return f"{runtime} program" if has else "formula"


def _emulated(pid: str, p: DeviceProfile, decision: RankDecision, host_gflops: float,
              step_seconds: dict[int, float]) -> EmulatedDevice:
    smallest = decision.candidates[0]
    unable_seconds, reason = None, ""
    if decision.selected_rank is None:
        unable_seconds = smallest.predicted_round_seconds if smallest.memory_ok else None
        reason = f"no packaged rank fits {pid}: the smallest, rank {smallest.rank}, is {smallest.why}"
    return EmulatedDevice(profile=pid, rank=decision.selected_rank, time_scale=host_gflops / p.sustained_gflops,
                          down_mbps=p.network_down_mbps, up_mbps=p.network_up_mbps, availability=p.availability,
                          unable_seconds=unable_seconds, unable_reason=reason, step_seconds=step_seconds)


def ranked(devices: Sequence[EmulatedDevice]) -> list[int]:
    """The ranks in use (devices without one left out)."""
    return [d.rank for d in devices if d.rank is not None]
