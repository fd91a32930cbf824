"""The manifest's device-memory figure of a training step against measured training peaks, on one package.

    .venv/bin/python bench/device_memory.py PKG [--rank 8] [--steps 3] [--runtime executorch|onnx]
        [--backends native,executorch] [--json docs/bench/device-memory.jsonl]

The prediction is read from the package's own ``training.pte`` and ``foundation.ptd``
(:func:`lorafleet.export.compiler.executorch.memory.program_memory`, the terms the manifest records since
2026-12-07; recomputed here, so packages exported before then can be compared too), next to the manifest's
formula estimate. Measured, each in a fresh process (:func:`lorafleet.edge_client.profiler.measure_rank`, 1
warm-up step + ``--steps``): ``native`` — the C++ trainer's whole process (VmHWM; no interpreter), and its
anonymous and file-backed resident memory once the program is loaded (``lorafleet-native info``);
``executorch`` — the Python ExecuTorch backend's peak above its RSS after importing the runtime (what the
profiler calls device memory). One JSON row per run.

``--runtime onnx`` (backends default ``onnxruntime``): the figure is ONNX Runtime's, measured again as export
measures it (:func:`lorafleet.export.compiler.onnx.memory.program_memory`: a fresh process opening the rank's
session and training 3 steps), against the profiler's measurement through the onnxruntime backend.

    .venv/bin/python bench/device_memory.py PKG [--rank 8] --delegates

prints, measuring nothing, how the program's XNNPACK delegates make up the ``workspace`` term: how many there are,
the largest delegate's workspace and how many delegates share that size, the sum over all of them (what one
workspace per delegate would hold, against the one shared workspace the runtime allocates), and the largest
delegate's nodes and internal tensors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(pkg: Path, rank: int, steps: int, backends: list[str], runtime: str = "executorch") -> dict[str, object]:
    from lorafleet.edge_client.profiler import measure_rank
    from lorafleet.export.formats.package import open_package

    package = open_package(pkg, verify=False)
    m = package.manifest
    if runtime == "onnx":
        from lorafleet.export.compiler.onnx.memory import program_memory as onnx_memory

        predicted = onnx_memory(package.path_of(rank, "onnx_training"), (m.batch_size, m.seq_len))
    else:
        from lorafleet.export.compiler.executorch.memory import program_memory

        predicted = program_memory(package.path_of(rank, "executorch_training"), package.foundation("executorch"))
    load_before = os.getloadavg()[0]
    row: dict[str, object] = {
        "package": pkg.name, "runtime": runtime, "model": m.model.spec, "quantize": m.quantize, "rank": rank,
        "batch_size": m.batch_size, "seq_len": m.seq_len,
        "predicted": predicted, "predicted_bytes": sum(predicted.values()),
        "formula_bytes": m.rank(rank).estimates.training_peak_memory_bytes, "measured": {},
    }
    measured: dict[str, object] = {}
    for backend in backends:
        r = measure_rank(pkg, rank, backend, steps=steps, timeout=3600)
        measured[backend] = {"device_memory_bytes": r.device_memory_bytes, "step_seconds": r.step_seconds}
    if "native" in backends:
        from lorafleet.edge_client.backends.native_backend import native_binary

        info = json.loads(subprocess.run([str(native_binary()), "info", "--package", str(pkg), "--rank", str(rank)],
                                         capture_output=True, text=True, check=True).stdout)
        measured["native_loaded"] = {"rss_anon_bytes": info["rss_anon_bytes"], "rss_file_bytes": info["rss_file_bytes"],
                                     "planned_bytes": info["planned_bytes"]}
    row["measured"] = measured
    row.update(date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), host=platform.machine(),
               cpus=os.cpu_count(), load_1min_before=round(load_before, 2),
               load_1min_after=round(os.getloadavg()[0], 2))
    return row


def delegates(pkg: Path, rank: int) -> dict[str, object]:
    """The XNNPACK delegates of ``rank``'s training program, as the ``workspace`` term sees them."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from lorafleet.export.compiler.executorch.memory import workspace_bytes as workspace_of
    from lorafleet.export.compiler.executorch.memory import xnnpack_graphs
    from lorafleet.export.formats.package import open_package

    program = deserialize_pte_binary(open_package(pkg, verify=False).path_of(rank, "executorch_training")
                                     .read_bytes()).program
    graphs = xnnpack_graphs([bytes(program.backend_delegate_data[d.processed.index].data)
                             for plan in program.execution_plan for d in plan.delegates or ()
                             if d.id == "XnnpackBackend"])
    sizes = [workspace_of(g) for g in graphs]
    largest = max(sizes, default=0)
    top = graphs[sizes.index(largest)] if graphs else {}
    internal = [v["xvalue_union"].get("tensor_value", v["xvalue_union"]) for v in top.get("xvalues") or ()]
    return {"package": pkg.name, "rank": rank, "delegates": len(graphs), "largest_workspace_bytes": largest,
            "delegates_of_largest_size": sizes.count(largest), "sum_of_workspaces_bytes": sum(sizes),
            "largest_nodes": [n["xnode_union_type"] for n in top.get("xnodes") or ()],
            "largest_internal_tensors": [t.get("dims") for t in internal if t.get("external_id") == 0xFFFFFFFF
                                         and not t.get("constant_buffer_idx")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--runtime", choices=("executorch", "onnx"), default="executorch")
    ap.add_argument("--backends", help="default: native,executorch (onnxruntime for --runtime onnx)")
    ap.add_argument("--json", type=Path, help="append the row to this JSONL file")
    ap.add_argument("--delegates", action="store_true", help="describe the XNNPACK delegates; measure nothing")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if a.delegates:
        print(json.dumps(delegates(a.package, a.rank)))
        return
    backends = a.backends or ("onnxruntime" if a.runtime == "onnx" else "native,executorch")
    row = run(a.package, a.rank, a.steps, [b for b in backends.split(",") if b], a.runtime)
    mb = 1e6
    terms = json.dumps({k: round(v / mb, 1) for k, v in row["predicted"].items()})
    print(f"{row['model']} {row['quantize']} r{a.rank} {row['batch_size']}x{row['seq_len']}: predicted "
          f"{row['predicted_bytes'] / mb:.0f} MB {terms}, formula {row['formula_bytes'] / mb:.0f} MB")
    for name, figures in row["measured"].items():
        if "device_memory_bytes" in figures:
            got = figures["device_memory_bytes"]
            print(f"  {name}: measured {got / mb:.0f} MB; predicted / measured {row['predicted_bytes'] / got:.3f}, "
                  f"formula / measured {row['formula_bytes'] / got:.3f}")
        else:
            print(f"  {name}: {json.dumps(figures)}")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
