"""ONNX graph passes of the ONNX Runtime export, on the exporter's ``onnx_ir.Model`` (before protobuf).

Working on the IR keeps the frozen weights as the exporter's zero-copy views of the torch parameters until
each is written, once, to the shared data file: memory stays near one model copy, and the protobuf handed to
ORT's artifact builder holds only references (it would otherwise be a full copy, over protobuf's 2 GB
limit for 1B-class models).

* :func:`strip_metadata` — drop the exporter's per-node debugging metadata (stack traces, FX names).
* :func:`fold_weight_transposes` — store frozen linear weights pre-transposed, as ORT would fold them.
* :func:`gather_from_transposed` — a tied embedding's lookup reads the transposed copy (one copy stored).
* :func:`sequence_splits_to_split` — ``SplitToSequence`` read by constant ``SequenceAt`` becomes one ``Split``
  (``Tensor.chunk``: Phi-3's fused ``gate_up_proj``; ORT's gradient builder does not see through sequences).
* :func:`cast_like_to_cast` — ``CastLike`` with a known target type becomes ``Cast`` (ORT has a gradient for
  one only).
* :class:`SharedExternalData` — move large initializers of many models into one external-data file,
  each distinct tensor stored once.

A quantized base, on the ``onnx.ModelProto`` that ORT's artifact builder wrote
(:mod:`lorafleet.export.compiler.onnx.artifacts`):

* :func:`split_storage_to_slices` — a ``Split`` of stored bytes (the LM head's chunks) becomes a ``Slice`` per
  chunk.
* :func:`lean_dequantizations` — each dequantization becomes ``uint8`` nibble ops, one ``DequantizeLinear``
  and the group scales' ``Mul``, read by the product untransposed.
* :func:`rematerialize_constant_subgraphs` — each dequantization recomputed just before each reader, and tied
  to that reader's activation.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ALIGNMENT = 64  # byte alignment of each tensor in the shared data file (lets a runtime map it directly)
MIN_EXTERNAL_BYTES = 1024  # smaller initializers (shapes, scalars, tiny norms) stay inline


def strip_metadata(model: Any) -> int:
    """Remove ``metadata_props`` and ``doc_string`` from every node; returns how many nodes changed.

    The dynamo exporter records a stack trace and FX node names per node: more bytes than the graph itself
    for a small model, and of no use on a device.
    """
    changed = 0
    for node in model.graph.all_nodes():
        if node.metadata_props or node.doc_string:
            node.metadata_props.clear()
            node.doc_string = None
            changed += 1
    return changed


def fold_weight_transposes(model: Any, weights: set[str]) -> int:
    """Replace ``Transpose(W)`` of a 2-D initializer ``W`` in ``weights`` by a stored ``W.T``.

    Before::   W (out, in) ──Transpose(perm=[1, 0])──> t ──MatMul(x, t)
    After::    W.T (in, out) ─────────────────────────────MatMul(x, W.T)

    ``W`` is dropped when nothing else reads it (a tied embedding keeps both: Gather reads ``W``).
    ``W.T`` is computed lazily, when its bytes are written. ONNX Runtime's training graph builder makes the
    same fold on its own, but under anonymous names and only in the training graph; folding first gives the
    training and eval graphs identical tensors, so the shared data file holds them once, and no step pays
    for a transpose. Returns the number of Transpose nodes removed.
    """
    import onnx_ir as ir

    graph = model.graph
    removed = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        src, out = node.inputs[0], node.outputs[0]
        perm = node.attributes.get("perm")
        if (src is None or src.name not in weights or not src.is_initializer() or src.const_value is None
                or len(src.const_value.shape) != 2 or out.is_graph_output()
                or (perm is not None and list(perm.as_ints()) != [1, 0])):
            continue
        name = f"{src.name}.T"
        if name not in graph.initializers:
            t = src.const_value
            lazy = ir.LazyTensor(_transposer(t), dtype=t.dtype, shape=ir.Shape([t.shape[1], t.shape[0]]), name=name)
            graph.register_initializer(ir.Value(name=name, shape=lazy.shape, type=ir.TensorType(t.dtype),
                                                const_value=lazy))
        ir.convenience.replace_all_uses_with(out, graph.initializers[name])
        graph.remove(node, safe=True)
        removed += 1
        if not src.uses():
            graph.initializers.pop(src.name)
    return removed


def gather_from_transposed(model: Any) -> int:
    """Let a tied embedding's lookup read the transposed copy, so the weight is stored once.

    Before::   W (V, h) ──Gather(axis=0)(ids (B, T))──> e (B, T, h)        and W.T (h, V) for the LM head
    After::    W.T (h, V) ──Gather(axis=1)(ids)──> (h, B, T) ──Transpose(perm=[1, 2, 0])──> e (B, T, h)

    Applies to an initializer ``W`` whose ``W.T`` exists (made by :func:`fold_weight_transposes`) and whose
    only readers are such Gathers with static-rank indices; ``W`` is then dropped (a tied embedding of
    Llama-3.2-1B is 1 GB in fp32). Returns the number of Gather nodes rewritten.
    """
    import onnx_ir as ir

    graph = model.graph
    rewritten = 0
    for name in [n for n in graph.initializers if f"{n}.T" in graph.initializers]:
        src, src_t = graph.initializers[name], graph.initializers[f"{name}.T"]
        gathers = [u.node for u in src.uses()]
        if not gathers or any(not _plain_gather(g, src) for g in gathers):
            continue
        for g in gathers:
            rank = len(g.inputs[1].shape)
            moved = ir.node("Gather", [src_t, g.inputs[1]], {"axis": 1}, name=f"{g.name}_transposed")
            back = ir.node("Transpose", [moved.outputs[0]], {"perm": [*range(1, rank + 1), 0]},
                           name=f"{g.name}_back")
            graph.insert_before(g, [moved, back])
            ir.convenience.replace_all_uses_with(g.outputs[0], back.outputs[0])
            graph.remove(g, safe=True)
            rewritten += 1
        graph.initializers.pop(name)
    return rewritten


def cast_like_to_cast(model: Any) -> int:
    """Replace ``CastLike(x, like)`` by ``Cast(x, to=like.dtype)`` wherever ``like``'s element type is known.

    torch's ``Tensor.type_as`` exports as ``CastLike`` (Gemma's RMSNorm ends in ``.type_as(x)``), and ONNX
    Runtime's training graph builder registers a gradient for ``Cast`` but none for ``CastLike``; the two
    compute the same thing once the target type is fixed, which it always is in a traced graph. Returns the
    number of nodes rewritten.
    """
    import onnx_ir as ir

    graph = model.graph
    rewritten = 0
    for node in list(graph.all_nodes()):
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        src, like = node.inputs[0], node.inputs[1]
        if src is None or like is None or like.dtype is None or node.outputs[0].is_graph_output():
            continue
        cast = ir.node("Cast", [src], {"to": int(like.dtype)}, name=f"{node.name}_cast")
        cast.outputs[0].dtype = like.dtype
        cast.outputs[0].shape = node.outputs[0].shape
        node.graph.insert_before(node, [cast])
        ir.convenience.replace_all_uses_with(node.outputs[0], cast.outputs[0])
        node.graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def sequence_splits_to_split(model: Any) -> int:
    """Replace ``SplitToSequence(x, split)`` whose every reader is ``SequenceAt(·, constant index)`` by one
    ``Split`` node, each ``SequenceAt`` by the matching output.

    Before::   x ──SplitToSequence(split=c, axis)──> seq ──SequenceAt(i)──> x_i
    After::    x ──Split(sizes, axis)──> x_0, x_1, …

    torch's exporter writes ``Tensor.chunk`` / ``split`` this way (Phi-3's MLP chunks its fused
    ``gate_up_proj`` output in two). ONNX Runtime's training graph builder has no gradient through
    sequence values: the LoRA factors before a chunk come out *unreachable* or, worse, with silently
    wrong gradients (the path through the chunk dropped). ``Split`` has a gradient. Applies when the split
    axis has a static size and ``split`` is a constant (a chunk size or the sizes); returns the number of
    ``SplitToSequence`` nodes rewritten.
    """
    import numpy as np
    import onnx_ir as ir

    rewritten = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "SplitToSequence" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, split = node.inputs[0], _constant(node.inputs[1])
        axis_attr = node.attributes.get("axis")
        axis = axis_attr.as_int() if axis_attr is not None else 0
        if x is None or x.shape is None or split is None or split.ndim > 1:
            continue
        axis = axis % len(x.shape)
        dim = x.shape[axis]
        if not isinstance(dim, int):
            continue
        sizes = _split_sizes(dim, split)
        readers = [u.node for u in node.outputs[0].uses()]
        indices = [_constant(r.inputs[1]) if r.op_type == "SequenceAt" and len(r.inputs) == 2 else None
                   for r in readers]
        if (not readers or sizes is None or node.outputs[0].is_graph_output()
                or any(r.outputs[0].is_graph_output() for r in readers)
                or any(i is None or i.ndim != 0 or not -len(sizes) <= int(i) < len(sizes) for i in indices)):
            continue
        const = ir.node("Constant", [], {"value": ir.tensor(np.array(sizes, dtype=np.int64))},
                        name=f"{node.name}_sizes")
        parts = ir.node("Split", [x, const.outputs[0]], {"axis": axis}, num_outputs=len(sizes),
                        name=f"{node.name}_split")
        node.graph.insert_before(node, [const, parts])
        for reader, index in zip(readers, indices, strict=True):
            assert index is not None
            out = parts.outputs[int(index) % len(sizes)]
            out.dtype, out.shape = reader.outputs[0].dtype, reader.outputs[0].shape
            ir.convenience.replace_all_uses_with(reader.outputs[0], out)
            reader.graph.remove(reader, safe=True)
        node.graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def _constant(value: Any) -> Any:
    """The numpy value of an initializer or ``Constant`` node output, else ``None``."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    return None


def _split_sizes(dim: int, split: Any) -> list[int] | None:
    """``SplitToSequence``'s pieces: a scalar is a chunk size (the last piece may be shorter), a 1-D tensor
    the sizes themselves (they must add up to ``dim``)."""
    if split.ndim == 0:
        chunk = int(split)
        if chunk <= 0:
            return None
        return [chunk] * (dim // chunk) + ([dim % chunk] if dim % chunk else [])
    sizes = [int(v) for v in split.tolist()]
    return sizes if sizes and sum(sizes) == dim and min(sizes) >= 0 else None


def _plain_gather(node: Any, src: Any) -> bool:
    """A Gather reading ``src`` as its data along axis 0, with indices of known rank, not a graph output."""
    axis = node.attributes.get("axis")
    return (node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2
            and node.inputs[0] is src and node.inputs[1] is not src and node.inputs[1].shape is not None
            and (axis is None or axis.as_int() == 0) and not node.outputs[0].is_graph_output())


def _transposer(t: Any) -> Any:
    import numpy as np
    import onnx_ir as ir

    return lambda: ir.tensor(np.ascontiguousarray(t.numpy().T))


class SharedExternalData:
    """One external-data file that many ONNX models point into; identical tensors are stored once.

    :meth:`externalize` moves each initializer of at least :data:`MIN_EXTERNAL_BYTES` of an IR model into
    the file (deduplicated by sha256 of its bytes) and replaces it by an external reference whose
    ``location`` is the file's path relative to ``model_dir``, where the model will be saved.
    :meth:`externalize_proto` does the same for an ``onnx.ModelProto`` (what ORT's artifact builder wrote).
    """

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raise ValueError(f"{self.path} already exists; a shared data file is written in one go")
        self.path.touch()
        self._index: dict[str, tuple[int, int]] = {}
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def location(self, model_dir: Path) -> str:
        """The file's path relative to ``model_dir``, as an ONNX external-data ``location``."""
        return os.path.relpath(self.path, Path(model_dir)).replace(os.sep, "/")

    @contextlib.contextmanager
    def linked_into(self, model_dir: Path) -> Iterator[str]:
        """A hard link to the file inside ``model_dir`` while the block runs; yields its local ``location``.

        ``onnx.checker`` (run by ORT's artifact builder) refuses a location that leaves the model's
        directory (``../``); the builder sees the link, the saved models get the real location afterwards
        (:meth:`relocate`).
        """
        link = Path(model_dir) / self.path.name
        os.link(self.path, link)
        try:
            yield link.name
        finally:
            link.unlink()

    def relocate(self, model: Any, old: str, model_dir: Path) -> int:
        """Point a ModelProto's external references at ``old`` to this file (relative to ``model_dir``)."""
        new, changed = self.location(model_dir), 0
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location" and entry.value == old:
                    entry.value = new
                    changed += 1
        return changed

    def _store(self, data: bytes) -> tuple[int, int]:
        """``(offset, length)`` of ``data`` in the file, appending it unless already there."""
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self._index:
            pad = -self._size % ALIGNMENT
            with open(self.path, "ab") as f:
                f.write(b"\0" * pad)
                f.write(data)
            self._index[digest] = (self._size + pad, len(data))
            self._size += pad + len(data)
        return self._index[digest]

    def externalize(self, model: Any, model_dir: Path, skip: set[str] | frozenset[str] = frozenset(),
                    location: str | None = None) -> int:
        """Move the IR ``model``'s large initializers (but those in ``skip``) into the file; returns how many.

        ``location`` overrides the reference written (default: the file relative to ``model_dir``).
        """
        import onnx_ir as ir

        location, moved = location or self.location(model_dir), 0
        for name, value in model.graph.initializers.items():
            t = value.const_value
            if name in skip or t is None or isinstance(t, ir.ExternalTensor) or t.nbytes < MIN_EXTERNAL_BYTES:
                continue
            offset, length = self._store(t.tobytes())
            value.const_value = ir.ExternalTensor(location, offset, length, t.dtype, shape=t.shape, name=name,
                                                  base_dir=str(model_dir))
            moved += 1
        return moved

    def externalize_proto(self, model: Any, model_dir: Path) -> int:
        """Move an ``onnx.ModelProto``'s large inline initializers into the file; returns how many."""
        from onnx import numpy_helper
        from onnx.external_data_helper import set_external_data

        location, moved = self.location(model_dir), 0
        for t in model.graph.initializer:
            if t.data_location == 1:  # TensorProto.EXTERNAL
                continue
            data = t.raw_data or numpy_helper.to_array(t).tobytes()
            if len(data) < MIN_EXTERNAL_BYTES:
                continue
            offset, length = self._store(data)
            for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(fld)
            t.raw_data = data[:1]  # set_external_data insists on a raw_data field being present
            set_external_data(t, location=location, offset=offset, length=length)
            t.ClearField("raw_data")
            moved += 1
        return moved


# --- a quantized base -----------------------------------------------------------------------------------

QUANTIZED_TYPES = ("INT8", "UINT8")


def quantized_storage(model: Any, skip: set[str]) -> set[str]:
    """Initializers of a quantized base that ONNX Runtime must not constant-fold: the integer weights and the
    (≥ 2-D) tensors read together with them by nodes whose inputs are all initializers (their scales).

    ORT's training-graph builder and its session optimizer fold every subgraph of initializers; folding a
    dequantization would store and hold the fp32 weight it computes.
    """
    graph = model.graph
    inits = {n: v for n, v in graph.initializers.items() if n not in skip and v.const_value is not None}
    keep = {n for n, v in inits.items() if v.const_value.dtype.name in QUANTIZED_TYPES}
    if not keep:
        return set()
    for node in graph.all_nodes():
        ins = [i for i in node.inputs if i is not None]
        if ins and all(i.name in inits for i in ins):
            keep |= {i.name for i in ins if len(inits[i.name].const_value.shape) >= 2}
    return keep


_DEQUANTIZE_OPS = {  # what the exporter writes for quantize.dequantize (a Concat becomes ConcatTraining in training)
    "int4": {"Cast": 1, "Mul": 3, "Floor": 1, "Sub": 2, "Unsqueeze": 2, "Concat": 1, "Reshape": 3},
    "int8": {"Cast": 1, "Mul": 1, "Reshape": 2},
}
_VIEWS = ("Reshape", "Slice", "Identity", "Unsqueeze")  # keep a stored tensor's element type and columns


def lean_dequantizations(model: Any, storage: set[str]) -> int:
    """Rewrite each dequantization of a stored weight (an ``onnx.ModelProto``) with fewer, smaller
    intermediates; returns the number rewritten.

    The exporter writes :func:`lorafleet.export.compiler.quantize.dequantize` element by element: for int4,
    the packed bytes cast to fp32, nibbles split with ``Floor`` and ``Sub``, stacked, shifted by 8, then
    scaled — six intermediates of the fp32 weight's size or half of it per weight (≈ 4.5× the weight), which
    ORT's memory plan keeps around. Here the nibbles are split in ``uint8`` (``BitwiseAnd``, ``BitShift``: an
    eighth of the fp32 size each), ORT's per-tensor ``DequantizeLinear`` (scale 1, zero point 8) writes
    ``q − 8`` in fp32 and one ``Mul`` applies the group scales: two fp32 tensors, and ``(q − 8) · s`` with one
    rounding as in the eager model, so the values are bit-identical. int8 is one ``DequantizeLinear`` per
    row (``axis=0``). ORT's blocked ``DequantizeLinear`` (opset 21) would save the second fp32 tensor but runs
    1.6–2× (int4) to 6–12× (int8) slower here (``bench/ort_dequantize.py``). A tree that does not have
    exactly the exporter's shape is left as it is.
    """
    from collections import Counter

    from onnx import helper

    graph = model.graph
    if max((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), default=0) < 18:
        return 0  # BitwiseAnd is opset 18
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {o for n in nodes if n.op_type == "Constant" for o in n.output} | set(inits)
    stored: dict[str, str] = {}  # value -> the storage initializer it views (integers, and their fp32 scales)
    for name in storage:
        if name in inits and len(inits[name].dims) == 2:
            stored[name] = name
    for n in nodes:
        if n.op_type in _VIEWS and n.input and n.input[0] in stored:
            stored[n.output[0]] = stored[n.input[0]]
        elif n.input and all(i in constants and i not in stored for i in n.input if i):
            constants.update(n.output)  # shapes and scalars computed from constants (left shared, as leaves)

    def kind(value: str) -> str | None:
        t = inits.get(stored.get(value, ""))
        return None if t is None else {2: "uint8", 3: "int8", 1: "float"}.get(t.data_type)

    def float_matrix(value: str) -> bool:
        """An fp32 (rows, groups) initializer — the scales, whether the storage lists them (a tied head's) or
        not — or a view of a stored one. (The training graph's builder folds ``scale.unsqueeze(-1)`` into an
        initializer; the eval graph keeps the ``Unsqueeze`` of the plain initializer.)"""
        t = inits.get(stored.get(value, value))
        return t is not None and t.data_type == 1 and len(t.dims) == 2

    replace: dict[int, list[Any]] = {}  # id(final node) -> the nodes that replace its tree
    outs: set[str] = set()  # the dequantized weights they write
    removed: set[int] = set()
    count = 0
    for final in nodes:
        if final.op_type != "Reshape" or final.input[0] not in producer:
            continue
        mul = producer[final.input[0]]
        if mul.op_type != "Mul" or id(mul) in removed:
            continue
        tree: list[Any] = []
        leaves: set[str] = set()
        stack = [final.output[0]]
        while stack:
            v = stack.pop()
            n = producer.get(v)
            if v in stored or v in constants or n is None:
                leaves.add(v)
                continue
            if all(t is not n for t in tree):
                tree.append(n)
                stack.extend(i for i in n.input if i)
        ints = [v for v in leaves if kind(v) in ("uint8", "int8")]
        scale_in = [v for v in mul.input if v in leaves and v not in ints]
        if len(ints) != 1 or len(scale_in) != 1 or any(v not in constants for v in leaves - {ints[0], scale_in[0]}):
            continue
        x, s = ints[0], scale_in[0]
        tag, out = f"{final.name or f'dequantize{count}'}_dq", final.output[0]
        pre: list[Any] = []  # a view giving the scales as (rows, groups)
        if s in producer and producer[s].op_type == "Unsqueeze" and float_matrix(producer[s].input[0]):
            s = producer[s].input[0]  # scale.unsqueeze(-1), shared with the backward's copies: left in place
            groups = int(inits[stored.get(s, s)].dims[1])
        elif s in inits and inits[s].data_type == 1 and len(inits[s].dims) == 3 and inits[s].dims[2] == 1:
            groups = int(inits[s].dims[1])  # ORT's builder folded scale.unsqueeze(-1) into an initializer
            pre = [helper.make_node("Constant", [], [f"{tag}_s2d"], name=f"{tag}_s2d_const",
                                    value=helper.make_tensor(f"{tag}_s2d_value", 7, [2], list(inits[s].dims[:2]))),
                   helper.make_node("Reshape", [s, f"{tag}_s2d"], [f"{tag}_scale"], name=f"{tag}_scale")]
            s = f"{tag}_scale"
        else:
            continue
        mode = "int4" if kind(x) == "uint8" else "int8"
        ops = Counter("Concat" if t.op_type == "ConcatTraining" else t.op_type for t in tree)
        casts = [t for t in tree if t.op_type == "Cast"]
        members = {id(t) for t in tree}
        if (ops != _DEQUANTIZE_OPS[mode] or casts[0].input[0] != x
                or any(id(c) not in members for t in tree if t is not final for o in t.output
                       for c in consumers.get(o, []))):
            continue
        width = int(inits[stored[x]].dims[1]) * (2 if mode == "int4" else 1)
        if groups <= 0 or width % groups:
            continue

        def const(name: str, dtype: int, dims: list[int], vals: list[Any], tag: str = tag) -> Any:
            return helper.make_node("Constant", [], [f"{tag}_{name}"], name=f"{tag}_{name}_const",
                                    value=helper.make_tensor(f"{tag}_{name}_value", dtype, dims, vals))

        if mode == "int4":
            lean = [const("15", 2, [], [15]), const("4", 2, [], [4]), const("8", 2, [], [8]),
                    const("axis", 7, [1], [-1]), const("shape", 7, [2], [-1, width]),
                    helper.make_node("BitwiseAnd", [x, f"{tag}_15"], [f"{tag}_lo"], name=f"{tag}_lo"),
                    helper.make_node("BitShift", [x, f"{tag}_4"], [f"{tag}_hi"], name=f"{tag}_hi", direction="RIGHT"),
                    helper.make_node("Unsqueeze", [f"{tag}_lo", f"{tag}_axis"], [f"{tag}_lo1"], name=f"{tag}_lo1"),
                    helper.make_node("Unsqueeze", [f"{tag}_hi", f"{tag}_axis"], [f"{tag}_hi1"], name=f"{tag}_hi1"),
                    helper.make_node("Concat", [f"{tag}_lo1", f"{tag}_hi1"], [f"{tag}_pairs"], name=f"{tag}_pairs",
                                     axis=-1),
                    helper.make_node("Reshape", [f"{tag}_pairs", f"{tag}_shape"], [f"{tag}_q"], name=f"{tag}_q"),
                    # (q - 8) exactly, by ORT's per-tensor kernel, then each group times its scale
                    const("one", 1, [], [1.0]), const("grouped", 7, [3], [-1, groups, width // groups]),
                    helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_one", f"{tag}_8"], [f"{tag}_v"],
                                     name=f"{tag}_v"),
                    helper.make_node("Reshape", [f"{tag}_v", f"{tag}_grouped"], [f"{tag}_v3"], name=f"{tag}_v3"),
                    helper.make_node("Unsqueeze", [s, f"{tag}_axis"], [f"{tag}_s3"], name=f"{tag}_s3"),
                    helper.make_node("Mul", [f"{tag}_v3", f"{tag}_s3"], [f"{tag}_w3"], name=f"{tag}_w3"),
                    helper.make_node("Reshape", [f"{tag}_w3", f"{tag}_shape"], [out], name=tag)]
        elif groups == 1:  # int8, one scale per row: DequantizeLinear per axis (ORT's blocked kernel is 6x slower)
            lean = [const("rows", 7, [1], [-1]),
                    helper.make_node("Reshape", [s, f"{tag}_rows"], [f"{tag}_s1"], name=f"{tag}_s1"),
                    helper.make_node("DequantizeLinear", [x, f"{tag}_s1"], [out], name=tag, axis=0)]
        else:
            lean = [helper.make_node("DequantizeLinear", [x, s], [out], name=tag, axis=1, block_size=width // groups)]
        replace[id(final)] = pre + lean
        outs.add(out)
        removed |= members
        count += 1
    if not count:
        return 0
    dropped = _products_read_untransposed(nodes, consumers, outs)
    out_nodes: list[Any] = []
    for n in nodes:
        if id(n) in replace:
            out_nodes += replace[id(n)]
        elif id(n) not in removed and id(n) not in dropped:
            out_nodes.append(n)
    del graph.node[:]
    graph.node.extend(out_nodes)
    if not any(op.domain == "com.microsoft" for op in model.opset_import) and any(
            n.domain == "com.microsoft" for n in out_nodes):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))  # the FusedMatMul products
    return count


def _products_read_untransposed(nodes: list[Any], consumers: dict[str, list[Any]], weights: set[str]) -> set[int]:
    """``MatMul(a, Transpose(W))`` / ``FusedMatMul(a, Transpose(W))`` of a dequantized ``W`` become
    ``FusedMatMul(a, W)`` with ``transB`` flipped (in place); returns the ids of the ``Transpose`` nodes dropped.

    ORT's QDQ propagation would otherwise move each ``DequantizeLinear`` past its transpose, adding a
    ``QuantizeLinear`` whose blocks no longer fit the transposed weight (a run-time error in ORT 1.19); the
    product reads the weight transposed for free anyway (ORT's own ``MatmulTransposeFusion``).
    """
    from onnx import helper

    dropped: set[int] = set()
    for t in nodes:
        if t.op_type != "Transpose" or not t.input or t.input[0] not in weights:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        readers = consumers.get(t.output[0], [])
        if perm != [[1, 0]] or not readers or any(
                r.op_type not in ("MatMul", "FusedMatMul") or list(r.input).index(t.output[0]) != 1
                or r.input[0] == t.output[0] for r in readers):
            continue
        for r in readers:
            if r.op_type == "MatMul":
                r.op_type, r.domain = "FusedMatMul", "com.microsoft"
                r.attribute.extend([helper.make_attribute("transB", 1), helper.make_attribute("alpha", 1.0)])
            else:
                attrs = {a.name: a for a in r.attribute}
                if "transB" in attrs:
                    attrs["transB"].i = 1 - attrs["transB"].i
                else:
                    r.attribute.append(helper.make_attribute("transB", 1))
            r.input[1] = t.input[0]
        dropped.add(id(t))
    return dropped


def split_storage_to_slices(model: Any, storage: set[str]) -> int:
    """Replace each ``Split`` of a quantized-storage initializer (an ``onnx.ModelProto``) by one ``Slice`` per
    output; returns the number of ``Split`` nodes replaced.

    ORT's artifact builder fuses the LM head's per-chunk ``Slice`` of its stored bytes and scales into one
    ``Split`` (``GatherSliceToSplitFusion``). A ``Split`` computes every chunk at once: in the forward it
    copies the whole stored matrix before the first chunk is read, and each backward copy made by
    :func:`rematerialize_constant_subgraphs` would copy it again (16 copies of 131 MB for a 128k
    vocabulary, all alive at the peak). A ``Slice`` per chunk copies only its rows, and each gets its own
    tie to its reader (:func:`_tie_to_readers`), so ORT's session does not fuse them back.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    out: list[Any] = []
    replaced = 0
    for node in graph.node:
        data = node.input[0] if node.input else ""
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or data not in storage or data not in inits:
            out.append(node)
            continue
        dims = list(inits[data].dims)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = int(attrs.get("axis", 0)) % len(dims)
        dim = dims[axis]
        split = node.input[1] if len(node.input) > 1 else ""
        if split:
            given = numpy_helper.to_array(inits[split]) if split in inits else consts.get(split)
            if given is None:
                out.append(node)
                continue
            sizes = [int(v) for v in np.asarray(given).reshape(-1)]
        else:  # num_outputs equal pieces, the last one smaller (Split-18)
            n = int(attrs.get("num_outputs", len(node.output)))
            chunk = -(-dim // n)
            sizes = [min(chunk, dim - k * chunk) for k in range(n)]
        if len(sizes) != len(node.output) or sum(sizes) != dim:
            out.append(node)
            continue
        start = 0
        for k, (name, size) in enumerate(zip(node.output, sizes, strict=True)):
            tag = f"{node.name or f'split{replaced}'}_slice{k}"
            bounds = []
            for what, value in (("starts", start), ("ends", start + size), ("axes", axis)):
                bounds.append(f"{tag}_{what}")
                out.append(helper.make_node("Constant", [], [bounds[-1]], name=f"{tag}_{what}_const",
                                            value=helper.make_tensor(f"{tag}_{what}_value", 7, [1], [value])))
            if name:
                out.append(helper.make_node("Slice", [data, *bounds], [name], name=tag))
            start += size
        replaced += 1
    del graph.node[:]
    graph.node.extend(out)
    return replaced


def rematerialize_constant_subgraphs(model: Any, constants: set[str], seeds: set[str]) -> int:
    """ONNX counterpart of :func:`lorafleet.export.compiler.executorch.passes.rematerialize_constant_subgraphs`
    on an ``onnx.ModelProto``: every value computed from a quantized weight in ``seeds`` and other
    ``constants`` alone (a dequantized weight) is computed just before its first reader (the exporter and ORT's
    builder may have hoisted it to the start of the graph) and recomputed, by copies of its nodes, just before
    each further reader, so the backward's product ``dL/dx = dL/dy · W`` does not keep the forward's ``W``
    alive. Returns the number of nodes added."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {out: n for n in nodes for out in n.output}
    constants = set(constants) | set(seeds) | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    const = set(constants)  # values computed from constants alone
    derived: set[str] = set(seeds)  # ... of which a quantized weight is one
    for n in nodes:
        ins = [i for i in n.input if i]
        if ins and all(i in const for i in ins):
            const.update(n.output)
            if any(i in derived for i in ins):
                derived.update(n.output)

    def subtree(value: str) -> list[Any]:
        seen: list[Any] = []
        stack = [value]
        while stack:
            v = stack.pop()
            n = producer.get(v)
            if n is not None and v in const and v not in constants and all(n is not s for s in seen):
                seen.append(n)
                stack.extend(i for i in n.input if i)
        return seen

    index = {id(n): k for k, n in enumerate(nodes)}
    # a dequantization runs where it is read: the exporter and ORT's builder may have put it far earlier
    deferred = {id(n) for n in nodes if n.op_type != "Constant" and any(o in derived for o in n.output)
                and all(o in const for o in n.output)}
    claimed: dict[int, int] = {}  # id(node) -> id(first reader)
    emitted: set[int] = set()
    out_nodes: list[Any] = []
    added = 0
    for n in nodes:
        if id(n) in deferred or (n.output and all(o in const for o in n.output) and id(n) in emitted):
            continue
        if n.output and all(o in const for o in n.output):
            out_nodes.append(n)
            emitted.add(id(n))
            continue
        for k, value in enumerate(n.input):
            if not value or value not in derived or value in constants:
                continue
            tree = sorted(subtree(value), key=lambda t: index[id(t)])
            if all(claimed.get(id(t), id(n)) == id(n) for t in tree):
                for t in tree:
                    claimed[id(t)] = id(n)
                    if id(t) not in emitted:
                        out_nodes.append(t)
                        emitted.add(id(t))
                continue
            suffix = f"_remat{added}"
            renamed: dict[str, str] = {}
            for t in tree:
                clone = type(t)()
                clone.CopyFrom(t)
                clone.name = (t.name or t.op_type) + suffix
                del clone.input[:]
                clone.input.extend(renamed.get(i, i) for i in t.input)
                del clone.output[:]
                for o in t.output:
                    renamed[o] = o + suffix
                    const.add(renamed[o])  # a copy is a dequantization too (for _tie_to_readers)
                clone.output.extend(renamed[o] for o in t.output)
                out_nodes.append(clone)
                added += 1
            n.input[k] = renamed[value]
        out_nodes.append(n)
    out_nodes += [n for n in nodes if id(n) in deferred and id(n) not in emitted]  # read by nothing
    del graph.node[:]
    graph.node.extend(_tie_to_readers(out_nodes, seeds, const))
    return added


def _tie_to_readers(nodes: list[Any], seeds: set[str], const: set[str]) -> list[Any]:
    """Make each dequantization wait for its reader's activation: ORT may schedule a node whose inputs are all
    initializers at any point, e.g. every layer's dequantization before the first layer runs.

    Each node reading a quantized weight ``q`` for a reader ``y = f(x, W(q))`` reads instead
    ``Reshape(q, Add(shape(q), Mul(Shape(x)[:1], 0)))`` — the same bytes (a reshape to its own shape: no copy),
    but only once ``x`` exists.
    """
    from onnx import helper

    producer = {o: n for n in nodes for o in n.output}
    out: list[Any] = []
    pending: dict[int, str] = {}  # id(tree node) -> the activation its reader waits for
    for n in reversed(nodes):  # readers come after their trees: walk back to mark each tree with its reader
        if n.output and all(o in const for o in n.output):
            continue
        acts = [i for i in n.input if i and i not in const]
        if not acts:
            continue
        stack = [i for i in n.input if i in const and i not in seeds]
        while stack:
            t = producer.get(stack.pop())
            if t is None or id(t) in pending:
                continue
            pending[id(t)] = acts[0]
            stack.extend(i for i in t.input if i in const and i not in seeds)
    count = 0
    for t in nodes:
        act = pending.get(id(t))
        if act is not None and any(i in seeds for i in t.input):
            for k, value in enumerate(list(t.input)):
                if value not in seeds:
                    continue
                tag = f"{value}_after{count}"
                count += 1
                out += [
                    helper.make_node("Shape", [act], [f"{tag}_s"], name=f"{tag}_shape", start=0, end=1),
                    helper.make_node("Mul", [f"{tag}_s", f"{tag}_zero"], [f"{tag}_z"], name=f"{tag}_mul"),
                    helper.make_node("Shape", [value], [f"{tag}_own"], name=f"{tag}_ownshape"),
                    helper.make_node("Add", [f"{tag}_own", f"{tag}_z"], [f"{tag}_shape_out"], name=f"{tag}_add"),
                    helper.make_node("Reshape", [value, f"{tag}_shape_out"], [tag], name=f"{tag}_reshape"),
                ]
                out.insert(len(out) - 4, helper.make_node(
                    "Constant", [], [f"{tag}_zero"], name=f"{tag}_zero_const",
                    value=helper.make_tensor(f"{tag}_zero_value", 7, [1], [0])))
                t.input[k] = tag
        out.append(t)
    return out
