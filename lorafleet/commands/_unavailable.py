"""Placeholder for a subcommand that is not implemented yet: it says so and exits 2, never fakes output."""

from __future__ import annotations

import typer

from export.errors import NotAvailableError


def register_unavailable(app: typer.Typer, name: str, summary: str) -> None:
    @app.command(name, help=f"{summary} (not yet available)",
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _unavailable(ctx: typer.Context) -> None:
        raise NotAvailableError(f"`lorafleet {name}` is not yet available in this version")
