"""Fleet scale: wall time and peak memory of ``lorafleet fleet`` across all its processes (Ray's included).

    .venv/bin/python bench/fleet.py                      # 1000 devices, 10% per round, 3 rounds
    .venv/bin/python bench/fleet.py --devices 5000 --fraction 0.02 --json /tmp/fleet.json

Runs the command in a child process and samples its whole process tree every 0.25 s (the driver, Ray's GCS
server, raylet and every ClientApp worker are its descendants): the peak of the summed RSS (an upper bound:
pages shared between processes count once per process) and of the summed PSS (shared pages divided among the
processes sharing them: the memory the run really takes). The command's stage lines are timestamped as they
arrive, so the wall time splits into preparing (package, profiling), the simulation rounds and evaluation.
The report's ``metrics.json`` gives the per-round counts. Results are printed and written to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def tree_sample(proc: Any, cpu: dict[int, float]) -> tuple[int, int, int]:
    """``(rss, pss, processes)`` summed over ``proc`` and its descendants; ``cpu`` keeps each process's
    latest user + system CPU seconds (their sum at the end is the run's CPU time, less each process's last
    quarter second)."""
    rss = pss = n = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(Exception):  # a process that just exited
            info = p.memory_full_info()
            times = p.cpu_times()
            cpu[p.pid] = times.user + times.system
            rss, pss, n = rss + info.rss, pss + getattr(info, "pss", info.rss), n + 1
    return rss, pss, n


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import psutil

    cmd = [sys.executable, "-m", "lorafleet", "fleet", "--devices", str(args.devices), "--fraction",
           str(args.fraction), "--rounds", str(args.rounds), "--model", args.model, "--method", args.method,
           "--local-steps", str(args.local_steps), "--seed", str(args.seed), "--out", str(out)]
    if args.round_deadline:
        cmd += ["--round-deadline", str(args.round_deadline)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([".", os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             stdin=subprocess.DEVNULL)
    stages: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: stages.extend((time.perf_counter() - t0, line.rstrip())
                                                           for line in child.stdout or []), daemon=True)
    reader.start()
    proc = psutil.Process(child.pid)
    peak = {"rss": 0, "pss": 0, "processes": 0}
    cpu: dict[int, float] = {}
    while child.poll() is None:
        rss, pss, n = tree_sample(proc, cpu)
        peak = {"rss": max(peak["rss"], rss), "pss": max(peak["pss"], pss), "processes": max(peak["processes"], n)}
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    if child.returncode != 0:
        tail = "\n".join(line for _, line in stages[-15:])
        raise SystemExit(f"lorafleet fleet failed (exit {child.returncode}):\n{tail}")
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(sum(cpu.values()), 1),
            "peak_rss_bytes": peak["rss"], "peak_pss_bytes": peak["pss"],
            "peak_processes": peak["processes"], "stages": [[round(t, 2), s] for t, s in stages if s.strip()],
            "rounds": _rounds(out)}


def _rounds(out: Path) -> list[dict[str, Any]]:
    data = json.loads((out / "metrics.json").read_text())
    return [{"round": r["round"], "online": r["online"], "sampled": len(r["sampled"]),
             "participants": len(r["participants"]), "dropped": len(r["dropped"]),
             "emulated_round_s": round(r["round_time_s"], 2),
             "eval_s": round(r["metrics"].get("eval_seconds", 0.0), 2)} for r in data["rounds"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--method", default="flexlora")
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--round-deadline", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="docs/bench/fleet.json")
    args = ap.parse_args()
    load_before, date = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        result = run(args, Path(tmp) / "out")
    result = {"command": " ".join(sys.argv), "date": date,
              "machine": f"{os.cpu_count()} CPUs", "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "settings": vars(args), **result}
    gib = 2**30
    print(f"{args.devices} devices, {args.fraction:g} per round, {args.rounds} rounds, {args.model}: "
          f"{result['wall_seconds']:.1f} s wall, ≈{result['cpu_seconds']:.0f} CPU s, peak "
          f"{result['peak_pss_bytes'] / gib:.2f} GiB PSS "
          f"({result['peak_rss_bytes'] / gib:.2f} GiB RSS) over up to {result['peak_processes']} processes")
    for t, line in result["stages"]:
        print(f"  [{t:7.1f} s] {line}")
    for r in result["rounds"]:
        print(f"  round {r['round']}: {r['online']} online, {r['sampled']} sampled, {r['participants']} aggregated, "
              f"{r['dropped']} dropped; emulated {r['emulated_round_s']} s; evaluation {r['eval_s']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
