"""An XNNPACK partitioner that delegates only ops whose weights are frozen.

XNNPACK packs the constant weights of a delegated op into its own buffers when the program loads; a weight
that must change at run time (a LoRA factor written by ``set_lora`` or updated by a training step) would then
be read stale. :class:`FrozenWeightsXnnpackPartitioner` drops every candidate partition that holds one of
the given placeholders ("pinned": the LoRA parameters or state buffers) and keeps those ops out of
``ops_to_not_decompose`` too, so they run as ordinary ExecuTorch kernels reading live memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


class GemmXnnpackPartitioner(FrozenWeightsXnnpackPartitioner):
    """Delegate only matrix products (``linear``, ``mm``, ``addmm``) to XNNPACK, each as its own partition.

    For the joint forward+backward graph of a training program: the frozen weights' products of the forward
    (``linear(x, W)``) and of the backward (``mm(dy, W)``, XNNPACK's fully-connected with transposed weights)
    carry nearly all of the FLOPs. Partitions hold one product each, so XNNPACK's preprocessing only needs
    its linear conversion; the other XNNPACK graph passes (SDPA and upsampling pattern matching...) cost about
    a second *per partition* on this graph and have nothing to find, so they are skipped through the
    ``dqlinear_partitioner`` compile spec that selects exactly that pass list in ``XnnpackBackend.preprocess``.
    """

    def __init__(self, pinned_fqns: Iterable[str]) -> None:
        from executorch.backends.xnnpack.partition.config.gemm_configs import (
            AddmmConfig,
            LinearConfig,
            MMConfig,
        )
        from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
        from executorch.exir.backend.compile_spec_schema import CompileSpec
        from executorch.exir.backend.partitioner import DelegationSpec

        super().__init__(pinned_fqns, configs=[LinearConfig, MMConfig, AddmmConfig], per_op_mode=True)
        only_linear_pass = CompileSpec("dqlinear_partitioner", b"")
        self.delegation_spec = DelegationSpec(XnnpackBackend.__name__, [only_linear_pass])
