"""Which LoRA rank a device can train: a pure function of a device report, per-rank predictions and budgets.

A rank fits when its predicted peak memory is within the memory budget (``memory_fraction`` × the device's
available memory) and its local round — ``steps_per_round`` training steps at the device's speed plus sending
and receiving the adapter over the device's network — is within the time budget. The largest fitting rank is
selected (HetLoRA, Cho et al. 2024, assigns each client the largest rank its capability allows; docs/device-sources.md
§3b: map rank monotonically from the memory left, not from TOPS). Nothing fitting is an answer, not an error:
``selected_rank`` is ``None`` and the reasons say which limit binds.

Step times in the predictions are the host's; the device report's ``time_scale`` (host GFLOP/s / device
GFLOP/s, 1.0 for a measured device) converts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lorafleet.edge_client.device import DeviceReport
from lorafleet.export.formats.errors import ConfigError


@dataclass(frozen=True)
class RankPrediction:
    """What training at ``rank`` is predicted to cost on the host that measured it."""

    rank: int
    peak_bytes: int  # peak memory of the training process
    step_seconds: float  # one training step (forward, backward, optimizer) on the host
    adapter_bytes: int  # the adapter on the wire (one way)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"RankPrediction.rank must be positive, got {self.rank}")
        if self.peak_bytes < 0 or self.adapter_bytes < 0:
            raise ConfigError(f"RankPrediction bytes must be non-negative, got peak_bytes={self.peak_bytes}, "
                             f"adapter_bytes={self.adapter_bytes}")
        if not (math.isfinite(self.step_seconds) and self.step_seconds >= 0):
            raise ConfigError(f"RankPrediction.step_seconds must be a non-negative number, got {self.step_seconds}")


@dataclass(frozen=True)
class Budgets:
    """The limits a rank must fit: a share of available memory and (optionally) seconds per local round."""

    memory_fraction: float = 0.9
    time_budget_seconds: float | None = None
    steps_per_round: int = 20

    def __post_init__(self) -> None:
        if not (0 < self.memory_fraction <= 1):
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.time_budget_seconds is not None and not (self.time_budget_seconds > 0):
            raise ConfigError(f"time_budget_seconds must be positive, got {self.time_budget_seconds}")
        if self.steps_per_round <= 0:
            raise ConfigError(f"steps_per_round must be positive, got {self.steps_per_round}")


@dataclass(frozen=True)
class Candidate:
    """One rank measured against the budgets. The decision is the fields (``memory_ok``, ``time_ok``, ``fits``);
    ``why`` and the other texts are rendered from them, for people."""

    rank: int
    predicted_peak_bytes: int
    memory_budget_bytes: int
    predicted_step_seconds: float  # on the device
    transfer_seconds: float  # the adapter down and up
    steps_per_round: int
    time_budget_seconds: float | None

    @property
    def predicted_round_seconds(self) -> float:
        """``steps_per_round`` steps plus the adapter's transfer."""
        return self.steps_per_round * self.predicted_step_seconds + self.transfer_seconds

    @property
    def memory_ok(self) -> bool:
        return self.predicted_peak_bytes <= self.memory_budget_bytes

    @property
    def time_ok(self) -> bool:
        return self.time_budget_seconds is None or self.predicted_round_seconds <= self.time_budget_seconds

    @property
    def fits(self) -> bool:
        return self.memory_ok and self.time_ok

    @property
    def limit(self) -> str | None:
        """Which limit this rank breaks: ``"memory"``, ``"time"``, ``"memory and time"``, or ``None``."""
        broken = [name for name, ok in (("memory", self.memory_ok), ("time", self.time_ok)) if not ok]
        return " and ".join(broken) or None

    @property
    def memory_text(self) -> str:
        return (f"peak {fmt_bytes(self.predicted_peak_bytes)} {'≤' if self.memory_ok else '>'} memory budget "
                f"{fmt_bytes(self.memory_budget_bytes)}")

    @property
    def round_text(self) -> str:
        text = (f"round {self.predicted_round_seconds:.1f} s ({self.steps_per_round} steps × "
                f"{self.predicted_step_seconds:.3f} s + {self.transfer_seconds:.1f} s transfer)")
        if self.time_budget_seconds is not None:
            text += f" {'≤' if self.time_ok else '>'} time budget {self.time_budget_seconds:g} s"
        return text

    @property
    def why(self) -> str:
        if self.fits:
            return f"fits: {self.memory_text}; {self.round_text}"
        if not self.memory_ok and not self.time_ok:
            return f"too big and too slow: {self.memory_text}; {self.round_text}"
        return f"too big: {self.memory_text}" if not self.memory_ok else f"too slow: {self.round_text}"

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "predicted_peak_bytes": self.predicted_peak_bytes,
                "predicted_step_seconds": round(self.predicted_step_seconds, 6),
                "predicted_round_seconds": round(self.predicted_round_seconds, 6),
                "memory_ok": self.memory_ok, "time_ok": self.time_ok, "fits": self.fits,
                "memory": self.memory_text, "round": self.round_text, "why": self.why}


@dataclass(frozen=True)
class RankDecision:
    candidates: list[Candidate]
    selected_rank: int | None
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"candidates": [c.to_json() for c in self.candidates], "selected_rank": self.selected_rank,
                "reasons": list(self.reasons)}


def transfer_seconds(adapter_bytes: int, device: DeviceReport) -> float:
    """Seconds to receive and send an adapter of ``adapter_bytes`` (0 when the network is unknown)."""
    seconds = 0.0
    for mbps in (device.network_down_mbps, device.network_up_mbps):
        if mbps:
            seconds += adapter_bytes * 8 / (mbps * 1e6)
    return seconds


def choose_rank(device: DeviceReport, predictions: list[RankPrediction], budgets: Budgets) -> RankDecision:
    """Evaluate every predicted rank against the budgets and select the largest that fits."""
    if not predictions:
        raise ValueError("choose_rank needs at least one rank prediction")
    memory_budget = int(budgets.memory_fraction * device.memory_available_bytes)
    candidates = [_candidate(p, device, budgets, memory_budget)
                  for p in sorted(predictions, key=lambda p: p.rank)]
    fitting = [c.rank for c in candidates if c.fits]
    selected = max(fitting) if fitting else None
    reasons = _budget_reasons(device, budgets, memory_budget) + [_verdict(candidates, selected)]
    return RankDecision(candidates, selected, reasons)


def _candidate(p: RankPrediction, device: DeviceReport, budgets: Budgets, memory_budget: int) -> Candidate:
    return Candidate(p.rank, p.peak_bytes, memory_budget, p.step_seconds * device.time_scale,
                     transfer_seconds(p.adapter_bytes, device), budgets.steps_per_round, budgets.time_budget_seconds)


def _budget_reasons(device: DeviceReport, budgets: Budgets, memory_budget: int) -> list[str]:
    reasons = [f"memory budget: {budgets.memory_fraction:g} × {fmt_bytes(device.memory_available_bytes)} "
               f"available on {device.name} = {fmt_bytes(memory_budget)}"]
    if budgets.time_budget_seconds is None:
        reasons.append(f"no time budget: round times (for {budgets.steps_per_round} local steps) are reported only")
    else:
        reasons.append(f"time budget: {budgets.time_budget_seconds:g} s per local round of "
                       f"{budgets.steps_per_round} steps plus receiving and sending the adapter")
    if device.network_up_mbps is None or device.network_down_mbps is None:
        reasons.append("network speed unknown (measured device): adapter transfer time is not counted")
    else:
        reasons.append(f"network: {device.network_down_mbps:g} Mbit/s down, {device.network_up_mbps:g} Mbit/s up")
    if device.time_scale != 1.0:
        reasons.append(f"step times scaled from the host by {device.time_scale:.3f} "
                       f"(host {device.host_gflops:.1f} GFLOP/s / device {device.gflops:.1f} GFLOP/s)")
    return reasons


def _verdict(candidates: list[Candidate], selected: int | None) -> str:
    """Which limit binds: the first candidate above the selection (or the smallest one) that does not fit."""
    above = [c for c in candidates if selected is None or c.rank > selected]
    blocker = next((c for c in above if not c.fits), None)
    if selected is None:
        assert blocker is not None
        return f"no packaged rank fits: the smallest, rank {blocker.rank}, is {blocker.why} ({blocker.limit} binds)"
    if blocker is None:
        return f"selected rank {selected}: the largest packaged rank fits, no limit binds"
    return (f"selected rank {selected}: the largest rank that fits; rank {blocker.rank} is {blocker.why} "
            f"({blocker.limit} binds)")


def fmt_bytes(n: float) -> str:
    """``1536 MiB`` → ``"1.50 GiB"``: binary units, as memory is sized."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
