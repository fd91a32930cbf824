"""`lorafleet demo`: the main job on the embedded default model.

Export SmolLM2-135M-Instruct into an edge package at a few LoRA ranks (cached after the first run), profile
this machine, emulate a small heterogeneous fleet on Flower's simulation engine — 8 devices of 4 profiles,
each training the rank the profiler's rule gives it under a 40 s round deadline — for 2 rounds of FlexLoRA,
and write the report (metrics per round, plots, ``summary.md``, the global adapter) into ``demo-out/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.commands.options import examples
from lorafleet.commands.output import Quiet, Verbose, console, third_party_log
from lorafleet.export.formats.errors import ConfigError

DEMO_MIX = {"jetson-orin-nano-8gb": 1.0, "raspberry-pi-5-8gb": 1.0, "pixel-8": 1.0, "android-mid-6gb": 1.0}


def demo_config(model: str, out: Path) -> Any:
    """The demo's fleet: 8 devices (2 of each profile), 2 rounds of FlexLoRA, ranks 4/16/64, a 40 s deadline;
    step times measured on this machine (the demo shows what the profiler does here)."""
    from lorafleet.fleet.config import FleetConfig

    return FleetConfig(devices=8, rounds=2, model=model, method="flexlora", seed=0, out=out, mix=dict(DEMO_MIX),
                       fraction=1.0, local_steps=10, round_deadline=40.0, ranks=(4, 16, 64),
                       emulation="measured")


def demo(
    model: Annotated[str, typer.Option("--model", help="Model spec (see `lorafleet models`).")] = "smollm2-135m",
    out: Annotated[Path, typer.Option("--out", help="Report directory (a previous demo report is replaced).")]
    = Path("demo-out"),
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", min=1, max=512, help="Tokens of the sample answers shown at the end.")] = 32,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Export SmolLM2-135M, profile this machine, emulate an 8-device FlexLoRA fleet, write the report."""
    import time

    from lorafleet.commands.fleet import print_result
    from lorafleet.export.compiler.models import parse_spec
    from lorafleet.fleet import run_fleet
    from lorafleet.fleet.progress import progress_for

    parse_spec(model)  # a bad spec fails here, before anything is written
    _clear_previous(out)
    cfg = demo_config(model, out)
    typer.echo(f"lorafleet demo: export {model} (LoRA ranks {', '.join(map(str, cfg.ranks))} on "
               f"{', '.join(cfg.target_modules)}) → profile this machine → {cfg.devices} emulated devices "
               f"({', '.join(DEMO_MIX)}) × {cfg.rounds} rounds of {cfg.method} (deadline "
               f"{cfg.round_deadline:g} s, {cfg.local_steps} local steps) → report in {out}/")
    started = time.perf_counter()
    with third_party_log("demo", verbose=verbose):
        with progress_for(cfg.rounds, quiet=quiet) as progress:
            result = run_fleet(cfg, progress=progress)
        _print_fleet(result)
        _print_sample(result, model, max_new_tokens)
    print_result(result)
    typer.echo(f"({time.perf_counter() - started:.0f} s)")


def register(app: typer.Typer) -> None:
    app.command("demo", epilog=examples(
        "lorafleet demo",
    ))(demo)


def _clear_previous(out: Path) -> None:
    """The demo rewrites its own report; anything else at ``out`` is left alone."""
    from lorafleet.fleet.records import METRICS_JSON

    if out.exists() and any(out.iterdir()):
        if not (out / METRICS_JSON).is_file():
            raise ConfigError(f"{out} exists and holds no fleet report; choose another --out")
        shutil.rmtree(out)


def _print_fleet(result: Any) -> None:
    from rich.table import Table

    choice = result.report.rank_choice
    host, emulation = choice["host"], choice.get("emulation", {})
    screen = console()
    if host is not None:
        steps = ", ".join(f"rank {m['rank']}: {m['step_seconds']:.2f} s" for m in host["measurements"])
        screen.print(f"this machine: {host['device']['gflops']:.1f} GFLOP/s per simulation worker; one training "
                      f"step ({host['backend']}): {steps}")
    else:
        screen.print(f"device step times from each rank's FLOPs at {emulation.get('efficiency', 0):.0%} of the "
                      f"profile's GFLOP/s (the same on any machine; --emulation measured times this one)")
    table = Table(title="ranks chosen by the profiler's rule (deadline "
                        f"{choice['budgets']['time_budget_seconds']:g} s)")
    for col in ("profile", "devices", "GFLOP/s", "online", "rank", "predicted round"):
        table.add_column(col)
    profiles = list(result.report.device_profiles.values())
    for name, p in choice["profiles"].items():
        rank = p["selected_rank"]
        fit = next((c for c in p["candidates"] if c["rank"] == rank), None)
        why = fit["round"] if fit else p["reasons"][-1]
        table.add_row(name, str(profiles.count(name)), f"{p['gflops']:g}", f"{p['availability']:.0%}",
                      str(rank) if rank is not None else "none", why)
    screen.print(table)


def _print_sample(result: Any, model: str, max_new_tokens: int) -> None:
    """One example of every held-out family (never trained on), answered before and after the fleet and scored
    with the report's own metric: the best and the worst answers, and how coarse the mean is."""
    from lorafleet import tasks
    from lorafleet.export.compiler.models import load_model
    from lorafleet.export.formats.adapter import read_adapter
    from lorafleet.fleet import GLOBAL_DIR
    from lorafleet.fleet.evaluate import applied, generate_answers

    examples = [(f, tasks.generate(f, 1, seed=1, stream="eval")[0]) for f in tasks.heldout_families()]
    loaded = load_model(model)

    def answers() -> list[str]:
        return generate_answers(loaded.model, loaded.tokenizer, [ex for _, ex in examples],
                                max_new_tokens=max_new_tokens, batch_size=len(examples))

    before = answers()
    with applied(loaded.model, read_adapter(result.out / GLOBAL_DIR)):
        after = answers()
    for line in sample_lines(examples, before, after):
        typer.echo(line)


def sample_lines(examples: list[tuple[str, Any]], before: list[str], after: list[str], shown: int = 2,
                 resamples: int = 2000) -> list[str]:
    """The ``shown`` best and worst answers after the fleet by their Rouge-L (the metric the report averages),
    then the mean change with a paired bootstrap 95 % interval over these examples."""
    import numpy as np

    from lorafleet.fleet.evaluate import rouge_l

    rows = [(family, ex, b, a, rouge_l(b, ex.output), rouge_l(a, ex.output))
            for (family, ex), b, a in zip(examples, before, after, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: (-rows[i][5], rows[i][0]))
    best = order[:shown]
    worst = [i for i in order[::-1] if i not in best][:shown]
    lines = [f"held-out tasks (families never trained on): {len(rows)} answers scored with Rouge-L F, "
             "untrained model → after the fleet"]
    for label, picked in (("best", best), ("worst", worst)):
        for i in picked:
            family, ex, b, a, sb, sa = rows[i]
            prompt = ex.instruction + (f" {ex.input}" if ex.input else "")
            lines.append(f"  {label} [{family}] {prompt}\n    reference: {ex.output!r}\n"
                         f"    untrained ({sb:.2f}): {b!r}\n    fleet ({sa:.2f}): {a!r}")
    change = np.array([r[5] - r[4] for r in rows])
    draws = np.random.default_rng(0).integers(0, len(rows), size=(resamples, len(rows)))
    low, high = np.percentile(change[draws].mean(axis=1), [2.5, 97.5])
    lines.append(f"mean Rouge-L of these {len(rows)}: {np.mean([r[4] for r in rows]):.2f} → "
                 f"{np.mean([r[5] for r in rows]):.2f}, change {change.mean():+.2f} (paired bootstrap 95 % "
                 f"interval {low:+.2f} … {high:+.2f}); one answer moves the mean by up to {1 / len(rows):.2f}, "
                 "so treat differences smaller than the interval's width as noise")
    return lines
