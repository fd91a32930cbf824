"""`lorafleet client`: Run a lorafleet device on Flower."""

import typer

from lorafleet.commands._unavailable import register_unavailable


def register(app: typer.Typer) -> None:
    register_unavailable(app, "client", "Run a lorafleet device on Flower")
