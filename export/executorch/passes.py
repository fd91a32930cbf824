"""Graph rewrites applied to exported programs before ExecuTorch lowering. Each is a small function over an
``ExportedProgram`` that returns how many nodes it changed; the docstrings show the graph before and after."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram


def replace_empty_permuted(ep: ExportedProgram) -> int:
    """Rewrite ``aten.empty_permuted`` (not core ATen; autograd emits it in the joint graph) as
    ``empty`` of the physical shape followed by ``permute`` back to the logical order.

    Before::

        buf = aten.empty_permuted.default([B, T, H], [2, 0, 1], dtype=f32)   # logical (B, T, H)

    After::

        raw = aten.empty.memory_format([H, B, T], dtype=f32)                  # physical layout
        buf = aten.permute.default(raw, [1, 2, 0])                            # logical (B, T, H)

    ``empty_permuted(size, physical_layout)`` allocates dims in the order ``physical_layout`` and returns a view
    with logical ``size``; ``permute`` by the inverse order is exactly that view.
    """
    graph = ep.graph_module.graph
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.empty_permuted.default:
            continue
        size, layout = list(node.args[0]), list(node.args[1])
        physical = [size[d] for d in layout]
        inverse = [layout.index(d) for d in range(len(layout))]
        with graph.inserting_before(node):
            raw = graph.call_function(torch.ops.aten.empty.memory_format, (physical,), dict(node.kwargs))
            view = graph.call_function(torch.ops.aten.permute.default, (raw, inverse))
        val = node.meta.get("val")
        raw.meta = {**node.meta, "val": val.permute(layout).contiguous() if val is not None else None}
        view.meta = dict(node.meta)
        node.replace_all_uses_with(view)
        graph.erase_node(node)
        changed += 1
    if changed:
        graph.lint()
        ep.graph_module.recompile()
    return changed
