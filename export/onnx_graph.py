"""ONNX graph passes of the ONNX Runtime export: small rewrites on an ``onnx.ModelProto``, each documented.

* :func:`strip_metadata` — drop the exporter's per-node debugging metadata (stack traces, FX names).
* :func:`fold_weight_transposes` — store frozen linear weights pre-transposed, as ORT would fold them.
* :class:`SharedExternalData` — move large initializers of many models into one external-data file,
  each distinct tensor stored once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ALIGNMENT = 64  # byte alignment of each tensor in the shared data file (lets a runtime map it directly)
MIN_EXTERNAL_BYTES = 1024  # smaller initializers (shapes, scalars, norms of tiny models) stay inline


def strip_metadata(model: Any) -> int:
    """Remove ``metadata_props`` and ``doc_string`` from every node; returns how many nodes changed.

    The dynamo exporter records a stack trace and FX node names per node: more bytes than the graph itself
    for a small model, and of no use on a device.
    """
    changed = 0
    for node in model.graph.node:
        if len(node.metadata_props) or node.doc_string:
            del node.metadata_props[:]
            node.doc_string = ""
            changed += 1
    return changed


def fold_weight_transposes(model: Any, weights: Iterable[str]) -> int:
    """Replace ``Transpose(W)`` of a 2-D initializer ``W`` in ``weights`` by a stored ``W.T``.

    Before::   W (out, in) ──Transpose(perm=[1, 0])──> t ──MatMul(x, t)
    After::    W.T (in, out) ─────────────────────────────MatMul(x, W.T)

    ``W`` is dropped when nothing else reads it (a tied embedding keeps both). ONNX Runtime's training
    graph builder makes the same fold on its own, but under anonymous names and only in the training
    graph; folding first gives the training and eval graphs identical tensors, so the shared data file
    holds them once. Returns the number of Transpose nodes removed.
    """
    from onnx import numpy_helper

    candidates = set(weights)
    inits = {t.name: t for t in model.graph.initializer}
    folded: dict[str, str] = {}  # transpose output -> new initializer name
    keep = []
    for node in model.graph.node:
        src = node.input[0] if node.op_type == "Transpose" and node.input else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if src in candidates and src in inits and len(inits[src].dims) == 2 and perm in (None, [1, 0]):
            new_name = f"{src}.T"
            if new_name not in inits:
                arr = np.ascontiguousarray(numpy_helper.to_array(inits[src]).T)
                inits[new_name] = numpy_helper.from_array(arr, new_name)
                model.graph.initializer.append(inits[new_name])
            folded[node.output[0]] = new_name
            continue
        keep.append(node)
    if not folded:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(keep)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in folded:
                node.input[i] = folded[name]
    for out in model.graph.output:
        if out.name in folded:
            raise ValueError(f"cannot fold a Transpose whose result {out.name} is a graph output")
    used = {i for n in model.graph.node for i in n.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for t in unused:
        model.graph.initializer.remove(t)
    return len(folded)


class SharedExternalData:
    """One external-data file that many ONNX models point into; identical tensors are stored once.

    ``externalize(model, model_dir)`` moves each initializer of at least :data:`MIN_EXTERNAL_BYTES` into
    the file (deduplicated by sha256 of its bytes) and rewrites it to an external reference whose
    ``location`` is the file's path relative to ``model_dir``, where the model will be saved.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[int, int]] = {}
        self._size = self.path.stat().st_size if self.path.exists() else 0
        if self._size:
            raise ValueError(f"{self.path} already exists; a shared data file is written in one go")
        self.path.touch()

    @property
    def size(self) -> int:
        return self._size

    def externalize(self, model: Any, model_dir: Path) -> int:
        """Move ``model``'s large initializers into the file; returns the bytes added to it."""
        import os

        from onnx import numpy_helper
        from onnx.external_data_helper import set_external_data

        location = os.path.relpath(self.path, Path(model_dir)).replace(os.sep, "/")
        added = 0
        with open(self.path, "ab") as f:
            for t in model.graph.initializer:
                if t.data_location == 1:  # already external
                    continue
                data = t.raw_data or numpy_helper.to_array(t).tobytes()
                if len(data) < MIN_EXTERNAL_BYTES:
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if digest not in self._index:
                    pad = -self._size % ALIGNMENT
                    f.write(b"\0" * pad)
                    self._index[digest] = (self._size + pad, len(data))
                    f.write(data)
                    self._size += pad + len(data)
                    added += pad + len(data)
                offset, length = self._index[digest]
                _clear_data(t)
                t.raw_data = b"\0"  # set_external_data insists on a raw_data field being present
                set_external_data(t, location=location, offset=offset, length=length)
                t.ClearField("raw_data")
        return added


def _clear_data(t: Any) -> None:
    for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(fld)
