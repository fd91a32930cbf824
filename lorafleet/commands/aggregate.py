"""`lorafleet aggregate`: Aggregate client adapters of different ranks."""

import typer

from lorafleet.commands._unavailable import register_unavailable


def register(app: typer.Typer) -> None:
    register_unavailable(app, "aggregate", "Aggregate client adapters of different ranks")
