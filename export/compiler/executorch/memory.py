"""What a device's ExecuTorch runtime holds while a package's training program trains: a prediction read from
the lowered program and the foundation file, not from a formula.

A device app links the runtime (no interpreter), loads ``training.pte`` with the shared ``foundation.ptd`` and
runs ``forward`` (forward + backward). What it then holds, term by term::

    planned   Σ the method's memory-planned buffers (``non_const_buffer_sizes``): every activation, gradient
              and temporary the memory planner placed — ExecuTorch allocates them once, at load
    packed    Σ over XNNPACK delegates of the bytes of the foundation weights each one reads: at init every
              delegate packs its weights into its own layout (the mapped source pages are released once packed),
              so a weight read by two delegates — a frozen linear's forward product and its backward one — is
              held twice (docs/BENCHMARKS.md "native": two packed copies measured)
    workspace the XNNPACK delegates' internal tensors (values inside one delegate, neither its inputs and outputs
              nor constants): XNNPACK plans and allocates them itself on a delegate's first run and keeps them; the
              runtime in ExecuTorch's wheel shares one workspace among the delegates (measured: one allocation of
              the largest delegate's plan, docs/BENCHMARKS.md), so the largest delegate's tensors alive at once
    mapped    the foundation tensors that the runtime's own (non-delegated) kernels read in place, each
              distinct segment once: mapped file pages, clean and file-backed (an embedding that only a gather
              reads touches just its looked-up rows; counted whole, so this term is an upper bound)
    program   the ``.pte`` file itself (instructions, delegate payloads, the LoRA tensors it stores)
    runtime   the runtime's own overhead with no program of consequence loaded: the libraries' resident
              pages and allocations, measured (:data:`RUNTIME_OVERHEAD_BYTES`)

``bench/device_memory.py`` compares the prediction with the measured peak of the Python ExecuTorch backend (above
the process's baseline before the program loads) and of the native trainer (its whole process), on the same
package; the figures are in docs/BENCHMARKS.md "Device memory".
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from lorafleet.export.formats.errors import PackageError

# The tiny package (random:tiny, 0.4 MB of foundation) trained in 12.5-20.6 MB in the native trainer and in 16.6 MB
# above its baseline in the Python backend (docs/bench/native.jsonl, 2026-12-04/05): the runtime's own cost.
RUNTIME_OVERHEAD_BYTES = 20 * 2**20

TERMS = ("planned", "packed", "workspace", "mapped", "program", "runtime")

_INVALID_ID = 0xFFFFFFFF  # XNN_INVALID_VALUE_ID: an internal value
# bits per element of each XNNDatatype (runtime_schema.fbs)
_DATATYPE_BITS = {"xnn_datatype_fp32": 32, "xnn_datatype_fp16": 16, "xnn_datatype_qint8": 8,
                  "xnn_datatype_quint8": 8, "xnn_datatype_qint32": 32, "xnn_datatype_qcint8": 8,
                  "xnn_datatype_qcint32": 32, "xnn_datatype_qcint4": 4, "xnn_datatype_qdint8": 8,
                  "xnn_datatype_qbint4": 4, "xnn_datatype_qpint8": 8, "xnn_datatype_int32": 32,
                  "xnn_datatype_pfp32": 32, "xnn_datatype_bf16": 16}


def xnnpack_graphs(payloads: list[bytes]) -> list[dict[str, Any]]:
    """Each XNNPACK delegate payload's graph (``XNNGraph`` of runtime_schema.fbs) as JSON, decoded by the
    flatbuffers compiler that ships with ExecuTorch (one ``flatc`` run for all of them)."""
    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _run_flatc

    if not payloads:
        return []
    with tempfile.TemporaryDirectory(prefix="lorafleet-xnn-") as tmp:
        names = []
        for i, payload in enumerate(payloads):
            header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
            if not header.is_valid():
                raise PackageError("an XNNPACK delegate payload has no valid XNNPACK header")
            path = Path(tmp) / f"d{i}.bin"
            path.write_bytes(payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
            names.append(path)
        schema = Path(xnnpack_graph_serialize.__file__).with_name("runtime_schema.fbs")  # beside its serializer
        try:
            _run_flatc(["--json", "--strict-json", "--defaults-json", "--raw-binary", "-o", tmp, str(schema), "--",
                        *map(str, names)])
        except subprocess.CalledProcessError as exc:
            raise PackageError(f"an XNNPACK delegate payload could not be decoded (flatc: {exc})") from exc
        return [json.loads(p.with_suffix(".json").read_text()) for p in names]


def named_constants(graph: dict[str, Any]) -> list[tuple[str, int]]:
    """``(named_key, size)`` of every constant the delegate reads from the named data map (the foundation)."""
    return [(c["named_key"], int(c["size"])) for c in graph.get("constant_data") or () if c.get("named_key")]


def workspace_bytes(graph: dict[str, Any]) -> int:
    """The delegate's internal tensors (neither its inputs and outputs nor constants) that are alive at once, at
    the worst node (nodes run in order; a tensor lives from the first node that names it to the last). XNNPACK
    allocates them itself when the delegate first runs (``xnn_plan_memory``) and keeps them."""
    sizes: dict[int, int] = {}
    for value in graph.get("xvalues") or ():
        t = value.get("xvalue_union") or {}
        t = t.get("tensor_value", t)  # XNNQuantizedTensorValue wraps an XNNTensorValue
        if "id_out" not in t or t.get("external_id") != _INVALID_ID or t.get("constant_buffer_idx"):
            continue
        elements = math.prod(int(d) for d in t.get("dims") or ())
        sizes[int(t["id_out"])] = (elements * _DATATYPE_BITS.get(t.get("datatype"), 32) + 7) // 8
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    nodes = graph.get("xnodes") or ()
    for j, node in enumerate(nodes):
        for key, v in (node.get("xnode_union") or {}).items():
            ids = [v] if key.endswith("_id") and isinstance(v, int) else v if key.endswith("_ids") else []
            for x in ids:
                if x in sizes:
                    first.setdefault(x, j)
                    last[x] = j
    alive = [0] * (len(nodes) + 1)
    for x, j in first.items():
        alive[j] += sizes[x]
        alive[last[x] + 1] -= sizes[x]
    peak = running = 0
    for step in alive:
        running += step
        peak = max(peak, running)
    return peak


def foundation_segments(path: str | Path) -> dict[str, tuple[int, int]]:
    """``{key: (segment index, bytes)}`` of a ``.ptd`` file (its header and index only are read)."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader, _deserialize_to_flat_tensor

    with open(path, "rb") as f:
        header = FlatTensorHeader.from_bytes(f.read(8 + FlatTensorHeader.EXPECTED_LENGTH)[8:])
        if not header.is_valid():
            raise PackageError(f"{path} is not an ExecuTorch data file (bad FlatTensor header)")
        f.seek(0)
        flat = _deserialize_to_flat_tensor(f.read(header.flatbuffer_offset + header.flatbuffer_size))
    return {n.key: (n.segment_index, int(flat.segments[n.segment_index].size)) for n in flat.named_data}


def program_memory(pte: str | Path, foundation: str | Path | None, *,
                   runtime_overhead: int = RUNTIME_OVERHEAD_BYTES) -> dict[str, int]:
    """The predicted device memory of running program ``pte`` with ``foundation``, by term (module docstring)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = Path(pte)
    data = pte.read_bytes()
    segments = foundation_segments(foundation) if foundation is not None else {}
    delegated: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    mapped_keys: set[str] = set()
    payloads: list[bytes] = []
    try:  # the deserializers raise whatever their flatbuffer readers hit on bytes that are not a program
        program = deserialize_pte_binary(data).program
        if not program.execution_plan:
            raise ValueError("no execution plan")
        planned = sum(int(s) for plan in program.execution_plan for s in plan.non_const_buffer_sizes or ())
        for plan in program.execution_plan:
            payloads += [bytes(program.backend_delegate_data[d.processed.index].data)
                         for d in plan.delegates or () if d.id == "XnnpackBackend"]
            for value in plan.values or ():
                info = getattr(value.val, "extra_tensor_info", None)
                if info is not None and info.fully_qualified_name:
                    mapped_keys.add(info.fully_qualified_name)
    except Exception as exc:
        raise PackageError(f"{pte} is not an ExecuTorch program ({type(exc).__name__}: {exc})"[:300]) from exc
    graphs = xnnpack_graphs(payloads)
    for graph in graphs:
        for key, size in named_constants(graph):
            delegated[key] += 1
            sizes[key] = size
    workspace = max((workspace_bytes(g) for g in graphs), default=0)
    missing = sorted(k for k in set(delegated) | mapped_keys if k not in segments)
    if missing:
        raise PackageError(f"{pte} reads {missing[0]!r}, which the foundation file does not hold")
    wrong = sorted(k for k, size in sizes.items() if segments[k][1] != size)
    if wrong:
        raise PackageError(f"{pte}'s XNNPACK delegate reads {wrong[0]!r} as {sizes[wrong[0]]} bytes, the foundation "
                           f"file holds {segments[wrong[0]][1]}")
    packed = sum(sizes[k] * n for k, n in delegated.items())
    by_segment = {segments[k][0]: segments[k][1] for k in mapped_keys}  # tied names share one segment
    mapped = sum(by_segment.values())
    return {"planned": planned, "packed": packed, "workspace": workspace, "mapped": mapped, "program": len(data),
            "runtime": runtime_overhead}
