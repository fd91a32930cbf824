"""`lorafleet fleet`: emulate a fleet of edge devices on Flower's simulation engine.

    lorafleet fleet --devices N [--profiles DIR] [--mix name=weight,...] [--fraction F] --rounds R
        --model SPEC --method M [--data builtin|FILE.jsonl] [--local-steps S] [--round-deadline SECONDS]
        [--ranks 4,8,16] [--quantize none|int8|int4|int4:G] [--rank-distribution D]
        [--emulation flops|measured] [--resume]
        [--gpus-per-device F] [--ray-address HOST:PORT] --seed S --out DIR
    lorafleet fleet --config fleet.toml [any option above, overriding the file's key] --out DIR
        [--expect 'METRIC OP NUMBER' ...] [--baseline DIR] [--print-config]

With expectations (``--expect`` or the fleet file's ``expect``) the run writes ``DIR/junit.xml`` and
``DIR/summary.json`` (:mod:`lorafleet.fleet.expect`), prints one line per expectation and exits 1 when one
fails. docs/ci.md describes fleet files and CI use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from lorafleet.commands.options import INTS, NUMBER, examples
from lorafleet.commands.output import Quiet, Verbose, third_party_log
from lorafleet.export.formats.errors import ConfigError, LorafleetError


class OneOf(click.Choice):
    """A choice whose names are loaded when first needed (the fleet's modules stay unimported until the
    command runs); a bad value is a one-line ConfigError, as for the fleet's other options."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        self.case_sensitive = True

    def __getattr__(self, name: str) -> Any:
        if name == "choices":
            self.choices = tuple(self._load())
            return self.choices
        raise AttributeError(name)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            flag = max(getattr(param, "opts", None) or ["value"], key=len)
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}") from None


def _methods() -> Sequence[str]:
    from lorafleet.server.aggregation import METHODS

    return list(METHODS)


def _rank_distributions() -> Sequence[str]:
    from lorafleet.fleet.config import RANK_DISTRIBUTIONS

    return RANK_DISTRIBUTIONS


def _emulations() -> Sequence[str]:
    from lorafleet.fleet.config import EMULATIONS

    return EMULATIONS


def fleet(
    config: Annotated[Path | None, typer.Option(
        "--config", help="Fleet file (TOML; see docs/ci.md). Options given here override its keys.")]
    = None,
    devices: Annotated[int | None, typer.Option("--devices", help="Virtual devices in the fleet.")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", help="Federated rounds.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model spec (smollm2-135m, random:tiny, ...).")]
    = None,
    method: Annotated[str | None, typer.Option("--method", click_type=OneOf(_methods),
                                               help="Aggregation method.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of everything random in the run.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report directory (new or empty).")] = None,
    profiles: Annotated[Path | None, typer.Option(
        "--profiles", help="Directory of device profiles (default: the bundled profiles/).")] = None,
    mix: Annotated[str | None, typer.Option(
        "--mix", help="Profile weights, e.g. pixel-8=2,jetson-orin-nano-8gb=1 (default: all, equal).")] = None,
    fraction: Annotated[Any, typer.Option(
        "--fraction", metavar="F", click_type=NUMBER,
        help="Share of the fleet sampled per round, from the online devices (default 1).")] = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="'builtin' (the task suite, non-IID; the default) or a JSONL file.")] = None,
    local_steps: Annotated[int | None, typer.Option(
        "--local-steps", help="Training steps per device per round (default 10).")] = None,
    round_deadline: Annotated[Any, typer.Option(
        "--round-deadline", metavar="SECONDS", click_type=NUMBER,
        help="Emulated seconds a device has per round (also its rank's time budget); later ones are dropped.")]
    = None,
    ranks: Annotated[Any, typer.Option(
        "--ranks", metavar="R1,R2,...", click_type=INTS, help="Packaged LoRA ranks (default 4,8,16).")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", metavar="none|int8|int4[:G]",
        help="The package's frozen base, as in 'lorafleet export': none (fp32, the default), int8 or int4 "
             "(groups of G, default 32). Devices' memory and ranks follow it.")] = None,
    rank_distribution: Annotated[str | None, typer.Option(
        "--rank-distribution", click_type=OneOf(_rank_distributions),
        help="How devices get ranks: the profiler's rule (default) or drawn from a distribution.")] = None,
    emulation: Annotated[str | None, typer.Option(
        "--emulation", click_type=OneOf(_emulations),
        help="Device step times from FLOPs (default) or measured on this host.")] = None,
    gpus_per_device: Annotated[Any, typer.Option(
        "--gpus-per-device", metavar="F", click_type=NUMBER,
        help="GPU share of each simulation worker, e.g. 0.25 (default 0: CPU); the torch backend then trains "
             "on CUDA.")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", metavar="HOST:PORT",
        help="Run the simulation on this running Ray cluster (or 'auto') instead of a local Ray instance.")]
    = None,
    expect: Annotated[list[str] | None, typer.Option(
        "--expect", metavar="'METRIC OP VALUE'",
        help="An expectation, e.g. 'heldout/rouge_l >= 0.2' or 'heldout/rouge_l >= baseline - 0.02' "
             "(repeatable; added to the fleet file's). A failed one makes the exit code 1.")] = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="Report directory that 'baseline' in expectations refers to.")] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the resolved configuration (as a fleet file, TOML) and exit.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the interrupted run in --out from its last completed round "
                         "(same settings).")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Emulate a fleet of edge devices on Flower's simulation engine and write a report."""
    from lorafleet.fleet import fleetfile
    from lorafleet.fleet.config import parse_mix
    from lorafleet.fleet.expect import parse_expectations, report_metrics
    from lorafleet.fleet.records import read_report

    file = fleetfile.read_fleet_file(config) if config is not None else None
    overrides = {"devices": devices, "rounds": rounds, "model": model, "method": method, "seed": seed, "out": out,
                 "profiles_dir": profiles, "mix": parse_mix(mix) if mix is not None else None,
                 "fraction": fraction, "data": data, "local_steps": local_steps, "round_deadline": round_deadline,
                 "ranks": ranks, "quantize": quantize, "rank_distribution": rank_distribution, "emulation": emulation,
                 "resume": True if resume else None, "gpus_per_device": gpus_per_device,
                 "ray_address": ray_address}
    settings = fleetfile.merge(file, overrides)
    baseline_dir = baseline if baseline is not None else (file.baseline if file is not None else None)
    texts = [(f"{config}: expect", e) for e in (file.expect if file is not None else [])]
    texts += [("--expect", e) for e in expect or []]
    expectations = parse_expectations(texts, baseline=baseline_dir is not None)
    cfg = fleetfile.build_config(settings, placeholder_out=print_config)
    if print_config:
        typer.echo(fleetfile.to_toml(cfg, expect=[t for _, t in texts], baseline=baseline_dir,
                                     out_given="out" in settings, source=config), nl=False)
        return
    base_metrics = report_metrics(read_report(baseline_dir)) if baseline_dir is not None else None

    from lorafleet.fleet import run_fleet
    from lorafleet.fleet.progress import progress_for

    # a run that had begun records its error; a report already there (or being resumed) is never touched
    fresh = not cfg.resume and (not cfg.out.exists() or (cfg.out.is_dir() and not any(cfg.out.iterdir())))
    started, clock = time.time(), time.perf_counter()
    try:
        with third_party_log("fleet", verbose=verbose), progress_for(cfg.rounds, quiet=quiet) as progress:
            result = run_fleet(cfg, progress=progress)
    except LorafleetError as exc:
        if fresh and cfg.out.is_dir():  # the run had begun: CI still finds junit.xml and summary.json, with the error
            _record_error(cfg, str(exc), time.perf_counter() - clock, config, baseline_dir)
        raise
    print_result(result)
    failed = judge(result, expectations, base_metrics, wall_s=time.perf_counter() - clock, started=started,
                   config=config, baseline=baseline_dir)
    if failed:
        raise typer.Exit(1)


def judge(result: Any, expectations: Sequence[Any], base_metrics: dict[str, float] | None, *, wall_s: float,
          started: float, config: Path | None, baseline: Path | None) -> int:
    """Judge the expectations on the run's report, write ``junit.xml`` and ``summary.json``, print one line
    per expectation; returns how many failed."""
    from lorafleet.export.formats.manifest import MANIFEST_FILE
    from lorafleet.fleet.expect import JUNIT_XML, SUMMARY_JSON, check, report_metrics, write_junit, write_summary

    metrics = report_metrics(result.report)
    outcomes = check(expectations, metrics, base_metrics)
    manifest = Path(result.package) / MANIFEST_FILE
    cached = manifest.is_file() and manifest.stat().st_mtime < started  # exported before this run began
    cfg = result.report.config
    run = {"config_file": str(config) if config is not None else None, "out": str(result.out),
           **{k: cfg.get(k) for k in ("model", "method", "devices", "rounds", "seed")},
           "wall_s": round(wall_s, 3), "package": str(result.package), "package_cached": cached,
           "baseline": str(baseline) if baseline is not None else None}
    suite = f"lorafleet fleet {config}" if config is not None else "lorafleet fleet"
    write_junit(result.out / JUNIT_XML, outcomes, metrics, suite=suite, time_s=wall_s)
    write_summary(result.out / SUMMARY_JSON, outcomes, metrics, run)
    typer.echo(f"edge package ({'cached, export skipped' if cached else 'exported by this run'}): {result.package}")
    for o in outcomes:
        if o.passed:
            typer.echo(f"expectation passed: {o.message}")
        else:
            typer.echo(f"expectation failed: {o.message}", err=True)
    failed = sum(not o.passed for o in outcomes)
    verdict = f"expectations: {len(outcomes) - failed} passed, {failed} failed" if outcomes else "no expectations"
    typer.echo(f"{verdict}; metrics for CI in {result.out / JUNIT_XML}, {result.out / SUMMARY_JSON}")
    return failed


def _record_error(cfg: Any, error: str, wall_s: float, config: Path | None, baseline: Path | None) -> None:
    from lorafleet.fleet.expect import JUNIT_XML, SUMMARY_JSON, write_junit, write_summary

    line = " ".join(error.split())
    run = {"config_file": str(config) if config is not None else None, "out": str(cfg.out), "model": cfg.model,
           "method": cfg.method, "devices": cfg.devices, "rounds": cfg.rounds, "seed": cfg.seed,
           "wall_s": round(wall_s, 3), "baseline": str(baseline) if baseline is not None else None}
    suite = f"lorafleet fleet {config}" if config is not None else "lorafleet fleet"
    write_junit(cfg.out / JUNIT_XML, [], {}, suite=suite, time_s=wall_s, error=line)
    write_summary(cfg.out / SUMMARY_JSON, [], {}, run, error=line)


def register(app: typer.Typer) -> None:
    app.command("fleet", epilog=examples(
        "lorafleet fleet --devices 8 --rounds 3 --model random:tiny --method flexlora --seed 0 --out fleet-out",
        "lorafleet fleet --config docs/ci/fleet.toml --out fleet-report",
    ))(fleet)


def print_result(result: object) -> None:
    from lorafleet.fleet import GLOBAL_DIR, FleetResult
    from lorafleet.fleet.records import PLOTS, SUMMARY_MD

    assert isinstance(result, FleetResult)
    out = result.out
    typer.echo(f"report: {out / SUMMARY_MD} (metrics.json, metrics.csv, {', '.join(PLOTS.values())})")
    typer.echo(f"global adapter (rank {result.global_rank}, PEFT): {out / GLOBAL_DIR}")
