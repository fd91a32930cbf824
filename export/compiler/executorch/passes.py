"""Graph rewrites applied to exported programs before ExecuTorch lowering. Each is a small function over an
``ExportedProgram`` that returns how many nodes it changed; the docstrings show the graph before and after."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument


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


def cancel_transpose_pairs(ep: ExportedProgram) -> int:
    """Drop two consecutive ``permute`` ops that undo each other (the backward of a linear layer transposes
    the forward's already transposed weight).

    Before::

        wt  = aten.permute.default(w, [1, 0])       # (in, out)
        w2  = aten.permute.default(wt, [1, 0])      # (out, in) again
        dx  = aten.mm.default(dy, w2)               # (N, out) @ (out, in)

    After::

        dx  = aten.mm.default(dy, w)

    ExecuTorch has no views: every ``permute`` becomes a ``permute_copy`` of the whole weight, on each step.
    """
    graph = ep.graph_module.graph
    changed = 0
    for node in list(graph.nodes):
        inner = node.args[0] if _is_permute(node) else None
        if inner is None or not _is_permute(inner):
            continue
        outer_dims, inner_dims = list(node.args[1]), list(inner.args[1])
        if [inner_dims[d] for d in outer_dims] == list(range(len(outer_dims))):
            node.replace_all_uses_with(inner.args[0])
            graph.erase_node(node)
            if not inner.users:
                graph.erase_node(inner)
            changed += 1
    return _finish(ep, changed)


def mm_to_linear(ep: ExportedProgram) -> int:
    """Turn a matmul with a transposed constant weight back into ``linear`` (decomposition undone).

    Before::

        wt = aten.permute.default(w, [1, 0])       # w: a parameter (out, in) -> (in, out) copy each step
        y  = aten.mm.default(x, wt)                 # (N, in) @ (in, out)

    After::

        y  = aten.linear.default(x, w)              # (N, in) -> (N, out), weight read as stored

    XNNPACK then packs ``w`` once as a static fully-connected weight, stored under the same key as in the
    inference program, so training and inference share the foundation bytes.
    """
    graph = ep.graph_module.graph
    constants = {**ep.graph_signature.inputs_to_parameters, **ep.graph_signature.inputs_to_buffers}
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.mm.default:
            continue
        x, wt = node.args
        if not (_is_permute(wt) and list(wt.args[1]) == [1, 0]):
            continue
        w = wt.args[0]
        if w.op != "placeholder" or w.name not in constants:
            continue
        with graph.inserting_before(node):
            linear = graph.call_function(torch.ops.aten.linear.default, (x, w))
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        if not wt.users:
            graph.erase_node(wt)
        changed += 1
    return _finish(ep, changed)


def drop_identity_ops(ep: ExportedProgram) -> int:
    """Remove ops that return their input unchanged; each would be a full copy per step in ExecuTorch.

    Before::

        a  = aten.alias.default(x)                    # autograd's saved-tensor alias
        p1 = aten.pow.Tensor_Scalar(x, 1.0)           # d/dx x² = 2·x¹
        e  = aten.expand.default(x, [1, 9, 32, 64])   # x is already (1, 9, 32, 64)
        t  = aten.permute.default(x, [0, 1, 2])
        y  = aten.mul.Tensor(p1, g)

    After::

        y  = aten.mul.Tensor(x, g)

    An op whose result is a graph output is kept (ExecuTorch plans outputs in their own memory).
    """
    aten = torch.ops.aten
    graph = ep.graph_module.graph
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if any(u.op == "output" for u in node.users) or not _same_tensor_meta(node, src):
            continue
        t = node.target
        identity = (t == aten.alias.default
                    or (t == aten.pow.Tensor_Scalar and node.args[1] == 1)
                    or (t == aten.expand.default and list(node.args[1]) == list(src.meta["val"].shape))
                    or (t == aten.permute.default and list(node.args[1]) == list(range(len(node.args[1])))))
        if identity:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            changed += 1
    return _finish(ep, changed)


def _same_tensor_meta(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    a, b = node.meta.get("val"), src.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
        a.dtype == b.dtype and a.stride() == b.stride()


def _is_permute(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and \
        node.target == torch.ops.aten.permute.default


def _finish(ep: ExportedProgram, changed: int) -> int:
    if changed:
        ep.graph_module.graph.lint()
        ep.graph_module.recompile()
    return changed


def tag_delegate_constants(ep: ExportedProgram, tag: str, keep_inside: set[str]) -> int:
    """Mark every lifted parameter/buffer (but the placeholders in ``keep_inside``) so that a delegate stores
    it in the external data file ``tag`` (what ``delegate_external_constants_pass_unlifted`` does on unlifted
    modules; a joint forward+backward graph cannot be unlifted and re-exported).

    Before: ``p_w`` (placeholder, meta ``custom`` absent). After: ``p_w.meta["custom"]["delegate_constant_tag"]
    == tag``; the graph itself is unchanged.
    """
    sig = ep.graph_signature
    constants = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    changed = 0
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in constants and node.name not in keep_inside:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag
            changed += 1
    return changed


def unshare_constants(ep: ExportedProgram, keep_inside: set[str]) -> int:
    """Give each user of a shared frozen constant its own placeholder (same tensor, same fully qualified name).

    Before::

        p_w ─┬─> linear(x, p_w)        # forward, delegated to XNNPACK
             └─> mm(dy, p_w)           # backward, another XNNPACK partition

    After::

        p_w_copy_0 ──> linear(x, p_w_copy_0)     # InputSpec target: the same fqn, no bytes copied
        p_w ─────────> mm(dy, p_w)

    ExecuTorch needs one placeholder per partition and makes the copies itself, one constant at a time with a
    whole-graph rebuild (and a deep copy of the tensor) each time: quadratic on a training graph with hundreds of
    shared weights. Doing all of them in one pass is linear; nothing changes in what the program computes or
    stores (delegates key weights by content, ExecuTorch by the fqn the copies share).
    """
    sig = ep.graph_signature
    kinds = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
    spec_of = {s.arg.name: s for s in sig.input_specs if isinstance(s.arg, TensorArgument)}
    new_specs: list[InputSpec] = []
    changed = 0
    for node in [n for n in ep.graph.nodes if n.op == "placeholder"]:
        spec = spec_of[node.name]
        users = list(node.users)
        if spec.kind in kinds and node.name not in keep_inside and len(users) > 1:
            for i, user in enumerate(users[1:]):
                with ep.graph.inserting_before(node):
                    copy = ep.graph.placeholder(f"{node.name}_copy_{i}")
                copy.meta = dict(node.meta)
                user.replace_input_with(node, copy)
                new_specs.append(InputSpec(spec.kind, TensorArgument(copy.name), spec.target, spec.persistent))
                changed += 1
        new_specs.append(spec)
    if changed:
        ep.graph_signature.input_specs = new_specs
    return _finish(ep, changed)


def rematerialize_constant_subgraphs(ep: ExportedProgram, trainable: set[str]) -> int:
    """Recompute every value derived from frozen constants alone right before each of its users.

    A quantized base dequantizes its weights in the graph (``lorafleet.export.compiler.quantize``). Autograd's
    joint graph computes each dequantized weight once, in the forward, and reads it again in the backward
    (``dL/dx = dL/dy · W``): the memory plan then keeps every layer's fp32 weight alive from the forward to the
    backward — the whole model dequantized. Giving each user its own copy of the (cheap, element-wise)
    dequantization makes every fp32 weight live only from its copy to its one user: at most one layer's
    weight at a time.

    Before::

        q, s ──to_copy──mul──> w ─┬─> linear(x, w)          # forward
                                  └─> linear(dy, wᵀ)        # backward: w alive across the whole graph

    After::

        q, s ──to_copy──mul──> w  ──> linear(x, w)
        q, s ──to_copy──mul──> w' ──> linear(dy, w'ᵀ)       # recomputed just before its use

    The values rematerialized are those computed from a frozen integer matrix (a quantized weight) and other
    frozen constants (its scales) alone; frozen means a lifted parameter, buffer or constant whose fully
    qualified name is not in ``trainable`` (the LoRA factors). An fp32 graph has none, and is left as it is.
    Returns the number of nodes added.
    """
    sig = ep.graph_signature
    constants = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    graph = ep.graph_module.graph
    frozen = {n for n in graph.nodes if n.op == "placeholder" and n.name in constants
              and constants[n.name] not in trainable}
    const: set[torch.fx.Node] = set(frozen)  # values computed from frozen constants alone
    derived: set[torch.fx.Node] = set()  # ... of which an integer matrix (a quantized weight) is one
    for node in graph.nodes:
        if node in frozen:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point and val.dtype != torch.bool \
                    and val.dim() >= 2:
                derived.add(node)
        elif node.op == "call_function":
            inputs = node.all_input_nodes
            if inputs and all(i in const for i in inputs):
                const.add(node)
                if any(i in derived for i in inputs):
                    derived.add(node)
    claimed: dict[torch.fx.Node, torch.fx.Node] = {}  # derived node -> the first consumer that reads it
    added = 0

    def subtree(node: torch.fx.Node) -> list[torch.fx.Node]:
        seen: list[torch.fx.Node] = []
        stack = [node]
        while stack:
            n = stack.pop()
            if n.op == "call_function" and n in const and n not in seen:
                seen.append(n)
                stack.extend(n.all_input_nodes)
        return seen

    for user in [n for n in graph.nodes if n not in const and n.op != "placeholder"]:
        for src in [i for i in user.all_input_nodes if i in derived and i.op == "call_function"]:
            nodes = subtree(src)
            if all(claimed.get(n, user) is user for n in nodes):
                for n in nodes:
                    claimed[n] = user
                continue
            copies: dict[torch.fx.Node, torch.fx.Node] = {}

            def copy(node: torch.fx.Node, before: torch.fx.Node = user,
                     copies: dict[torch.fx.Node, torch.fx.Node] = copies) -> torch.fx.Node:
                nonlocal added
                if node.op != "call_function":
                    return node
                if node not in copies:
                    args = torch.fx.map_arg(node.args, copy)
                    kwargs = torch.fx.map_arg(node.kwargs, copy)
                    with graph.inserting_before(before):
                        new = graph.call_function(node.target, args, kwargs)
                    new.meta = dict(node.meta)
                    copies[node] = new
                    claimed[new] = before
                    added += 1
                return copies[node]

            user.replace_input_with(src, copy(src))
            dead = [n for n in nodes if not n.users]
            while dead:  # the original nodes only this user read (e.g. the backward's transpose)
                n = dead.pop()
                inputs = n.all_input_nodes
                graph.erase_node(n)
                dead += [i for i in inputs if i in const and i.op == "call_function" and not i.users
                         and i not in dead]
    return _finish(ep, added)
