"""The fleet report's figures (matplotlib, object API on the Agg canvas: no pyplot state, no display).

Each builder takes a :class:`lorafleet.fleet.records.FleetReport` and returns a ``Figure``; :func:`save` writes it
atomically as PNG.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lorafleet.fleet.records import FleetReport

SPLIT_STYLE = {"heldout": ("held-out families", "tab:blue", "o"), "seen": ("seen families", "tab:orange", "s")}
PANELS = (("rouge_l", "Rouge-L F"), ("exact_match", "exact match"), ("loss", "loss (response tokens)"))


def save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path``, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))


def metrics_figure(report: FleetReport) -> Figure:
    """Rouge-L, exact match and loss of the global adapter per round, held-out and seen (round 0 = baseline)."""
    fig = _figure(12.5, 3.8)
    axes = fig.subplots(1, len(PANELS))
    for ax, (metric, label) in zip(axes, PANELS, strict=True):
        for split, (name, color, marker) in SPLIT_STYLE.items():
            key = f"{split}/{metric}"
            points = [(r.round, r.metrics[key]) for r in report.rounds if not math.isnan(r.metrics.get(key, math.nan))]
            if points:  # rounds that were evaluated (and not NaN)
                ax.plot(*zip(*points, strict=True), marker=marker, color=color, label=name)
        ax.set_title(label)
        ax.set_xlabel("round (0 = untrained)")
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(_title(report, "global adapter per round"))
    return fig


def rank_histogram_figure(report: FleetReport) -> Figure:
    """How many devices train at each rank, stacked by device profile."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    ranks = sorted(set(report.device_ranks.values()), key=lambda r: r or 0)  # None (no rank fits) first
    x = range(len(ranks))
    by_profile = Counter((report.device_profiles.get(d, "devices"), r) for d, r in report.device_ranks.items())
    bottom = [0] * len(ranks)
    for profile in sorted({p for p, _ in by_profile}):
        heights = [by_profile[(profile, r)] for r in ranks]
        ax.bar(x, heights, bottom=bottom, label=profile)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, total in enumerate(bottom):
        ax.annotate(str(total), (i, total), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"r={r}" if r is not None else "none fits" for r in ranks])
    ax.set_xlabel("LoRA rank chosen for the device")
    ax.set_ylabel("devices")
    ax.legend(fontsize=8, title="profile" if report.device_profiles else None)
    ax.set_title(_title(report, "rank per device"))
    return fig


def round_times_figure(report: FleetReport) -> Figure:
    """Distribution of emulated per-device round times, finished vs dropped, with the deadline."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    done = [t for r in report.rounds for d, t in r.device_times_s.items() if d not in set(r.dropped)]
    late = [t for r in report.rounds for d, t in r.device_times_s.items() if d in set(r.dropped)]
    if done or late:
        ax.hist([done, late], bins=30, stacked=True, color=["tab:green", "tab:red"],
                label=[f"finished ({len(done)})", f"dropped as stragglers ({len(late)})"])
        deadline = report.config.get("round_deadline_s")
        if deadline:
            ax.axvline(float(deadline), color="black", linestyle="--", label=f"deadline {float(deadline):g} s")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training rounds yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("emulated device round time (s)")
    ax.set_ylabel("device-rounds")
    ax.set_title(_title(report, "emulated round times"))
    return fig


def rank_energy_figure(report: FleetReport) -> Figure:
    """Share of the global adapter's energy in each rank segment, per round (the rank-collapse check)."""
    fig = _figure(7.4, 4.0)
    ax = fig.subplots()
    rounds = [r for r in report.rounds if r.rank_energy]
    keys = sorted({k for r in rounds for k in r.rank_energy}, key=lambda k: int(k.split("-")[0]))
    bottom = [0.0] * len(rounds)
    colors = _colors(len(keys))
    for key, color in zip(keys, colors, strict=True):
        heights = [r.rank_energy.get(key, 0.0) for r in rounds]
        ax.bar([r.round for r in rounds], heights, bottom=bottom, color=color, label=f"components {key}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if not rounds:
        ax.text(0.5, 0.5, "no global adapter yet", ha="center", va="center", transform=ax.transAxes)
    else:
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles[::-1], labels[::-1], fontsize=8, loc="outside right upper", title="rank segment")
    ax.set_ylim(0, 1.0)
    _integer_ticks(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("share of ‖ΔW‖²")
    ax.set_title(_title(report, "energy per rank segment"))
    return fig


FIGURES: dict[str, Callable[[FleetReport], Figure]] = {
    "metrics": metrics_figure, "ranks": rank_histogram_figure, "times": round_times_figure,
    "energy": rank_energy_figure,
}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _title(report: FleetReport, what: str) -> str:
    method, devices = report.config.get("method"), len(report.device_ranks)
    return f"{method} · {devices} devices — {what}" if method else what
