"""Calibrate flops emulation's training efficiency: achieved FLOP/s of a real training step over the matmul
throughput of the same CPU, both single-threaded and timed in thread CPU seconds (so a shared host's load
does not enter the ratio).

    .venv/bin/python bench/emulation_efficiency.py [--model smollm2-135m] [--rank 8] [--seq-len 32] [--steps 5]

``matmul``: the median over repeats of ``(tokens × in) @ (in × out)`` at every linear shape of the model,
FLOPs ``2·tokens·in·out``. ``step``: forward, backward and the device's AdamW of eager PEFT LoRA on
``q_proj, v_proj`` at the rank, FLOPs from the manifest's estimate
(:func:`lorafleet.export.compiler.estimates.flops_per_step`). The ratio is what
:data:`lorafleet.fleet.emulation.TRAINING_EFFICIENCY` stands for: a device's step takes
``FLOPs / (sustained GFLOP/s × efficiency)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def thread_seconds(fn, repeats: int) -> float:
    """Median thread CPU seconds of ``fn`` over ``repeats`` (one warm-up run first)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from lorafleet.edge_client.backends.base import AdamW, OptimizerConfig
    from lorafleet.export.compiler.estimates import flops_per_step
    from lorafleet.export.compiler.lora import attach_lora
    from lorafleet.export.compiler.loss import CausalLMLoss, example_batch
    from lorafleet.export.compiler.models import load_model
    from lorafleet.export.formats.program import LoraSpec

    loaded = load_model(args.model, attn_implementation="eager", with_tokenizer=False)
    info, tokens = loaded.info, args.seq_len
    flops_mm, secs_mm = 0, 0.0
    for out_f, in_f in info.module_shapes.values():
        x, w = torch.randn(tokens, in_f), torch.randn(in_f, out_f)
        secs_mm += thread_seconds(lambda x=x, w=w: x @ w, 20)
        flops_mm += 2 * tokens * in_f * out_f
    matmul_gflops = flops_mm / secs_mm / 1e9

    targets = ("q_proj", "v_proj")
    model = attach_lora(loaded.model, LoraSpec(args.rank, targets, 16.0))
    model.train()
    loss_fn = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, OptimizerConfig(lr=1e-4))
    ids, labels = example_batch(info.vocab_size, 1, tokens, seed=0)

    def step() -> None:
        for p in params:
            p.grad = None
        loss_fn(ids, labels).backward()
        opt.step([p.grad for p in params])

    secs_step = thread_seconds(step, args.steps)
    flops = flops_per_step(info, list(targets), args.rank, tokens, 1)
    step_gflops = flops / secs_step / 1e9
    row = {"model": args.model, "rank": args.rank, "tokens": tokens, "threads": 1,
           "matmul_gflops": round(matmul_gflops, 2), "step_flops": flops, "step_cpu_s": round(secs_step, 4),
           "step_gflops": round(step_gflops, 2), "efficiency": round(step_gflops / matmul_gflops, 3),
           "loadavg": round(os.getloadavg()[0], 2), "machine": f"{os.cpu_count()}-core {platform.machine()}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
