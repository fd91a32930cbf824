"""Benchmark the export pipeline and on-device training steps.

    .venv/bin/python bench/export.py export --model smollm2-135m --ranks 4,8,16,32 --out /tmp/pkg
    .venv/bin/python bench/export.py steps --package /tmp/pkg --steps 10
    .venv/bin/python bench/export.py export --model random:llama-3.2-1b --ranks 8 --out /tmp/pkg1b \
        --limit-gb 16

``export`` runs ``lorafleet export`` in a child process and reports wall time, peak memory (PSS summed over
the child's whole process tree, sampled every 0.2 s, and the tree's RSS, which counts pages a forked lowering
process shares with its parent twice; the export is killed if its PSS passes ``--limit-gb``, and the last
stage it logged is reported as the point of failure) and the package size split into shared foundations and per-rank
files. ``steps`` times one training step (forward, backward, AdamW) per rank and runtime — eager PyTorch +
PEFT (the reference), ONNX Runtime training, the ExecuTorch training program + host AdamW — on the package's
batch shape: 2 warm-up steps, then the median of ``--steps``. Results are printed and appended as JSON lines
to ``--json`` (default ``docs/bench/export.jsonl``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _tree_memory(proc: Any) -> tuple[int, int]:
    """(PSS, RSS) summed over the process tree. The export lowers each ExecuTorch program in a forked child
    that shares the parent's pages copy-on-write: RSS counts those twice, PSS (proportional set size) once."""
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(Exception):  # a child that just exited
            info = p.memory_full_info()  # /proc/PID/smaps_rollup
            pss, rss = pss + info.pss, rss + info.rss
    return pss, rss


def bench_export(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    cmd = [sys.executable, "-m", "lorafleet", "export", args.model, "--ranks", args.ranks,
           "--target-modules", args.target_modules, "--seq-len", str(args.seq_len), "--batch-size",
           str(args.batch_size), "--runtimes", args.runtimes, "--quantize", args.quantize, "--out", args.out,
           "--force"]
    log_path = Path(args.out).with_suffix(".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": "."})
        proc, peak, peak_rss, killed = psutil.Process(child.pid), 0, 0, False
        trace = open(args.trace, "w") if args.trace else None  # noqa: SIM115 - closed below
        while child.poll() is None:
            pss, rss = _tree_memory(proc)
            peak, peak_rss = max(peak, pss), max(peak_rss, rss)
            if trace is not None:  # seconds since start, tree PSS: lines up with the log's "(at N s)" stages
                trace.write(f"{time.perf_counter() - t0:.1f} {pss / 2**20:.0f}\n")
            if peak > args.limit_gb * 2**30:
                child.kill()
                killed = True
                break
            time.sleep(0.2)
        child.wait()
        if trace is not None:
            trace.close()
    wall = time.perf_counter() - t0
    lines = log_path.read_text().splitlines()
    stages = [ln for ln in lines if ln.startswith("[export]")]
    result: dict[str, Any] = {
        "kind": "export", "model": args.model, "ranks": args.ranks, "runtimes": args.runtimes,
        "quantize": args.quantize, "seq_len": args.seq_len, "batch_size": args.batch_size, "wall_s": round(wall, 1),
        "peak_pss_gb": round(peak / 2**30, 2), "peak_tree_rss_gb": round(peak_rss / 2**30, 2),
        "returncode": child.returncode, "killed_over_limit_gb": killed,
        "last_stage": stages[-1] if stages else None,
        "error": next((ln for ln in reversed(lines) if ln.startswith("lorafleet: error")), None),
        "stage_seconds": next((ln for ln in lines if ln.startswith("stage seconds")), None),
    }
    if child.returncode == 0:
        result.update(_sizes(args.out))
    result["predicted"] = _plan(args)
    return result


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """What ``lorafleet export --dry-run`` predicted for the same command (to compare with what it took)."""
    from lorafleet.export.compiler.pipeline import ExportConfig
    from lorafleet.export.compiler.plan import plan_export

    cfg = ExportConfig(model=args.model, ranks=tuple(int(r) for r in args.ranks.split(",")),
                       target_modules=tuple(args.target_modules.split(",")), out=Path(args.out), seq_len=args.seq_len,
                       batch_size=args.batch_size, runtimes=tuple(args.runtimes.split(",")), quantize=args.quantize,
                       force=True)
    plan = plan_export(cfg)
    return {"wall_s": round(plan.total_seconds, 1), "peak_gb": round(plan.peak_memory_bytes / 2**30, 2),
            "package_mb": round(plan.package_bytes / 1e6, 1),
            "foundation_mb": {k: round(v / 1e6, 1) for k, v in plan.foundation_bytes.items()}}


def _sizes(path: str) -> dict[str, Any]:
    from lorafleet.export.formats.package import open_package

    m = open_package(path, verify=False).manifest
    return {
        "foundation_mb": {k: round(v.size / 1e6, 1) for k, v in m.shared_files.items()},
        "package_mb": round((sum(v.size for v in m.shared_files.values())
                             + sum(m.rank(r).size_bytes for r in m.ranks)) / 1e6, 1),
        "per_rank_mb": {r: round(m.rank(r).size_bytes / 1e6, 2) for r in m.ranks},
        "per_rank_runtime_mb": {r: {rt: round(sum(e.size for f, e in m.rank(r).files.items()
                                                  if f.startswith(rt + "/")) / 1e6, 2)
                                    for rt in ("executorch", "onnx", "adapters")} for r in m.ranks},
        "verification_worst": _worst(m.verification["checks"]),
    }


def _worst(checks: list[dict[str, Any]], by_artifact: bool = False) -> dict[str, float]:
    """The largest value of each verification metric (``artifact:metric`` with ``by_artifact``)."""
    worst: dict[str, float] = {}
    for c in checks:
        key = f"{c['artifact']}:{c['metric']}" if by_artifact else c["metric"]
        worst[key] = max(worst.get(key, 0.0), float(c["value"]))
    return worst


# --- training steps -------------------------------------------------------------------------------------

def _median_step(step: Any, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from lorafleet.export.compiler.loss import CausalLMLoss, example_batch
    from lorafleet.export.compiler.models import load_model
    from lorafleet.export.formats.package import open_package

    pkg = open_package(args.package)
    m = pkg.manifest
    ids, labels = example_batch(m.model.vocab_size, m.batch_size, m.seq_len, seed=1)
    base = load_model(m.model.spec, attn_implementation="eager", with_tokenizer=False).model
    out = []
    for r in m.ranks:
        row: dict[str, Any] = {"kind": "steps", "model": m.model.spec, "rank": r, "batch": [m.batch_size, m.seq_len],
                               "threads": torch.get_num_threads()}
        base, row["eager_ms"] = _eager_ms(base, pkg, r, ids, labels, args.steps, CausalLMLoss)
        if "onnx" in m.runtimes:
            row["onnx_ms"] = _onnx_ms(pkg, r, ids, labels, args.steps)
        if "executorch" in m.runtimes:
            row["executorch_ms"] = _executorch_ms(pkg, r, ids, labels, args.steps)
        for rt in ("onnx", "executorch"):
            if f"{rt}_ms" in row:
                row[f"{rt}_speedup_vs_eager"] = round(row["eager_ms"] / row[f"{rt}_ms"], 2)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def _eager_ms(base: Any, pkg: Any, r: int, ids: Any, labels: Any, steps: int, loss_cls: Any) -> tuple[Any, float]:
    import torch

    from lorafleet.export.compiler.lora import attach_lora, detach_lora
    from lorafleet.export.formats.program import LoraSpec

    m = pkg.manifest
    model = attach_lora(base, LoraSpec(r, tuple(m.target_modules), m.lora_alpha), pkg.initial_adapter(r))
    model.train()
    loss_fn = loss_cls(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(ids, labels).backward()
        opt.step()

    ms = _median_step(step, steps)
    return detach_lora(model), round(ms, 1)


def _onnx_ms(pkg: Any, r: int, ids: Any, labels: Any, steps: int) -> float:
    from lorafleet.export.runtime.onnx import OnnxTrainer

    trainer = OnnxTrainer.from_package(pkg, r)
    return round(_median_step(lambda: trainer.step(ids, labels), steps), 1)


def _executorch_ms(pkg: Any, r: int, ids: Any, labels: Any, steps: int) -> float:
    from lorafleet.edge_client.backends.base import OptimizerConfig
    from lorafleet.edge_client.backends.executorch_backend import ExecutorchBackend
    from lorafleet.edge_client.data import Batch

    backend = ExecutorchBackend.from_package(pkg, r, OptimizerConfig(lr=1e-4))  # the path devices run
    b = Batch(ids.numpy(), labels.numpy())
    return round(_median_step(lambda: backend.step(b), steps), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--ranks", default="4,8,16,32")
    e.add_argument("--target-modules", default="q_proj,v_proj")
    e.add_argument("--seq-len", type=int, default=32)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--runtimes", default="executorch,onnx")
    e.add_argument("--quantize", default="none", help="none | int8 | int4[:G], as lorafleet export takes it")
    e.add_argument("--out", required=True)
    e.add_argument("--limit-gb", type=float, default=16.0)
    e.add_argument("--trace", help="write the tree's PSS (MiB) every 0.2 s to this file, with seconds since start")
    s = sub.add_parser("steps")
    s.add_argument("--package", required=True)
    s.add_argument("--steps", type=int, default=10)
    for p in (e, s):
        p.add_argument("--json", default="docs/bench/export.jsonl")
    args = ap.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count()}
    rows = [bench_export(args)] if args.cmd == "export" else bench_steps(args)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        for row in rows:
            f.write(json.dumps({**meta, **row}) + "\n")
    if args.cmd == "export":
        print(json.dumps({**meta, **rows[0]}, indent=2))


if __name__ == "__main__":
    main()
