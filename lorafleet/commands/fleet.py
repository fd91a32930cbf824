"""`lorafleet fleet`: emulate a fleet of edge devices on Flower's simulation engine.

    lorafleet fleet --devices N [--profiles DIR] [--mix name=weight,...] [--fraction F] --rounds R
        --model SPEC --method M [--data builtin|FILE.jsonl] [--local-steps S] [--round-deadline SECONDS]
        --seed S --out DIR
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from export.errors import ConfigError


def parse_number(option: str, text: str) -> float:
    """A finite number given on the command line (one-line error otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{option} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number, got {text!r}")
    return value


def register(app: typer.Typer) -> None:
    @app.command("fleet")
    def fleet(
        devices: Annotated[int, typer.Option("--devices", help="Virtual devices in the fleet.")],
        rounds: Annotated[int, typer.Option("--rounds", help="Federated rounds.")],
        model: Annotated[str, typer.Option("--model", help="Model spec (smollm2-135m, random:tiny, ...).")],
        method: Annotated[str, typer.Option("--method", help="fedavg, hetlora, flexlora or raflora.")],
        seed: Annotated[int, typer.Option("--seed", help="Seed of everything random in the run.")],
        out: Annotated[Path, typer.Option("--out", help="Report directory (new or empty).")],
        profiles: Annotated[Path | None, typer.Option(
            "--profiles", help="Directory of device profiles (default: the bundled profiles/).")] = None,
        mix: Annotated[str | None, typer.Option(
            "--mix", help="Profile weights, e.g. pixel-8=2,jetson-orin-nano-8gb=1 (default: all, equal).")] = None,
        fraction: Annotated[str, typer.Option(
            "--fraction", metavar="F", help="Share of the fleet sampled per round, from the online devices.")] = "1.0",
        data: Annotated[str, typer.Option(
            "--data", help="'builtin' (the task suite, non-IID) or a JSONL file.")] = "builtin",
        local_steps: Annotated[int, typer.Option("--local-steps", help="Training steps per device per round.")] = 10,
        round_deadline: Annotated[str | None, typer.Option(
            "--round-deadline", metavar="SECONDS",
            help="Emulated seconds a device has per round (also its rank's time budget); later ones are dropped.")]
        = None,
    ) -> None:
        """Emulate a fleet of edge devices on Flower's simulation engine and write a report."""
        from edge_client.profiles import PROFILES_DIR
        from lorafleet.fleet import run_fleet
        from lorafleet.fleet_config import FleetConfig, parse_mix
        from lorafleet.fleet_progress import RichProgress

        cfg = FleetConfig(devices=devices, rounds=rounds, model=model, method=method, seed=seed, out=out,
                          profiles_dir=profiles or PROFILES_DIR, mix=parse_mix(mix) if mix is not None else None,
                          fraction=parse_number("--fraction", fraction), data=data, local_steps=local_steps,
                          round_deadline=None if round_deadline is None else
                          parse_number("--round-deadline", round_deadline))
        with RichProgress(rounds) as progress:
            result = run_fleet(cfg, progress=progress)
        print_result(result)


def print_result(result: object) -> None:
    from lorafleet.fleet import GLOBAL_DIR, FleetResult
    from lorafleet.report import PLOTS, SUMMARY_MD

    assert isinstance(result, FleetResult)
    out = result.out
    typer.echo(f"report: {out / SUMMARY_MD} (metrics.json, metrics.csv, {', '.join(PLOTS.values())})")
    typer.echo(f"global adapter (rank {result.global_rank}, PEFT): {out / GLOBAL_DIR}")
