"""Lower a PEFT LoRA causal LM to ExecuTorch programs — export → rewrite → lower → serialize.

* :func:`lower_inference` — an XNNPACK-delegated program with methods ``forward(input_ids (1, T)) -> logits``,
  ``set_lora(*factors)`` and ``get_lora()``. The LoRA factors live in buffers shared by the three methods
  (ExecuTorch's ``share_mutable_buffers``) and their ops stay out of XNNPACK, so new factors take effect
  without re-export.
* :func:`lower_training` — ``forward(input_ids (B, T), labels (B, T)) -> loss`` compiled with its backward
  (``torch.export.experimental._export_forward_backward``): the program returns the loss, the LoRA gradients
  and the LoRA parameters, which is what ``executorch.extension.training.TrainingModule`` expects.

Program–data separation: every frozen weight is tagged for the data file :data:`FOUNDATION_TAG`; the LoRA
factors stay inside the per-rank ``.pte``. Frozen weights keep the same key in every program (the wrappers
share module names; XNNPACK keys its weights by content hash), so :class:`export.executorch.foundation.
FoundationStore` merges the data files of all ranks and of both program kinds into one ``.ptd``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from executorch.exir import (
    EdgeCompileConfig,
    EdgeProgramManager,
    ExecutorchBackendConfig,
    ExecutorchProgramManager,
    to_edge,
    to_edge_transform_and_lower,
)
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted
from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
from torch.export import ExportedProgram, export
from torch.export.experimental import _export_forward_backward

from export.errors import ExportError
from export.executorch.files import write_atomic
from export.executorch.partition import FrozenWeightsXnnpackPartitioner, pinned_placeholders
from export.executorch.passes import replace_empty_permuted
from export.executorch.spec import LORA_METHOD, LoraSpec
from export.executorch.wrappers import (
    LORA_STATE,
    CausalLMLoss,
    GetLora,
    InferenceLogits,
    LoraState,
    SetLora,
    lora_parameter_names,
)

FOUNDATION_TAG = "foundation"  # the frozen weights' data file is FOUNDATION_TAG + ".ptd"
ProgramKind = Literal["inference", "training"]
LORA_STATE_PREFIX = f"b_{LORA_STATE}_w"  # placeholder names of the LoraState buffers in exported graphs


@dataclass
class LoweredProgram:
    """A serialized program and the frozen-weights data it reads (``None`` when it has no external data)."""

    kind: ProgramKind
    pte: bytes
    foundation: bytes | None
    lora: LoraSpec
    input_shape: tuple[int, int]  # (B, T) of input_ids (and labels)

    def write(self, path: str | Path) -> Path:
        """Write the ``.pte`` atomically; the foundation is written once for all programs by a FoundationStore."""
        return write_atomic(path, self.pte)


def lower_inference(peft_model: Any, seq_len: int) -> LoweredProgram:
    """Compile ``forward(input_ids (1, seq_len)) -> logits``, ``set_lora``, ``get_lora`` (XNNPACK, fp32)."""
    _check_positive(seq_len=seq_len)
    names = lora_parameter_names(peft_model)
    spec = LoraSpec.from_peft(peft_model, names)
    params = dict(peft_model.named_parameters())
    state = LoraState([params[n] for n in names])
    pinned = {f"{LORA_STATE}.w{i}" for i in range(len(names))}
    ids = torch.zeros((1, seq_len), dtype=torch.long)
    with torch.no_grad():
        forward = _export_with_delegate_tags(InferenceLogits(peft_model, names, state), (ids,), pinned)
        setter = export(SetLora(state), tuple(t.clone() for t in state.tensors()), strict=False)
        getter = export(GetLora(state), (), strict=False)
    methods = {"forward": forward, "set_lora": setter, "get_lora": getter}
    edge = to_edge_transform_and_lower(
        methods,
        partitioner={"forward": [FrozenWeightsXnnpackPartitioner(pinned)], "set_lora": [], "get_lora": []},
        constant_methods={LORA_METHOD: spec.to_json()},
    )
    config = ExecutorchBackendConfig(
        passes=[InitializedMutableBufferPass([LORA_STATE_PREFIX])],  # ship the factors as the state's initial value
        external_constants=_foundation_tagger(edge, pinned),
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
        emit_mutable_buffer_names=True,
    )
    return _serialize("inference", edge.to_executorch(config), spec, (1, seq_len))


def lower_training(peft_model: Any, batch_size: int, seq_len: int) -> LoweredProgram:
    """Compile the joint forward+backward ``forward(input_ids, labels) -> loss`` for batches (B, T)."""
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    names = lora_parameter_names(peft_model)
    spec = LoraSpec.from_peft(peft_model, names)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    if trainable != set(names):
        extra = sorted(trainable - set(names))[:3]
        raise ExportError(f"only LoRA factors may be trainable; also trainable: {extra}")
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
    ep = export(CausalLMLoss(peft_model), (ids, ids.clone()), strict=False)
    ep = _export_forward_backward(ep)
    replace_empty_permuted(ep)
    edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False),
                   constant_methods={LORA_METHOD: spec.to_json()})
    pinned = {f"model.{n}" for n in names}
    config = ExecutorchBackendConfig(external_constants=_foundation_tagger(edge, pinned))
    return _serialize("training", edge.to_executorch(config), spec, (batch_size, seq_len))


# --- stages ---------------------------------------------------------------------------------------------

def _export_with_delegate_tags(module: torch.nn.Module, args: tuple[Any, ...], pinned: set[str]) -> ExportedProgram:
    """Export, tag every frozen constant so the XNNPACK delegate stores it in the foundation file, re-export.

    The delegate reads its constants' tags from ``get_attr`` nodes of the unlifted module (as ExecuTorch's
    LLM export does with ``delegate_external_constants_pass_unlifted``).
    """
    unlifted = export(module, args, strict=False).module()
    delegate_external_constants_pass_unlifted(
        unlifted, gen_tag_fn=lambda node: None if node.target in pinned else FOUNDATION_TAG)
    return export(unlifted, args, strict=False)


def _foundation_tagger(edge: EdgeProgramManager, pinned: set[str]) -> Callable[[torch.fx.Node], str | None]:
    """A ``to_executorch`` tag function: frozen constants go to the foundation file, pinned ones stay inside."""
    inside: set[str] = set()
    for method in edge.methods:
        inside |= pinned_placeholders(edge.exported_program(method), pinned)
    return lambda node: None if node.name in inside else FOUNDATION_TAG


def _serialize(kind: ProgramKind, et: ExecutorchProgramManager, spec: LoraSpec,
               shape: tuple[int, int]) -> LoweredProgram:
    with tempfile.TemporaryDirectory(prefix="lorafleet-ptd-") as tmp:
        if et._tensor_data:  # no public accessor; write_tensor_data_to_file asserts when there is no data
            et.write_tensor_data_to_file(tmp)
        files = {p.stem: p for p in Path(tmp).glob("*.ptd")}
        if set(files) - {FOUNDATION_TAG}:
            raise ExportError(f"unexpected data files from ExecuTorch: {sorted(files)}")
        foundation = files[FOUNDATION_TAG].read_bytes() if FOUNDATION_TAG in files else None
    return LoweredProgram(kind, et.buffer, foundation, spec, shape)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ExportError(f"{name} must be a positive integer, got {value!r}")
