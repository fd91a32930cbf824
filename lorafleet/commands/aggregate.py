"""`lorafleet aggregate`: aggregate client PEFT adapters of different ranks into one global adapter.

    lorafleet aggregate --method {fedavg,hetlora,flexlora,raflora} [--weights n1,n2,...] [--rank R]
                        --out OUT ADAPTER_DIR...

Clients are streamed module by module (:func:`server.aggregation.aggregate_dirs`); OUT is written to a
temporary directory and renamed at the end, so a failure leaves no OUT behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from export.errors import AggregationError
from server.aggregation import METHODS  # cheap: torch is imported only when aggregating


def parse_weights(text: str | None) -> list[float] | None:
    """``"3,1,2.5"`` -> ``[3.0, 1.0, 2.5]``; the values themselves are checked by the aggregation."""
    if text is None:
        return None
    weights = []
    for item in text.split(","):
        try:
            weights.append(float(item))
        except ValueError:
            raise AggregationError(f"--weights: {item.strip()!r} is not a number (expected n1,n2,...)") from None
    return weights


def register(app: typer.Typer) -> None:
    @app.command("aggregate")
    def aggregate(
        adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTER_DIR...",
                                                       help="Client PEFT adapter directories.")],
        method: Annotated[str, typer.Option("--method", click_type=click.Choice(list(METHODS)),
                                            help="fedavg (equal ranks), hetlora (Cho et al. 2024), flexlora "
                                                 "(Bai et al. 2024) or raflora (Wu et al. 2026).")],
        out: Annotated[Path, typer.Option("--out", help="Output PEFT adapter directory (must not exist).")],
        weights: Annotated[str | None, typer.Option("--weights", metavar="n1,n2,...",
                                                    help="One weight per adapter, e.g. its number of training "
                                                         "examples (default: equal). hetlora multiplies its "
                                                         "sparsity weights by them.")] = None,
        rank: Annotated[int | None, typer.Option("--rank", metavar="R",
                                                 help="Global rank (default: the largest client rank).")] = None,
        max_update_norm: Annotated[str, typer.Option(
            "--max-update-norm", metavar="auto|N",
            help="Refuse a client whose ‖ΔW‖_F exceeds N (auto: a root-mean-square change of 1000 per "
                 "base weight).")] = "auto",
    ) -> None:
        """Aggregate client adapters of different ranks (and lora_alpha) into a global adapter."""
        from export.adapter import write_adapter
        from export.errors import LorafleetError
        from server.aggregation import aggregate_dirs

        if out.exists():
            raise LorafleetError(f"output {out} already exists")
        parsed = parse_weights(weights)
        options = {"use_weights": True} if method == "hetlora" and parsed is not None else {}
        from lorafleet.commands.serve import parse_auto

        bound = parse_auto(max_update_norm, "--max-update-norm") or None
        result = aggregate_dirs(method, adapters, parsed, rank=rank, max_update_norm=bound, **options)
        write_adapter(result, out)
        ranks = sorted(result.ranks)
        shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        typer.echo(f"wrote {out}: {method} of {len(adapters)} adapters, {len(result.modules)} modules, "
                   f"rank {shown}")
