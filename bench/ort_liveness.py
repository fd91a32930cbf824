"""A reading of ONNX Runtime's memory plan from what ran, against which export measures instead.

    .venv/bin/python bench/ort_liveness.py PKG RANK [--json docs/bench/ort-liveness.jsonl]

Opens the rank's training session with ORT's profiler on and the optimized graph saved, runs one forward/backward
on zero ids of the compiled shape, and computes the largest total of intermediate tensors alive at once in ORT's
execution order: each kernel output (size from the profiler's ``output_type_shape``) lives from the kernel that
writes it to the last kernel that reads it or a view of it (``Reshape``-like kernels and gradient accumulation
alias their first input); initializers and graph inputs own no buffer. Prints that peak beside the other terms a
device holds (the foundation segments the graph reads, the LoRA tensors ×4, the graph files), for comparison with
``bench/ort_memory.py PKG RANK exact`` (what ORT allocates, counted exactly) and ``base`` (lorafleet's options).
It undercounts what ORT holds about twofold, which is why ``lorafleet.export.compiler.onnx.memory`` measures.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ALIASING = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "InPlaceAccumulatorV2"})
_BYTES = {"float": 4, "double": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
          "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1}


def profile_step(art: Path, shape: tuple[int, int], work: Path) -> tuple[Path, Path]:
    import numpy as np
    from onnxruntime.training.api import CheckpointState, Module

    from lorafleet.export.runtime.onnx import quiet_onnxruntime, session_options

    quiet_onnxruntime()
    opts = session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / "profile")
    opts.optimized_model_filepath = str(work / "optimized.onnx")
    (work / "optimized.data").symlink_to(os.devnull)  # the saved graph's weights: nothing reads them
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    module = Module(str(art / "training_model.onnx"), CheckpointState.load_checkpoint(str(art / "checkpoint")),
                    None, session_options=opts)
    ids = np.zeros(shape, dtype=np.int64)
    module.train()
    module(ids, ids.copy())
    del module  # the profile is written when the session closes
    return work / "optimized.onnx", sorted(work.glob("profile*.json"))[-1]


def kernel_runs(profile: Path) -> list[tuple[str, list[int]]]:
    runs = []
    for e in json.loads(profile.read_text()):
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            sizes = [_BYTES[dt] * math.prod(dims) for s in e.get("args", {}).get("output_type_shape", [])
                     for dt, dims in s.items()]
            runs.append((name[: -len("_kernel_time")], sizes))
    return runs


def peak_live_bytes(nodes: dict[str, Any], held: set[str], outputs: list[str],
                    runs: list[tuple[str, list[int]]]) -> int:
    alias: dict[str, str] = {}

    def root(v: str) -> str:
        while v in alias:
            v = alias[v]
        return v

    born: dict[str, tuple[int, int]] = {}
    last: dict[str, int] = {}
    transient: dict[int, int] = {}
    for step, (name, sizes) in enumerate(runs):
        node = nodes.get(name)
        if node is None:  # a cast ORT inserted at run time
            transient[step] = sum(sizes)
            continue
        for v in node.input:
            if v:
                last[root(v)] = step
        for j, v in enumerate(node.output):
            if not v:
                continue
            if j == 0 and node.op_type in _ALIASING and node.input and node.input[0]:
                alias[v] = node.input[0]
                last[root(v)] = step
            else:
                born[v] = (step, sizes[j] if j < len(sizes) else 0)
                last[v] = step
    for v in outputs:
        last[root(v)] = len(runs)
    delta = [0] * (len(runs) + 2)
    for v, (step, size) in born.items():
        if v not in held:
            delta[step] += size
            delta[last[v] + 1] -= size
    live = peak = 0
    for step in range(len(runs)):
        live += delta[step]
        peak = max(peak, live + transient.get(step, 0))
    return peak


def main() -> None:
    import onnx
    from onnxruntime.training.api import CheckpointState

    from lorafleet.export.formats.package import open_package

    pkg = open_package(sys.argv[1], verify=False)
    rank = int(sys.argv[2])
    m = pkg.manifest
    art = pkg.path_of(rank, "onnx_training")
    with tempfile.TemporaryDirectory() as tmp:
        graph_path, profile = profile_step(art, (m.batch_size, m.seq_len), Path(tmp))
        graph = onnx.load(str(graph_path), load_external_data=False).graph
        runs = kernel_runs(profile)
    held = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    planned = peak_live_bytes({n.name: n for n in graph.node}, held, [o.name for o in graph.output], runs)
    training = onnx.load(str(art / "training_model.onnx"), load_external_data=False).graph
    segments = {}
    for t in training.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            segments[(info.get("location"), int(info.get("offset", 0)))] = int(info.get("length", 0))
    state = CheckpointState.load_checkpoint(str(art / "checkpoint"))
    row = {"package": pkg.path.name, "rank": rank, "kernels": len(runs), "live_peak_bytes": planned,
           "foundation_bytes": sum(segments.values()),
           "trainable_x4_bytes": sum(4 * p.data.nbytes for _, p in state.parameters if p.requires_grad),
           "graph_bytes": sum((art / f).stat().st_size for f in ("training_model.onnx", "optimizer_model.onnx"))}
    row["sum_bytes"] = sum(v for k, v in row.items() if k.endswith("_bytes"))
    row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(row))
    if len(sys.argv) > 4 and sys.argv[3] == "--json":
        with open(sys.argv[4], "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
