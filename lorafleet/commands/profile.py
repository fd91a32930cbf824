"""`lorafleet profile`: Measure this device and pick the LoRA rank it can train."""

import typer

from lorafleet.commands._unavailable import register_unavailable


def register(app: typer.Typer) -> None:
    register_unavailable(app, "profile", "Measure this device and pick the LoRA rank it can train")
