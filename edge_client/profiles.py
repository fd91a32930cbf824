"""Device profiles: one TOML file per device class, schema in ``profiles/README.md``.

An emulated device takes its memory, speed, network and availability from its profile. Every numeric figure
carries a source tagged as ``/work/shared/DEVICES.md`` does: ``[S]`` sourced, ``[D]`` derived, ``[U]``
unverified. Loading validates everything and raises :class:`export.errors.ConfigError` with one line naming
the file and the field.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
KINDS = ("jetson", "sbc", "android-flagship", "android-mid", "android-low", "ios", "host")
RUNTIMES = ("executorch", "onnxruntime", "torch")
SOURCE_TAGS = ("[S]", "[D]", "[U]")
GIB = 1 << 30

# numeric figure -> its type; every figure must be positive and carry a source
NUMERIC_FIELDS: dict[str, type] = {
    "memory_total_gib": float,
    "app_memory_gib": float,
    "cpu_cores": int,
    "sustained_gflops": float,
    "memory_bandwidth_gbs": float,
    "network_up_mbps": float,
    "network_down_mbps": float,
    "availability": float,
}
# The largest value any device (a host included) can plausibly have: larger ones are typos or attacks
MAXIMA: dict[str, float] = {
    "memory_total_gib": 1 << 16, "app_memory_gib": 1 << 16, "cpu_cores": 1 << 12, "sustained_gflops": 1e7,
    "memory_bandwidth_gbs": 1e5, "network_up_mbps": 1e7, "network_down_mbps": 1e7, "availability": 1.0,
}
REQUIRED = ("name", "kind", *NUMERIC_FIELDS, "runtimes", "sources")
OPTIONAL = ("notes",)


@dataclass(frozen=True)
class DeviceProfile:
    """A device class's budgets and speeds (units in the field names; see ``profiles/README.md``)."""

    name: str
    kind: str
    memory_total_gib: float
    app_memory_gib: float
    cpu_cores: int
    sustained_gflops: float
    memory_bandwidth_gbs: float
    network_up_mbps: float
    network_down_mbps: float
    availability: float
    runtimes: tuple[str, ...]
    sources: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    path: Path | None = None

    @property
    def id(self) -> str:
        """The file stem, e.g. ``jetson-orin-nano-8gb`` (the name a fleet config uses)."""
        return self.path.stem if self.path else self.name

    @property
    def memory_total_bytes(self) -> int:
        return int(self.memory_total_gib * GIB)

    @property
    def app_memory_bytes(self) -> int:
        return int(self.app_memory_gib * GIB)


def list_profiles(directory: str | Path = PROFILES_DIR) -> list[Path]:
    """Every ``*.toml`` profile in ``directory``, sorted by name."""
    return sorted(Path(directory).glob("*.toml"))


def load_all(directory: str | Path = PROFILES_DIR) -> list[DeviceProfile]:
    """Load and validate every profile in ``directory``."""
    return [load_profile(p) for p in list_profiles(directory)]


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else a bundled profile by stem (``pixel-8`` → ``profiles/pixel-8.toml``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = PROFILES_DIR / f"{Path(str(name_or_path)).stem}.toml"
    if path.suffix == "" and bundled.is_file():
        return bundled
    known = ", ".join(p.stem for p in list_profiles())
    raise ConfigError(f"device profile not found: {name_or_path} (bundled profiles: {known})")


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Read and validate one profile file (or a bundled profile by name)."""
    path = resolve_profile_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_profile(data, origin=str(path), path=path)


def parse_profile(data: dict[str, Any], *, origin: str = "profile", path: Path | None = None) -> DeviceProfile:
    """Validate a profile's parsed TOML. Errors read ``<origin>: field '<name>': <problem>``."""

    def fail(name: str, problem: str) -> ConfigError:
        return ConfigError(f"{origin}: field '{name}': {problem}")

    for name in REQUIRED:
        if name not in data:
            raise fail(name, "missing (required; see profiles/README.md)")
    for name in data:
        if name not in REQUIRED and name not in OPTIONAL:
            raise fail(name, f"unknown field (known: {', '.join(REQUIRED + OPTIONAL)})")
    values: dict[str, Any] = {}
    for name in ("name", "kind", "notes"):
        if name in data and (not isinstance(data[name], str) or not data[name].strip()):
            raise fail(name, f"must be a non-empty string, got {data[name]!r}")
    if data["kind"] not in KINDS:
        raise fail("kind", f"must be one of {', '.join(KINDS)}, got {data['kind']!r}")
    for name, kind in NUMERIC_FIELDS.items():
        values[name] = _number(data[name], kind, lambda p, n=name: fail(n, p))
        if values[name] > MAXIMA[name] and name != "availability":
            raise fail(name, f"must be at most {MAXIMA[name]:g}, got {values[name]!r}")
    _check_ranges(values, fail)
    runtimes = _runtimes(data["runtimes"], lambda p: fail("runtimes", p))
    sources = _sources(data["sources"], fail)
    return DeviceProfile(name=data["name"], kind=data["kind"], runtimes=runtimes, sources=sources,
                         notes=data.get("notes", ""), path=path, **values)


def _number(value: Any, kind: type, fail: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"must be a number, got {value!r}")
    if kind is int and not isinstance(value, int):
        raise fail(f"must be an integer, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise fail(f"must be positive, got {value!r}")
    return kind(value)


def _check_ranges(values: dict[str, Any], fail: Any) -> None:
    if values["app_memory_gib"] > values["memory_total_gib"]:
        raise fail("app_memory_gib", f"must be at most memory_total_gib ({values['memory_total_gib']}), "
                                     f"got {values['app_memory_gib']}")
    if values["availability"] > 1:
        raise fail("availability", f"must be a fraction in (0, 1], got {values['availability']}")


def _runtimes(value: Any, fail: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise fail(f"must be a non-empty list of {', '.join(RUNTIMES)}, got {value!r}")
    for item in value:
        if item not in RUNTIMES:
            raise fail(f"unknown runtime {item!r} (known: {', '.join(RUNTIMES)})")
    if len(set(value)) != len(value):
        raise fail(f"lists a runtime twice: {value!r}")
    return tuple(value)


def _sources(value: Any, fail: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise fail("sources", f"must be a table with one entry per figure, got {value!r}")
    for name in NUMERIC_FIELDS:
        if name not in value:
            raise fail(f"sources.{name}", "missing: every figure needs a source ([S], [D] or [U] + where from)")
    for name, text in value.items():
        if name not in NUMERIC_FIELDS:
            raise fail(f"sources.{name}", "names no figure of the profile")
        if not isinstance(text, str) or not text.startswith(SOURCE_TAGS) or len(text.strip()) <= 4:
            raise fail(f"sources.{name}", f"must start with [S], [D] or [U] and say where the figure comes "
                                          f"from, got {text!r}")
    return dict(value)
