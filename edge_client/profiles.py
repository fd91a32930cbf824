"""Device profiles: one TOML file per device class, schema in ``profiles/README.md``.

An emulated device takes its memory, speed, network and availability from its profile. Every numeric figure carries a
source tagged as ``docs/device-sources.md`` does: ``[S]`` sourced, ``[D]`` derived, ``[U]`` unverified. Loading
validates everything against the pydantic model :class:`ProfileFile` and raises
:class:`lorafleet.export.formats.errors.ConfigError` with one line naming the file and the field (:func:`_problem`
words pydantic's first error).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from lorafleet.export.formats.errors import ConfigError
from lorafleet.export.formats.schema import OWN, Problem, Strict, invalid, validate

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
Kind = Literal["jetson", "sbc", "android-flagship", "android-mid", "android-low", "ios", "host"]
Runtime = Literal["executorch", "onnxruntime", "torch"]
KINDS: tuple[str, ...] = get_args(Kind)
RUNTIMES: tuple[str, ...] = get_args(Runtime)
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
    """Validate a profile's parsed TOML against :class:`ProfileFile`. Errors read ``<origin>: field '<name>':
    <problem>``."""
    checked = validate(ProfileFile, data, error=ConfigError, render=lambda p: "{}: field '{}': {}".format(
        origin, *_problem(p)))
    figures = {name: NUMERIC_FIELDS[name](getattr(checked, name)) for name in NUMERIC_FIELDS}
    return DeviceProfile(name=checked.name, kind=checked.kind, runtimes=tuple(checked.runtimes),
                         sources=dict(data["sources"]), notes=checked.notes, path=path, **figures)


def _problem(p: Problem) -> tuple[str, str]:
    """The field and the problem, as profiles have always worded them, for pydantic's first error."""
    if p.type == OWN:
        return p.field, p.message
    if p.top == "sources" and len(p.loc) > 1:
        if p.type == "missing":
            return p.field, "missing: every figure needs a source ([S], [D] or [U] + where from)"
        if p.type == "extra_forbidden":
            return p.field, "names no figure of the profile"
        return p.field, _source_problem(p.input)
    if p.type == "missing":
        return p.field, "missing (required; see profiles/README.md)"
    if p.type == "extra_forbidden":
        return p.field, f"unknown field (known: {', '.join(REQUIRED + OPTIONAL)})"
    if p.top == "sources":
        return "sources", f"must be a table with one entry per figure, got {p.input!r}"
    if p.top == "runtimes":
        if len(p.loc) > 1:
            return "runtimes", f"unknown runtime {p.input!r} (known: {', '.join(RUNTIMES)})"
        return "runtimes", f"must be a non-empty list of {', '.join(RUNTIMES)}, got {p.input!r}"
    if p.top in ("name", "kind", "notes"):
        if p.top == "kind" and isinstance(p.input, str) and p.input.strip():
            return "kind", f"must be one of {', '.join(KINDS)}, got {p.input!r}"
        return p.field, f"must be a non-empty string, got {p.input!r}"
    if p.top in NUMERIC_FIELDS:
        name = str(p.top)
        if p.type == "int_type" and isinstance(p.input, float):
            return name, f"must be an integer, got {p.input!r}"
        if p.type in ("int_type", "float_type"):
            return name, f"must be a number, got {p.input!r}"
        if p.type in ("greater_than", "finite_number"):
            return name, f"must be positive, got {p.input!r}"
        if p.type == "less_than_equal" and name == "availability":
            return name, f"must be a fraction in (0, 1], got {float(p.input)}"
        if p.type == "less_than_equal":
            return name, f"must be at most {MAXIMA[name]:g}, got {NUMERIC_FIELDS[name](p.input)!r}"
    return p.field, f"{p.message}, got {p.shown}"


def _nonblank(value: str) -> str:
    if not value.strip():
        raise invalid(f"must be a non-empty string, got {value!r}")
    return value


def _distinct(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise invalid(f"lists a runtime twice: {value!r}")
    return value


def _source_problem(text: Any) -> str:
    return f"must start with [S], [D] or [U] and say where the figure comes from, got {text!r}"


def _source(text: str) -> str:
    if not text.startswith(SOURCE_TAGS) or len(text.strip()) <= 4:
        raise invalid(_source_problem(text))
    return text


# The schema of a profile file (profiles/README.md). Messages: :func:`_problem`.
Text = Annotated[str, AfterValidator(_nonblank)]
Source = Annotated[str, AfterValidator(_source)]


def _figure(name: str) -> Any:
    """A figure's bounds: positive, finite, at most ``MAXIMA[name]``."""
    if NUMERIC_FIELDS[name] is int:
        return Field(gt=0, le=MAXIMA[name])
    return Field(gt=0, le=MAXIMA[name], allow_inf_nan=False)


class Sources(Strict):
    """``[sources]``: one tagged source per figure, and nothing else."""

    memory_total_gib: Source
    app_memory_gib: Source
    cpu_cores: Source
    sustained_gflops: Source
    memory_bandwidth_gbs: Source
    network_up_mbps: Source
    network_down_mbps: Source
    availability: Source


class ProfileFile(Strict):
    """A profile file as written. Fields are checked in this order (the first problem is reported): the
    strings, the figures, then the lists and tables."""

    name: Text
    kind: Kind
    notes: Text = ""
    memory_total_gib: float = _figure("memory_total_gib")
    app_memory_gib: float = _figure("app_memory_gib")
    cpu_cores: int = _figure("cpu_cores")
    sustained_gflops: float = _figure("sustained_gflops")
    memory_bandwidth_gbs: float = _figure("memory_bandwidth_gbs")
    network_up_mbps: float = _figure("network_up_mbps")
    network_down_mbps: float = _figure("network_down_mbps")
    availability: float = _figure("availability")
    runtimes: Annotated[list[Runtime], Field(min_length=1), AfterValidator(_distinct)]
    sources: Sources

    @field_validator("app_memory_gib")
    @classmethod
    def _within_total(cls, value: float, info: ValidationInfo) -> float:
        total = info.data.get("memory_total_gib")
        if total is not None and value > total:
            raise invalid(f"must be at most memory_total_gib ({float(total)}), got {float(value)}")
        return value
