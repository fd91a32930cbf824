"""The edge-package manifest (``PKG/manifest.json``): dataclasses, JSON round trip and validation.

The manifest is the contract between the exporter, the devices and the server: it names the foundation
model, the LoRA configuration every rank shares (``target_modules``, ``lora_alpha``), the fixed training
shape (``batch_size`` × ``seq_len``), and for each rank the relative paths of its programs plus the size and
sha256 of every file. ``docs/package-format.md`` shows the exact JSON. This module only *describes*
packages; :mod:`lorafleet.export.formats.package` is the one module that writes or opens them.

Reading never trusts the file: every field is checked against strict pydantic models (a bool is not a
number, nor is a string) and bounded (:data:`LIMITS`), every path must stay inside the package (no absolute
paths, no ``..``), and ``manifest_sha256`` — the sha256 of the rest of the manifest in canonical JSON (sorted
keys, no spaces) — must match, so an edited manifest is detected (the file hashes it lists cover every other
file). What the programs themselves fix (rank, ``lora_alpha``, rsLoRA, target modules, the input shape) is
cross-checked against the manifest when a program is loaded
(:func:`lorafleet.export.formats.program.check_compiled`). Violations raise :class:`PackageError` naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePosixPath
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from lorafleet.export.formats.errors import PackageError
from lorafleet.export.formats.schema import OWN, Problem, Strict, invalid, validate

FORMAT_VERSION = 2  # 2: manifest_sha256, programs that state their own LoRA settings
MANIFEST_FILE = "manifest.json"
DIGEST_FIELD = "manifest_sha256"
# The largest value each field may take: anything larger is an edited or corrupt manifest, not a model.
LIMITS = {"seq_len": 1 << 17, "batch_size": 1 << 12, "rank": 1 << 14, "lora_alpha": 1e6, "num_layers": 1 << 10,
          "dimension": 1 << 20, "vocab_size": 1 << 22, "num_parameters": 1 << 40, "bytes": 1 << 50,
          "flops": 1 << 70}
RUNTIMES = ("executorch", "onnx")
# What a rank can hold; ``Package.path_of(rank, kind)`` takes one of these.
KINDS = ("executorch_inference", "executorch_training", "onnx_training", "adapter")
KIND_RUNTIME = {"executorch_inference": "executorch", "executorch_training": "executorch",
                "onnx_training": "onnx", "adapter": None}
# ONNX training programs take labels (B, T) and shift inside, as Hugging Face's causal-LM loss does.
ONNX_LABELS = ("unshifted", "shifted")


@dataclass(frozen=True)
class FileEntry:
    """One file of the package: its size in bytes and hex sha256."""

    size: int
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 0:
            raise PackageError(_BAD_SIZE.format(self.size))
        if not _is_sha256(self.sha256):
            raise PackageError(_BAD_SHA256.format(self.sha256))


_BAD_SIZE = "file size must be a non-negative integer, got {!r}"
_BAD_SHA256 = "sha256 must be 64 lowercase hex digits, got {!r}"


def _is_sha256(s: object) -> bool:
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


@dataclass(frozen=True)
class ModelSection:
    """The foundation model a package is compiled from: what :func:`lorafleet.export.compiler.models.describe`
    reads off a loaded model, and what the manifest records."""

    spec: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    num_parameters: int
    module_shapes: dict[str, tuple[int, int]]  # target name -> (out, in); JSON [out, in]

    def __post_init__(self) -> None:
        object.__setattr__(self, "module_shapes", {k: (int(v[0]), int(v[1])) for k, v in self.module_shapes.items()})


# How export obtains each runtime's ``Estimates.device_memory``: ExecuTorch stores its memory plan in the program;
# ONNX Runtime plans at run time, so its step is measured (lorafleet.export.compiler.executorch.memory / .onnx.memory)
DEVICE_MEMORY_SOURCE = {"executorch": "read from its program", "onnx": "measured at export"}


@dataclass(frozen=True)
class Estimates:
    """Per-rank training cost estimates for one step of ``batch_size`` × ``seq_len`` tokens.

    Computed by :mod:`lorafleet.export.compiler.estimates` from the LoRA training-memory formula
    (docs/device-sources.md §3b) at the package's precision; ``memory_breakdown`` holds its terms in bytes.
    """

    training_peak_memory_bytes: int
    flops_per_step: int
    memory_breakdown: dict[str, int] = field(default_factory=dict)
    # runtime -> the terms of what that runtime on a device holds while the rank trains (DEVICE_MEMORY_SOURCE: how
    # each runtime's figure is obtained); a runtime not listed has only the formula
    device_memory: dict[str, dict[str, int]] = field(default_factory=dict)

    def device_memory_bytes(self, runtime: str | None = None) -> int:
        """The predicted training peak on a device running ``runtime``: its recorded device memory where the
        package has it (:data:`DEVICE_MEMORY_SOURCE`), else the formula's ``training_peak_memory_bytes``."""
        terms = self.device_memory.get(runtime or "")
        return sum(terms.values()) if terms else self.training_peak_memory_bytes


@dataclass(frozen=True)
class RankArtifacts:
    """Everything one rank adds to the package. Paths are relative to the package root."""

    r: int
    adapter: str  # PEFT adapter directory holding the rank's initial LoRA weights
    executorch_inference: str | None
    executorch_training: str | None
    onnx_training: str | None  # a directory: training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint
    trainable_parameters: int
    size_bytes: int  # sum of this rank's own files (shared foundation files excluded)
    estimates: Estimates
    files: dict[str, FileEntry]


@dataclass(frozen=True)
class Manifest:
    """``PKG/manifest.json``."""

    format_version: int
    model: ModelSection
    target_modules: list[str]
    lora_alpha: float
    use_rslora: bool
    seq_len: int
    batch_size: int
    runtimes: list[str]
    quantize: str
    onnx_labels: str
    executorch_foundation: str | None  # frozen weights shared by every rank's ExecuTorch programs
    onnx_foundation: str | None  # frozen weights shared by every rank's ONNX models (external data)
    ranks: list[int]
    artifacts: dict[str, RankArtifacts]  # keyed by str(rank)
    shared_files: dict[str, FileEntry]  # files no single rank owns (the foundations)
    verification: dict[str, Any]
    created_by: str = "lorafleet"
    quantization: dict[str, Any] = field(default_factory=dict)  # empty for an fp32 base (see compiler.quantize)
    manifest_sha256: str = ""  # set by to_json(): the digest of everything above

    def rank(self, r: int) -> RankArtifacts:
        try:
            return self.artifacts[str(r)]
        except KeyError:
            raise PackageError(f"the package has no rank {r} (ranks: {self.ranks})") from None

    def all_files(self) -> dict[str, FileEntry]:
        """Every file the package lists, shared and per rank."""
        files = dict(self.shared_files)
        for art in self.artifacts.values():
            files.update(art.files)
        return files

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data[DIGEST_FIELD] = manifest_digest(data)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


def manifest_digest(data: dict[str, Any]) -> str:
    """sha256 of the manifest without its digest field, as canonical JSON (sorted keys, compact)."""
    import hashlib

    body = {k: v for k, v in data.items() if k != DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# --- reading --------------------------------------------------------------------------------------------

def manifest_from_json(text: str, origin: str = MANIFEST_FILE) -> Manifest:
    """Parse and validate a manifest. Raises :class:`PackageError` naming the offending field."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{origin} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{origin} must hold a JSON object")
    return manifest_from_dict(data, origin)


def manifest_from_dict(data: dict[str, Any], origin: str = MANIFEST_FILE) -> Manifest:
    """Validate ``data`` (a parsed manifest.json) and build the :class:`Manifest`. The problem reported is the
    first one met, in this order: format_version (an older package is told to re-export, whatever else
    changed), ranks and the keys of artifacts, every other field in the order :class:`_ManifestKeys` declares
    them, the cross-field checks (:func:`validate_manifest`), and last the digest."""
    version = _checked(_VersionKeys, data, origin).format_version
    if version != FORMAT_VERSION:
        raise PackageError(f"{origin}: format_version {version} is not supported (this lorafleet reads "
                           f"{FORMAT_VERSION}); re-export the package")
    index = _checked(_IndexKeys, data, origin)
    if sorted(index.artifacts) != sorted(str(x) for x in index.ranks):
        raise PackageError(f"{origin}: artifacts keys {sorted(index.artifacts)} do not match ranks {index.ranks}")
    m = _checked(_ManifestKeys, data, origin).build()
    validate_manifest(m, origin)
    _check_digest(data, m.manifest_sha256, origin)  # last: a field error names the field, this only says "edited"
    return m


def _check_digest(data: dict[str, Any], digest: str, origin: str) -> None:
    try:
        expected = manifest_digest(data)
    except ValueError:  # NaN or Inf somewhere: no canonical JSON, certainly not an exported manifest
        expected = ""
    if digest != expected:
        raise PackageError(f"{origin} was edited after export (its {DIGEST_FIELD} does not match its content); "
                           f"restore it or re-export the package")


def validate_manifest(m: Manifest, origin: str = MANIFEST_FILE) -> None:
    """Cross-field checks: known runtimes, positive ranks matching their artifacts, paths listed in files."""
    for rt in m.runtimes:
        if rt not in RUNTIMES:
            raise PackageError(f"{origin}: runtimes has unknown runtime {rt!r} (known: {', '.join(RUNTIMES)})")
    if m.onnx_labels not in ONNX_LABELS:
        raise PackageError(f"{origin}: onnx_labels must be one of {ONNX_LABELS}, got {m.onnx_labels!r}")
    if not m.ranks or any(x <= 0 for x in m.ranks) or len(set(m.ranks)) != len(m.ranks):
        raise PackageError(f"{origin}: ranks must be distinct positive integers, got {m.ranks}")
    for r, art in m.artifacts.items():
        for rt in art.estimates.device_memory:
            if rt not in m.runtimes:
                raise PackageError(f"{origin}: artifacts.{r}.estimates.device_memory has runtime {rt!r}, "
                                   f"which the package does not have (runtimes: {', '.join(m.runtimes)})")
    if not m.target_modules:
        raise PackageError(f"{origin}: target_modules is empty")
    _bounded(origin, "seq_len", m.seq_len, 2, LIMITS["seq_len"])
    _bounded(origin, "batch_size", m.batch_size, 1, LIMITS["batch_size"])
    if not (math.isfinite(m.lora_alpha) and 0 < m.lora_alpha <= LIMITS["lora_alpha"]):
        raise PackageError(f"{origin}: lora_alpha must be a positive number at most {LIMITS['lora_alpha']:g}, "
                           f"got {m.lora_alpha}")
    _check_model(m.model, f"{origin}: model")
    unknown = sorted(set(m.target_modules) - set(m.model.module_shapes))
    if unknown:
        raise PackageError(f"{origin}: target_modules {unknown} are not among model.module_shapes "
                           f"{sorted(m.model.module_shapes)}")
    smallest = min(min(m.model.module_shapes[t]) for t in m.target_modules)
    for x in m.ranks:
        _bounded(origin, "ranks", x, 1, min(LIMITS["rank"], smallest))
    for key, art in m.artifacts.items():
        if str(art.r) != key:
            raise PackageError(f"{origin}: artifacts.{key} says r = {art.r}")
        _check_rank_paths(m, art, f"{origin}: artifacts.{key}")
    for name, fpath in (("executorch_foundation", m.executorch_foundation), ("onnx_foundation", m.onnx_foundation)):
        if fpath is not None and fpath not in m.shared_files:
            raise PackageError(f"{origin}: {name} {fpath!r} is not listed in shared_files")


def _bounded(origin: str, name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise PackageError(f"{origin}: {name} must be >= {low:g} and <= {high:g}, got {value!r}")


def _check_model(s: ModelSection, origin: str) -> None:
    _bounded(origin, "num_layers", s.num_layers, 1, LIMITS["num_layers"])
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        _bounded(origin, name, getattr(s, name), 1, LIMITS["dimension"])
    _bounded(origin, "vocab_size", s.vocab_size, 1, LIMITS["vocab_size"])
    _bounded(origin, "num_parameters", s.num_parameters, 1, LIMITS["num_parameters"])
    for name, (out, inp) in s.module_shapes.items():
        _bounded(origin, f"module_shapes.{name}", min(out, inp), 1, LIMITS["dimension"])
        _bounded(origin, f"module_shapes.{name}", max(out, inp), 1, LIMITS["dimension"])


def _check_rank_paths(m: Manifest, art: RankArtifacts, where: str) -> None:
    for kind in KINDS:
        p = getattr(art, kind)
        runtime = KIND_RUNTIME[kind]
        if p is None:
            if runtime is None or runtime in m.runtimes:
                raise PackageError(f"{where}: {kind} is missing")
            continue
        prefix = p.rstrip("/") + "/"
        if p not in art.files and not any(f.startswith(prefix) for f in art.files):
            raise PackageError(f"{where}: {kind} path {p!r} is not among the rank's files")


# --- the JSON schema ------------------------------------------------------------------------------------
# Strict pydantic models of manifest.json (``<Section>Keys``; ``build()`` makes the dataclass), checked in
# the steps of manifest_from_dict. Unknown keys are ignored, as they always were (the digest covers them),
# except in a file entry, which is exactly {"size", "sha256"}. Fields are declared in the order problems are
# reported (the order the hand-written reader before them read the file); _line words a problem as this
# module always has, one line naming the field.

class _Keys(Strict):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


K = TypeVar("K", bound=_Keys)
_RANGE = "lorafleet_range"  # the error type of _within; its ctx holds low and high
_BAD_PATH = "path {!r} must be relative and stay inside the package"
_BAD_ENTRY = "must be {'size': int, 'sha256': hex}"


def _outside(p: str) -> bool:
    pp = PurePosixPath(p)
    return not p or pp.is_absolute() or ".." in pp.parts or "\\" in p


def _within(low: int, high: int) -> AfterValidator:
    def check(v: int) -> int:
        if not low <= v <= high:
            raise PydanticCustomError(_RANGE, "must be >= {low} and <= {high}", {"low": low, "high": high})
        return v
    return AfterValidator(check)


def _relative(p: str) -> str:
    if _outside(p):
        raise invalid(_BAD_PATH.format(p))
    return p


def _sha256(s: str) -> str:
    if not _is_sha256(s):
        raise invalid(_BAD_SHA256.format(s))
    return s


def _quantize(s: str) -> str:
    from lorafleet.export.formats.errors import ConfigError
    from lorafleet.export.formats.quantization import Quantization

    try:
        canonical = str(Quantization.parse(s))
    except ConfigError as exc:
        raise invalid(str(exc)) from None
    if canonical != s:
        raise invalid(f"quantize {s!r} is not written canonically (expected {canonical!r})")
    return s


RelPath = Annotated[str, AfterValidator(_relative)]
Quantize = Annotated[str, AfterValidator(_quantize)]
Bytes = Annotated[int, _within(0, LIMITS["bytes"])]
Shape = Annotated[list[int], Field(min_length=2, max_length=2)]  # [out, in]


class _FileKeys(_Keys):
    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, AfterValidator(_sha256)]

    @model_validator(mode="before")
    @classmethod
    def _exactly_size_and_sha256(cls, v: Any) -> Any:
        if not isinstance(v, dict) or set(v) != {"size", "sha256"}:
            raise invalid(_BAD_ENTRY)
        return v

    def build(self) -> FileEntry:
        return FileEntry(self.size, self.sha256)


Files = dict[RelPath, _FileKeys]  # relative path -> entry


class _ModelKeys(_Keys):
    module_shapes: dict[str, Shape]  # first: checked before the rest of the section, as it always was
    spec: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    num_parameters: int

    def build(self) -> ModelSection:
        return ModelSection(**self.model_dump())


class _EstimatesKeys(_Keys):
    memory_breakdown: dict[str, int] = Field(default_factory=dict)
    training_peak_memory_bytes: Bytes
    flops_per_step: Annotated[int, _within(0, LIMITS["flops"])]
    device_memory: dict[str, dict[str, Bytes]] = Field(default_factory=dict)

    def build(self) -> Estimates:
        return Estimates(self.training_peak_memory_bytes, self.flops_per_step, dict(self.memory_breakdown),
                         {k: dict(v) for k, v in self.device_memory.items()})


class _RankKeys(_Keys):
    estimates: _EstimatesKeys
    trainable_parameters: Bytes
    size_bytes: Bytes
    r: int
    adapter: RelPath
    executorch_inference: RelPath | None = None
    executorch_training: RelPath | None = None
    onnx_training: RelPath | None = None
    files: Files

    def build(self) -> RankArtifacts:
        return RankArtifacts(
            r=self.r, adapter=self.adapter, executorch_inference=self.executorch_inference,
            executorch_training=self.executorch_training, onnx_training=self.onnx_training,
            trainable_parameters=self.trainable_parameters, size_bytes=self.size_bytes,
            estimates=self.estimates.build(), files={n: e.build() for n, e in self.files.items()})


class _VersionKeys(_Keys):
    format_version: int


class _IndexKeys(_Keys):
    ranks: list[int]
    artifacts: dict[str, Any]


class _ManifestKeys(_Keys):
    format_version: int
    ranks: list[int]
    model: _ModelKeys
    target_modules: list[str]
    lora_alpha: float  # an int is taken too (as a float), a bool is not
    use_rslora: bool
    seq_len: int
    batch_size: int
    runtimes: list[str]
    quantize: Quantize
    onnx_labels: str
    executorch_foundation: RelPath | None = None
    onnx_foundation: RelPath | None = None
    artifacts: dict[str, _RankKeys]
    shared_files: Files
    verification: dict[str, Any]
    created_by: Any = "lorafleet"  # informative only: taken as its str(), as it always was
    quantization: dict[str, Any] = {}
    manifest_sha256: str

    def build(self) -> Manifest:
        return Manifest(
            format_version=self.format_version, model=self.model.build(), target_modules=list(self.target_modules),
            lora_alpha=float(self.lora_alpha), use_rslora=self.use_rslora, seq_len=self.seq_len,
            batch_size=self.batch_size, runtimes=list(self.runtimes), quantize=self.quantize,
            onnx_labels=self.onnx_labels, executorch_foundation=self.executorch_foundation,
            onnx_foundation=self.onnx_foundation, ranks=list(self.ranks),
            artifacts={k: a.build() for k, a in self.artifacts.items()},
            shared_files={n: e.build() for n, e in self.shared_files.items()}, verification=dict(self.verification),
            created_by=str(self.created_by), quantization=dict(self.quantization),
            manifest_sha256=self.manifest_sha256)


def _checked(model: type[K], data: Any, origin: str) -> K:
    """``data`` checked against ``model``; the first problem met raises :class:`PackageError` (:func:`_line`)."""
    return validate(model, data, error=PackageError, render=lambda p: _line(p, data, origin), by_depth=False)


# How a wrong value is named: by the field for lists and paths, else by pydantic's error type.
_LIST_OF = {"ranks": "int", "target_modules": "str", "runtimes": "str"}
_PATHS = ("executorch_foundation", "onnx_foundation", *KINDS)
_WHAT = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
         "dict_type": "an object", "model_type": "an object"}


def _split(loc: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], str | int, tuple[str | int, ...]]:
    """``loc`` as (the object holding the field, the field, the place inside the field's value). The objects
    are the manifest, its model section, each artifacts.<r> and its estimates."""
    if loc[0] == "model" and len(loc) > 1:
        return loc[:1], loc[1], loc[2:]
    if loc[0] == "artifacts" and len(loc) > 2:
        if loc[2] == "estimates" and len(loc) > 3:
            return loc[:3], loc[3], loc[4:]
        return loc[:2], loc[2], loc[3:]
    return (), loc[0], loc[1:]


def _value(data: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        data = data.get(step) if isinstance(data, dict) else None
    return data


# Within one rank, the order in which problems are reported, where it is not the models' field order: the
# rank's own sizes come before its estimates' figures (the estimates object itself, and its breakdown, first).
_RANK_ORDER = ("estimates", "memory_breakdown", "device_memory", "trainable_parameters", "size_bytes",
               "training_peak_memory_bytes", "flops_per_step")


def _rank_first(p: Problem) -> Problem:
    """``p``, or if it is in artifacts.<r> the problem of that rank that comes first in :data:`_RANK_ORDER`."""
    if p.loc[:1] != ("artifacts",) or len(p.loc) < 3:
        return p

    def order(e: Any) -> int:
        loc = tuple(e["loc"])
        name = loc[3] if loc[2] == "estimates" and len(loc) > 3 else loc[2]
        return _RANK_ORDER.index(name) if name in _RANK_ORDER else len(_RANK_ORDER)

    e = min((e for e in p.errors if tuple(e["loc"][:2]) == p.loc[:2] and len(e["loc"]) > 2), key=order)
    return replace(p, loc=tuple(e["loc"]), type=e["type"], message=e["msg"], input=e.get("input"),
                   ctx=e.get("ctx") or {})


def _line(p: Problem, data: Any, origin: str) -> str:
    """Problem ``p`` of manifest ``data`` in one line: ``<origin>[: <object>]: field '<name>' must be ...``."""
    if not p.loc:
        return f"{origin} must hold a JSON object"
    p = _rank_first(p)

    def at(path: tuple[str | int, ...]) -> str:
        return f"{origin}: {'.'.join(map(str, path))}" if path else origin

    if p.loc[-1] == "[key]" and p.type != OWN:  # only from a dict built in code: JSON keys are strings
        return f"{at(p.loc[:-2])}: key {p.loc[-2]!r} must be a string"
    holder, key, inside = _split(p.loc)
    where = at(holder)
    if key in ("files", "shared_files") and inside:  # a file table: name -> {size, sha256}
        table, name, part = at((*holder, key)), inside[0], inside[1:]
        if part == ("[key]",):
            return f"{table}: {p.message}"
        if not part:
            return f"{table}: entry {name!r} {_BAD_ENTRY}"
        return f"{table}: entry {name!r}: " + (_BAD_SIZE if part[0] == "size" else _BAD_SHA256).format(p.input)
    if key == "artifacts" and inside:
        return f"{at(('artifacts', inside[0]))} must be an object"
    if key == "module_shapes" and inside:
        return f"{where}: module_shapes.{inside[0]} must be [out, in], got {_value(data, (*holder, key, inside[0]))!r}"
    if key == "memory_breakdown":
        return f"{where}: memory_breakdown must map names to integers"
    if key == "device_memory":
        return f"{where}: device_memory must map runtimes to {{term: bytes}} objects"
    if p.type == "missing":
        return f"{where}: missing field {key!r}"
    if p.type == _RANGE:
        return f"{where}: {key} must be >= {p.ctx['low']:g} and <= {p.ctx['high']:g}, got {p.input!r}"
    if p.type == OWN:  # a path that leaves the package
        return f"{where}: {key}: {p.message}"
    got = _value(data, (*holder, key))
    what = ("a relative path" if key in _PATHS else f"a list of {_LIST_OF[key]}" if key in _LIST_OF
            else _WHAT.get(p.type))
    if what is None:  # no wording of ours: pydantic's
        return f"{where}: field {key!r}: {p.message}, got {got!r}"
    return f"{where}: field {key!r} must be {what}, got {got!r}"


def check_relative_path(p: str, where: str) -> str:
    """``p`` if it is a relative POSIX path inside the package (no ``..``, not absolute)."""
    if _outside(p):
        raise PackageError(f"{where}: {_BAD_PATH.format(p)}")
    return p
