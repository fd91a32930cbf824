"""`lorafleet export`: compile a model and LoRA heads at several ranks into a verified edge package.

    lorafleet export MODEL --ranks 4,8,16,32 --target-modules q_proj,v_proj [--lora-alpha A] [--seq-len T]
        [--batch-size B] [--adapter DIR] [--runtimes executorch,onnx] [--quantize none|int8|int4|int4:G]
        [--force] [--dry-run] --out PKG
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.commands.options import INTS, NAMES, examples
from lorafleet.commands.output import Quiet, Verbose, console, say, third_party_log


def export(
    model: Annotated[str, typer.Argument(help="Model spec: smollm2-135m, random:<arch>, an HF dir or a .gguf.")],
    ranks: Annotated[Any, typer.Option("--ranks", click_type=INTS,
                                       help="LoRA ranks, comma-separated (e.g. 4,8,16,32).")],
    target_modules: Annotated[Any, typer.Option("--target-modules", click_type=NAMES,
                                                help="Layers to adapt (q_proj,v_proj).")],
    out: Annotated[Path, typer.Option("--out", help="Package directory to create.")],
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="PEFT lora_alpha (alpha / r).")] = 16.0,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training sequence (fixed).")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per training step.")] = 1,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="PEFT adapter every rank starts from.")] = None,
    runtimes: Annotated[Any, typer.Option("--runtimes", click_type=NAMES,
                                          help="executorch, onnx or both.")] = "executorch,onnx",
    quantize: Annotated[str, typer.Option(
        "--quantize", help="Frozen-base storage: none (fp32), int8 (per output channel) or int4[:G] (groups of G "
                           "inputs, default 32); every linear, the embedding and the LM head.")] = "none",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing package at --out.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the inputs and print the predicted time, peak memory and package size; "
                          "load nothing, write nothing.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Compile a model and LoRA heads into an edge package for ExecuTorch and ONNX Runtime."""
    from lorafleet.export.compiler.pipeline import ExportConfig, run_export

    cfg = ExportConfig(model=model, ranks=ranks, target_modules=target_modules, out=out,
                       lora_alpha=lora_alpha, seq_len=seq_len, batch_size=batch_size, adapter=adapter,
                       runtimes=runtimes, quantize=quantize, force=force)
    if dry_run:
        from lorafleet.export.compiler.plan import plan_export

        with third_party_log("export", verbose=verbose):
            plan = plan_export(cfg)
        _plan_summary(plan)
        return
    with third_party_log("export", verbose=verbose):
        started = time.perf_counter()
        result = run_export(cfg, log=lambda msg: say(f"[export] {msg} (at {time.perf_counter() - started:.0f} s)",
                                                     quiet=quiet))
    _summary(result)


def register(app: typer.Typer) -> None:
    app.command("export", epilog=examples(
        "lorafleet export smollm2-135m --ranks 4,8,16 --target-modules q_proj,v_proj --out pkg",
        "lorafleet export random:tiny --ranks 2,4 --target-modules q_proj,v_proj --seq-len 16 --runtimes onnx "
        "--out tiny-pkg",
    ))(export)


def _summary(result: object) -> None:
    from rich.table import Table

    from lorafleet.export.compiler.pipeline import ExportResult

    assert isinstance(result, ExportResult)
    m = result.manifest
    table = Table(title=f"edge package {result.path}")
    device = sorted({rt for r in m.ranks for rt in m.rank(r).estimates.device_memory})
    for col in ("rank", "trainable", "own files", "est. train peak", *(f"{rt} device est." for rt in device),
                "est. GFLOP/step"):
        table.add_column(col, justify="right")
    for r in m.ranks:
        art = m.rank(r)
        table.add_row(str(r), f"{art.trainable_parameters:,}", _mb(art.size_bytes),
                      _mb(art.estimates.training_peak_memory_bytes),
                      *(_mb(art.estimates.device_memory_bytes(rt)) if rt in art.estimates.device_memory else "-"
                        for rt in device),
                      f"{art.estimates.flops_per_step / 1e9:.1f}")
    out = console()
    out.print(table)
    for rel, entry in m.shared_files.items():
        out.print(f"shared: {rel} {_mb(entry.size)}")
    worst: dict[str, float] = {}
    for c in m.verification["checks"]:
        worst[c["metric"]] = max(worst.get(c["metric"], 0.0), c["value"])
    out.print("verified against eager PEFT: " + ", ".join(f"{k} ≤ {v:.2g}" for k, v in worst.items()))
    out.print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))


def _plan_summary(plan: object) -> None:
    from rich.table import Table

    from lorafleet.export.compiler.plan import ExportPlan

    assert isinstance(plan, ExportPlan)
    out = console()
    out.print(f"dry run: {plan.spec} ({plan.model_type}, {plan.parameters / 1e9:.2f} B parameters, "
              f"{plan.num_layers} layers), base {plan.quantize}, runtimes {', '.join(plan.runtimes)}: inputs checked, "
              f"nothing loaded or written")
    table = Table(title="predicted package")
    for col in ("rank", "adapter", *plan.runtimes, "est. train peak"):
        table.add_column(col, justify="right")
    for r in plan.ranks:
        files = plan.rank_bytes[r]
        table.add_row(str(r), _mb(files["adapter"]), *(_mb(files[rt]) for rt in plan.runtimes),
                      _mb(plan.step_memory_bytes[r]))
    out.print(table)
    for rt, n in plan.foundation_bytes.items():
        out.print(f"shared: {rt} foundation {_mb(n)}")
    out.print(f"package: about {_mb(plan.package_bytes)}")
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in plan.seconds.items())
    out.print(f"time: about {plan.total_seconds / 60:.1f} min on a 2-core x86-64 machine ({parts})")
    verdict = "fits" if plan.fits else "does NOT fit"
    out.print(f"peak memory: about {plan.peak_memory_bytes / 2**30:.1f} GiB; {plan.available_memory_bytes / 2**30:.1f}"
              f" GiB free now: {verdict}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
