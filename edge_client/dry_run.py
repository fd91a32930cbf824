"""A device's check before it joins a federation (``lorafleet client --dry-run``): nothing is sent anywhere.

It does what the ClientApp does for its first round, on this machine: opens the package, picks the rank as the
query handler would (:func:`lorafleet.edge_client.flower_client.profile_rank` under the server's default
budgets, or the node's fixed rank), and runs one real training step of that rank on a batch of the examples
with the same trainer (:func:`lorafleet.edge_client.trainer.train_local`). The report is data; the CLI renders it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lorafleet.edge_client.data import Example
from lorafleet.edge_client.flower_client import NodeSettings, node_device, profile_rank, resolve_backend
from lorafleet.export.formats import protocol as P

DEFAULT_ROUND_TIMEOUT = 600.0  # what the ClientApp assumes when a query carries no budget
DEFAULT_LOCAL_STEPS = 10


@dataclass(frozen=True)
class DryRunReport:
    rank: int  # P.NO_RANK: no packaged rank fits; then nothing was trained
    reasons: tuple[str, ...]  # why that rank (the profiler's reasons, or "fixed rank")
    backend: str
    memory_available_bytes: int  # what the device (measured, or its profile) has for the app
    peak_rss_bytes: int  # peak resident memory of this process during the step (0: no step)
    step_seconds: float  # wall seconds of the training step (the first: includes loading the program)
    loss: float | None  # the step's loss (None: no step)
    batch_size: int
    num_examples: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}


def dry_run(settings: NodeSettings, examples: Sequence[Example], *, round_timeout: float = DEFAULT_ROUND_TIMEOUT,
            local_steps: int = DEFAULT_LOCAL_STEPS, lr: float = 1e-3, seed: int = 0) -> DryRunReport:
    """Pick this node's rank and train one step on ``examples``; see the module docstring."""
    from lorafleet.edge_client.rank_choice import Budgets
    from lorafleet.edge_client.trainer import train_local
    from lorafleet.export.formats.package import open_package

    pkg = open_package(settings.package)  # every file checked, as `lorafleet client` does before it connects
    backend = resolve_backend(settings, pkg)
    if settings.rank:
        pkg.manifest.rank(settings.rank)
        rank, reasons = settings.rank, [f"fixed rank {settings.rank}"]
    else:
        budgets = Budgets(time_budget_seconds=round_timeout, steps_per_round=local_steps)
        rank, reasons = profile_rank(settings, pkg, backend, budgets)
    memory = node_device(settings, pkg).memory_available_bytes
    if rank == P.NO_RANK:
        return DryRunReport(rank, tuple(reasons), backend, memory, 0, 0.0, None, pkg.manifest.batch_size,
                            len(examples))
    result = train_local(pkg, rank, backend, examples, steps=1, lr=lr, seed=seed)
    return DryRunReport(rank, tuple(reasons), result.backend, memory, result.peak_rss_bytes, result.step_seconds,
                        result.losses[0], pkg.manifest.batch_size, len(examples))
