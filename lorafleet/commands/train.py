"""`lorafleet train`: Train a LoRA adapter locally from an edge package."""

import typer

from lorafleet.commands._unavailable import register_unavailable


def register(app: typer.Typer) -> None:
    register_unavailable(app, "train", "Train a LoRA adapter locally from an edge package")
