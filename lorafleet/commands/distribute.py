"""`lorafleet distribute`: cut the global adapter down to a client's rank.

    lorafleet distribute --rank r --out OUT GLOBAL_DIR

The first r components of every module (HetLoRA/FlexLoRA distribution); for a FlexLoRA global adapter this
is exactly the rank-r truncated SVD of the aggregate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.commands.options import AUTO_POSITIVE, examples


def distribute(
    global_dir: Annotated[Path, typer.Argument(metavar="GLOBAL_DIR", help="The global PEFT adapter directory.")],
    rank: Annotated[int, typer.Option("--rank", metavar="r", help="The client's LoRA rank.")],
    out: Annotated[Path, typer.Option("--out", help="Output PEFT adapter directory (must not exist).")],
    max_update_norm: Annotated[Any, typer.Option(
        "--max-update-norm", metavar="auto|N", click_type=AUTO_POSITIVE,
        help="Refuse a global adapter whose ‖ΔW‖_F exceeds N (auto: a root-mean-square change of 1000 per "
             "base weight).")] = "auto",
) -> None:
    """Cut the global adapter down to a client's rank (the first r components)."""
    from lorafleet.export.formats.adapter import read_adapter, write_adapter
    from lorafleet.export.formats.errors import AdapterError, LorafleetError
    from lorafleet.server import bounds
    from lorafleet.server.aggregation import check_output
    from lorafleet.server.aggregation import distribute as cut

    if out.exists():
        raise LorafleetError(f"output {out} already exists")
    global_adapter = read_adapter(global_dir)
    limit = max_update_norm or bounds.rms_bound(global_adapter)  # 0.0: auto
    norm = bounds.change_norm(global_adapter, None)
    if not norm <= limit:
        raise AdapterError(f"{global_dir}: its ‖ΔW‖_F = {norm:.3g} is above the bound {limit:.3g} "
                           f"(--max-update-norm)")
    result = cut(global_adapter, rank)
    check_output(result)
    write_adapter(result, out)
    typer.echo(f"wrote {out}: rank {result.r} of {global_dir}")


def register(app: typer.Typer) -> None:
    app.command("distribute", epilog=examples(
        "lorafleet distribute --rank 8 --out for-rank-8 global",
    ))(distribute)
