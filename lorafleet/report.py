"""The fleet report: ``metrics.json``, ``metrics.csv``, PNG plots and ``summary.md`` in an output directory.

One :class:`RoundRecord` per round — round 0 is the untrained baseline — holding the evaluation metrics of
the global adapter, who took part, who was dropped as a straggler, the emulated round time and the energy
per rank segment (:mod:`lorafleet.rank_energy`). Every file is written atomically, so the report can be
rewritten after each round and is never seen half-written.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.atomic import atomic_write_text
from export.errors import ConfigError, LorafleetError

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


def write_report(out_dir: str | Path, report: FleetReport) -> list[Path]:
    """Write every report file into ``out_dir`` (created if missing); returns the paths written."""
    from lorafleet import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / METRICS_JSON, json.dumps(_json_safe(report.to_dict()), indent=2) + "\n")
    atomic_write_text(out / METRICS_CSV, metrics_csv(report))
    written = [out / METRICS_JSON, out / METRICS_CSV]
    for key, name in PLOTS.items():
        plots.save(plots.FIGURES[key](report), out / name)
        written.append(out / name)
    atomic_write_text(out / SUMMARY_MD, summary_markdown(report))
    written.append(out / SUMMARY_MD)
    for path in written:
        shareable(path)
    return written


def shareable(path: Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (temporary files are created owner-only)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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


def metrics_csv(report: FleetReport) -> str:
    """One row per round: counts, emulated time, every metric, every rank segment's energy share."""
    metric_keys = sorted({k for r in report.rounds for k in r.metrics})
    energy_keys = _energy_keys(report)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["round", "online", "sampled", "participants", "dropped", "round_time_s", *metric_keys,
                     *(f"energy/{k}" for k in energy_keys)])
    for r in report.rounds:
        writer.writerow([r.round, r.online, len(r.sampled), len(r.participants), len(r.dropped),
                         f"{r.round_time_s:.6g}",
                         *(_cell(r.metrics.get(k)) for k in metric_keys),
                         *(_cell(r.rank_energy.get(k)) for k in energy_keys)])
    return buf.getvalue()


def summary_markdown(report: FleetReport) -> str:
    """A readable summary: the run, the fleet, a table per round, the change from the baseline, the plots."""
    cfg = report.config
    ranks = Counter(report.device_ranks.values())
    lines = [f"# Fleet report: {cfg.get('method', '?')} on {cfg.get('model', '?')}", ""]
    lines += [f"- {k}: `{v}`" for k, v in cfg.items() if not isinstance(v, dict | list)]
    lines += ["", f"## Fleet: {len(report.device_ranks)} devices", "", "| rank | devices |", "|---:|---:|"]
    lines += [f"| {r if r is not None else 'none fits'} | {n} |"
              for r, n in sorted(ranks.items(), key=lambda kv: kv[0] or 0)]
    if report.device_profiles:
        chosen = report.rank_choice.get("profiles", {})
        lines += ["", "| profile | devices | rank | why |", "|---|---:|---:|---|"]
        for p, n in sorted(Counter(report.device_profiles.values()).items()):
            c = chosen.get(p, {})
            rank = c.get("selected_rank", "?")
            lines.append(f"| {p} | {n} | {rank if rank is not None else 'none'} | {(c.get('reasons') or [''])[-1]} |")
    lines += ["", "## Rounds", "", *_rounds_table(report), "", *_change_lines(report)]
    lines += ["", "## Plots", ""] + [f"![{k}]({name})" for k, name in PLOTS.items()]
    return "\n".join(lines) + "\n"


# --- internals ------------------------------------------------------------------------------------------

SHOWN = ("heldout/rouge_l", "seen/rouge_l", "heldout/exact_match", "seen/exact_match", "seen/loss")


def _rounds_table(report: FleetReport) -> list[str]:
    shown = [k for k in SHOWN if any(k in r.metrics for r in report.rounds)]
    head = ["round", *shown, "online", "sampled", "participants", "dropped", "round time (s)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in report.rounds:
        cells = [str(r.round), *(_fmt(r.metrics.get(k)) for k in shown), str(r.online), str(len(r.sampled)),
                 str(len(r.participants)), str(len(r.dropped)), f"{r.round_time_s:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _change_lines(report: FleetReport) -> list[str]:
    if len(report.rounds) < 2:
        return []
    first, last = report.rounds[0].metrics, report.rounds[-1].metrics
    out = [f"Change from the untrained baseline (round 0) to round {report.rounds[-1].round}:", ""]
    for k in SHOWN:
        if k in first and k in last and not (math.isnan(first[k]) or math.isnan(last[k])):
            out.append(f"- {k}: {_fmt(first[k])} → {_fmt(last[k])} ({last[k] - first[k]:+.4f})")
    return out


def _energy_keys(report: FleetReport) -> list[str]:
    keys: dict[str, None] = {}
    for r in report.rounds:
        keys.update(dict.fromkeys(r.rank_energy))
    return sorted(keys, key=lambda k: int(k.split("-")[0]))


def _fmt(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4f}"


def _cell(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6g}"


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
