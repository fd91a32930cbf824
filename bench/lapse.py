"""A device frozen past Flower's heartbeat patience rejoins its round: a real deployment check on 127.0.0.1.

    .venv/bin/python bench/lapse.py [--freeze 75] [--json docs/bench/lapse.jsonl]

Flower's SuperLink, three ``lorafleet client`` devices (ranks 2, 4, 8 by their profiles) and ``flwr run`` of the
lorafleet app (one flexlora round of a ``random:tiny`` package). The rank-8 device is stopped with SIGSTOP
before the run starts and continued (SIGCONT) ``--freeze`` seconds later: past 2 × 30 s without heartbeats the
SuperLink answers the server's rank query itself ("Node Unavailable"), the way it does for every device of a
server restarted with ``--resume``; the server sends the message again once the device is connected again
(``lorafleet.server.server_app.PromptGrid``). The row says whether that device's update was aggregated, how
often a message was sent again, and how long the round took. Not a test: it waits out Flower's 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ROUND_TIMEOUT = 240.0
RANKS = (2, 4, 8)


def run(root: Path, freeze: float) -> dict[str, object]:
    import tomli_w
    from fed_helpers import Processes, flower, lorafleet, process_env, profile_for_rank, read_state, write_data

    from lorafleet.export.compiler.pipeline import ExportConfig, run_export
    from lorafleet.federation import APP_DIR, free_port

    pkg = root / "pkg"
    run_export(ExportConfig(model="random:tiny", ranks=RANKS, target_modules=("q_proj", "v_proj"), seq_len=16,
                            runtimes=("onnx",), out=pkg))
    env, port, home = process_env(root / "cache"), free_port(), root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": "local", "local": {"address": f"127.0.0.1:{port}", "insecure": True}}}))
    procs = Processes(root / "logs", env)
    try:
        procs.start("superlink", flower("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                        "--database", str(root / "superlink.db"),
                                        "--disable-runtime-dependency-installation"), env={"FLWR_HOME": str(home)})
        time.sleep(8)
        clients = [procs.start(f"client-{i}", lorafleet(
            "client", "--server", f"127.0.0.1:{port}", "--package", str(pkg),
            "--data", str(write_data(root / f"data-{i}.jsonl", 4 + 2 * i, i)),
            "--profile", str(profile_for_rank(root / f"device-{i}.toml", pkg, r, ROUND_TIMEOUT)), "--verbose"))
            for i, r in enumerate(RANKS)]
        time.sleep(25)  # registered, heartbeating
        os.killpg(clients[-1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        state, config = root / "state", root / "run.toml"
        config.write_text(tomli_w.dumps({"rounds": 1, "min-clients": 3, "round-timeout": ROUND_TIMEOUT,
                                         "local-steps": 2, "lr": 0.01, "seed": 7, "package": str(pkg),
                                         "method": "flexlora", "state-dir": str(state)}))
        with open(root / "run.log", "w") as log:
            job = subprocess.Popen(flower("flwr", "run", str(APP_DIR), "local", "--run-config", str(config),
                                          "--stream"), env={**env, "FLWR_HOME": str(home)}, stdout=log,
                                   stderr=subprocess.STDOUT)
            time.sleep(max(0.0, freeze - (time.monotonic() - stopped)))
            os.killpg(clients[-1].pid, signal.SIGCONT)
            rc = job.wait(600)
        done = time.monotonic() - stopped
        entry = (read_state(state) or {"history": [{}]})["history"][0]
        text = (root / "run.log").read_text(errors="replace")
        return {"kind": "heartbeat-lapse", "freeze_s": freeze, "rc": rc,
                "valid_ranks": sorted(v["rank"] for v in entry.get("valid", {}).values()),
                "dropped": entry.get("dropped"), "sent_again": text.count("its message is sent again"),
                "seconds_from_freeze_to_end": round(done, 1)}
    finally:
        procs.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--freeze", type=float, default=75.0, help="seconds the rank-8 device is stopped")
    ap.add_argument("--json", default="docs/bench/lapse.jsonl")
    args = ap.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="lorafleet-lapse-") as tmp:
        row = {**meta, **run(Path(tmp), args.freeze)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
