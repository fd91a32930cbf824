"""`lorafleet serve`: Run a lorafleet federation server on Flower."""

import typer

from lorafleet.commands._unavailable import register_unavailable


def register(app: typer.Typer) -> None:
    register_unavailable(app, "serve", "Run a lorafleet federation server on Flower")
