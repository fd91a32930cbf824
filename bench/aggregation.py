"""FlexLoRA aggregation: lorafleet's factored path against the dense reference, on SmolLM2-1.7B shapes.

    .venv/bin/python bench/aggregation.py --threads 1 [--clients 10,100] [--layers 24] [--dense-layers 2]

For each fleet size, client adapters (ranks drawn from {4, 8, 16, 32, 64}, lora_alpha from {8, 16, 32},
weights n_k from 50..500) are written as real PEFT directories (float32 safetensors, all 7 projections of
every layer), then each variant runs in its own process, reading the clients lazily module by module:

* ``dense``    — the published FlexLoRA code's method: every client's ΔW_k = s_k B_k A_k materialized
                 (out × in) and summed, then one full SVD per module, sliced to R = max r_k. Timed on the
                 first ``--dense-layers`` layers only (every layer has the same shapes, so the full-model
                 time is that × layers / dense-layers, stated as an extrapolation).
* ``factored`` — :func:`lorafleet.server.aggregation.aggregate_dirs` ("flexlora", ``solver="auto"``): QR of the stacked
                 factors + SVD of the Σr×Σr core while Σ r_k ≤ min(out, in); else the certified block Krylov
                 solver on the factored operator (exact Gram path as its fall-back). Timed on the same layers
                 and on all layers; its Krylov runs (blocks, products, residuals, fall-backs) are recorded.
* ``gram``     — the exact path beyond min(out, in) alone (``solver="gram"``: W formed once, float64
                 eigendecomposition of the smaller Gram matrix), on the dense layers, when Σ r_k > min(out, in).
* ``read``     — reading every client's tensors and nothing else (the I/O floor all variants include).

Errors: every variant's rank-R result against a float64 oracle (W in float64, full float64 SVD), on the
dense layers. Peak memory: the child process's peak RSS (``VmHWM``), and that minus its RSS after
imports. Time: wall seconds and the child's CPU seconds; with ``--threads 1`` CPU time is what the work
costs on one core even when other processes share the machine, so ratios are taken on it. Synthetic
clients share a decaying low-rank structure plus client noise, so the top-R subspace is well defined (as
for real fine-tuning updates); the dense and Gram timings do not depend on the values, the Krylov solver's
(how many blocks it needs) does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lorafleet.export.compiler.architectures import ARCHITECTURES, module_shapes  # noqa: E402
from lorafleet.export.formats.adapter import Adapter, LoraPair, peft_config, read_adapter, scaling_for, write_adapter  # noqa: E402
from lorafleet.server.aggregation import METHODS, aggregate_dirs, engine, lowrank  # noqa: E402
from lorafleet.server.aggregation.krylov import KrylovResult, KrylovSettings  # noqa: E402
from lorafleet.server.aggregation.streaming import LazyAdapter, open_clients  # noqa: E402

RANKS = (4, 8, 16, 32, 64)
ALPHAS = (8, 16, 32)
SHARED_RANK = 64  # rank of the structure the synthetic clients share
NOISE = 0.3


def module_names(layers: range) -> dict[str, tuple[int, int]]:
    shapes = module_shapes(ARCHITECTURES["smollm2-1.7b"])
    block = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {f"model.layers.{i}.{block[m]}.{m}": shape for i in layers for m, shape in shapes.items()}


# --- synthetic clients -------------------------------------------------------------------------------------

def generate(root: Path, n_clients: int, layers: int, seed: int) -> tuple[list[str], list[float]]:
    """Write ``n_clients`` PEFT adapter directories; returns their paths and weights n_k.

    Deterministic in (n_clients, layers, seed): if ``root`` already holds all of them (``--fleets``), they are
    reused after checking every client's rank and lora_alpha against the draw."""
    rng = np.random.default_rng(seed)
    ranks = rng.choice(RANKS, n_clients).tolist()
    alphas = rng.choice(ALPHAS, n_clients).tolist()
    weights = rng.integers(50, 501, n_clients).astype(float).tolist()
    existing = [root / f"client{k:03d}" for k in range(n_clients)]
    if all((d / "adapter_model.safetensors").is_file() for d in existing):
        configs = [json.loads((d / "adapter_config.json").read_text()) for d in existing]
        if [(c["r"], c["lora_alpha"]) for c in configs] != list(zip(ranks, alphas, strict=True)):
            raise SystemExit(f"{root} holds a different fleet; remove it")
        return [str(d) for d in existing], weights
    shutil.rmtree(root, ignore_errors=True)  # an interrupted earlier write
    shapes = module_names(range(layers))
    bases = _shared_bases(shapes, seed)
    decay = torch.tensor([1.0 / (1 + i) for i in range(SHARED_RANK)])
    g = torch.Generator().manual_seed(seed + 1)
    dirs = []
    for k, (r, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        mods = {}
        for name, (out, inp) in shapes.items():
            u, v = bases[name]  # (out, 64), (64, in)
            b = u[:, :r] * decay[:r] + NOISE * torch.randn(out, r, generator=g) / out ** 0.5
            a = v[:r] + NOISE * torch.randn(r, inp, generator=g) / inp ** 0.5
            mods[name] = LoraPair(a, b, scaling_for(r, alpha))
        cfg = peft_config(sorted({n.rsplit(".", 1)[1] for n in shapes}), r, alpha, base_model="smollm2-1.7b")
        dirs.append(str(write_adapter(Adapter(mods, cfg), root / f"client{k:03d}")))
    return dirs, weights


def _shared_bases(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.linalg.qr(torch.randn(out, SHARED_RANK, generator=g))[0],
                   torch.linalg.qr(torch.randn(inp, SHARED_RANK, generator=g))[0].T)
            for name, (out, inp) in shapes.items()}


# --- variants (each runs in a child process) ---------------------------------------------------------------

def factored(dirs: list[str], weights: list[float], layers: int | None, solver: str = "auto") -> Adapter:
    if layers is None:
        return aggregate_dirs("flexlora", dirs, weights, solver=solver)
    clients = open_clients(dirs)  # the same streamed path as aggregate_dirs, restricted to some layers
    keep = set(module_names(range(layers)))
    specs = [{n: s for n, s in c.specs.items() if n in keep} for c in clients]
    return engine.run(METHODS["flexlora"], specs, [str(c.path) for c in clients], [c.config for c in clients],
                      lambda name: [c.pair(name) for c in clients], weights, None, {"solver": solver})


def record_krylov() -> list[KrylovResult]:
    """Instrument the Krylov solver in this (child) process: every result it returns is appended here,
    without its factors (keeping those would add every module's to the variant's peak memory)."""
    runs: list[KrylovResult] = []
    solve = lowrank.top_singular

    def recorded(*args: Any, **kwargs: Any) -> KrylovResult:
        result = solve(*args, **kwargs)
        runs.append(dataclasses.replace(result, b=None, a=None))
        return result

    lowrank.top_singular = recorded  # type: ignore[assignment]
    return runs


def krylov_summary(runs: list[KrylovResult]) -> dict[str, Any] | None:
    if not runs:
        return None
    converged = [r for r in runs if r.converged]
    return {"modules": len(runs), "certified": len(converged), "fell_back_to_exact": len(runs) - len(converged),
            "blocks": sorted({r.blocks for r in runs}), "krylov_dimension": sorted({r.columns for r in runs}),
            "max_certified_residual": max((r.residual for r in converged), default=None),
            "tol": KrylovSettings().tol}


def dense(dirs: list[str], weights: list[float], layers: int) -> Adapter:
    """The reference: ΔW_k materialized per client, summed, full SVD, sliced to R = max r_k."""
    clients = open_clients(dirs)
    total = sum(weights)
    mods = {}
    for name in module_names(range(layers)):
        pairs = [c.pair(name) for c in clients]
        w = torch.zeros(pairs[0].shape)  # (out, in)
        for wk, p in zip(weights, pairs, strict=True):
            w += (wk / total) * (p.scaling * (p.lora_B @ p.lora_A))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = max(p.r for p in pairs)
        mods[name] = LoraPair(vh[:r].contiguous(), (u[:, :r] * s[:r]).contiguous(), 1.0)
    return Adapter(mods, {"r": max(p.r for p in mods.values()), "lora_alpha": 1.0})


def read_only(dirs: list[str], layers: int) -> None:
    clients = [LazyAdapter(d) for d in dirs]
    for name in module_names(range(layers)):
        for c in clients:
            c.pair(name)


def oracle_errors(dirs: list[str], weights: list[float], layers: int, outputs: dict[str, str]) -> dict[str, float]:
    """Max over modules of ‖ΔW_variant − T_R(W)‖_F / ‖T_R(W)‖_F, with T_R(W) from a float64 full SVD
    (numpy's LAPACK, a different implementation from both variants')."""
    clients = open_clients(dirs)
    results = {k: read_adapter(v) for k, v in outputs.items()}
    total = sum(weights)
    errors = dict.fromkeys(outputs, 0.0)
    for name in module_names(range(layers)):
        pairs = [c.pair(name) for c in clients]
        w = (torch.cat([(wk / total) * p.scaling * p.lora_B.double() for wk, p in zip(weights, pairs, strict=True)], 1)
             @ torch.cat([p.lora_A.double() for p in pairs], 0))  # Σ w_k s_k B_k A_k in float64, one GEMM
        u, s, vh = (torch.from_numpy(x) for x in np.linalg.svd(w.numpy(), full_matrices=False))  # LAPACK gesdd
        r = max(p.r for p in pairs)
        ref = (u[:, :r] * s[:r]) @ vh[:r]
        for key, res in results.items():
            p = res.modules[name]
            got = p.scaling * (p.lora_B.double() @ p.lora_A.double())
            errors[key] = max(errors[key], float((got - ref).norm() / ref.norm()))
    return errors


def _rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak) of this process: per address space, so not inherited through fork+exec
    the way ``ru_maxrss`` is."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    base_rss = _rss_kib("VmRSS")
    dirs, weights, layers = spec["dirs"], spec["weights"], spec.get("layers")
    t0, c0 = time.perf_counter(), time.process_time()
    if spec["variant"] == "oracle":
        return {"errors": oracle_errors(dirs, weights, layers, spec["outputs"])}
    runs = record_krylov()
    if spec["variant"] == "read":
        read_only(dirs, layers)
        result = None
    elif spec["variant"] == "dense":
        result = dense(dirs, weights, layers)
    else:
        result = factored(dirs, weights, layers, "gram" if spec["variant"] == "gram" else "auto")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_kib("VmHWM")
    if result is not None and spec.get("save"):
        write_adapter(result, spec["save"], overwrite=True)
    out = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "peak_rss_mib": round(peak / 1024),
           "peak_above_start_mib": round((peak - base_rss) / 1024),
           "load_average_1min": round(os.getloadavg()[0], 2)}
    if summary := krylov_summary(runs):
        out["krylov"] = summary
    return out


def run_child(spec: dict[str, Any], threads: int | None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if threads:  # before the child imports torch / numpy: MKL, OpenMP and OpenBLAS read these at start-up
        env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {spec['variant']} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {spec['variant']:>8} layers={spec.get('layers') or 'all'}: {result}", flush=True)
    return result


# --- orchestration -----------------------------------------------------------------------------------------

def bench_fleet(root: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    fleet = Path(args.fleets or root) / f"fleet{n}-layers{args.layers}-seed{args.seed + n}"
    dirs, weights = generate(fleet, n, args.layers, args.seed + n)
    ranks = [read_adapter_rank(d) for d in dirs]
    print(f"{n} clients: ranks sum {sum(ranks)}, written in {time.perf_counter() - t0:.0f} s", flush=True)
    common = {"dirs": dirs, "weights": weights}
    sub, th = args.dense_layers, args.threads
    beyond = sum(ranks) > 2048  # min(out, in) of every SmolLM2-1.7B projection
    dense_sub = run_child({**common, "variant": "dense", "layers": sub, "save": str(root / f"dense{n}")}, th)
    fact_sub = run_child({**common, "variant": "factored", "layers": sub, "save": str(root / f"fact{n}")}, th)
    outputs = {"dense": str(root / f"dense{n}"), "factored": str(root / f"fact{n}")}
    gram_sub = None
    if beyond:
        gram_sub = run_child({**common, "variant": "gram", "layers": sub, "save": str(root / f"gram{n}")}, th)
        outputs["gram"] = str(root / f"gram{n}")
    fact_all = run_child({**common, "variant": "factored", "layers": None}, th)
    read_all = run_child({**common, "variant": "read", "layers": args.layers}, th)
    errors = run_child({**common, "variant": "oracle", "layers": sub, "outputs": outputs}, th)
    dense_all = dense_sub["cpu_seconds"] * args.layers / sub
    dense_all_wall = dense_sub["seconds"] * args.layers / sub
    if not args.fleets:
        shutil.rmtree(fleet)
    return {
        "clients": n, "sum_ranks": sum(ranks), "min_out_in": 2048,
        "fleet_mib_on_disk": round(sum(Path(d, "adapter_model.safetensors").stat().st_size for d in dirs) / 2**20),
        "path": "krylov (certified), exact gram fall-back" if beyond else "factored (QR + core SVD)",
        "dense_subset": dense_sub, "factored_subset": fact_sub, "gram_subset": gram_sub,
        "factored_all_layers": fact_all, "read_all_layers": read_all, "errors_vs_float64": errors["errors"],
        "speedup_subset_cpu": round(dense_sub["cpu_seconds"] / fact_sub["cpu_seconds"], 1),
        "speedup_subset_wall": round(dense_sub["seconds"] / fact_sub["seconds"], 1),
        "speedup_gram_subset_cpu": round(dense_sub["cpu_seconds"] / gram_sub["cpu_seconds"], 1) if gram_sub else None,
        "dense_all_layers_extrapolated_cpu_s": round(dense_all, 1),
        "speedup_all_layers_cpu_vs_extrapolated": round(dense_all / fact_all["cpu_seconds"], 1),
        "dense_all_layers_extrapolated_wall_s": round(dense_all_wall, 1),
        "speedup_all_layers_wall_vs_extrapolated": round(dense_all_wall / fact_all["seconds"], 1),
    }


def read_adapter_rank(path: str) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="10,100")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS/OpenMP threads per timed child (default: the libraries' own choice)")
    p.add_argument("--workdir", default=None, help="where client adapters are written (default: a temp dir)")
    p.add_argument("--fleets", default=None,
                   help="keep the generated client fleets in this directory and reuse them on the next run "
                        "(100 clients x 24 layers is ~12 GB and ~15 min to write)")
    p.add_argument("--json", default="docs/bench/aggregation.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    load_start, date = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M %Z")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="agg-bench-") as tmp:
        runs = [bench_fleet(Path(tmp), int(n), args) for n in args.clients.split(",")]
    report = {"command": " ".join(["bench/aggregation.py", *sys.argv[1:]]), "date": date,
              "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, numpy {np.__version__}",
              "threads": args.threads or "default",
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "layers": args.layers, "dense_layers": args.dense_layers, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
