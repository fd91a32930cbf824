"""`lorafleet export`: Compile a model and LoRA heads into an edge package."""

import typer

from lorafleet.commands._unavailable import register_unavailable


def register(app: typer.Typer) -> None:
    register_unavailable(app, "export", "Compile a model and LoRA heads into an edge package")
