"""Who is in the fleet: each device's profile, and the rank the profiler's selection rule gives it.

This machine is profiled once (:func:`edge_client.profiler.profile_device`: its matmul throughput at the
package's layer shapes, and real training steps of the smallest and largest packaged rank, each in a fresh
process, fitted as ``a + b·r``). Every profile then gets its rank from the same rule a real device applies,
:func:`edge_client.rank_choice.choose_rank`, on the profile emulated from this host
(:func:`edge_client.device.emulate`: memory, speed and network from the profile, step times scaled by host
GFLOP/s ÷ device GFLOP/s) under the fleet's budgets — the memory fraction, and the round deadline as the time
budget of ``local_steps`` steps plus the adapter down and up. Nobody assigns ranks by hand: a device whose
profile fits no packaged rank gets none, and is dropped whenever it is sampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_client.profiles import DeviceProfile, list_profiles, load_profile
from export.errors import ConfigError
from lorafleet.emulation import assign_profiles

if TYPE_CHECKING:
    from edge_client.profiler import ProfileResult
    from edge_client.rank_choice import Budgets, RankDecision
    from export.package import Package


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
                "measurements": [{"rank": m.rank, "peak_rss_bytes": m.peak_rss_bytes,
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


@dataclass(frozen=True)
class FleetPlan:
    host: HostProfile
    profiles: dict[str, DeviceProfile]  # profile id -> profile (those in the mix)
    decisions: dict[str, RankDecision]  # profile id -> the rank rule's decision
    devices: list[EmulatedDevice]  # index = device id

    @property
    def device_ranks(self) -> list[int | None]:
        return [d.rank for d in self.devices]

    def rank_choice_json(self, budgets: Budgets) -> dict[str, Any]:
        """What the report records: the host's measurements, the budgets, each profile's decision."""
        return {"host": self.host.to_json(),
                "budgets": {"memory_fraction": budgets.memory_fraction,
                            "time_budget_seconds": budgets.time_budget_seconds,
                            "steps_per_round": budgets.steps_per_round},
                "profiles": {pid: {"file": str(p.path), "name": p.name, "gflops": p.sustained_gflops,
                                   "availability": p.availability, **self.decisions[pid].to_json()}
                             for pid, p in sorted(self.profiles.items())}}


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
    from edge_client.device import measure_device
    from edge_client.profiler import profile_device

    tokens = pkg.manifest.batch_size * pkg.manifest.seq_len
    # samples of ≥ 0.2 s, like a training step, so that a shared host's contention weighs on both alike
    host = measure_device(tuple((tokens, i, o) for o, i in pkg.manifest.model.module_shapes.values()),
                          min_seconds=1.0)
    return HostProfile(profile_device(host, pkg, backend, budgets, steps=steps), backend)


def plan_fleet(host: HostProfile, profiles: Mapping[str, DeviceProfile], mix: Mapping[str, float] | None,
               num_devices: int, budgets: Budgets, seed: int) -> FleetPlan:
    """Give every device a profile (by the mix's weights) and every profile its rank (the profiler's rule)."""
    from edge_client.device import emulate
    from edge_client.rank_choice import choose_rank

    weights = {pid: (1.0 if mix is None else float(mix[pid])) for pid in profiles}
    decisions = {pid: choose_rank(emulate(p, host.gflops), host.result.predictions, budgets)
                 for pid, p in profiles.items()}
    per_profile = {pid: _emulated(pid, p, decisions[pid], host.gflops) for pid, p in profiles.items()}
    devices = [per_profile[pid] for pid in assign_profiles(num_devices, weights, seed)]
    return FleetPlan(host, dict(profiles), decisions, devices)


def _emulated(pid: str, p: DeviceProfile, decision: RankDecision, host_gflops: float) -> EmulatedDevice:
    smallest = decision.candidates[0]
    unable_seconds, reason = None, ""
    if decision.selected_rank is None:
        memory_ok = "too big" not in smallest.why
        unable_seconds = smallest.predicted_round_seconds if memory_ok else None
        reason = f"no packaged rank fits {pid}: the smallest, rank {smallest.rank}, is {smallest.why}"
    return EmulatedDevice(profile=pid, rank=decision.selected_rank, time_scale=host_gflops / p.sustained_gflops,
                          down_mbps=p.network_down_mbps, up_mbps=p.network_up_mbps, availability=p.availability,
                          unable_seconds=unable_seconds, unable_reason=reason)


def ranked(devices: Sequence[EmulatedDevice]) -> list[int]:
    """The ranks in use (devices without one left out)."""
    return [d.rank for d in devices if d.rank is not None]
