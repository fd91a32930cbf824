"""The emulated fleet's ServerApp: the fleet strategy, the global adapter's evaluation, the report.

Flower's ``Strategy.start`` runs the rounds; its server-side ``evaluate_fn`` hook is called before round 1
(the untrained baseline, round 0) and after every round: there the global adapter is scored on the
held-out and seen families (:mod:`lorafleet.evaluate`), its energy per rank segment is measured
(:mod:`lorafleet.rank_energy`), and the round — metrics, participants, dropped devices and why, emulated
times — is added to the report, which is rewritten (atomically) so it can be read while the fleet runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_client.data import Example
from lorafleet.report import FleetReport, RoundRecord, write_report

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord
    from flwr.serverapp import Grid, ServerApp

    from export.adapter import Adapter
    from lorafleet.evaluate import EvalConfig
    from lorafleet.fleet_strategy import Emulation, FleetStrategy, RoundOutcome
    from server.server_app import ServerConfig

ROUND_TIMEOUT = 7 * 24 * 3600.0  # wall seconds Flower waits for a round's replies: emulated deadlines decide


class FleetProgress:
    """What a run reports as it goes (the CLI shows it as a progress bar); the default does nothing."""

    def stage(self, text: str) -> None: ...

    def replies(self, done: int, total: int) -> None: ...

    def round_done(self, record: RoundRecord) -> None: ...


class Evaluator:
    """Scores an adapter on the evaluation splits with the base model kept in memory."""

    def __init__(self, model_spec: str, splits: Mapping[str, Mapping[str, Sequence[Example]]], config: EvalConfig):
        from export.models import load_model

        self.loaded = load_model(model_spec)
        self.splits, self.config = splits, config
        self._baseline: dict[str, float] | None = None  # the untrained model's scores, kept for later runs

    def __call__(self, adapter: Adapter | None) -> dict[str, float]:
        from lorafleet.evaluate import evaluate_splits, flat_metrics

        if adapter is None and self._baseline is not None:
            return dict(self._baseline)
        metrics = flat_metrics(evaluate_splits(self.loaded.model, self.loaded.tokenizer, self.splits,
                                               adapter=adapter, config=self.config))
        if adapter is None:
            self._baseline = dict(metrics)
        return metrics


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

        self.strategy = build_fleet_strategy(self.config, self.emulation, self._outcome, self.progress.stage)
        self.progress.stage("round 0: evaluating the untrained model")
        self.strategy.start(grid=ProgressGrid(grid, self.progress),  # type: ignore[arg-type]
                            initial_arrays=ArrayRecord(),
                            num_rounds=self.config.rounds, timeout=ROUND_TIMEOUT, evaluate_fn=self._evaluate)

    def _outcome(self, outcome: RoundOutcome) -> None:
        self.progress.stage(f"round {outcome.round}: evaluating the global adapter")

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        from lorafleet.rank_energy import rank_segments, segment_energy

        assert self.strategy is not None
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
        if rnd < self.config.rounds:
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
    from lorafleet.fleet_strategy import FleetStrategy
    from server.server_app import build_strategy, open_server_package

    base, _ = build_strategy(config)
    pkg = open_server_package(config.package)
    return FleetStrategy(emulation=emulation, initial_adapter=pkg.initial_adapter, on_round=on_round, on_stage=on_stage,
                         global_adapter=base.global_adapter, state=base.state, limits=base.limits,
                         settings=base.settings, checkpoint=None, min_clients=1, min_valid=1, fraction=1.0)


class ProgressGrid:
    """The simulation's Grid, reporting replies as they arrive (as ``InMemoryGrid.send_and_receive`` does
    otherwise: push, then pull until every reply is in or ``timeout`` passes)."""

    def __init__(self, grid: Grid, progress: FleetProgress, interval: float = 0.05):
        self._grid, self.progress, self.interval = grid, progress, interval

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        total, replies = len(pending), []
        deadline = time.monotonic() + (timeout or 0.0)
        self.progress.replies(0, total)
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if got:
                self.progress.replies(len(replies), total)
            if not pending or (timeout is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies


def make_fleet_server_app(server: FleetServer) -> ServerApp:
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server.run(grid)

    return app
