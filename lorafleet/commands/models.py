"""`lorafleet models`: list the model specs the loader understands."""

from __future__ import annotations

import json

import typer

from lorafleet.commands.options import examples


def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the named model specs (local HF directories and .gguf paths are accepted too)."""
    from rich.table import Table

    from lorafleet.commands.output import console as make_console
    from lorafleet.export.compiler.models import list_models
    from lorafleet.export.formats.cache import cache_dir

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="lorafleet model specs")
    for col in ("spec", "weights", "source"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["spec"], row["weights"], row["source"])
    console = make_console()
    console.print(table)
    console.print("Also: a local Hugging Face model directory, or a path to a .gguf file.")
    console.print(f"Model cache: {cache_dir()} (set LORAFLEET_CACHE to move it)")


def register(app: typer.Typer) -> None:
    app.command("models", epilog=examples(
        "lorafleet models",
    ))(models)
