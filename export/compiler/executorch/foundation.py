"""One foundation data file (``.ptd``) for every ExecuTorch program of a package.

Each lowered program carries the frozen weights it reads as a FlatTensor blob: named entries (a module
name such as ``model.base_model.model.model.embed_tokens.weight`` for ExecuTorch's own constants, a sha256
of the bytes for XNNPACK-delegated weights) pointing at data segments. The FlatTensor format lets several
names share one segment, so :class:`FoundationStore` merges the blobs of all ranks and of both program kinds,
storing each distinct tensor once: a linear weight read by the inference program's XNNPACK delegate
(sha256 key) and by the training program (module-name key) is one segment with two names.

A name that two programs map to *different* bytes is an error (the programs were not lowered from the same
foundation model).

:meth:`FoundationStore.add_file` takes a program's data file on disk and keeps only references to its segments
(the file is deleted at once when it adds nothing new): a 1B-parameter model's frozen weights are then read from
disk when the merged file is written, never held in memory.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executorch.exir._serialize._cord import Cord, FileBackedData
from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
from executorch.extension.flat_tensor.serialize.serialize import (
    FlatTensorHeader,
    FlatTensorSerializer,
    _deserialize_to_flat_tensor,
)

from lorafleet.export.formats.atomic import atomic_write
from lorafleet.export.formats.errors import ExportError

ALIGNMENT = 64  # bytes; XNNPACK and the portable kernels need 16


@dataclass
class _Entry:
    buffer: int  # index into FoundationStore._buffers
    layout: Any  # executorch TensorLayout or None (opaque delegate data)


class FileSlice(FileBackedData):
    """``size`` bytes of a file from ``offset``, for a :class:`Cord`: written by copying, never loaded whole."""

    def __init__(self, path: str | Path, offset: int, size: int) -> None:
        super().__init__(str(path))
        self._offset, self._size = offset, size
        self._digest: bytes | None = None

    def _chunks(self) -> Any:
        with open(self._path, "rb") as f:
            f.seek(self._offset)
            left = self._size
            while left:
                chunk = f.read(min(left, self._COPY_CHUNK_SIZE))
                if not chunk:
                    raise ExportError(f"{self._path} is shorter than its data segments say")
                left -= len(chunk)
                yield chunk

    def prefix(self, size: int) -> bytes:
        with open(self._path, "rb") as f:
            f.seek(self._offset)
            return f.read(min(size, self._size))

    def sha256(self) -> bytes:
        if self._digest is None:
            digest = hashlib.sha256()
            for chunk in self._chunks():
                digest.update(chunk)
            self._digest = digest.digest()
        return self._digest

    def to_bytes(self) -> bytes:
        return b"".join(self._chunks())

    def write_to_file(self, outfile: io.BufferedIOBase) -> None:
        for chunk in self._chunks():
            outfile.write(chunk)


class FoundationStore:
    """Accumulates foundation blobs; :meth:`write` serializes the union with every distinct tensor once."""

    def __init__(self) -> None:
        self._buffers: list[bytes | FileSlice] = []
        self._by_digest: dict[bytes, int] = {}
        self._entries: dict[str, _Entry] = {}
        self._digests: dict[str, bytes] = {}

    def add(self, blob: bytes | None) -> int:
        """Merge one program's foundation blob; return how many new bytes it contributed (0 for a repeat)."""
        if blob is None:
            return 0
        payload = FlatTensorSerializer().deserialize(Cord(blob))
        segments = [bytes(b) for b in payload.buffers]
        digests = [hashlib.sha256(b).digest() for b in segments]
        layouts = {k: (e.buffer_index, e.tensor_layout) for k, e in payload.named_data.items()}
        return self._merge(layouts, segments, digests)

    def add_file(self, path: str | Path) -> int:
        """Merge one program's foundation data file, keeping references to it; return the new bytes it holds.

        The file must stay where it is until :meth:`write`; one that adds nothing new is deleted now.
        """
        path = Path(path)
        with open(path, "rb") as f:
            head = f.read(8 + FlatTensorHeader.EXPECTED_LENGTH)
            header = FlatTensorHeader.from_bytes(head[8:])
            if not header.is_valid():
                raise ExportError(f"{path} is not an ExecuTorch data file (bad FlatTensor header)")
            f.seek(0)
            flat = _deserialize_to_flat_tensor(f.read(header.flatbuffer_offset + header.flatbuffer_size))
        segments = [FileSlice(path, header.segment_base_offset + seg.offset, seg.size) for seg in flat.segments]
        digests = [seg.sha256() for seg in segments]
        layouts = {n.key: (n.segment_index, n.tensor_layout) for n in flat.named_data}
        added = self._merge(layouts, segments, digests)
        if not any(isinstance(b, FileSlice) and Path(b._path) == path for b in self._buffers):
            path.unlink()
        return added

    def _merge(self, layouts: dict[str, tuple[int, Any]], segments: list[Any], digests: list[bytes]) -> int:
        added = 0
        for key, (index_in_blob, layout) in layouts.items():
            digest = digests[index_in_blob]
            if key in self._entries:
                if self._digests[key] != digest:
                    raise ExportError(f"foundation tensor {key!r} differs between programs "
                                      "(were they lowered from the same model?)")
                continue
            index = self._by_digest.get(digest)
            if index is None:
                index = len(self._buffers)
                self._buffers.append(segments[index_in_blob])
                self._by_digest[digest] = index
                added += len(segments[index_in_blob])
            self._entries[key] = _Entry(index, layout)
            self._digests[key] = digest
        return added

    @property
    def keys(self) -> set[str]:
        return set(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (each distinct tensor counted once)."""
        return sum(len(b) for b in self._buffers)

    def write(self, path: str | Path) -> Path:
        """Write the merged ``.ptd`` atomically."""
        if not self._entries:
            raise ExportError("no foundation data to write (add the lowered programs first)")
        payload = DataPayload(
            buffers=self._buffers,
            named_data={k: DataEntry(e.buffer, ALIGNMENT, e.layout) for k, e in self._entries.items()},
        )
        cord = FlatTensorSerializer().serialize(payload)
        return atomic_write(path, cord.write_to_file)
