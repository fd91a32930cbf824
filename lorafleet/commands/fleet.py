"""`lorafleet fleet`: Emulate a fleet of edge devices on Flower's simulation engine."""

import typer

from lorafleet.commands._unavailable import register_unavailable


def register(app: typer.Typer) -> None:
    register_unavailable(app, "fleet", "Emulate a fleet of edge devices on Flower's simulation engine")
