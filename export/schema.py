"""Validating data read from files against pydantic models, with lorafleet's one-line errors.

Files a user or a device can edit (server state, profiles, manifests, run configs) are parsed into pydantic
models in strict mode (no silent coercion: ``"abc"`` is not a round number, ``true`` is not a count), with
bounds on every field. :func:`validate` turns pydantic's multi-line report into one line naming the file,
the field path and what was wrong, as the CLI shows errors.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from export.errors import LorafleetError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base model: strict types, no unknown fields, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def validate(model: type[M], data: Any, origin: str, error: type[LorafleetError] = LorafleetError) -> M:
    """``model`` parsed from ``data``; raises ``error`` with one line naming ``origin`` and the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        if first["type"] == "missing":
            raise error(f"{origin}: missing field {where!r}{more}") from None
        value = first.get("input")
        shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
        raise error(f"{origin}: field {where!r}: {first['msg']}, got {shown[:80]}{more}") from None
