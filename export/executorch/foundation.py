"""One foundation data file (``.ptd``) for every ExecuTorch program of a package.

Each lowered program carries the frozen weights it reads as a FlatTensor blob: named entries (a module
name such as ``model.base_model.model.model.embed_tokens.weight`` for ExecuTorch's own constants, a sha256
of the bytes for XNNPACK-delegated weights) pointing at data segments. The FlatTensor format lets several
names share one segment, so :class:`FoundationStore` merges the blobs of all ranks and of both program kinds,
storing each distinct tensor once: a linear weight read by the inference program's XNNPACK delegate
(sha256 key) and by the training program (module-name key) is one segment with two names.

A name that two programs map to *different* bytes is an error (the programs were not lowered from the same
foundation model).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executorch.exir._serialize._cord import Cord
from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

from export.errors import ExportError
from export.executorch.files import write_atomic

ALIGNMENT = 64  # bytes; XNNPACK and the portable kernels need 16


@dataclass
class _Entry:
    buffer: int  # index into FoundationStore._buffers
    layout: Any  # executorch TensorLayout or None (opaque delegate data)


class FoundationStore:
    """Accumulates foundation blobs; :meth:`write` serializes the union with every distinct tensor once."""

    def __init__(self) -> None:
        self._buffers: list[bytes] = []
        self._by_digest: dict[bytes, int] = {}
        self._entries: dict[str, _Entry] = {}
        self._digests: dict[str, bytes] = {}

    def add(self, blob: bytes | None) -> int:
        """Merge one program's foundation blob; return how many new bytes it contributed (0 for a repeat)."""
        if blob is None:
            return 0
        payload = FlatTensorSerializer().deserialize(Cord(blob))
        added = 0
        for key, entry in payload.named_data.items():
            data = bytes(payload.buffers[entry.buffer_index])
            digest = hashlib.sha256(data).digest()
            if key in self._entries:
                if self._digests[key] != digest:
                    raise ExportError(f"foundation tensor {key!r} differs between programs "
                                      "(were they lowered from the same model?)")
                continue
            index = self._by_digest.get(digest)
            if index is None:
                index = len(self._buffers)
                self._buffers.append(data)
                self._by_digest[digest] = index
                added += len(data)
            self._entries[key] = _Entry(index, entry.tensor_layout)
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
        return write_atomic(path, cord.write_to_file)
