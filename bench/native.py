"""The native trainer against the Python ExecuTorch backend on one package: per-step losses, step time and
the process's peak memory.

    .venv/bin/python bench/native.py PKG [--rank 8] [--steps 20] [--json docs/bench/native.jsonl]

Both train the same `lorafleet batches` (the built-in tasks, 32 examples per family, seed 0) from the package's
initial adapter with the same AdamW (lr 1e-3), each in a fresh process, one after the other:

* native: `build/native/lorafleet-native train` — its per-step loss and time, and its peak RSS (getrusage);
  the peak is compared with what the device must hold: the foundation file it maps, the program's planned
  memory, and the rest (the runtime's own overhead, LoRA factors, gradients and the AdamW moments);
* python: `lorafleet.edge_client.backends.executorch_backend` in `python -c` — the same figures, and its peak
  above the process's RSS after importing the runtime (the profiler's "device memory").

The row holds both, the largest per-step loss difference, and the ratios native / python; the native
process's anonymous and file-backed resident memory once the program is loaded (`lorafleet-native info`);
and, after one step of both backends from the same batch, how many LoRA-B elements differ and by how much.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PYTHON_SIDE = r"""
import json, sys, time
from lorafleet.export.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
import executorch.extension.training, executorch.runtime  # the runtime's libraries before the baseline
from lorafleet.edge_client.backends import OptimizerConfig, make_backend
from lorafleet.edge_client.data import Batch
from lorafleet.export.formats.package import open_package
import numpy as np, struct
pkg_path, rank, path, lr = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
raw = open(path, "rb").read()
_, B, T, n = struct.unpack("<IIIQ", raw[4:24])
arr = np.frombuffer(raw[24:], dtype="<i8").reshape(n, 2, B, T)
baseline = current_rss_bytes()
reset_peak_rss()
be = make_backend("executorch", open_package(pkg_path, verify=False), rank, OptimizerConfig(lr=lr))
rows = []
for i in range(n):
    start = time.perf_counter()
    loss = be.step(Batch(arr[i, 0].copy(), arr[i, 1].copy()))
    rows.append({"step": i + 1, "loss": loss, "seconds": time.perf_counter() - start})
print(json.dumps({"steps": rows, "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline}))
"""


def run(pkg: Path, rank: int, steps: int) -> dict[str, object]:
    from lorafleet.edge_client.backends.native_backend import native_binary, write_batches
    from lorafleet.edge_client.data import batches, encode_all
    from lorafleet.edge_client.tokenizer import load_tokenizer
    from lorafleet.export.formats.package import open_package
    from lorafleet.tasks import families, generate

    m = open_package(pkg, verify=False).manifest
    examples = [ex for name in families("seen") for ex in generate(name, 32, seed=0, stream="train")]
    encoded = encode_all(load_tokenizer(m.model.spec), examples, m.seq_len)
    lr = 1e-3
    with tempfile.TemporaryDirectory(prefix="bench-native-") as tmp:
        data = Path(tmp) / "batches.bin"
        write_batches(data, batches(encoded, m.batch_size, steps, seed=0))
        proc = subprocess.run([str(native_binary()), "train", "--package", str(pkg), "--rank", str(rank),
                               "--batches", str(data), "--lr", repr(lr), "--out", str(Path(tmp) / "out")],
                              capture_output=True, text=True, check=True)
        lines = [json.loads(x) for x in proc.stdout.splitlines()]
        native_steps, summary = [x for x in lines if "step" in x], lines[-1]
        py = subprocess.run([sys.executable, "-c", PYTHON_SIDE, str(pkg), str(rank), str(data), repr(lr)],
                            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        python = json.loads(py.stdout.splitlines()[-1])
        info = json.loads(subprocess.run([str(native_binary()), "info", "--package", str(pkg), "--rank", str(rank)],
                                         capture_output=True, text=True, check=True).stdout)
        one_step = _one_step(pkg, rank, data, lr)
    n_loss = [x["loss"] for x in native_steps]
    p_loss = [x["loss"] for x in python["steps"]]
    # the first step of each includes one-time work (first touch of the mapped foundation): medians skip it
    n_sec = statistics.median(x["seconds"] for x in native_steps[1:])
    p_sec = statistics.median(x["seconds"] for x in python["steps"][1:])
    peak, planned, mapped = summary["peak_rss_bytes"], summary["planned_bytes"], summary["foundation_bytes"]
    return {
        "bench": "native", "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} CPUs", "model": m.model.spec, "rank": rank, "batch": [m.batch_size, m.seq_len],
        "steps": steps, "max_loss_abs_diff": max(abs(a - b) for a, b in zip(n_loss, p_loss, strict=True)),
        "loss_abs_diff_by_step": [abs(a - b) for a, b in zip(n_loss, p_loss, strict=True)],
        "loss_first_last": [n_loss[0], n_loss[-1]],
        "native": {"step_seconds": n_sec, "peak_rss_bytes": peak, "foundation_bytes": mapped,
                   "planned_bytes": planned, "overhead_bytes": peak - mapped - planned,
                   "loaded_rss_anon_bytes": info["rss_anon_bytes"], "loaded_rss_file_bytes": info["rss_file_bytes"]},
        "after_one_step": one_step,
        "python": {"step_seconds": p_sec, "peak_rss_bytes": python["peak_rss_bytes"],
                   "above_baseline_bytes": python["peak_rss_bytes"] - python["baseline_rss_bytes"]},
        "ratio_step_native_over_python": n_sec / p_sec,
        "ratio_peak_native_over_python": peak / python["peak_rss_bytes"],
    }


def _one_step(pkg: Path, rank: int, data: Path, lr: float) -> dict[str, object]:
    """One step of each backend from the package's initial adapter on the first batch: the LoRA factors that
    differ afterwards (the first step's gradients, through the same AdamW)."""
    import numpy as np

    from lorafleet.edge_client.backends import OptimizerConfig, make_backend
    from lorafleet.edge_client.data import Batch
    from lorafleet.export.formats.package import open_package

    raw = data.read_bytes()
    b, t = int.from_bytes(raw[8:12], "little"), int.from_bytes(raw[12:16], "little")
    ids = np.frombuffer(raw[24:24 + 8 * b * t], dtype="<i8").reshape(b, t).copy()
    labels = np.frombuffer(raw[24 + 8 * b * t:24 + 16 * b * t], dtype="<i8").reshape(b, t).copy()
    package = open_package(pkg, verify=False)
    after = {}
    for name in ("executorch", "native"):
        be = make_backend(name, package, rank, OptimizerConfig(lr=lr))
        be.step(Batch(ids, labels))
        after[name] = be.adapter_state()
    differing, largest = 0, 0.0
    for module, p in after["executorch"].modules.items():
        d = (p.lora_B - after["native"].modules[module].lora_B).abs()
        differing += int((d > 0).sum())
        largest = max(largest, float(d.max()))
    total = sum(p.lora_B.numel() for p in after["executorch"].modules.values())
    return {"lora_b_elements": total, "lora_b_differing": differing, "lora_b_max_abs_diff": largest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path, help="append the row to this JSONL file")
    args = ap.parse_args()
    row = run(args.package, args.rank, args.steps)
    print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
