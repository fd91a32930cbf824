"""Profiler accuracy: predicted vs measured peak memory and step time per rank and backend, and the rank the
profiler selects for every device profile.

    .venv/bin/python bench/profiler.py --package PKG [--backends onnxruntime,executorch,torch]
        [--steps 5] [--time-budgets none,120,60] [--out docs/bench/profiler.json] | tee docs/bench/profiler.txt

For each backend the profiler's own procedure runs first (fresh processes at the smallest and largest packaged
rank, a linear fit, a prediction for every rank); then every packaged rank is measured again, independently,
in its own fresh process, and compared with the prediction. Goals: peak memory within ±10 %, step time within
±25 %. Then every profile in ``profiles/`` is emulated (host step times scaled by the GFLOP/s ratio) and the
selected rank and the binding limit are recorded.

Step times are recorded twice: wall seconds (what the profiler predicts and a device experiences) and CPU
seconds of the process per step (all threads), which a machine shared with other jobs distorts far less; the
same linear model is fitted on both. ``OMP_WAIT_POLICY=PASSIVE`` is set for the child processes unless the
environment sets it (torch's spinning OpenMP workers inflate both figures when the cores are contended).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lorafleet.edge_client.device import emulate, matmul_gflops  # noqa: E402
from lorafleet.edge_client.profiler import fit_linear, measure_rank, profile_device  # noqa: E402
from lorafleet.edge_client.profiles import load_all  # noqa: E402
from lorafleet.edge_client.rank_choice import Budgets, choose_rank  # noqa: E402
from lorafleet.export.formats.package import open_package  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True, type=Path)
    ap.add_argument("--backends", default="onnxruntime,executorch,torch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--time-budgets", default="none,120,60",
                    help="round-time budgets (seconds, or none) to select ranks under, at --memory-fraction 0.9")
    ap.add_argument("--out", type=Path, default=Path("docs/bench/profiler.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by every measuring child process

    pkg = open_package(args.package)
    budgets = [Budgets(time_budget_seconds=None if t == "none" else float(t)) for t in args.time_budgets.split(",")]
    budgets.append(Budgets(memory_fraction=0.5))
    m = pkg.manifest
    tokens = m.batch_size * m.seq_len
    shapes = [(tokens, i, o) for o, i in m.model.module_shapes.values()]
    host_gflops = matmul_gflops(shapes)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": _machine(), "load_before": os.getloadavg(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "package": {"model": m.model.spec, "ranks": m.ranks, "target_modules": m.target_modules,
                    "seq_len": m.seq_len, "batch_size": m.batch_size},
        "host_gflops_at_package_shapes": round(host_gflops, 2), "steps": args.steps, "backends": {},
    }
    for backend in args.backends.split(","):
        runtime = "onnx" if backend == "onnxruntime" else backend
        if backend != "torch" and runtime not in m.runtimes:
            print(f"skip {backend}: the package has no {runtime} programs", file=sys.stderr)
            continue
        report["backends"][backend] = _bench_backend(pkg, backend, args.steps, host_gflops, budgets)
    report["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _print_summary(report)


def _bench_backend(pkg: Any, backend: str, steps: int, host_gflops: float,
                   budgets: list[Budgets]) -> dict[str, Any]:
    host = emulate_host(host_gflops)
    t0 = time.perf_counter()
    result = profile_device(host, pkg, backend, Budgets(), steps=steps)
    profile_seconds = time.perf_counter() - t0
    predicted = {p.rank: p for p in result.predictions}
    # the same linear model fitted on CPU seconds per step: a load-insensitive check of the model itself
    cpu_fit = fit_linear([float(x.rank) for x in result.measurements], [x.cpu_seconds for x in result.measurements])
    rows = []
    for r in sorted(pkg.ranks):
        meas = measure_rank(pkg.path, r, backend, steps=steps)
        p = predicted[r]
        rows.append({
            "rank": r, "fit_point": r in (min(pkg.ranks), max(pkg.ranks)),
            "predicted_peak_bytes": p.peak_bytes, "measured_peak_bytes": meas.device_memory_bytes,
            "peak_error": round(p.peak_bytes / meas.device_memory_bytes - 1, 4),
            "predicted_step_seconds": round(p.step_seconds, 5), "measured_step_seconds": round(meas.step_seconds, 5),
            "step_error": round(p.step_seconds / meas.step_seconds - 1, 4),
            "predicted_cpu_seconds": round(cpu_fit(r), 5), "measured_cpu_seconds": round(meas.cpu_seconds, 5),
            "cpu_error": round(cpu_fit(r) / meas.cpu_seconds - 1, 4), "load_1min": os.getloadavg()[0],
        })
        print(f"{backend} r={r}: {rows[-1]}", file=sys.stderr, flush=True)
    selections = []
    for prof in load_all():
        dev = emulate(prof, host_gflops)
        for b in budgets:
            decision = choose_rank(dev, result.predictions, b)
            selections.append({"profile": prof.id, "memory_fraction": b.memory_fraction,
                               "time_budget_seconds": b.time_budget_seconds, "selected_rank": decision.selected_rank,
                               "verdict": decision.reasons[-1]})
    fit_points = [{"rank": x.rank, "device_memory_bytes": x.device_memory_bytes,
                   "step_seconds": round(x.step_seconds, 5), "cpu_seconds": round(x.cpu_seconds, 5)}
                  for x in result.measurements]
    return {"profile_seconds": round(profile_seconds, 1), "fit_reasons": result.decision.reasons[:2],
            "fit_measurements": fit_points,
            "ranks": rows, "selections": selections}


def emulate_host(host_gflops: float) -> Any:
    from lorafleet.edge_client.device import DeviceReport, memory_bytes

    total, available = memory_bytes()
    return DeviceReport("bench host", "measured", total, available, os.cpu_count() or 1, host_gflops, 1.0,
                        host_gflops=host_gflops)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((x.split(":", 1)[1].strip() for x in model.splitlines() if x.startswith("Model name")), cpu)
    except OSError:
        pass
    import psutil

    gib = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()}-core {cpu} ({platform.machine()}), {gib:.0f} GiB, no GPU"


def _print_summary(report: dict[str, Any]) -> None:
    print(f"{report['date']}  {report['machine']}  load {_loads(report['load_before'])} -> "
          f"{_loads(report['load_after'])}  OMP_WAIT_POLICY={report['omp_wait_policy']}")
    for backend, b in report["backends"].items():
        print(f"== {backend} (fit: {b['fit_reasons'][1]})")
        print("rank  peak pred / meas MiB     err   wall pred / meas ms     err    cpu pred / meas ms     err  load")
        for row in b["ranks"]:
            print(f"{row['rank']:>4}  {row['predicted_peak_bytes'] / 2**20:8.1f} / "
                  f"{row['measured_peak_bytes'] / 2**20:7.1f}"
                  f"  {row['peak_error']:+6.1%}  {row['predicted_step_seconds'] * 1e3:8.1f} / "
                  f"{row['measured_step_seconds'] * 1e3:7.1f}  {row['step_error']:+6.1%}  "
                  f"{row['predicted_cpu_seconds'] * 1e3:8.1f} / {row['measured_cpu_seconds'] * 1e3:7.1f}  "
                  f"{row['cpu_error']:+6.1%}  {row['load_1min']:4.1f}{'  (fit point)' if row['fit_point'] else ''}")
    budgets = sorted({(s["memory_fraction"], s["time_budget_seconds"] or 0.0)
                      for b in report["backends"].values() for s in b["selections"]}, key=lambda x: (-x[0], -x[1]))
    heads = [f"{bk[:4]} m{m:g}/t{t:g}" if t else f"{bk[:4]} m{m:g}" for bk in report["backends"] for m, t in budgets]
    print("selected rank per profile (m: memory fraction, t: round-time budget in s):")
    print(f"{'profile':<22} " + " ".join(f"{h:>13}" for h in heads))
    profiles = list(dict.fromkeys(s["profile"] for b in report["backends"].values() for s in b["selections"]))
    for prof in profiles:
        cells = []
        for b in report["backends"].values():
            picks = {(s["memory_fraction"], s["time_budget_seconds"] or 0.0): s["selected_rank"]
                     for s in b["selections"] if s["profile"] == prof}
            cells += [str(picks.get(k)) if picks.get(k) is not None else "none" for k in budgets]
        print(f"{prof:<22} " + " ".join(f"{c:>13}" for c in cells))


def _loads(loads: Any) -> str:
    return "/".join(f"{x:.1f}" for x in loads)


if __name__ == "__main__":
    main()
