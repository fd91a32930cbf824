"""Validating data read from files against pydantic models, with lorafleet's one-line errors.

Files a user or a device can edit (server state, profiles, manifests, run configs) are parsed into pydantic
models in strict mode (no silent coercion: ``"abc"`` is not a round number, ``true`` is not a count), with
bounds on every field. :func:`validate` turns pydantic's multi-line report into one line naming the file,
the field path and what was wrong, as the CLI shows errors.

Three pieces let a schema keep the exact wording its users already see:

* :func:`invalid` — what a model's own validator raises: its text is the message, shown as is;
* :class:`Problem` — the first error of a :class:`~pydantic.ValidationError` (the outermost one; at one depth a
  missing field before an unknown one before a wrong one; or, with ``by_depth=False``, the first one pydantic
  met, in the model's field order), with everything a message needs;
* ``validate(..., render=...)`` — ``render(problem)`` writes the line instead of the default
  ``<origin>: field '<path>': <pydantic's message>, got <value>``.

:func:`fields_model` and :func:`parse_fields` read a frozen dataclass (a run config, a node config) from a
mapping of external keys through a strict model of the dataclass's own fields.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import ErrorDetails, PydanticCustomError

from lorafleet.export.formats.errors import LorafleetError

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

OWN = "lorafleet"  # the error type of :func:`invalid`: the message is lorafleet's own text


class Strict(BaseModel):
    """Base model: strict types, no unknown fields, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def invalid(message: str) -> PydanticCustomError:
    """The error a validator raises to report ``message`` exactly (``Problem.message``; no ``{}`` templating)."""
    return PydanticCustomError(OWN, "{text}", {"text": message})


_ORDER = {"missing": 0, "extra_forbidden": 1}


@dataclass(frozen=True)
class Problem:
    """The first error of a :class:`ValidationError`, and the others, as a renderer needs them."""

    loc: tuple[str | int, ...]
    type: str  # pydantic's error type ("missing", "extra_forbidden", "int_type", ...) or OWN
    message: str  # pydantic's message, or the text given to :func:`invalid`
    input: Any
    ctx: Mapping[str, Any]
    errors: tuple[ErrorDetails, ...]  # all of them, first one first

    @classmethod
    def first(cls, exc: ValidationError, *, by_depth: bool = True) -> Problem:
        """The outermost error (``by_depth``), or with ``by_depth=False`` the first one pydantic met: fields in
        the order the model declares them, a mapping's items in their order, each key before its value (the
        order a hand-written reader meets them)."""
        errors = tuple(exc.errors())
        if by_depth:
            errors = tuple(sorted(errors, key=lambda e: (len(e["loc"]), _ORDER.get(e["type"], 2))))  # stable
        e = errors[0]
        return cls(loc=tuple(e["loc"]), type=e["type"], message=e["msg"], input=e.get("input"),
                   ctx=e.get("ctx") or {}, errors=errors)

    @property
    def field(self) -> str:
        """The dotted field path (``sources.availability``), ``(top level)`` for the whole input."""
        return ".".join(str(p) for p in self.loc) or "(top level)"

    @property
    def top(self) -> str | int | None:
        """The top-level field the problem is in."""
        return self.loc[0] if self.loc else None

    @property
    def shown(self) -> str:
        """The offending value for a message: its repr, or its type's name for a table or list, at most 80 chars."""
        value = self.input
        return (repr(value) if not isinstance(value, dict | list) else type(value).__name__)[:80]

    @property
    def more(self) -> int:
        return len(self.errors) - 1

    def unknown(self) -> list[str]:
        """Every unknown top-level key, sorted."""
        return sorted(str(e["loc"][0]) for e in self.errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1)


def default_line(origin: str, p: Problem) -> str:
    """``<origin>: missing field '<path>'`` or ``<origin>: field '<path>': <message>, got <value>``, and how many
    more problems there are."""
    more = f" (and {p.more} more)" if p.more else ""
    if p.type == "missing":
        return f"{origin}: missing field {p.field!r}{more}"
    if p.type == OWN:
        return f"{origin}: field {p.field!r}: {p.message}{more}"
    return f"{origin}: field {p.field!r}: {p.message}, got {p.shown}{more}"


def validate(model: type[M], data: Any, origin: str = "", error: type[LorafleetError] = LorafleetError, *,
             render: Callable[[Problem], str] | None = None, by_depth: bool = True) -> M:
    """``model`` parsed from ``data``; raises ``error`` with one line: ``render(problem)``, by default
    :func:`default_line` naming ``origin`` and the first bad field (which one is first: :meth:`Problem.first`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problem = Problem.first(exc, by_depth=by_depth)
        line = render(problem) if render else default_line(origin, problem)
        raise error(" ".join(line.splitlines())) from None


def fields_model(cls: type, keys: Mapping[str, str] | None = None) -> type[Strict]:
    """A strict model of dataclass ``cls``'s fields, read under ``keys`` (external key -> field name; by default
    the field names): each key typed as its field (``float`` takes an int too, never a bool), required where the
    field has no default, unknown keys refused. Errors are located by the external key. Built once per
    ``(cls, keys)``."""
    return _fields_model(cls, tuple((keys or {f.name: f.name for f in dataclasses.fields(cls)}).items()))


@functools.cache
def _fields_model(cls: type, keys: tuple[tuple[str, str], ...]) -> type[Strict]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    spec: dict[str, Any] = {}
    for key, name in keys:
        f = fields[name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        spec[name] = (hints[name], Field(alias=key) if required else Field(default=None, alias=key))
    return create_model(f"{cls.__name__}Keys", __base__=Strict, **spec)


def parse_fields(cls: type[T], data: Mapping[str, Any], keys: Mapping[str, str] | None,
                 render: Callable[[Problem], str], error: type[LorafleetError]) -> T:
    """``cls(**fields)`` from ``data`` checked against :func:`fields_model` (the keys not given keep the
    dataclass's defaults, and its ``__post_init__`` checks the values); a bad key raises ``error(render(p))``."""
    checked = validate(fields_model(cls, keys), dict(data), error=error, render=render)
    return cls(**checked.model_dump(exclude_unset=True))
