"""The CI fleet docs/ci.md recommends (``docs/ci/fleet.toml``: random:tiny, 100 devices, 3 rounds): wall time and
peak memory of one run of ``lorafleet fleet --config docs/ci/fleet.toml``, as a CI job runs it.

    .venv/bin/python bench/ci_fleet.py                                  # run it once, print the figures
    .venv/bin/python bench/ci_fleet.py --json docs/bench/ci-fleet.jsonl  # and append them as one JSON row
    .venv/bin/python bench/ci_fleet.py --cache /tmp/lf-cache -- --rounds 1   # options after -- go to the command

The command runs in a child process with ``$LORAFLEET_CACHE`` (``--cache``, default: the usual cache). Run it
twice: the first run of a cold cache exports the package (its row says ``"package_cached": false``); the goal
(docs/ci.md, "Cost") is for a run with the package cached. Memory: ``resource.getrusage`` — ``ru_maxrss`` of
this process and of its children (the largest single process of the run that was waited for; Linux reports
KiB) — and the peak of the summed RSS of the whole process tree (Ray's processes included), sampled every
0.25 s with psutil (an upper bound: shared pages count once per process).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLEET_TOML = ROOT / "docs" / "ci" / "fleet.toml"


def tree_rss(proc: Any) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(Exception):  # a process that just exited
            total += p.memory_info().rss
    return total


def _stage(text: str) -> bool:
    """A stage or result line of the command, not a frame of its progress bar (spinner, bar)."""
    return bool(text) and not text.startswith((" ", "│")) and not 0x2800 <= ord(text[0]) <= 0x28FF


def run(config: Path, out: Path, extra: list[str], cache: str | None) -> dict[str, Any]:
    import psutil

    cmd = [sys.executable, "-m", "lorafleet", "fleet", "--config", str(config), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cache:
        env["LORAFLEET_CACHE"] = cache
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             stdin=subprocess.DEVNULL)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - t0, line.rstrip())
                                                          for line in child.stdout or []), daemon=True)
    reader.start()
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "command": " ".join(["lorafleet", *cmd[3:]]),
        "exit_code": child.returncode,
        "wall_seconds": round(wall, 2),
        "cpu_seconds_children": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 1),
        "peak_rss_children_bytes": after.ru_maxrss * 1024,  # the largest single process (waited for)
        "peak_rss_self_bytes": me.ru_maxrss * 1024,
        "peak_tree_rss_bytes": peak,  # summed over the process tree, sampled
        "package_cached": summary.get("run", {}).get("package_cached"),
        "expectations_passed": summary.get("passed"),
        "expectations": [e["message"] for e in summary.get("expectations", [])],
        "fleet_wall_seconds": summary.get("run", {}).get("wall_s"),
        "stages": [[round(t, 1), text] for t, text in lines if _stage(text)][:60],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=FLEET_TOML)
    parser.add_argument("--cache", help="LORAFLEET_CACHE for the run (default: the environment's, or the usual)")
    parser.add_argument("--json", type=Path, help="append the result as one JSON row to this file")
    parser.add_argument("extra", nargs="*", help="options for lorafleet fleet, after --")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-ci-fleet-") as tmp:
        row = run(args.config, Path(tmp) / "out", args.extra, args.cache)
    row = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{os.cpu_count()} CPUs", "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in os.getloadavg()], **row}
    gib = 2**30
    print(f"{row['command']}: exit {row['exit_code']}, {row['wall_seconds']} s wall "
          f"(package {'cached' if row['package_cached'] else 'exported by this run'}), "
          f"{row['cpu_seconds_children']} CPU s; peak RSS {row['peak_rss_children_bytes'] / gib:.2f} GiB "
          f"(largest process), {row['peak_tree_rss_bytes'] / gib:.2f} GiB (process tree, summed); "
          f"load {row['load_average_before']} -> {row['load_average_after']}")
    for t, text in row["stages"]:
        print(f"  [{t:7.1f} s] {text}")
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0 if row["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
