"""Where lorafleet keeps downloads and build products outside git."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LORAFLEET_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$LORAFLEET_CACHE`` if set, else ``~/.cache/lorafleet``. Created on demand."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorafleet").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
