"""How the ExecuTorch lowering scales, what it holds in memory, and what a training step spends its time on.

    .venv/bin/python bench/executorch_lowering.py scale --layers 4,8 \
        [--json docs/bench/executorch-lowering.jsonl]
    .venv/bin/python bench/executorch_lowering.py memory --layers 2
    py-spy record --native -r 200 -f raw -o prof.txt -- \
        .venv/bin/python bench/executorch_lowering.py steps --package PKG --rank 8 --steps 25
    .venv/bin/python bench/executorch_lowering.py profile-summary prof.txt
    .venv/bin/python bench/executorch_lowering.py pte-sizes --package PKG --rank 8
    .venv/bin/python bench/executorch_lowering.py stages --layers 4 --ranks 4,16

``scale`` lowers random SmolLM2-135M-shaped models (the real layer shapes, fewer layers; LoRA rank 8 on q,v;
batch 1 × 32) and times the training program with the contiguous partitioner (the pipeline's) and with torch's
``CapabilityBasedPartitioner``, and the inference program with the contiguous partitioner and with XNNPACK's
default partitioner (the previous lowering). ``memory`` lowers a Llama-3.2-1B-shaped training program with and
without ``weights_shared_across_partitions`` and reports the peak RSS above the start inside ``to_backend``
(sampled every 50 ms), each variant in a forked child. ``steps`` runs training steps of a package's program,
to be profiled; ``profile-summary`` condenses the profile to each kernel's share of the samples in the
program's execution; ``pte-sizes`` splits a rank's ``.pte`` files into their parts; ``stages`` times each stage of
both programs' lowering (``torch.export``, the joint graph, ``to_edge``, partitioning and XNNPACK's
``preprocess``, ``to_executorch``, serialization) at each of ``--ranks``, to show what a lowering shared across
ranks could save. Rows are printed
and appended as JSON lines to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _peft_model(arch: str, layers: int, rank: int = 8) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafleet.export.compiler.architectures import ARCHITECTURES

    a = ARCHITECTURES[arch]
    config = AutoConfig.for_model(a.model_type, **{**a.hf_config_dict(), "num_hidden_layers": layers})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                           lora_dropout=0.0))


@contextlib.contextmanager
def _partitioner(kind: str, which: str) -> Iterator[None]:
    """Swap the lowering's partitioner: ``which`` is "contiguous" (the pipeline's), "capability" (training:
    torch's CapabilityBasedPartitioner) or "xnnpack-default" (inference: XNNPACK's own partitioning)."""
    import lorafleet.export.compiler.executorch.lower as lower
    import lorafleet.export.compiler.executorch.partition as partition

    if which == "contiguous":
        yield
        return
    if kind == "training" and which == "capability":
        from executorch.exir.backend.canonical_partitioners.pattern_op_partitioner import (
            generate_partitions_from_list_of_nodes,
        )

        cls = partition.ContiguousXnnpackPartitioner
        original = cls.generate_partitions
        cls.generate_partitions = lambda self, ep: generate_partitions_from_list_of_nodes(  # type: ignore[method-assign]
            ep.graph_module, self.get_matched_nodes_from_configs(ep))
        try:
            yield
        finally:
            cls.generate_partitions = original  # type: ignore[method-assign]
        return
    if kind == "inference" and which == "xnnpack-default":
        saved = lower.ContiguousXnnpackPartitioner, lower.sort_graph_once
        lower.ContiguousXnnpackPartitioner = partition.FrozenWeightsXnnpackPartitioner  # type: ignore[assignment,misc]
        lower.sort_graph_once = contextlib.nullcontext  # type: ignore[assignment]
        try:
            yield
        finally:
            lower.ContiguousXnnpackPartitioner, lower.sort_graph_once = saved  # type: ignore[misc]
        return
    raise SystemExit(f"no partitioner {which!r} for {kind}")


def bench_scale(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lorafleet.export.compiler.executorch import lower_inference, lower_training

    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        model = _peft_model(args.arch, layers)
        for kind, which in (("training", "contiguous"), ("training", "capability"),
                            ("inference", "contiguous"), ("inference", "xnnpack-default")):
            t0 = time.perf_counter()
            with _partitioner(kind, which):
                program = lower_training(model, 1, 32) if kind == "training" else lower_inference(model, 32)
            rows.append({"kind": "scale", "arch": args.arch, "layers": layers, "program": kind,
                         "partitioner": which, "lower_s": round(time.perf_counter() - t0, 1),
                         "pte_bytes": len(program.pte), "loadavg": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# The lowering's stages, as (label, module attribute path): each is timed by wrapping it for one lowering.
_STAGES = (
    ("export", "lorafleet.export.compiler.executorch.training", "export"),
    ("joint_graph", "lorafleet.export.compiler.executorch.training", "_export_forward_backward"),
    ("to_edge", "lorafleet.export.compiler.executorch.training", "to_edge"),
    ("export", "lorafleet.export.compiler.executorch.lower", "export"),
    ("to_edge_and_lower", "lorafleet.export.compiler.executorch.lower", "to_edge_transform_and_lower"),
    ("to_backend", "executorch.exir.program._program", "EdgeProgramManager.to_backend"),
    ("xnnpack_preprocess", "executorch.backends.xnnpack.xnnpack_preprocess", "XnnpackBackend.preprocess"),
    ("to_executorch", "executorch.exir.program._program", "EdgeProgramManager.to_executorch"),
    ("serialize", "lorafleet.export.compiler.executorch.training", "serialize"),
    ("serialize", "lorafleet.export.compiler.executorch.lower", "serialize"),
)


@contextlib.contextmanager
def _timed_stages(times: dict[str, float]) -> Iterator[None]:
    """Wrap each of :data:`_STAGES` so its wall time adds to ``times[label]``; restore them on exit."""
    import importlib

    restore = []
    for label, module, attr in _STAGES:
        owner: Any = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        fn = raw.__func__ if isinstance(raw, staticmethod) else raw

        def timed(*a: Any, _fn: Any = fn, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                times[_label] = times.get(_label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, staticmethod(timed) if isinstance(raw, staticmethod) else timed)
        restore.append((owner, name, raw))
    try:
        yield
    finally:
        for owner, name, raw in reversed(restore):
            setattr(owner, name, raw)


def bench_stages(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each stage's seconds in the lowering of both programs, per rank (a fresh PEFT model of the same base)."""
    from lorafleet.export.compiler.executorch import lower_inference, lower_training

    rows = []
    for rank in (int(x) for x in args.ranks.split(",")):
        model = _peft_model(args.arch, int(args.layers), rank)
        for kind in ("training", "inference"):
            times: dict[str, float] = {}
            t0 = time.perf_counter()
            with _timed_stages(times):
                lower_training(model, 1, 32) if kind == "training" else lower_inference(model, 32)
            total = time.perf_counter() - t0
            rows.append({"kind": "stages", "arch": args.arch, "layers": int(args.layers), "rank": rank,
                         "program": kind, "lower_s": round(total, 1),
                         "stages_s": {k: round(v, 1) for k, v in times.items()},
                         "loadavg": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    import tempfile

    from lorafleet.export.compiler.forked import run_forked

    rows = []
    model = _peft_model("llama-3.2-1b", int(args.layers))
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    for shared in (False, True):  # each in a fresh forked child: the first lowering's leftovers do not count
        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            def measure(shared: bool = shared, path: str = out.name) -> None:
                Path(path).write_text(json.dumps(_memory_row(model, shared)))

            run_forked(measure, "memory")
            row = {"kind": "memory", "arch": "llama-3.2-1b", "layers": int(args.layers),
                   "weights_gib": round(weights / 2**30, 2), "weights_shared": shared, **json.loads(out.read())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _memory_row(model: Any, shared: bool) -> dict[str, float]:
    """Lower ``model``'s training program; the peak RSS above the start inside ``to_backend``."""
    import psutil
    from executorch.exir.program._program import EdgeProgramManager as manager

    import lorafleet.export.compiler.executorch.training as training

    proc = psutil.Process()
    peak, start, stop = [0], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    to_backend = manager.to_backend

    def measured(self: Any, *a: Any) -> Any:
        start[0] = peak[0] = proc.memory_info().rss
        return to_backend(self, *a)

    if not shared:
        training.weights_shared_across_partitions = contextlib.nullcontext  # type: ignore[assignment]
    manager.to_backend = measured
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    training.lower_training(model, 1, 32)
    stop.set()
    thread.join()
    return {"to_backend_peak_above_start_gib": round((peak[0] - start[0]) / 2**30, 2)}


def bench_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from lorafleet.export.compiler.executorch import load_training
    from lorafleet.export.formats.package import open_package

    pkg = open_package(args.package, verify=False)
    program = load_training(pkg.path_of(args.rank, "executorch_training"), pkg.foundation("executorch"))
    ids = torch.randint(0, pkg.manifest.model.vocab_size, program.input_shape,
                        generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        program.step(ids, ids)
        times.append(time.perf_counter() - t0)
    row = {"kind": "steps", "package": args.package, "rank": args.rank, "median_ms": round(
        1e3 * sorted(times)[len(times) // 2], 1)}
    print(json.dumps(row), flush=True)
    return [row]


def profile_summary(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Share of a py-spy ``--native -f raw`` profile's samples inside the program's execution, per kernel (a
    frame's inclusive share; only ExecuTorch kernel and XNNPACK frames are listed)."""
    from collections import Counter

    inclusive: Counter[str] = Counter()
    total = 0
    with open(args.raw) as f:
        lines = f.read().splitlines()
    for line in lines:
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not any("Method::execute" in f for f in frames):
            continue
        total += int(n)
        for name in {f.split(" (")[0] for f in frames}:
            inclusive[name] += int(n)
    keep = ("torch::executor::native::", "XnnpackBackend::execute")
    rows = [{"kind": "profile", "frame": k, "share": round(v / total, 3)}
            for k, v in inclusive.most_common() if any(s in k for s in keep) and v / total >= 0.01]
    for row in rows:
        print(json.dumps(row))
    return rows


def pte_sizes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Where a rank's ExecuTorch program bytes go: mutable buffers' initial values, delegate blobs, the rest."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from lorafleet.export.formats.package import open_package

    pkg = open_package(args.package, verify=False)
    rows = []
    for kind in ("executorch_inference", "executorch_training"):
        data = pkg.path_of(args.rank, kind).read_bytes()
        pte = deserialize_pte_binary(data)
        rows.append({"kind": "pte", "rank": args.rank, "program": kind, "bytes": len(data),
                     "mutable_data_entries": len(pte.mutable_data or []),
                     "mutable_data_bytes": sum(len(b.storage) for b in pte.mutable_data or []),
                     "delegate_bytes": sum(len(d.data) for d in pte.program.backend_delegate_data),
                     "methods": [plan.name for plan in pte.program.execution_plan]})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--arch", default="smollm2-135m")
    s.add_argument("--layers", default="4,8")
    m = sub.add_parser("memory")
    m.add_argument("--layers", default="2")
    t = sub.add_parser("steps")
    t.add_argument("--package", required=True)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--steps", type=int, default=25)
    r = sub.add_parser("profile-summary")
    r.add_argument("raw", help="py-spy record --native -f raw output")
    z = sub.add_parser("pte-sizes")
    z.add_argument("--package", required=True)
    z.add_argument("--rank", type=int, default=8)
    g = sub.add_parser("stages")
    g.add_argument("--arch", default="smollm2-135m")
    g.add_argument("--layers", default="4")
    g.add_argument("--ranks", default="4,16")
    for p in (s, m, t, r, z, g):
        p.add_argument("--json", default="")
    args = ap.parse_args()
    rows = {"scale": bench_scale, "memory": bench_memory, "steps": bench_steps, "profile-summary": profile_summary,
            "pte-sizes": pte_sizes, "stages": bench_stages}[args.cmd](args)
    if args.json:
        stamp = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpus": os.cpu_count()}
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({**stamp, **row}) + "\n")


if __name__ == "__main__":
    main()
