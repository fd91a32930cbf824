"""`lorafleet aggregate`: aggregate client PEFT adapters of different ranks into one global adapter.

    lorafleet aggregate --method {fedavg,hetlora,flexlora,raflora} [--weights n1,n2,...] [--rank R]
                        --out OUT ADAPTER_DIR...

Clients are streamed module by module (:func:`lorafleet.server.aggregation.aggregate_dirs`); OUT is written to a
temporary directory and renamed at the end, so a failure leaves no OUT behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer

from lorafleet.commands.options import AUTO_POSITIVE, NUMBERS, examples
from lorafleet.server.aggregation import METHODS  # cheap: torch is imported only when aggregating


def aggregate(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTER_DIR...",
                                                   help="Client PEFT adapter directories.")],
    method: Annotated[str, typer.Option("--method", click_type=click.Choice(list(METHODS)),
                                        help="fedavg (equal ranks), hetlora (Cho et al. 2024), flexlora "
                                             "(Bai et al. 2024) or raflora (Wu et al. 2026).")],
    out: Annotated[Path, typer.Option("--out", help="Output PEFT adapter directory (must not exist).")],
    weights: Annotated[Any, typer.Option("--weights", metavar="n1,n2,...", click_type=NUMBERS,
                                                help="One weight per adapter, e.g. its number of training "
                                                     "examples (default: equal). hetlora multiplies its "
                                                     "sparsity weights by them.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", metavar="R",
                                             help="Global rank (default: the largest client rank).")] = None,
    max_update_norm: Annotated[Any, typer.Option(
        "--max-update-norm", metavar="auto|N", click_type=AUTO_POSITIVE,
        help="Refuse a client whose ‖ΔW‖_F exceeds N (auto: a root-mean-square change of 1000 per "
             "base weight).")] = "auto",
) -> None:
    """Aggregate client adapters of different ranks (and lora_alpha) into a global adapter."""
    from lorafleet.export.formats.adapter import write_adapter
    from lorafleet.export.formats.errors import LorafleetError
    from lorafleet.server.aggregation import aggregate_dirs

    if out.exists():
        raise LorafleetError(f"output {out} already exists")
    parsed = None if weights is None else list(weights)
    options = {"use_weights": True} if method == "hetlora" and parsed is not None else {}
    bound = max_update_norm or None  # 0.0: auto
    result = aggregate_dirs(method, adapters, parsed, rank=rank, max_update_norm=bound, **options)
    write_adapter(result, out)
    ranks = sorted(result.ranks)
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    typer.echo(f"wrote {out}: {method} of {len(adapters)} adapters, {len(result.modules)} modules, "
               f"rank {shown}")


def register(app: typer.Typer) -> None:
    app.command("aggregate", epilog=examples(
        "lorafleet aggregate --method flexlora --weights 120,80 --out global phone-a phone-b",
    ))(aggregate)
