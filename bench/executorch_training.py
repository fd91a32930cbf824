"""ExecuTorch training step time against eager torch+PEFT on the same CPU, per lowering backend.

    .venv/bin/python bench/executorch_training.py [--model smollm2-135m] [--rank 8]
        [--backends portable,linear,gemm,xnnpack] [--steps 12] [--threads 2,1]
        [--json docs/bench/executorch-training.json]

For each backend the training program is lowered (time and peak RSS recorded), loaded against its foundation
file, checked against eager (loss and LoRA gradients on the same batch), then timed: eager steps
(forward + backward + the device's AdamW) and ExecuTorch steps (``TrainingProgram.step`` + the same AdamW, as
``ExecutorchBackend`` runs them) alternate, so both see the same machine load; the figure is the median of
each. LoRA on q_proj, v_proj; one fixed batch.
``--threads`` sets both torch's intra-op threads and ExecuTorch's threadpool.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    args = _parse()
    from lorafleet.export.compiler.executorch.training import TrainingLowering

    model = _peft_model(args.model, args.rank)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
    labels = ids.clone()
    report: dict[str, Any] = {"model": args.model, "rank": args.rank, "target_modules": ["q_proj", "v_proj"],
                              "batch": [args.batch, args.seq_len], "threads": args.threads,
                              "machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "backends": {}}
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="et-bench-") as tmp:
            row = _lower(model, TrainingLowering(backend), args, Path(tmp))
            _check(model, Path(tmp), ids, labels, row)
            for threads in (int(t) for t in args.threads.split(",")):
                row[f"threads={threads}"] = _time(model, Path(tmp), ids, labels, args.steps, threads)
        report["backends"][backend] = row
        print(json.dumps({backend: row}), flush=True)
    report["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--backends", default="portable,linear,gemm,xnnpack")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", default="2,1", help="torch intra-op threads = ExecuTorch threadpool size; a list "
                   "times each")
    p.add_argument("--json", default="")
    return p.parse_args()


def _peft_model(spec: str, rank: int) -> Any:
    from peft import LoraConfig, get_peft_model

    from lorafleet.export.compiler.models import load_model

    base = load_model(spec, attn_implementation="eager", with_tokenizer=False).model
    torch.manual_seed(0)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(base, cfg)


def _lower(model: Any, lowering: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from lorafleet.export.compiler.executorch import FoundationStore, lower_training

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    lowered = lower_training(model, args.batch, args.seq_len, lowering)
    seconds = time.perf_counter() - t0
    lowered.write(out / "training.pte")
    store = FoundationStore()
    store.add(lowered.foundation)
    store.write(out / "foundation.ptd")
    return {"lower_s": round(seconds, 1), "lower_loadavg": load0, "pte_bytes": len(lowered.pte),
            "foundation_bytes": (out / "foundation.ptd").stat().st_size,
            "peak_rss_gb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _check(model: Any, out: Path, ids: torch.Tensor, labels: torch.Tensor, row: dict[str, Any]) -> None:
    """Load the program and compare one step with eager: loss and every LoRA gradient."""
    from lorafleet.export.compiler.executorch import load_training
    from lorafleet.export.formats.adapter import peft_key

    program = load_training(out / "training.pte", out / "foundation.ptd")
    model.zero_grad()
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grads = {peft_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    step = program.step(ids, labels)
    row.update(loss_eager=float(ref.detach()), loss_et=step.loss,
               max_grad_abs_diff=max(float((step.gradients[k] - g).abs().max()) for k, g in ref_grads.items()),
               max_grad_abs=max(float(g.abs().max()) for g in ref_grads.values()))


def _time(model: Any, out: Path, ids: torch.Tensor, labels: torch.Tensor, steps: int,
          threads: int) -> dict[str, Any]:
    """Median ms per training step (forward, backward, AdamW) of eager and ExecuTorch, steps interleaved."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from lorafleet.edge_client.backends.base import AdamW, OptimizerConfig
    from lorafleet.export.compiler.executorch import load_training

    torch.set_num_threads(threads)
    _unsafe_reset_threadpool(threads)  # before loading: XNNPACK keeps a pointer to the pool it was built with
    program = load_training(out / "training.pte", out / "foundation.ptd")
    config = OptimizerConfig(lr=1e-4)  # the device's AdamW (what ExecutorchBackend and TorchBackend step with)
    params = program.parameters()
    keys = sorted(params)
    opt = AdamW([params[k] for k in keys], config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref_opt = AdamW(trainable, config)
    eager_ms, et_ms = [], []
    load0 = os.getloadavg()[0]
    for _ in range(steps + 2):  # two warm-up rounds, dropped below
        t = time.perf_counter()
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        ref_opt.step([p.grad for p in trainable])
        eager_ms.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        grads = program.step(ids, labels).gradients
        opt.step([grads[k] for k in keys])
        et_ms.append(1000 * (time.perf_counter() - t))
    eager, et = statistics.median(eager_ms[2:]), statistics.median(et_ms[2:])
    return {"eager_ms": round(eager, 1), "et_ms": round(et, 1), "et_over_eager": round(et / eager, 3),
            "eager_min_ms": round(min(eager_ms[2:]), 1), "et_min_ms": round(min(et_ms[2:]), 1),
            "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)], "steps": steps}


def _machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {mem:.0f} GB, no GPU ({platform.processor() or 'cpu'})"


if __name__ == "__main__":
    main()
