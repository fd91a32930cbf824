"""A quantized frozen base against fp32: package size, device memory and time of a training step, quality.

    python bench/quantize.py --model smollm2-135m --modes none,int8,int4 --ranks 16 \
        --runtimes executorch,onnx,torch --steps 50 --out docs/bench/quantize.jsonl

For each ``--quantize`` mode it exports one package (``lorafleet export``, timed, its peak memory read from
polling the process tree with ``psutil``), then, for each rank and runtime, in a fresh
process:

* **device memory of a training step** — the resident set's peak during program load and
  :data:`MEASURE_STEPS` steps, above the process's RSS just before the program loads (the interpreter and the
  runtime libraries are already imported then, so they are not counted: what remains is what the runtime
  maps and plans for this program — the foundation bytes it touches, its planned memory, its own overhead);
* **step time** — the median of :data:`MEASURE_STEPS` steps after two warm-up steps, and its ratio to eager
  fp32 torch measured in the same run (``torch`` runtime of the ``none`` package);
* **loss after ``--steps`` local steps** on the built-in tasks (``lorafleet data`` → ``lorafleet train``), the
  mean of the last five steps against fp32's.

The quality cost (perplexity and mean KL of the next-token distribution on a fixed text against fp32) is what
export measured and wrote into each manifest's ``quantization.against_fp32``. One JSON row per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MEASURE_STEPS = 5
LORAFLEET = [sys.executable, "-m", "lorafleet"]


def _tree_peak(proc: subprocess.Popen[Any]) -> int:
    """Poll a process tree's total RSS until it exits; return the peak (bytes)."""
    import psutil

    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            total = 0
        peak = max(peak, total)
        time.sleep(0.2)
    return peak


def export(model: str, mode: str, ranks: str, seq_len: int, runtimes: str, out: Path) -> dict[str, Any]:
    cmd = [*LORAFLEET, "export", model, "--ranks", ranks, "--target-modules", "q_proj,v_proj",
           "--seq-len", str(seq_len), "--quantize", mode, "--runtimes", runtimes, "--out", str(out), "--force"]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.export.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        peak = _tree_peak(proc)
    if proc.returncode != 0:
        raise SystemExit(f"export {mode} failed: see {out.parent / (out.name + '.export.log')}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"kind": "export", "model": model, "quantize": manifest["quantize"], "ranks": manifest["ranks"],
            "seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": peak,
            "foundation_bytes": {k: v["size"] for k, v in manifest["shared_files"].items()},
            "quantization": manifest.get("quantization", {}),
            "estimate_bytes": {r: a["estimates"]["training_peak_memory_bytes"]
                               for r, a in manifest["artifacts"].items()}}


# --- one runtime in a fresh process -----------------------------------------------------------------------

def step_child(package: str, rank: int, runtime: str) -> dict[str, Any]:
    """Runs in the child: imports first, then baseline, then load + steps (see the module docstring)."""
    import torch  # noqa: F401  (imported before the baseline, as a device app's runtime library would be)

    from lorafleet.edge_client.backends.base import OptimizerConfig
    from lorafleet.edge_client.data import Batch
    from lorafleet.export.compiler.loss import example_batch
    from lorafleet.export.formats.package import open_package
    from lorafleet.export.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    if runtime == "executorch":
        import executorch.extension.training  # noqa: F401

        from lorafleet.edge_client.backends.executorch_backend import ExecutorchBackend as Backend
    elif runtime == "onnx":
        import onnxruntime.training.api  # noqa: F401

        from lorafleet.edge_client.backends.onnx_backend import OnnxBackend as Backend  # type: ignore[assignment]
    else:
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from lorafleet.edge_client.backends.torch_backend import TorchBackend as Backend  # type: ignore[assignment]
    pkg = open_package(package)
    m = pkg.manifest
    ids, labels = example_batch(m.model.vocab_size, m.batch_size, m.seq_len, seed=1)
    batch = Batch(ids.numpy(), labels.numpy())
    baseline = current_rss_bytes()
    reset_ok = reset_peak_rss()
    backend = Backend.from_package(pkg, rank, OptimizerConfig(lr=1e-4))
    for _ in range(2):
        backend.step(batch)
    times = []
    for _ in range(MEASURE_STEPS):
        t0 = time.perf_counter()
        backend.step(batch)
        times.append(time.perf_counter() - t0)
    return {"device_memory_bytes": peak_rss_bytes() - baseline, "baseline_rss_bytes": baseline,
            "peak_reset": reset_ok, "step_ms": round(statistics.median(times) * 1e3, 1),
            "threads": __import__("torch").get_num_threads()}


def measure(package: Path, rank: int, runtime: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "_step", str(package), str(rank), runtime],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[-300:]}
    return json.loads(lines[-1])


def local_training(package: Path, rank: int, runtime: str, data: Path, steps: int) -> dict[str, Any]:
    backend = {"onnx": "onnxruntime"}.get(runtime, runtime)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([*LORAFLEET, "train", "--package", str(package), "--rank", str(rank), "--backend",
                              backend, "--data", str(data), "--steps", str(steps), "--seed", "0", "--lr", "1e-3",
                              "--out", str(Path(tmp) / "a"), "--json"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][-300:]}
    losses = json.loads(lines[-1])["losses"]
    return {"first_loss": round(losses[0], 4), "final_loss": round(statistics.mean(losses[-5:]), 4)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        print(json.dumps(step_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default="none,int8,int4")
    ap.add_argument("--ranks", default="16")
    ap.add_argument("--runtimes", default="executorch,onnx,torch")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="local training steps for the loss comparison")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorafleet-bench-quantize")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON rows here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runtimes = args.runtimes.split(",")
    export_runtimes = ",".join(r for r in runtimes if r != "torch") or "onnx"
    data = args.work / "tasks.jsonl"
    if not data.exists():
        subprocess.run([*LORAFLEET, "data", "--out", str(data), "--examples", "8"], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(),
            "load_1min": round(os.getloadavg()[0], 2)}
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        row = {**row, **meta}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    eager: dict[int, float] = {}
    for mode in args.modes.split(","):
        pkg = args.work / f"pkg-{mode.replace(':', '-')}"
        emit(export(args.model, mode, args.ranks, args.seq_len, export_runtimes, pkg))
        for r in [int(x) for x in args.ranks.split(",")]:
            for rt in (["torch"] if "torch" in runtimes else []) + [x for x in runtimes if x != "torch"]:
                row = {"kind": "step", "model": args.model, "quantize": mode, "rank": r, "runtime": rt,
                       **measure(pkg, r, rt)}
                if rt == "torch" and mode == "none" and "step_ms" in row:
                    eager[r] = row["step_ms"]
                if r in eager and "step_ms" in row:
                    row["step_ratio_vs_eager_fp32"] = round(row["step_ms"] / eager[r], 2)
                if args.steps > 0:
                    row.update(local_training(pkg, r, rt, data, args.steps))
                emit(row)


if __name__ == "__main__":
    main()
