"""Progress notes from deep inside the library (a model download, a one-time conversion) for whoever shows
them: the CLI points :func:`set_sink` at the terminal; by default a note is a ``logging`` INFO record of the
``lorafleet`` logger (silent unless the application configures logging)."""

from __future__ import annotations

import logging
from collections.abc import Callable

_sink: Callable[[str], None] | None = None


def set_sink(sink: Callable[[str], None] | None) -> None:
    """Where notes go from now on (``None``: back to logging)."""
    global _sink
    _sink = sink


def note(message: str) -> None:
    """A one-line progress note (e.g. "downloading the embedded model from PyPI (55 MB)")."""
    if _sink is not None:
        _sink(message)
    else:
        logging.getLogger("lorafleet").info(message)
