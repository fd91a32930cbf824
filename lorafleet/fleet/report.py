"""The fleet report's writer: ``metrics.json``, ``metrics.csv``, PNG plots and ``summary.md`` in an output
directory, from the records of :mod:`lorafleet.fleet.records`. Every file is written atomically, so the report
can be rewritten after each round and is never seen half-written.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from lorafleet.export.formats.atomic import atomic_write_text
from lorafleet.fleet import plots
from lorafleet.fleet.records import METRICS_CSV, METRICS_JSON, PLOTS, SUMMARY_MD, FleetReport


def write_report(out_dir: str | Path, report: FleetReport) -> list[Path]:
    """Write every report file into ``out_dir`` (created if missing); returns the paths written."""
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
        lines += ["", "| profile | devices | rank | predicted memory (the rank, or the smallest) | why |",
                  "|---|---:|---:|---|---|"]
        for p, n in sorted(Counter(report.device_profiles.values()).items()):
            c = chosen.get(p, {})
            rank = c.get("selected_rank", "?")
            lines.append(f"| {p} | {n} | {rank if rank is not None else 'none'} | {_memory_cell(c)} | "
                         f"{(c.get('reasons') or [''])[-1]} |")
    lines += ["", "## Rounds", "", *_rounds_table(report), "", *_change_lines(report)]
    lines += ["", "## Plots", ""] + [f"![{k}]({name})" for k, name in PLOTS.items()]
    return "\n".join(lines) + "\n"


# --- internals ------------------------------------------------------------------------------------------

def _memory_cell(choice: dict[str, Any]) -> str:
    """The predicted training peak against the memory budget, of the selected rank (or the smallest one)."""
    candidates = choice.get("candidates") or []
    picked = [c for c in candidates if c.get("rank") == choice.get("selected_rank")] or candidates[:1]
    return str(picked[0].get("memory", "")) if picked else ""


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


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
