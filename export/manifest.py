"""The edge-package manifest (``PKG/manifest.json``): dataclasses, JSON round trip and validation.

The manifest is the contract between the exporter, the devices and the server: it names the foundation
model, the LoRA configuration every rank shares (``target_modules``, ``lora_alpha``), the fixed training
shape (``batch_size`` × ``seq_len``), and for each rank the relative paths of its programs plus the size and
sha256 of every file. ``docs/package-format.md`` shows the exact JSON. This module only *describes*
packages; :mod:`export.package` is the one module that writes or opens them.

Reading never trusts the file: every field is type-checked and bounded (:data:`LIMITS`), every path must
stay inside the package (no absolute paths, no ``..``), and ``manifest_sha256`` — the sha256 of the rest of
the manifest in canonical JSON (sorted keys, no spaces) — must match, so an edited manifest is detected
(the file hashes it lists cover every other file). What the programs themselves fix (rank, ``lora_alpha``,
rsLoRA, target modules, the input shape) is cross-checked against the manifest when a program is loaded
(:func:`check_compiled`). Violations raise :class:`PackageError` naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

from export.errors import PackageError

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
            raise PackageError(f"file size must be a non-negative integer, got {self.size!r}")
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64
                and all(c in "0123456789abcdef" for c in self.sha256)):
            raise PackageError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")


@dataclass(frozen=True)
class ModelSection:
    """The foundation model the package was compiled from (see :class:`export.models.ModelInfo`)."""

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
    module_shapes: dict[str, list[int]]  # target name -> [out, in]


@dataclass(frozen=True)
class Estimates:
    """Per-rank training cost estimates for one step of ``batch_size`` × ``seq_len`` tokens.

    Computed by :mod:`export.estimates` from the LoRA training-memory formula (DEVICES.md §3b) at the
    package's precision; ``memory_breakdown`` holds its terms in bytes.
    """

    training_peak_memory_bytes: int
    flops_per_step: int
    memory_breakdown: dict[str, int] = field(default_factory=dict)


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
    r = _Reader(data, origin)
    version = r.int_("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"{origin}: format_version {version} is not supported (this lorafleet reads "
                           f"{FORMAT_VERSION}); re-export the package")
    ranks = r.list_("ranks", int)
    artifacts_raw = r.dict_("artifacts")
    if sorted(artifacts_raw) != sorted(str(x) for x in ranks):
        raise PackageError(f"{origin}: artifacts keys {sorted(artifacts_raw)} do not match ranks {ranks}")
    m = Manifest(
        format_version=version,
        model=_model_section(r.dict_("model"), f"{origin}: model"),
        target_modules=r.list_("target_modules", str),
        lora_alpha=r.number_("lora_alpha"),
        use_rslora=r.bool_("use_rslora"),
        seq_len=r.int_("seq_len"),
        batch_size=r.int_("batch_size"),
        runtimes=r.list_("runtimes", str),
        quantize=r.str_("quantize"),
        onnx_labels=r.str_("onnx_labels"),
        executorch_foundation=r.path_("executorch_foundation", optional=True),
        onnx_foundation=r.path_("onnx_foundation", optional=True),
        ranks=ranks,
        artifacts={k: _rank_artifacts(v, f"{origin}: artifacts.{k}") for k, v in artifacts_raw.items()},
        shared_files=_files(r.dict_("shared_files"), f"{origin}: shared_files"),
        verification=r.dict_("verification"),
        created_by=str(data.get("created_by", "lorafleet")),
        manifest_sha256=r.str_(DIGEST_FIELD),
    )
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


@dataclass(frozen=True)
class Compiled:
    """What a loaded program says about itself (its LoRA settings and its fixed input shape)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    input_shape: tuple[int, ...]


def check_compiled(m: Manifest, rank: int, artifact: str, compiled: Compiled) -> None:
    """Raise :class:`PackageError` unless the program agrees with the manifest on what it computes with.

    A manifest that says ``lora_alpha`` 32 over a program compiled at 16 would train at one scaling and write
    adapters at the other: the program is what runs, so a disagreement is refused, not reconciled.
    """
    want = Compiled(rank, m.lora_alpha, m.use_rslora, tuple(sorted(m.target_modules)),
                    (m.batch_size, m.seq_len) if artifact != "executorch_inference" else (1, m.seq_len))
    got = Compiled(compiled.r, float(compiled.lora_alpha), compiled.use_rslora,
                   tuple(sorted(compiled.target_modules)), tuple(compiled.input_shape))
    for name in ("r", "lora_alpha", "use_rslora", "target_modules", "input_shape"):
        if getattr(got, name) != getattr(want, name):
            raise PackageError(f"rank {rank} {artifact}: the program was compiled with {name} "
                               f"{getattr(got, name)!r}, the manifest says {getattr(want, name)!r}: the "
                               f"manifest or the program was changed after export; re-export the package")


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


# --- field readers --------------------------------------------------------------------------------------

class _Reader:
    """Typed access to a JSON object; every failure names ``origin`` and the field."""

    def __init__(self, data: dict[str, Any], origin: str):
        self.data, self.origin = data, origin

    def _get(self, key: str, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise PackageError(f"{self.origin}: missing field {key!r}")
        return self.data[key]

    def _fail(self, key: str, what: str) -> PackageError:
        return PackageError(f"{self.origin}: field {key!r} must be {what}, got {self.data.get(key)!r}")

    def int_(self, key: str) -> int:
        v = self._get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self._fail(key, "an integer")
        return v

    def number_(self, key: str) -> float:
        v = self._get(key)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise self._fail(key, "a number")
        return float(v)

    def bool_(self, key: str) -> bool:
        v = self._get(key)
        if not isinstance(v, bool):
            raise self._fail(key, "true or false")
        return v

    def str_(self, key: str) -> str:
        v = self._get(key)
        if not isinstance(v, str):
            raise self._fail(key, "a string")
        return v

    def dict_(self, key: str) -> dict[str, Any]:
        v = self._get(key)
        if not isinstance(v, dict):
            raise self._fail(key, "an object")
        return v

    def list_(self, key: str, item: type) -> list[Any]:
        v = self._get(key)
        if not isinstance(v, list) or not all(isinstance(x, item) and not isinstance(x, bool) for x in v):
            raise self._fail(key, f"a list of {item.__name__}")
        return v

    def path_(self, key: str, optional: bool = False) -> str | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise self._fail(key, "a relative path")
        return check_relative_path(v, f"{self.origin}: {key}")


def check_relative_path(p: str, where: str) -> str:
    """``p`` if it is a relative POSIX path inside the package (no ``..``, not absolute)."""
    pp = PurePosixPath(p)
    if not p or pp.is_absolute() or ".." in pp.parts or "\\" in p:
        raise PackageError(f"{where}: path {p!r} must be relative and stay inside the package")
    return p


def _model_section(d: dict[str, Any], origin: str) -> ModelSection:
    r = _Reader(d, origin)
    shapes = r.dict_("module_shapes")
    for k, v in shapes.items():
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)):
            raise PackageError(f"{origin}: module_shapes.{k} must be [out, in], got {v!r}")
    return ModelSection(
        spec=r.str_("spec"), architecture=r.str_("architecture"), model_type=r.str_("model_type"),
        num_layers=r.int_("num_layers"), hidden_size=r.int_("hidden_size"),
        intermediate_size=r.int_("intermediate_size"), num_attention_heads=r.int_("num_attention_heads"),
        num_key_value_heads=r.int_("num_key_value_heads"), vocab_size=r.int_("vocab_size"),
        num_parameters=r.int_("num_parameters"), module_shapes=shapes,
    )


def _rank_artifacts(d: Any, origin: str) -> RankArtifacts:
    if not isinstance(d, dict):
        raise PackageError(f"{origin} must be an object")
    r = _Reader(d, origin)
    est = _Reader(r.dict_("estimates"), f"{origin}.estimates")
    breakdown = est.data.get("memory_breakdown", {})
    if not isinstance(breakdown, dict) or not all(isinstance(v, int) for v in breakdown.values()):
        raise PackageError(f"{origin}.estimates: memory_breakdown must map names to integers")
    for key in ("trainable_parameters", "size_bytes"):
        _bounded(origin, key, r.int_(key), 0, LIMITS["bytes"])
    _bounded(f"{origin}.estimates", "training_peak_memory_bytes", est.int_("training_peak_memory_bytes"), 0,
             LIMITS["bytes"])
    _bounded(f"{origin}.estimates", "flops_per_step", est.int_("flops_per_step"), 0, LIMITS["flops"])
    return RankArtifacts(
        r=r.int_("r"),
        adapter=r.path_("adapter") or "",
        executorch_inference=r.path_("executorch_inference", optional=True),
        executorch_training=r.path_("executorch_training", optional=True),
        onnx_training=r.path_("onnx_training", optional=True),
        trainable_parameters=r.int_("trainable_parameters"),
        size_bytes=r.int_("size_bytes"),
        estimates=Estimates(est.int_("training_peak_memory_bytes"), est.int_("flops_per_step"), breakdown),
        files=_files(r.dict_("files"), f"{origin}.files"),
    )


def _files(d: dict[str, Any], origin: str) -> dict[str, FileEntry]:
    out = {}
    for name, entry in d.items():
        check_relative_path(name, origin)
        if not isinstance(entry, dict) or set(entry) != {"size", "sha256"}:
            raise PackageError(f"{origin}: entry {name!r} must be {{'size': int, 'sha256': hex}}")
        try:
            out[name] = FileEntry(entry["size"], entry["sha256"])
        except PackageError as exc:
            raise PackageError(f"{origin}: entry {name!r}: {exc}") from None
    return out
