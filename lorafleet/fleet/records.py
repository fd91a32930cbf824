"""A fleet run's records: one :class:`RoundRecord` per round — round 0 is the untrained baseline — holding the
evaluation metrics of the global adapter, who took part, who was dropped as a straggler, the emulated round
time and the energy per rank segment (:mod:`lorafleet.fleet.rank_energy`); the :class:`FleetReport` that holds
them; and :func:`read_report`, which reads a written report back. :mod:`lorafleet.fleet.report` writes them,
:mod:`lorafleet.fleet.plots` draws them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.export.formats.errors import ConfigError, LorafleetError

METRICS_JSON, METRICS_CSV, SUMMARY_MD = "metrics.json", "metrics.csv", "summary.md"
PLOTS = {"metrics": "metrics.png", "ranks": "rank_histogram.png", "times": "round_times.png",
         "energy": "rank_energy.png"}


@dataclass
class RoundRecord:
    """What happened in one round. ``device_times_s`` holds the emulated time of every sampled device
    (participants and stragglers); ``rank_energy`` maps a segment label (``"1-4"``) to its energy share."""

    round: int
    metrics: dict[str, float]
    participants: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    round_time_s: float = 0.0
    device_times_s: dict[str, float] = field(default_factory=dict)
    rank_energy: dict[str, float] = field(default_factory=dict)
    online: int = 0  # devices online this round (the rest were not sampled)
    sampled: list[str] = field(default_factory=list)
    drop_reasons: dict[str, str] = field(default_factory=dict)  # dropped device -> why
    ranks: dict[str, int] = field(default_factory=dict)  # participant -> rank of its update (HetLoRA may prune)


@dataclass
class FleetReport:
    """A whole run: its configuration, each device's rank (``None``: no packaged rank fits it) and profile,
    how the ranks were chosen, and the rounds so far."""

    config: dict[str, Any]
    device_ranks: dict[str, int | None]
    rounds: list[RoundRecord] = field(default_factory=list)
    device_profiles: dict[str, str] = field(default_factory=dict)
    rank_choice: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {d: r for d, r in self.device_ranks.items()
               if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0)}
        if bad:
            raise ConfigError(f"device_ranks must be positive integers or None, got {dict(list(bad.items())[:5])}")
        unknown = set(self.device_profiles) - set(self.device_ranks)
        if unknown:
            raise ConfigError(f"device_profiles names devices without a rank: {sorted(unknown)[:5]}")
        for i, rec in enumerate(self.rounds):
            self.check_round(rec, expected=i)

    def check_round(self, rec: RoundRecord, *, expected: int | None = None) -> None:
        expected = len(self.rounds) if expected is None else expected
        if rec.round != expected:
            raise ConfigError(f"round {rec.round} recorded where round {expected} was expected")
        strangers = (set(rec.participants) | set(rec.dropped) | set(rec.device_times_s)) - set(self.device_ranks)
        if strangers:
            raise ConfigError(f"round {rec.round} names unknown devices: {sorted(strangers)[:5]}")
        if set(rec.participants) & set(rec.dropped):
            raise ConfigError(f"round {rec.round}: a device cannot both take part and be dropped")
        if not (rec.round_time_s >= 0):
            raise ConfigError(f"round {rec.round}: round_time_s must be >= 0, got {rec.round_time_s}")

    def add_round(self, rec: RoundRecord) -> None:
        self.check_round(rec)
        self.rounds.append(rec)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "device_ranks": self.device_ranks, "device_profiles": self.device_profiles,
                "rank_choice": self.rank_choice, "rounds": [asdict(r) for r in self.rounds]}


def read_report(out_dir: str | Path) -> FleetReport:
    """Read ``metrics.json`` back (``None`` values become NaN)."""
    path = Path(out_dir) / METRICS_JSON
    try:
        data = json.loads(path.read_text())
        rounds = [RoundRecord(**{**r, "metrics": {k: _num(v) for k, v in r["metrics"].items()}})
                  for r in data["rounds"]]
        return FleetReport(data["config"], data["device_ranks"], rounds, data.get("device_profiles", {}),
                           data.get("rank_choice", {}))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LorafleetError(f"cannot read fleet report {path}: {exc}") from exc


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)
