"""Lower a PEFT LoRA causal LM to an ExecuTorch training program.

``forward(input_ids (B, T), labels (B, T)) -> loss`` (Hugging Face's causal-LM loss) is exported, its backward
added by ``torch.export.experimental._export_forward_backward`` — the program returns the loss, the LoRA
gradients and the LoRA parameters, as ``executorch.extension.training.TrainingModule`` expects — and lowered:

* ``"portable"`` — ``to_edge(...).to_executorch()``, ExecuTorch's own kernels (the naive lowering);
* ``"linear"`` — the same after the graph rewrites of :mod:`lorafleet.export.compiler.executorch.passes`, which drop the
  weight transposes autograd leaves in the graph (ExecuTorch has no views: each is a full ``permute_copy`` per step) and
  keep ``linear`` undecomposed;
* ``"gemm"`` — the rewrites, then every matrix product with a frozen weight (forward ``linear`` and backward
  ``mm``) delegated to XNNPACK, weights stored in the foundation file under the same keys as the inference
  program's;
* ``"xnnpack"`` (default) — the rewrites, then the matrix products and the element-wise and layout ops of the
  forward and backward delegated to XNNPACK, each run of consecutive supported ops one partition
  (:class:`lorafleet.export.compiler.executorch.partition.ContiguousXnnpackPartitioner`). The LoRA factors and every op
  reading them stay in ExecuTorch memory in both XNNPACK lowerings: a training step or ``set_adapter`` changes them.

docs/BENCHMARKS.md has each lowering's step time against eager PyTorch on the same CPU; ``"xnnpack"`` is the
default because it is the one faster than eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
from torch.export import export
from torch.export.experimental import _export_forward_backward

from lorafleet.export.compiler.executorch.lower import (
    FOUNDATION_TAG,
    LoweredProgram,
    check_positive,
    compiled_lora,
    foundation_tagger,
    serialize,
)
from lorafleet.export.compiler.executorch.partition import (
    DECODER_CONFIGS,
    GEMM_CONFIGS,
    ContiguousXnnpackPartitioner,
    pinned_placeholders,
    sort_graph_once,
    weights_shared_across_partitions,
)
from lorafleet.export.compiler.executorch.passes import (
    cancel_transpose_pairs,
    drop_identity_ops,
    mm_to_linear,
    rematerialize_constant_subgraphs,
    replace_empty_permuted,
    tag_delegate_constants,
    unshare_constants,
)
from lorafleet.export.compiler.executorch.wrappers import lora_parameter_names
from lorafleet.export.compiler.loss import CausalLMLoss
from lorafleet.export.formats.errors import ExportError
from lorafleet.export.formats.program import LORA_METHOD, WRAPPED

TrainingBackend = Literal["portable", "linear", "gemm", "xnnpack"]
BACKENDS: tuple[TrainingBackend, ...] = ("portable", "linear", "gemm", "xnnpack")


@dataclass(frozen=True)
class TrainingLowering:
    """How the joint graph is lowered (see the module docstring)."""

    backend: TrainingBackend = "xnnpack"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ExportError(f"TrainingLowering.backend must be one of {BACKENDS}, got {self.backend!r}")


def lower_training(peft_model: Any, batch_size: int, seq_len: int, lowering: TrainingLowering | None = None,
                   data_path: str | Path | None = None) -> LoweredProgram:
    """Compile the joint forward+backward ``forward(input_ids, labels) -> loss`` for batches (B, T).

    With ``data_path`` the frozen weights' data file is written there instead of being returned in memory.
    """
    lowering = lowering or TrainingLowering()
    check_positive(batch_size=batch_size, seq_len=seq_len)
    names = lora_parameter_names(peft_model)
    spec = compiled_lora(peft_model, names)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    if trainable != set(names):
        extra = sorted(trainable - set(names))[:3]
        raise ExportError(f"only LoRA factors may be trainable; also trainable: {extra}")
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
    ep = _export_forward_backward(export(CausalLMLoss(peft_model), (ids, ids.clone()), strict=False))
    replace_empty_permuted(ep)
    pinned = {f"{WRAPPED}.{n}" for n in names}
    preserve: list[torch._ops.OpOverload] = []
    if lowering.backend != "portable":
        drop_identity_ops(ep)
        cancel_transpose_pairs(ep)
        mm_to_linear(ep)
        preserve = [torch.ops.aten.linear.default]
    rematerialize_constant_subgraphs(ep, trainable=pinned)  # a quantized base: dequantize again for the backward
    edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False, preserve_ops=preserve),
                   constant_methods={LORA_METHOD: spec.to_json()})
    if lowering.backend in ("gemm", "xnnpack"):
        joint = edge.exported_program()
        inside = pinned_placeholders(joint, pinned)
        unshare_constants(joint, keep_inside=inside)
        tag_delegate_constants(joint, FOUNDATION_TAG, keep_inside=inside)
        configs = DECODER_CONFIGS if lowering.backend == "xnnpack" else GEMM_CONFIGS
        with sort_graph_once(), weights_shared_across_partitions():
            edge = edge.to_backend(ContiguousXnnpackPartitioner(pinned, configs))
    config = ExecutorchBackendConfig(external_constants=foundation_tagger(edge, pinned))
    return serialize("training", edge.to_executorch(config), spec, (batch_size, seq_len), data_path)
