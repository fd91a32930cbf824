"""Expectations on a fleet's metrics, for CI: ``METRIC OP NUMBER`` or ``METRIC OP baseline [+-] NUMBER``.

    heldout/rouge_l >= 0.20                    the final round's held-out Rouge-L
    dropped_share <= 0.3                       share of sampled device-rounds dropped (stragglers, no rank)
    round_time_p95_s <= 60                     95th percentile of the emulated round times
    heldout/rouge_l >= baseline - 0.02         against the same metric of a baseline report (--baseline DIR)

``OP`` is one of ``>=``, ``<=``, ``>``, ``<``, ``==`` (``==`` within 1e-9 relative, 1e-12 absolute).
:func:`parse_expectations` checks every name against :func:`known_metrics` before anything runs;
:func:`report_metrics` computes the namespace from a :class:`~lorafleet.fleet.records.FleetReport`,
:func:`check` / :func:`check_report` judge the expectations (the latter on a written report, without running
a fleet), and :func:`write_junit` / :func:`write_summary` write ``junit.xml`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.records import FleetReport

JUNIT_XML, SUMMARY_JSON = "junit.xml", "summary.json"
SPLITS = ("heldout", "seen")
EVAL_METRICS = ("rouge_l", "exact_match", "loss")  # lorafleet.fleet.evaluate.METRICS (checked by the tests)
DELTA = "delta/"  # delta/<metric>: the final round's value minus round 0's (the untrained model)

# the fleet's own figures, over the trained rounds (1..R); descriptions are shown by docs/ci.md
FLEET_METRICS: dict[str, str] = {
    "rounds": "rounds run",
    "devices": "devices in the fleet",
    "unranked_share": "share of devices that no packaged rank fits",
    "rank_mean": "mean rank of the devices that have one",
    "online_mean": "devices online per round, mean",
    "sampled_mean": "devices sampled per round, mean",
    "participants_mean": "devices aggregated per round, mean",
    "participants_min": "devices aggregated per round, fewest",
    "dropped_mean": "devices dropped per round, mean",
    "dropped_share": "dropped / sampled, over all rounds (0 when none was sampled)",
    "round_time_mean_s": "emulated round time, mean (s)",
    "round_time_p95_s": "emulated round time, 95th percentile (s, linear interpolation)",
    "round_time_max_s": "emulated round time, longest (s)",
    "device_time_p95_s": "emulated time of a sampled device, 95th percentile over all device-rounds (s)",
}
FINAL_ONLY = ("train/loss", "eval_seconds")  # final-round metrics that have no delta/


def eval_metric_names() -> list[str]:
    return [f"{s}/{m}" for s in SPLITS for m in EVAL_METRICS]


def known_metrics() -> list[str]:
    """Every name an expectation may use before a fleet has run."""
    evals = eval_metric_names()
    return [*evals, *FINAL_ONLY, *(DELTA + m for m in evals), *FLEET_METRICS]


OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
    "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
}
_EXPR = re.compile(r"^\s*(?P<metric>[A-Za-z_][\w./-]*)\s*(?P<op>>=|<=|==|>|<)\s*(?P<rhs>.+?)\s*$")
_RELATIVE = re.compile(r"^baseline(?:\s*(?P<sign>[+-])\s*(?P<offset>\S+))?$")
FORM = "METRIC OP NUMBER or METRIC OP baseline [+-] NUMBER, OP one of >=, <=, >, <, =="


@dataclass(frozen=True)
class Expectation:
    """``metric op value``, or ``metric op baseline + value`` when ``relative``."""

    text: str
    metric: str
    op: str
    value: float
    relative: bool = False

    def threshold(self, baseline: float | None) -> float:
        if not self.relative:
            return self.value
        return math.nan if baseline is None else baseline + self.value

    def __str__(self) -> str:
        if not self.relative:
            return f"{self.metric} {self.op} {_num(self.value)}"
        if self.value == 0:
            return f"{self.metric} {self.op} baseline"
        return f"{self.metric} {self.op} baseline {'-' if self.value < 0 else '+'} {_num(abs(self.value))}"


@dataclass(frozen=True)
class Outcome:
    expectation: Expectation
    value: float  # NaN: not in the report
    threshold: float
    baseline: float | None
    passed: bool
    message: str  # "heldout/rouge_l >= 0.2: got 0.13 (short by 0.07)"


def parse_expectation(text: str, *, source: str = "--expect") -> Expectation:
    """One expression; a malformed one is a one-line error naming ``source``."""
    m = _EXPR.match(text)
    if not m:
        raise ConfigError(f"{source}: cannot read {text!r}: expected {FORM}")
    rhs = m["rhs"]
    rel = _RELATIVE.match(rhs)
    try:
        if rel:
            offset = float(rel["offset"]) if rel["offset"] is not None else 0.0
            value = -offset if rel["sign"] == "-" else offset
        else:
            value = float(rhs)
    except ValueError:
        raise ConfigError(f"{source}: cannot read {text!r}: {rhs!r} is not a number (expected {FORM})") from None
    if not math.isfinite(value):
        raise ConfigError(f"{source}: cannot read {text!r}: the number must be finite")
    return Expectation(text.strip(), m["metric"], m["op"], value, relative=bool(rel))


def parse_expectations(texts: Iterable[tuple[str, str]], *, baseline: bool,
                       extra_names: Iterable[str] = ()) -> list[Expectation]:
    """``(source, expression)`` pairs -> expectations, each name checked against :func:`known_metrics` (and
    ``extra_names``), and ``baseline`` ones only with a baseline report. Raises before anything runs."""
    known = [*known_metrics(), *(n for n in extra_names if n not in known_metrics())]
    out = []
    for source, text in texts:
        e = parse_expectation(text, source=source)
        if e.metric not in known:
            raise ConfigError(f"{source}: unknown metric {e.metric!r} in {text!r} (known: {', '.join(known)})")
        if e.relative and not baseline:
            raise ConfigError(f"{source}: {text!r} compares against the baseline, but no --baseline DIR "
                              f"(or baseline in the fleet file) is given")
        out.append(e)
    return out


def report_metrics(report: FleetReport) -> dict[str, float]:
    """The namespace expectations are judged in: the final round's evaluation metrics, their change since
    round 0 (``delta/...``), and the fleet's figures (:data:`FLEET_METRICS`). Missing values are NaN."""
    import numpy as np

    rounds = report.rounds
    trained = rounds[1:]
    final = dict(rounds[-1].metrics) if rounds else {}
    first = rounds[0].metrics if rounds else {}
    out: dict[str, float] = {}
    for name in [*eval_metric_names(), *FINAL_ONLY]:
        out[name] = _float(final.get(name))
    for name, value in final.items():  # whatever else the report holds
        out.setdefault(name, _float(value))
    for name in eval_metric_names():
        out[DELTA + name] = out[name] - _float(first.get(name)) if len(rounds) > 1 else math.nan

    def mean(xs: Sequence[float]) -> float:
        return float(np.mean(xs)) if len(xs) else math.nan

    ranks = [r for r in report.device_ranks.values() if r is not None]
    sampled = sum(len(r.sampled) for r in trained)
    dropped = sum(len(r.dropped) for r in trained)
    times = [r.round_time_s for r in trained]
    device_times = [t for r in trained for t in r.device_times_s.values()]
    out.update({
        "rounds": float(len(trained)),
        "devices": float(len(report.device_ranks)),
        "unranked_share": (len(report.device_ranks) - len(ranks)) / len(report.device_ranks)
        if report.device_ranks else math.nan,
        "rank_mean": mean(ranks),
        "online_mean": mean([r.online for r in trained]),
        "sampled_mean": mean([len(r.sampled) for r in trained]),
        "participants_mean": mean([len(r.participants) for r in trained]),
        "participants_min": float(min((len(r.participants) for r in trained), default=math.nan)),
        "dropped_mean": mean([len(r.dropped) for r in trained]),
        "dropped_share": dropped / sampled if sampled else 0.0,
        "round_time_mean_s": mean(times),
        "round_time_p95_s": float(np.percentile(times, 95)) if times else math.nan,
        "round_time_max_s": max(times, default=math.nan),
        "device_time_p95_s": float(np.percentile(device_times, 95)) if device_times else math.nan,
    })
    return out


def check(expectations: Sequence[Expectation], metrics: Mapping[str, float],
          baseline: Mapping[str, float] | None = None) -> list[Outcome]:
    """Judge each expectation; a metric missing (or NaN) in the report fails it."""
    outcomes = []
    for e in expectations:
        value = _float(metrics.get(e.metric))
        base = _float(baseline.get(e.metric)) if (e.relative and baseline is not None) else None
        thr = e.threshold(base)
        passed = not (math.isnan(value) or math.isnan(thr)) and OPS[e.op](value, thr)
        outcomes.append(Outcome(e, value, thr, base, passed, _message(e, value, thr, base, passed)))
    return outcomes


def check_report(report_dir: str | Path, expectations: Iterable[str | Expectation],
                 baseline_dir: str | Path | None = None) -> list[Outcome]:
    """Judge expectations on a written report (``DIR/metrics.json``) without running anything."""
    from lorafleet.fleet.records import read_report

    metrics = report_metrics(read_report(report_dir))
    base = report_metrics(read_report(baseline_dir)) if baseline_dir is not None else None
    base_known = base is not None
    exps = [e if isinstance(e, Expectation)
            else parse_expectations([("expectation", e)], baseline=base_known, extra_names=metrics)[0]
            for e in expectations]
    return check(exps, metrics, base)


def write_junit(path: str | Path, outcomes: Sequence[Outcome], metrics: Mapping[str, float], *,
                suite: str = "lorafleet fleet", time_s: float = 0.0, error: str | None = None) -> Path:
    """``junit.xml``: one testsuite, the metrics as its properties, one testcase per expectation (a
    ``failure`` element with the message when it failed). ``error``: the fleet did not finish; one testcase
    ``fleet run`` with an ``error`` element holding the message."""
    failures = sum(not o.passed for o in outcomes)
    counts = {"tests": str(len(outcomes) + (error is not None)), "failures": str(failures),
              "errors": str(int(error is not None)), "skipped": "0", "time": f"{time_s:.3f}"}
    root = ET.Element("testsuites", {"name": suite, **counts})
    ts = ET.SubElement(root, "testsuite", {"name": suite, **counts})
    if error is not None:
        case = ET.SubElement(ts, "testcase", {"classname": suite, "name": "fleet run", "time": f"{time_s:.3f}"})
        ET.SubElement(case, "error", {"message": error, "type": "FleetError"}).text = error
    props = ET.SubElement(ts, "properties")
    for name, value in metrics.items():
        ET.SubElement(props, "property", {"name": name, "value": _num(value, full=True)})
    for o in outcomes:
        case = ET.SubElement(ts, "testcase", {"classname": suite, "name": str(o.expectation), "time": "0"})
        cprops = ET.SubElement(case, "properties")
        figures: dict[str, float | None] = {"value": o.value, "threshold": o.threshold, "baseline": o.baseline}
        for key, figure in figures.items():
            if figure is not None:
                ET.SubElement(cprops, "property", {"name": key, "value": _num(figure, full=True)})
        if not o.passed:
            fail = ET.SubElement(case, "failure", {"message": o.message, "type": "ExpectationFailed"})
            fail.text = o.message
        else:
            ET.SubElement(case, "system-out").text = o.message
    ET.indent(root)
    return _write(path, '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n")


def summary(outcomes: Sequence[Outcome], metrics: Mapping[str, float], run: Mapping[str, Any], *,
            error: str | None = None) -> dict[str, Any]:
    """``summary.json``'s content: ``passed``, ``failed``, ``error``, ``expectations``, ``metrics``, ``run``."""
    return {
        "passed": error is None and all(o.passed for o in outcomes),
        "failed": sum(not o.passed for o in outcomes),
        "error": error,
        "expectations": [{"expect": str(o.expectation), "metric": o.expectation.metric, "op": o.expectation.op,
                          "threshold": _json(o.threshold), "baseline": _json(o.baseline),
                          "value": _json(o.value), "passed": o.passed, "message": o.message} for o in outcomes],
        "metrics": {k: _json(v) for k, v in metrics.items()},
        "run": dict(run),
    }


def write_summary(path: str | Path, outcomes: Sequence[Outcome], metrics: Mapping[str, float],
                  run: Mapping[str, Any], *, error: str | None = None) -> Path:
    return _write(path, json.dumps(summary(outcomes, metrics, run, error=error), indent=1) + "\n")


# --- internals ------------------------------------------------------------------------------------------

def _write(path: str | Path, text: str) -> Path:
    """Atomically, with the mode a plain ``open`` would give (the report's files are readable by others)."""
    import os

    from lorafleet.export.formats.atomic import atomic_write_text

    out = Path(path)
    atomic_write_text(out, text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)
    return out


def _message(e: Expectation, value: float, thr: float, base: float | None, passed: bool) -> str:
    head = f"{e}: got {_num(value)}"
    if e.relative:
        head += f", baseline {_num(base) if base is not None else 'missing'}, threshold {_num(thr)}"
    if math.isnan(value):
        return f"{e}: {e.metric} is not in the report (got nan)"
    if math.isnan(thr):
        return f"{head} ({e.metric} is not in the baseline report)"
    if passed:
        return head
    gap = abs(value - thr)
    if e.op == "==":
        why = f"off by {_num(gap)}"
    elif e.op in (">=", ">"):
        why = f"short by {_num(gap)}" if gap else f"must be above {_num(thr)}"
    else:
        why = f"over by {_num(gap)}" if gap else f"must be below {_num(thr)}"
    return f"{head} ({why})"


def _num(value: float | None, *, full: bool = False) -> str:
    if value is None:
        return "none"
    if math.isnan(value):
        return "nan"
    if full:
        return repr(float(value))
    text = f"{value:.4g}"
    return "0" if text == "-0" else text


def _float(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _json(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value
