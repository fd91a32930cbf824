"""Edge packages on disk: the one module that writes them and the one function that opens them.

Layout (every path relative to the package root ``PKG/``; ``docs/package-format.md`` has the manifest)::

    manifest.json
    executorch/foundation.ptd            frozen weights shared by every rank's ExecuTorch programs
    executorch/rank-<r>/inference.pte    XNNPACK inference program (LoRA weights inside)
    executorch/rank-<r>/training.pte     training program (its trainable parameters: the LoRA tensors)
    onnx/foundation.data                 frozen weights shared by every rank's ONNX models (external data)
    onnx/rank-<r>/                       ORT training artifacts: training_model.onnx, eval_model.onnx,
                                         optimizer_model.onnx, checkpoint (LoRA tensors only)
    adapters/rank-<r>/                   the rank's initial LoRA weights as a PEFT adapter directory

Writing goes through :func:`write_package`: stages put their files into a temporary directory that
:class:`PackageWriter` lays out, :meth:`PackageWriter.finish` hashes every file into the manifest, and the
directory is renamed into place only when the block succeeds (nothing is left behind on failure).
:func:`open_package` checks the manifest and the sha256 of every file before anyone runs a program.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.atomic import atomic_dir
from lorafleet.export.formats.errors import PackageError
from lorafleet.export.formats.manifest import (
    FORMAT_VERSION,
    KIND_RUNTIME,
    KINDS,
    MANIFEST_FILE,
    Estimates,
    FileEntry,
    Manifest,
    ModelSection,
    RankArtifacts,
    manifest_from_json,
)

if TYPE_CHECKING:
    from lorafleet.export.formats.adapter import Adapter

EXECUTORCH_FOUNDATION = "executorch/foundation.ptd"
ONNX_FOUNDATION = "onnx/foundation.data"


def rank_paths(r: int) -> dict[str, str]:
    """The relative path of each kind of artifact of rank ``r``."""
    return {
        "executorch_inference": f"executorch/rank-{r}/inference.pte",
        "executorch_training": f"executorch/rank-{r}/training.pte",
        "onnx_training": f"onnx/rank-{r}",
        "adapter": f"adapters/rank-{r}",
    }


def _rank_dirs(r: int) -> tuple[str, ...]:
    """Directories whose files belong to rank ``r`` alone."""
    return (f"executorch/rank-{r}/", f"onnx/rank-{r}/", f"adapters/rank-{r}/")


# --- opening --------------------------------------------------------------------------------------------

@dataclass
class Package:
    """An opened, checked edge package."""

    path: Path
    manifest: Manifest

    @property
    def ranks(self) -> list[int]:
        return list(self.manifest.ranks)

    def path_of(self, rank: int, kind: str) -> Path:
        """Absolute path of ``kind`` (one of :data:`lorafleet.export.formats.manifest.KINDS`) for ``rank``."""
        if kind not in KINDS:
            raise PackageError(f"unknown artifact kind {kind!r} (known: {', '.join(KINDS)})")
        rel = getattr(self.manifest.rank(rank), kind)
        if rel is None:
            raise PackageError(f"{self.path}: rank {rank} has no {kind} "
                               f"(the package was exported for runtimes {self.manifest.runtimes})")
        return self.path / rel

    def foundation(self, runtime: str) -> Path | None:
        """The shared frozen-weights file of ``runtime`` ("executorch" or "onnx"), if the package has one."""
        rel = {"executorch": self.manifest.executorch_foundation, "onnx": self.manifest.onnx_foundation}.get(runtime)
        return None if rel is None else self.path / rel

    def initial_adapter(self, rank: int) -> Adapter:
        """The rank's initial LoRA weights (PEFT init, or the ``--adapter`` truncated to ``rank``)."""
        from lorafleet.export.formats.adapter import read_adapter

        return read_adapter(self.path_of(rank, "adapter"))

    def files_for(self, rank: int, runtime: str | None = None) -> list[str]:
        """Relative paths a device needs for ``rank`` (and only ``runtime``'s programs, if given)."""
        art = self.manifest.rank(rank)
        wanted = []
        for kind in KINDS:
            rel = getattr(art, kind)
            if rel is None or (runtime is not None and KIND_RUNTIME[kind] not in (None, runtime)):
                continue
            wanted += [f for f in art.files if f == rel or f.startswith(rel.rstrip("/") + "/")]
        for rt in ([runtime] if runtime else self.manifest.runtimes):
            found = self.foundation(rt)
            if found is not None:
                wanted.append(str(found.relative_to(self.path)))
        return sorted(set(wanted))


def open_package(path: str | Path, *, verify: bool = True, ranks: Iterable[int] | None = None) -> Package:
    """Open the package at ``path``: parse and validate its manifest and check every file's size and sha256.

    ``ranks`` limits the file check to those ranks' files plus the shared ones (a device that downloaded
    a single rank). Raises :class:`PackageError` on a missing manifest, a missing file or a mismatch — of a
    file's hash, or of a rank's packaged adapter with the manifest's LoRA settings.
    """
    root = Path(path)
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise PackageError(f"{root} is not an edge package (no {MANIFEST_FILE})")
    manifest = manifest_from_json(mpath.read_text(), str(mpath))
    if verify:
        files = dict(manifest.shared_files)
        for r in (manifest.ranks if ranks is None else list(ranks)):
            files.update(manifest.rank(r).files)
        for rel, entry in sorted(files.items()):
            _check_file(root, rel, entry)
        for r in (manifest.ranks if ranks is None else list(ranks)):
            _check_adapter_config(root, manifest, r)
    return Package(root, manifest)


def _check_adapter_config(root: Path, m: Manifest, r: int) -> None:
    """The rank's packaged adapter must state the manifest's rank, ``lora_alpha``, rsLoRA and targets."""
    import json

    path = root / m.rank(r).adapter / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PackageError(f"{root}: {path.relative_to(root)} is unreadable ({exc})") from None
    got = (cfg.get("r"), cfg.get("lora_alpha"), bool(cfg.get("use_rslora", False)),
           sorted(cfg.get("target_modules") or []))
    want = (r, m.lora_alpha, m.use_rslora, sorted(m.target_modules))
    if got[0] != want[0] or not isinstance(got[1], int | float) or float(got[1]) != want[1] or got[2:] != want[2:]:
        raise PackageError(f"{root}: rank {r}'s adapter says r, lora_alpha, rsLoRA, targets = {got}, the manifest "
                           f"{want}: the package was changed after export")


def _check_file(root: Path, rel: str, entry: FileEntry) -> None:
    p = root / rel
    if not p.is_file():
        raise PackageError(f"{root}: file {rel} listed in the manifest is missing")
    size = p.stat().st_size
    if size != entry.size:
        raise PackageError(f"{root}: file {rel} has {size} bytes, the manifest says {entry.size}")
    digest = sha256_file(p)
    if digest != entry.sha256:
        raise PackageError(f"{root}: file {rel} is corrupt (sha256 {digest[:12]}..., manifest {entry.sha256[:12]}...)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --- writing --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackageSpec:
    """What every rank of a package shares (the manifest's header)."""

    model: ModelSection
    target_modules: list[str]
    lora_alpha: float
    seq_len: int
    batch_size: int
    runtimes: list[str]
    quantize: str = "none"
    onnx_labels: str = "unshifted"
    use_rslora: bool = False
    quantization: dict[str, Any] = field(default_factory=dict)  # the compiler's record of a quantized base


@dataclass(frozen=True)
class RankRecord:
    """What the pipeline knows about one rank before its files are hashed."""

    r: int
    trainable_parameters: int
    estimates: Estimates


@dataclass
class PackageWriter:
    """Lays out a package inside a staging directory; :meth:`finish` writes the manifest."""

    root: Path
    manifest: Manifest | None = field(default=None, init=False)

    def path(self, rank: int, kind: str) -> Path:
        """Where a stage writes ``kind`` of ``rank`` (a file or a directory; its parent is created)."""
        p = self.root / rank_paths(rank)[kind]
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def foundation(self, runtime: str) -> Path:
        """Where a stage writes ``runtime``'s shared frozen-weights file."""
        p = self.root / {"executorch": EXECUTORCH_FOUNDATION, "onnx": ONNX_FOUNDATION}[runtime]
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def finish(self, spec: PackageSpec, ranks: list[RankRecord], verification: dict[str, Any]) -> Manifest:
        """Hash every staged file and write ``manifest.json``; returns the manifest."""
        files = {str(p.relative_to(self.root)): p for p in sorted(self.root.rglob("*")) if p.is_file()}
        files.pop(MANIFEST_FILE, None)
        entries = {rel: FileEntry(p.stat().st_size, sha256_file(p)) for rel, p in files.items()}
        artifacts: dict[str, RankArtifacts] = {}
        owned: set[str] = set()
        for rec in ranks:
            mine = {rel: e for rel, e in entries.items() if rel.startswith(_rank_dirs(rec.r))}
            owned |= set(mine)
            paths: dict[str, str | None] = dict(rank_paths(rec.r))
            for kind, rel in paths.items():
                if rel is not None and not any(f == rel or f.startswith(rel + "/") for f in mine):
                    paths[kind] = None
            artifacts[str(rec.r)] = RankArtifacts(
                r=rec.r, adapter=paths["adapter"] or "", executorch_inference=paths["executorch_inference"],
                executorch_training=paths["executorch_training"], onnx_training=paths["onnx_training"],
                trainable_parameters=rec.trainable_parameters, size_bytes=sum(e.size for e in mine.values()),
                estimates=rec.estimates, files=mine)
        shared = {rel: e for rel, e in entries.items() if rel not in owned}
        manifest = Manifest(
            format_version=FORMAT_VERSION, model=spec.model, target_modules=list(spec.target_modules),
            lora_alpha=spec.lora_alpha, use_rslora=spec.use_rslora, seq_len=spec.seq_len,
            batch_size=spec.batch_size, runtimes=list(spec.runtimes), quantize=spec.quantize,
            quantization=dict(spec.quantization), onnx_labels=spec.onnx_labels,
            executorch_foundation=EXECUTORCH_FOUNDATION if EXECUTORCH_FOUNDATION in shared else None,
            onnx_foundation=ONNX_FOUNDATION if ONNX_FOUNDATION in shared else None,
            ranks=[rec.r for rec in ranks], artifacts=artifacts, shared_files=shared,
            verification=verification, created_by=_created_by())
        text = manifest.to_json()
        manifest_from_json(text, "the manifest being written")  # never write one we could not read back
        (self.root / MANIFEST_FILE).write_text(text)
        _chmod_like_mkdir(self.root)
        self.manifest = manifest
        return manifest


@contextmanager
def write_package(out: str | Path, *, overwrite: bool = False) -> Iterator[PackageWriter]:
    """Stage a package for ``out``; it appears there only if the block ends after :meth:`PackageWriter.finish`.

    Raises :class:`PackageError` before any work if ``out`` exists (without ``overwrite``) or its parent
    cannot be written.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise PackageError(f"output {out} already exists (use --force to replace it)")
    if out.exists() and not (out / MANIFEST_FILE).is_file():
        raise PackageError(f"output {out} exists and is not an edge package; refusing to replace it")
    created = _missing_ancestor(out.parent)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            writer = PackageWriter(tmp)
            yield writer
            if writer.manifest is None:
                raise PackageError("internal error: the package was staged but never finished")
    except BaseException:
        _remove_empty_dirs(created, stop=out.parent)
        raise


def _missing_ancestor(d: Path) -> Path | None:
    """The highest ancestor of ``d`` (or ``d``) that does not exist yet: what ``mkdir -p`` would create."""
    missing = None
    for p in [d, *d.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _remove_empty_dirs(top: Path | None, stop: Path) -> None:
    """Undo ``mkdir -p``: remove ``stop`` and its parents up to ``top`` while they are empty."""
    if top is None:
        return
    for p in [stop, *stop.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


def _chmod_like_mkdir(path: Path) -> None:
    """Staged files may be private (``mkdtemp``, ``mkstemp``); give them a plain ``mkdir`` / ``open`` mode."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for p in path.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _created_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lorafleet {version('lorafleet')}"
    except PackageNotFoundError:
        return "lorafleet"
