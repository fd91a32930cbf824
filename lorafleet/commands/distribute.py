"""`lorafleet distribute`: Cut the global adapter down to a client's rank."""

import typer

from lorafleet.commands._unavailable import register_unavailable


def register(app: typer.Typer) -> None:
    register_unavailable(app, "distribute", "Cut the global adapter down to a client's rank")
