"""XNNPACK partitioners that delegate only ops whose weights are frozen.

XNNPACK packs the constant weights of a delegated op into its own buffers when the program loads; a weight
that must change at run time (a LoRA factor written by ``set_lora`` or updated by a training step) would then
be read stale. :class:`FrozenWeightsXnnpackPartitioner` drops every candidate partition that holds one of
the given placeholders ("pinned": the LoRA parameters or state buffers) and keeps those ops out of
``ops_to_not_decompose`` too, so they run as ordinary ExecuTorch kernels reading live memory.
:class:`ContiguousXnnpackPartitioner` does the same with a partitioning that stays linear in the size of a
30-layer training graph (:func:`contiguous_partitions`); both programs of a package are lowered with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from torch.export import ExportedProgram


def pinned_placeholders(ep: ExportedProgram, pinned_fqns: Iterable[str]) -> set[str]:
    """Placeholder names in ``ep`` of the parameters/buffers named by ``pinned_fqns``."""
    fqns = set(pinned_fqns)
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return {ph for ph, fqn in lifted.items() if fqn in fqns}


class FrozenWeightsXnnpackPartitioner(XnnpackPartitioner):
    """:class:`XnnpackPartitioner` that never delegates an op reading one of ``pinned_fqns``."""

    def __init__(self, pinned_fqns: Iterable[str], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.pinned_fqns = frozenset(pinned_fqns)

    def get_matched_nodes_from_configs(self, ep: ExportedProgram) -> list[list[torch.fx.Node]]:
        pinned = pinned_placeholders(ep, self.pinned_fqns)
        groups = super().get_matched_nodes_from_configs(ep)
        return [g for g in groups if not any(n.op == "placeholder" and n.name in pinned for n in g)]

    def ops_to_not_decompose(
        self, ep: ExportedProgram,
    ) -> tuple[list[torch._ops.OpOverload], Callable[[torch.fx.Node], bool] | None]:
        ops, keep = super().ops_to_not_decompose(ep)
        pinned = pinned_placeholders(ep, self.pinned_fqns)

        def keep_unless_pinned(node: torch.fx.Node) -> bool:
            if any(a.op == "placeholder" and a.name in pinned for a in node.all_input_nodes):
                return False
            return keep(node) if keep is not None else True

        return ops, keep_unless_pinned


# XNNPACK partitioner configs for a decoder's graphs: the matrix products, the element-wise and layout ops of
# its forward and (in a training program) backward. Left out: ops whose delegation needs XNNPACK graph passes
# other than the linear conversion (clone and dim-order copies, cat: XNNPACK's clone removal, dim-order revert
# and cat decomposition passes) and softmax (its partitions returned one of their own inputs, which XNNPACK
# rejects).
DECODER_CONFIGS = (
    "LinearConfig", "MMConfig", "AddmmConfig", "BMMConfig",
    "AddConfig", "SubConfig", "MulConfig", "DivConfig", "NegConfig", "PowConfig", "AbsConfig",
    "ExpConfig", "LogConfig", "SigmoidConfig", "TanhConfig", "GeluConfig", "ReLUConfig", "LeakyReLUConfig",
    "ReciprocalSquareRootConfig", "SquareRootConfig", "SinConfig", "CosConfig", "FloorConfig", "CeilConfig",
    "MaximumConfig", "MinimumConfig", "ClampConfig", "HardtanhConfig", "MeanDimConfig",
    "PermuteConfig", "SliceCopyConfig", "UnsqueezeCopyConfig", "ViewCopyConfig", "ConstantPadConfig",
)


class ContiguousXnnpackPartitioner(FrozenWeightsXnnpackPartitioner):
    """Delegate a decoder's matrix products and element-wise/layout ops to XNNPACK, in partitions as long as
    consecutive supported ops run, never an op reading a LoRA factor.

    Made for the joint forward+backward graph of a LoRA training program (and used for inference too):
    products with frozen weights (forward ``linear(x, W)``, backward ``mm(dy, W)``), attention's batched
    products, norms, rotary embeddings, activations and their gradients. Left to ExecuTorch: the LoRA products
    (their factors change every step), the loss over the vocabulary, reductions other than a mean, and the ops
    :data:`DECODER_CONFIGS` leaves out. XNNPACK's preprocessing runs only its linear conversion (the
    ``dqlinear_partitioner`` compile spec selects exactly that pass list in ``XnnpackBackend.preprocess``): the
    other passes look for patterns (SDPA, upsampling, batch norm, convolutions, quantization) these graphs do
    not have, at about a second per partition each. What the partitions compute is checked against eager for
    every exported program.
    """

    def __init__(self, pinned_fqns: Iterable[str], configs: Iterable[str] = DECODER_CONFIGS) -> None:
        from executorch.backends.xnnpack.partition import config as xnnpack_configs
        from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
        from executorch.exir.backend.compile_spec_schema import CompileSpec
        from executorch.exir.backend.partitioner import DelegationSpec

        classes = [getattr(xnnpack_configs, name) for name in configs]
        super().__init__(pinned_fqns, configs=classes, per_op_mode=False)
        only_linear_pass = CompileSpec("dqlinear_partitioner", b"")
        self.delegation_spec = DelegationSpec(XnnpackBackend.__name__, [only_linear_pass])

    def generate_partitions(self, ep: ExportedProgram) -> list[Any]:
        """Partitions from :func:`contiguous_partitions` (linear in the graph's size).

        XNNPACK's default merging (``GroupBasedPartitioner``) compares every pair of candidate groups, and
        torch's ``CapabilityBasedPartitioner`` searches for a cycle at every merge: both are super-linear in the
        graph's size, and a 30-layer training graph takes them minutes (docs/BENCHMARKS.md).
        """
        return contiguous_partitions(ep.graph_module.graph, self.get_matched_nodes_from_configs(ep))


def contiguous_partitions(graph: torch.fx.Graph, groups: list[list[torch.fx.Node]]) -> list[Any]:
    """Partition the ops of ``groups`` into maximal runs of consecutive supported ops in the graph's order.

    Each group (an op with the nodes it needs, e.g. its weight's placeholder) lands whole in one partition, or,
    when its ops fall into different runs, in none. A run of consecutive nodes of a topological order is convex
    — every path between two of its nodes stays inside it — so fusing it cannot create a cycle, and nothing
    needs to be checked per merge: one pass over the graph, repeated only while some group had to be dropped.
    """
    from torch.fx.passes.infra.partitioner import Partition

    order = [n for n in graph.nodes if n.op == "call_function"]
    live = [g for g in groups if any(n.op == "call_function" for n in g)]
    while True:
        supported = {n for g in live for n in g if n.op == "call_function"}
        run_of: dict[torch.fx.Node, int] = {}
        run, open_run = 0, False
        for node in order:
            if node in supported:
                run_of[node] = run
                open_run = True
            elif open_run:
                run, open_run = run + 1, False
        whole = [g for g in live if len({run_of[n] for n in g if n.op == "call_function"}) == 1]
        if len(whole) == len(live):
            break
        live = whole
    members: dict[int, list[torch.fx.Node]] = {}
    for g in live:
        first = next(n for n in g if n.op == "call_function")
        members.setdefault(run_of[first], []).extend(g)
    return [Partition(id=i, nodes=nodes) for i, nodes in enumerate(members.values())]


GEMM_CONFIGS = ("LinearConfig", "MMConfig", "AddmmConfig")  # the "gemm" lowering: matrix products only


@contextmanager
def weights_shared_across_partitions() -> Iterator[None]:
    """Within the block, XNNPACK partitions do not each get their own copy of the frozen weights.

    ``to_backend`` deep-copies every partition's program (its weights included) before handing it to XNNPACK's
    ``preprocess``, all partitions at once, and each ``preprocess`` returns its weights' bytes, which are
    merged by name only later: a weight read by two partitions (a training program's forward ``linear`` and
    backward ``mm``) existed four times. Measured on a 2-layer Llama-3.2-1B-shaped training program (1.43 GiB
    of weights): 5.7 GiB above the start inside ``to_backend``; 3.9 GiB with this block
    (``bench/executorch_lowering.py memory``). Here the copies share the weight tensors (``preprocess`` only
    reads them; what the programs compute is verified against eager) and bytes under a name already seen are
    replaced by the first copy (XNNPACK names weights by the sha256 of their bytes).
    """
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    preprocess = XnnpackBackend.preprocess
    saved = {name: XnnpackBackend.__dict__.get(name) for name in ("copy_exported_program_for_preprocess", "preprocess")}
    seen: dict[str, Any] = {}

    def copy_sharing_weights(edge_program: ExportedProgram, compile_specs: Any) -> ExportedProgram:
        import copy

        tensors = [*edge_program.state_dict.values(), *edge_program.constants.values()]
        memo = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
        return copy.deepcopy(edge_program, memo)

    def preprocess_deduplicated(edge_program: ExportedProgram, compile_specs: Any) -> Any:
        result = preprocess(edge_program, compile_specs)
        store = result.data_store_output
        if store is not None:
            entries = [*store.pte_data.items()] + [kv for d in store.external_data.values() for kv in d.items()]
            for key, entry in entries:
                store.buffers[entry.buffer_index] = seen.setdefault(key, store.buffers[entry.buffer_index])
        return result

    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(
        lambda cls, ep, specs: copy_sharing_weights(ep, specs))
    XnnpackBackend.preprocess = staticmethod(preprocess_deduplicated)
    try:
        yield
    finally:
        for name, descriptor in saved.items():  # the class's own descriptors, or back to the inherited one
            if descriptor is None:
                delattr(XnnpackBackend, name)
            else:
                setattr(XnnpackBackend, name, descriptor)


@contextmanager
def sort_graph_once() -> Iterator[None]:
    """Within the block, ExecuTorch's ``to_backend`` sorts the graph once after fusing all partitions, instead of
    after each one.

    ``create_submodule_from_nodes`` calls ``legalize_graph`` (a topological sort and rebuild of the entire graph)
    once per partition: quadratic in a training graph with hundreds of partitions (half of a 2.4-minute lowering
    of an 8-layer model, most of a 30-minute one at 30 layers). Skipped there, a fused partition's call may sit
    before one of its inputs (it takes its first node's place); :func:`sort_in_place` then orders the graph
    once, in place — ExecuTorch keeps references to the call nodes, which a rebuilt graph would invalidate.
    ExecuTorch itself skips the per-partition sort on another path (``backend/utils.py``; its TODO T153794167).
    """
    import executorch.exir.backend.backend_api as backend_api

    fuse, create = backend_api.create_submodule_from_nodes, backend_api._create_partitions

    def fuse_without_sort(gm: Any, node_list: Any, tag: str, skip_legalize_graph: bool = False) -> Any:
        return fuse(gm, node_list, tag, skip_legalize_graph=True)

    def create_then_sort_once(gm: Any, *args: Any, **kwargs: Any) -> Any:
        out = create(gm, *args, **kwargs)
        sort_in_place(gm.graph)  # a multi-op partition is fused at its first node, maybe before an input
        return out

    backend_api.create_submodule_from_nodes = fuse_without_sort
    backend_api._create_partitions = create_then_sort_once
    try:
        yield
    finally:
        backend_api.create_submodule_from_nodes = fuse
        backend_api._create_partitions = create


def sort_in_place(graph: torch.fx.Graph) -> int:
    """Reorder ``graph``'s nodes topologically, moving as few as possible; return how many moved.

    Depth-first over each node's inputs in the current order, so an already sorted graph is left as is. Nodes
    are moved within the same graph (unlike ``legalize_graph``, which builds a new one): references that
    ExecuTorch holds to call nodes stay valid.
    """
    order: list[torch.fx.Node] = []
    done: set[torch.fx.Node] = set()
    for root in graph.nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((i, False) for i in reversed(node.all_input_nodes) if i not in done)
    moved = 0
    cursor = graph._root
    for node in order:
        if cursor.next is not node:
            cursor.append(node)
            moved += 1
        cursor = node
    return moved
