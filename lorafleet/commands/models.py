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
    cols = ("spec", "family", "parameters", "weights", "verified", "source")
    for col in cols:
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for row in rows:
        table.add_row(*(row[c] for c in cols))
    console = make_console()
    console.print(table)
    console.print("verified: what the test suite exports and verifies for the family (runtime: base precision).")
    console.print("Also: a local Hugging Face model directory, a Hub id (org/name) in the local Hugging Face "
                  "cache, or a path to a .gguf file.")
    console.print(f"Model cache: {cache_dir()} (set LORAFLEET_CACHE to move it)")


def register(app: typer.Typer) -> None:
    app.command("models", epilog=examples(
        "lorafleet models",
    ))(models)
