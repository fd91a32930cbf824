"""`lorafleet profile`: measure this device (or emulate one from a profile) and pick the LoRA rank it can train."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.commands.options import examples
from lorafleet.commands.output import Quiet, Verbose, console, say, third_party_log


class BackendName(StrEnum):
    executorch = "executorch"
    onnxruntime = "onnxruntime"
    torch = "torch"
    native = "native"


def profile(
    package: Annotated[Path | None, typer.Option("--package", help="Edge package: evaluate its ranks.")] = None,
    profile_file: Annotated[str | None, typer.Option(
        "--profile", help="Emulate this device profile (a file, or a name in profiles/).")] = None,
    backend: Annotated[BackendName, typer.Option("--backend", help="Training runtime.")] = BackendName.onnxruntime,
    memory_fraction: Annotated[float, typer.Option(
        "--memory-fraction", help="Share of the available memory training may use.")] = 0.9,
    time_budget: Annotated[float | None, typer.Option(
        "--time-budget", help="Seconds per local round: 20 steps plus adapter download and upload.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Measure this device and pick the largest LoRA rank whose training fits its memory and time budgets."""
    from lorafleet.edge_client.device import DEFAULT_SHAPES, emulate, measure_device
    from lorafleet.edge_client.profiler import profile_device
    from lorafleet.edge_client.profiles import load_profile
    from lorafleet.edge_client.rank_choice import Budgets
    from lorafleet.export.formats.package import open_package

    budgets = Budgets(memory_fraction=memory_fraction, time_budget_seconds=time_budget)
    prof = load_profile(profile_file) if profile_file else None
    pkg = open_package(package) if package is not None else None
    shapes: tuple[tuple[int, int, int], ...] = DEFAULT_SHAPES
    if pkg is not None:
        tokens = pkg.manifest.batch_size * pkg.manifest.seq_len
        shapes = tuple((tokens, i, o) for o, i in pkg.manifest.model.module_shapes.values())
    with third_party_log("profile", verbose=verbose):
        say("measuring this machine (memory, matmul throughput, copy bandwidth)", quiet=quiet or as_json)
        host = measure_device(shapes)
        device = emulate(prof, host.gflops) if prof else host
        if pkg is not None:
            say(f"training steps of ranks {min(pkg.ranks)} and {max(pkg.ranks)} on {backend.value}, each in a fresh "
                "process", quiet=quiet or as_json)
        result = profile_device(device, pkg, backend.value, budgets)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        _print_table(result.to_json())


def register(app: typer.Typer) -> None:
    app.command("profile", epilog=examples(
        "lorafleet profile",
        "lorafleet profile --package pkg --profile pixel-8 --json",
    ))(profile)


def _print_table(out: dict[str, Any]) -> None:
    from rich.table import Table

    from lorafleet.edge_client.rank_choice import fmt_bytes

    screen = console()
    d = out["device"]
    screen.print(f"[bold]{d['name']}[/bold] ({d['source']}): {fmt_bytes(d['memory_available_bytes'])} available "
                  f"of {fmt_bytes(d['memory_total_bytes'])}, {d['cpu_count']} CPUs, {d['gflops']:.1f} GFLOP/s, "
                  f"{d['memory_bandwidth_gbs']:.1f} GB/s")
    if out["candidates"]:
        table = Table()
        for col in ("rank", "predicted peak", "step (s)", "fits", "why"):
            table.add_column(col)
        for c in out["candidates"]:
            table.add_row(str(c["rank"]), fmt_bytes(c["predicted_peak_bytes"]), f"{c['predicted_step_seconds']:.3f}",
                          "yes" if c["fits"] else "no", c["why"])
        screen.print(table)
    for reason in out["reasons"]:
        screen.print(f"- {reason}")
    screen.print(f"selected rank: {out['selected_rank'] if out['selected_rank'] is not None else 'none'}")
