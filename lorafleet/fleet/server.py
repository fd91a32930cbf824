"""The emulated fleet's ServerApp: the fleet strategy, the global adapter's evaluation, the report.

Flower's ``Strategy.start`` runs the rounds; its server-side ``evaluate_fn`` hook is called before round 1
(the untrained baseline, round 0) and after every round: there the global adapter is scored on the
held-out and seen families (:mod:`lorafleet.fleet.evaluate`), its energy per rank segment is measured
(:mod:`lorafleet.fleet.rank_energy`), and the round — metrics, participants, dropped devices and why, emulated
times — is added to the report, which is rewritten (atomically) so it can be read while the fleet runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.edge_client.data import Example
from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.records import FleetReport, RoundRecord
from lorafleet.fleet.report import write_report

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp

    from lorafleet.export.formats.adapter import Adapter
    from lorafleet.fleet.evaluate import EvalConfig, SplitResult
    from lorafleet.fleet.strategy import Emulation, FleetStrategy, RoundOutcome
    from lorafleet.server.server_app import ServerConfig

ROUND_TIMEOUT = 7 * 24 * 3600.0  # wall seconds Flower waits for a round's replies: emulated deadlines decide


class FleetProgress:
    """What a run reports as it goes (the CLI shows it as a progress bar); the default does nothing."""

    def stage(self, text: str) -> None: ...

    def replies(self, done: int, total: int) -> None: ...

    def round_done(self, record: RoundRecord) -> None: ...


class Evaluator:
    """Scores an adapter on the evaluation splits with the base model kept in memory. With a ``quantize``d
    package that base holds the quantized weights the devices train over, dequantized once into fp32 (the
    same values; a forward need not dequantize again, and adapters merge into them as into an fp32 base)."""

    def __init__(self, model_spec: str, splits: Mapping[str, Mapping[str, Sequence[Example]]], config: EvalConfig,
                 *, quantize: str = "none"):
        from lorafleet.export.compiler.models import load_model
        from lorafleet.export.formats.quantization import Quantization

        self.loaded = load_model(model_spec, quantization=Quantization.parse(quantize))
        if self.loaded.quantization is not None:
            from lorafleet.export.compiler.quantize import dequantize_model

            dequantize_model(self.loaded.model)
        self.splits, self.config = splits, config
        self._baseline: dict[str, SplitResult] | None = None  # the untrained model's, kept for later runs
        self.last: dict[str, SplitResult] = {}  # the latest call's results, each example's scores included

    def __call__(self, adapter: Adapter | None) -> dict[str, float]:
        from lorafleet.fleet.evaluate import evaluate_splits, flat_metrics

        if adapter is None and self._baseline is not None:
            self.last = self._baseline
        else:
            self.last = evaluate_splits(self.loaded.model, self.loaded.tokenizer, self.splits, adapter=adapter,
                                        config=self.config)
            if adapter is None:
                self._baseline = self.last
        return flat_metrics(self.last)


def evaluated(rnd: int, rounds: int, every: int) -> bool:
    """Whether round ``rnd`` is evaluated: the baseline, the last round, and every ``every``-th (0: none)."""
    return rnd in (0, rounds) or (every > 0 and rnd % every == 0)


@dataclass
class FleetServer:
    """One fleet run on the server side (lives in the simulation's ServerApp thread)."""

    config: ServerConfig
    emulation: Emulation
    evaluator: Callable[[Adapter | None], dict[str, float]]
    report: FleetReport
    out: Path
    progress: FleetProgress
    eval_every: int = 1
    strategy: FleetStrategy | None = None

    def run(self, grid: Grid) -> None:
        from flwr.app import ArrayRecord

        from lorafleet.server.server_app import PromptGrid

        self.strategy = build_fleet_strategy(self.config, self.emulation, self._outcome, self.progress.stage)
        done = self.strategy.state.round  # > 0: resumed from the checkpoint in config.state_dir
        if done:
            self._catch_up(done)
        else:
            self.progress.stage("round 0: evaluating the untrained model")
        if self.config.rounds > done:
            self.strategy.start(grid=PromptGrid(grid, 0.05, self.progress.replies),  # type: ignore[arg-type]
                                initial_arrays=ArrayRecord(), num_rounds=self.config.rounds - done,
                                timeout=ROUND_TIMEOUT, evaluate_fn=self._evaluate)

    def _catch_up(self, done: int) -> None:
        """A resumed run: the report keeps rounds 0..``done``; a round the checkpoint has but the report
        lacks (the run stopped while evaluating it) is recorded from the checkpoint's history."""
        from lorafleet.fleet.rank_energy import rank_segments, segment_energy
        from lorafleet.fleet.strategy import FLEET_KEY, RoundOutcome

        assert self.strategy is not None
        del self.report.rounds[done + 1:]
        if len(self.report.rounds) == done:
            outcome = RoundOutcome.from_json(self.strategy.state.history[done - 1][FLEET_KEY])
            metrics = self.evaluator(self.strategy.global_adapter) if evaluated(
                done, self.config.rounds, self.eval_every) else {}
            ranks = [r for r in self.report.device_ranks.values() if r]
            self.report.add_round(round_record(outcome, metrics, segment_energy(
                self.strategy.global_adapter, rank_segments(ranks))))
        if len(self.report.rounds) != done + 1:
            raise ConfigError(f"the report in {self.out} has {len(self.report.rounds) - 1} rounds, the checkpoint "
                              f"{done}: they are not from the same run")
        write_report(self.out, self.report)
        self.progress.stage(f"resumed after round {done}")

    def _outcome(self, outcome: RoundOutcome) -> None:
        self.progress.stage(f"round {outcome.round}: evaluating the global adapter")

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        from lorafleet.fleet.rank_energy import rank_segments, segment_energy

        assert self.strategy is not None
        if rnd == 0 and self.strategy.round_offset:
            return None  # resumed: the baseline is in the report already
        rnd += self.strategy.round_offset
        metrics: dict[str, float] = {}
        if evaluated(rnd, self.config.rounds, self.eval_every):
            started = time.perf_counter()
            metrics = self.evaluator(self.strategy.global_adapter if rnd else None)
            metrics["eval_seconds"] = time.perf_counter() - started
        record = RoundRecord(round=rnd, metrics=metrics)
        if rnd:
            out = self.strategy.outcomes[-1]
            ranks = [r for r in self.report.device_ranks.values() if r]
            record = round_record(out, metrics, segment_energy(self.strategy.global_adapter, rank_segments(ranks)))
        self.report.add_round(record)
        write_report(self.out, self.report)
        self.progress.round_done(record)
        if rnd < self.config.rounds and self.strategy.node_of:  # before the first round, identify() says it
            self.progress.stage(f"round {rnd + 1}: training")
        return None


def round_record(out: RoundOutcome, metrics: dict[str, float], energy: dict[str, float]) -> RoundRecord:
    """The report's record of a round (device ids as strings)."""
    if out.loss is not None:
        metrics = {**metrics, "train/loss": float(out.loss)}
    return RoundRecord(round=out.round, metrics=metrics, participants=[str(d) for d in out.participants],
                       dropped=sorted(str(d) for d in out.dropped), round_time_s=out.round_time,
                       device_times_s={str(d): t for d, t in sorted(out.device_times.items())},
                       rank_energy=energy, online=out.online, sampled=[str(d) for d in out.sampled],
                       drop_reasons={str(d): why for d, why in sorted(out.dropped.items())},
                       ranks={str(d): r for d, r in sorted(out.ranks.items())})


def build_fleet_strategy(config: ServerConfig, emulation: Emulation, on_round: Callable[[RoundOutcome], None],
                         on_stage: Callable[[str], None] = lambda _s: None) -> FleetStrategy:
    """The fleet strategy, built from what the federation's ServerApp builds for ``config``."""
    from lorafleet.fleet.strategy import FleetStrategy
    from lorafleet.server.server_app import build_strategy, open_server_package

    pkg = open_server_package(config.package)
    strategy, _ = build_strategy(config, FleetStrategy, emulation=emulation, initial_adapter=pkg.initial_adapter,
                                 on_round=on_round, on_stage=on_stage, min_clients=1, min_valid=1, fraction=1.0)
    return strategy


def make_fleet_server_app(server: FleetServer) -> ServerApp:
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server.run(grid)

    return app
