"""Fleet files: a committed TOML file holding everything ``lorafleet fleet`` takes, and its expectations.

    [fleet]                      # or [tool.lorafleet.fleet] in a pyproject.toml, as Flower apps keep their config
    devices = 100
    rounds = 3
    model = "random:tiny"
    method = "flexlora"
    seed = 0
    local-steps = 5              # dash- or underscore-spelled: local_steps is the same key
    round-deadline = 60
    ranks = [4, 8, 16]           # or "4,8,16"
    mix = { pixel-8 = 2, jetson-orin-nano-8gb = 1 }   # or "pixel-8=2,jetson-orin-nano-8gb=1"
    eval-per-family = 1          # any FleetConfig field, the library-only ones included
    expect = ["delta/seen/loss < 0", "dropped_share <= 0.3"]
    baseline = "ci-baseline"     # a report directory, for expectations against ``baseline``

Keys map onto :class:`~lorafleet.fleet.config.FleetConfig`'s fields generically (from the dataclass's fields
and their types), so a field added there is a fleet-file key at once; ``profiles`` is ``profiles_dir`` (the
CLI's ``--profiles``). Two keys are not fields: ``expect`` (a list of expressions, :mod:`lorafleet.fleet.expect`)
and ``baseline``. Relative paths in the file (``out``, ``profiles``, ``data``, ``baseline``) are relative to
the file's directory. Every error is one :class:`~lorafleet.export.formats.errors.ConfigError` line naming the
file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.config import DATA_BUILTIN, FleetConfig, parse_mix

TABLE = "fleet"  # the table of a fleet file; in a pyproject.toml: [tool.lorafleet.fleet]
ALIASES = {"profiles": "profiles_dir"}  # CLI option names that are not the field's name
RUN_KEYS = ("expect", "baseline")  # fleet-file keys that are not FleetConfig fields
PATH_STRINGS = ("data",)  # str fields holding a path (unless DATA_BUILTIN)


@dataclass
class FleetFile:
    """A read fleet file: FleetConfig settings (field name -> value, paths resolved), expectations, baseline."""

    path: Path
    settings: dict[str, Any] = field(default_factory=dict)
    expect: list[str] = field(default_factory=list)
    baseline: Path | None = None


def config_fields() -> dict[str, Any]:
    """Every FleetConfig field name with its (resolved) type."""
    hints = typing.get_type_hints(FleetConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(FleetConfig)}


def required_fields() -> list[str]:
    """The FleetConfig fields without a default (a fleet file or the command line must give them)."""
    return [f.name for f in dataclasses.fields(FleetConfig)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def known_keys() -> list[str]:
    return sorted({*config_fields(), *ALIASES, *RUN_KEYS})


def field_name(key: str) -> str | None:
    """The FleetConfig field (or run key) a fleet-file key names, ``None`` if none: ``local-steps`` ->
    ``local_steps``, ``profiles`` -> ``profiles_dir``."""
    name = key.strip().replace("-", "_")
    name = ALIASES.get(name, name)
    return name if name in config_fields() or name in RUN_KEYS else None


def read_fleet_file(path: str | Path) -> FleetFile:
    """Read and check a fleet file (a ``fleet.toml`` with a ``[fleet]`` table, or a ``pyproject.toml`` with
    ``[tool.lorafleet.fleet]``); nothing is run."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"fleet file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read fleet file {path}: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    table, label = _fleet_table(doc, path)
    out = FleetFile(path)
    fields = config_fields()
    seen: dict[str, str] = {}
    for key, value in table.items():
        name = field_name(key)
        if name is None:
            raise ConfigError(f"{where}: unknown key {key!r} in [{label}] (known: {', '.join(known_keys())})")
        if name in seen:
            raise ConfigError(f"{where}: [{label}] sets {name!r} twice ({seen[name]!r} and {key!r})")
        seen[name] = key
        what = f"{where}: [{label}] {key}"
        if name == "expect":
            out.expect = _expressions(value, what)
        elif name == "baseline":
            out.baseline = _path(value, what, path.parent)
        else:
            out.settings[name] = coerce(value, fields[name], what, base=path.parent,
                                        path_string=name in PATH_STRINGS)
    return out


def coerce(value: Any, hint: Any, what: str, *, base: Path | None = None, path_string: bool = False) -> Any:
    """``value`` (as TOML gives it) as a field of type ``hint``; ``what`` names it in the error. Paths are
    resolved against ``base`` when it is given."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], what, base=base, path_string=path_string)
        return value  # let FleetConfig check it
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{what}: expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{what}: expected a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what}: expected a string, got {_show(value)}")
        if path_string and base is not None and value != DATA_BUILTIN:
            return str(_path(value, what, base))
        return value
    if hint is Path:
        return _path(value, what, base)
    if origin is tuple:
        item = args[0] if args else Any
        if isinstance(value, str):  # the CLI's comma-separated form
            value = [_from_text(x.strip(), item, what) for x in value.split(",")]
        if not isinstance(value, list):
            raise ConfigError(f"{what}: expected a list, got {_show(value)}")
        return tuple(coerce(v, item, f"{what}[{i}]", base=base) for i, v in enumerate(value))
    if origin is dict:
        item = args[1] if len(args) == 2 else Any
        if isinstance(value, str) and item is float:  # the CLI's name=weight,... form (--mix)
            try:
                return parse_mix(value)
            except ConfigError as exc:
                raise ConfigError(f"{what}: {str(exc).removeprefix('--mix: ')}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{what}: expected a table, got {_show(value)}")
        return {str(k): coerce(v, item, f"{what}.{k}", base=base) for k, v in value.items()}
    return value


def merge(file: FleetFile | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The fleet file's settings with the command line's on top (``None``: not given)."""
    settings = dict(file.settings) if file is not None else {}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def build_config(settings: dict[str, Any], *, placeholder_out: bool = False) -> FleetConfig:
    """A FleetConfig from merged settings; a missing required setting is a one-line error naming its option
    (``placeholder_out``: a missing ``out`` is allowed, for ``--print-config``)."""
    settings = dict(settings)
    if placeholder_out and "out" not in settings:
        settings["out"] = Path("-")
    missing = [name for name in required_fields() if name not in settings]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"missing {flags} (give {'it' if len(missing) == 1 else 'them'} on the command line "
                          f"or in a fleet file with --config)")
    return FleetConfig(**settings)


def to_toml(cfg: FleetConfig, *, expect: list[str], baseline: Path | None, out_given: bool = True,
            source: Path | None = None) -> str:
    """The resolved configuration as a fleet file: every FleetConfig field (defaults included) in ``[fleet]``,
    paths absolute; feeding it back to ``--config`` runs the same fleet. ``None`` values (not set) are
    comments."""
    lines = ["# lorafleet fleet: resolved configuration" + (f" (from {source})" if source else ""), f"[{TABLE}]"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = "profiles" if f.name == "profiles_dir" else f.name
        if (f.name == "out" and not out_given) or value is None:
            lines.append(f"# {key}: not set")
        elif f.name == "extra" and not value:
            continue
        else:
            if isinstance(value, Path) or (f.name in PATH_STRINGS and value != DATA_BUILTIN):
                value = os.path.abspath(value)  # absolute: the printed file may be saved anywhere
            lines.append(f"{key} = {toml_value(value)}")
    lines.append(f"expect = {toml_value(list(expect))}")
    lines.append(f"baseline = {toml_value(os.path.abspath(baseline))}" if baseline is not None
                 else "# baseline: not set")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """One TOML value (strings, numbers, booleans, paths, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', str(k)) else json.dumps(str(k))} = {toml_value(v)}"
                 for k, v in value.items())
        return "{ " + ", ".join(items) + " }" if value else "{}"
    raise ConfigError(f"cannot write {value!r} as TOML")


# --- internals ------------------------------------------------------------------------------------------

def _fleet_table(doc: dict[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    tool = doc.get("tool", {}).get("lorafleet", {}) if isinstance(doc.get("tool"), dict) else {}
    if isinstance(tool, dict) and TABLE in tool:  # a pyproject.toml: the rest of the file is not ours
        table, label = tool[TABLE], f"tool.lorafleet.{TABLE}"
    elif TABLE in doc:
        stray = [k for k in doc if k != TABLE]
        if stray and path.name != "pyproject.toml":
            raise ConfigError(f"{path}: unknown top-level key {stray[0]!r} (every setting goes in [{TABLE}])")
        table, label = doc[TABLE], TABLE
    else:
        raise ConfigError(f"{path}: no [{TABLE}] table (or [tool.lorafleet.{TABLE}] in a pyproject.toml)")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {label} must be a table, got {_show(table)}")
    return table, label


def _expressions(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what}: expected a list of strings such as \"heldout/rouge_l >= 0.2\", got "
                          f"{_show(value)}")
    return list(value)


def _path(value: Any, what: str, base: Path | None) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}: expected a path (a string), got {_show(value)}")
    p = Path(value).expanduser()
    return p if base is None or p.is_absolute() else base / p


def _from_text(text: str, item: Any, what: str) -> Any:
    if item is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{what}: {text!r} is not an integer") from None
    if item is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{what}: {text!r} is not a number") from None
    return text


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
