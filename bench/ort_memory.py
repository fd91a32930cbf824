"""ONNX Runtime session options against the device memory of a quantized package's training step.

    .venv/bin/python bench/ort_memory.py PKG RANK VARIANT [--json docs/bench/ort-memory.jsonl]

VARIANT: ``base`` (lorafleet's session options: constant folding and the QDQ transformers off), ``arena``
(also the CPU memory arena off), ``PRIORITY_BASED`` / ``MEMORY_EFFICIENT`` (also that execution order), ``cse``
(common-subexpression elimination off as well), ``none`` (every graph optimization off), ``exact`` (the CPU
arena and the memory pattern off: every tensor is its own allocation; run with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that each large one is its own mapping, freed at once, and the peak counts live allocations). The step is measured as
``bench/quantize.py``'s ``step_child`` measures it (one process per variant: run each in a fresh one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def options(variant: str, lorafleet_options: Any) -> Any:
    import onnxruntime as ort

    o = lorafleet_options()  # lorafleet's options, then the variant's
    if variant == "none":
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return o
    if variant == "cse":
        o.add_session_config_entry("optimization.disable_specified_optimizers",
                                   "ConstantFolding,CommonSubexpressionElimination")
    if variant in ("PRIORITY_BASED", "MEMORY_EFFICIENT"):
        o.execution_order = getattr(ort.ExecutionOrder, variant)
    elif variant == "arena":
        o.enable_cpu_mem_arena = False
    elif variant == "exact":
        o.enable_cpu_mem_arena = False
        o.enable_mem_pattern = False
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("rank", type=int)
    ap.add_argument("variant", choices=("base", "arena", "exact", "PRIORITY_BASED", "MEMORY_EFFICIENT", "cse", "none"))
    ap.add_argument("--json", default="docs/bench/ort-memory.jsonl")
    args = ap.parse_args()
    import quantize  # bench/quantize.py

    import lorafleet.export.runtime.onnx as runtime

    own = runtime.session_options
    runtime.session_options = lambda: options(args.variant, own)  # what every OnnxTrainer session is built with
    row = {"date": time.strftime("%Y-%m-%d %H:%M"), "package": Path(args.package).name, "rank": args.rank,
           "variant": args.variant, **quantize.step_child(args.package, args.rank, "onnx")}
    with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
