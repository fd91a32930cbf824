"""Option types the commands share: comma-separated lists and checked numbers, as click parameter types.

A bad value is a :class:`~lorafleet.export.formats.errors.ConfigError` naming the option and the value, so the
CLI prints one line and exits 1, as for every other bad input (click's own usage errors exit 2)::

    ranks: Annotated[Any, typer.Option("--ranks", click_type=INTS)]          # "4,8,16" -> (4, 8, 16)
    fraction: Annotated[Any, typer.Option("--fraction", click_type=FRACTION)] = "1.0"
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from lorafleet.export.formats.errors import ConfigError


def _flag(param: click.Parameter | None) -> str:
    if param is None:
        return "value"
    opts = getattr(param, "opts", None) or [param.name or "value"]
    return str(max(opts, key=len))


class CommaList(click.ParamType):
    """``"a,b,c"`` -> a tuple of items, each converted by ``item``; empty items are an error."""

    def __init__(self, item: Callable[[str], Any] = str, what: str = "", example: str = "a,b") -> None:
        self.item, self.what, self.example = item, what, example
        self.name = f"list of {what or 'names'}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        flag, text = _flag(param), str(value)
        items = tuple(x.strip() for x in text.split(","))
        if not text.strip() or any(not x for x in items):
            raise ConfigError(f"{flag}: expected a comma-separated list, got {text!r}")
        out = []
        for x in items:
            try:
                out.append(self.item(x))
            except ValueError:
                raise ConfigError(f"{flag}: {x!r} is not {self.what} (expected e.g. {self.example})") from None
        return tuple(out)


class Number(click.ParamType):
    """A finite number; optionally positive (``> 0``), and optionally the word ``auto`` (-> ``0.0``, "derive
    it")."""

    def __init__(self, *, positive: bool = False, auto: bool = False) -> None:
        self.positive, self.auto = positive, auto
        self.name = "auto|number" if auto else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        flag, text = _flag(param), str(value)
        if self.auto:
            if text.strip().lower() == "auto":
                return 0.0
            want = "auto or a positive number"
        else:
            want = "a positive number" if self.positive else "a number"
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{flag} must be {want}, got {text!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{flag} must be a finite number, got {text!r}" if not self.auto and not self.positive
                              else f"{flag} must be {want}, got {text!r}")
        if (self.positive or self.auto) and not number > 0:
            raise ConfigError(f"{flag} must be {want}, got {text!r}")
        return number


def examples(*commands: str) -> str:
    """A command's ``--help`` epilog: its example command lines, each a paragraph (rich help re-flows text
    within one). ``tests/test_cli_help.py`` parses every one with the command's own parser."""
    return "\n\n".join(["Examples:", *commands])


NAMES = CommaList(str, "a name", "q_proj,v_proj")
INTS = CommaList(int, "an integer", "4,8,16")
NUMBERS = CommaList(float, "a number", "n1,n2,...")
NUMBER = Number()
POSITIVE = Number(positive=True)
AUTO_POSITIVE = Number(auto=True)
