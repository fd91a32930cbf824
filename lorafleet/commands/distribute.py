"""`lorafleet distribute`: cut the global adapter down to a client's rank.

    lorafleet distribute --rank r --out OUT GLOBAL_DIR

The first r components of every module (HetLoRA/FlexLoRA distribution); for a FlexLoRA global adapter this
is exactly the rank-r truncated SVD of the aggregate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("distribute")
    def distribute(
        global_dir: Annotated[Path, typer.Argument(metavar="GLOBAL_DIR", help="The global PEFT adapter directory.")],
        rank: Annotated[int, typer.Option("--rank", metavar="r", help="The client's LoRA rank.")],
        out: Annotated[Path, typer.Option("--out", help="Output PEFT adapter directory (must not exist).")],
    ) -> None:
        """Cut the global adapter down to a client's rank (the first r components)."""
        from export.adapter import read_adapter, write_adapter
        from export.errors import LorafleetError
        from server.aggregation import distribute as cut

        if out.exists():
            raise LorafleetError(f"output {out} already exists")
        result = cut(read_adapter(global_dir), rank)
        write_adapter(result, out)
        typer.echo(f"wrote {out}: rank {result.r} of {global_dir}")
