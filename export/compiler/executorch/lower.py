"""Lower a PEFT LoRA causal LM to ExecuTorch programs — export → rewrite → lower → serialize.

* :func:`lower_inference` — an XNNPACK-delegated program with methods ``forward(input_ids (1, T)) -> logits``,
  ``set_lora(*factors)`` and ``get_lora()``. The LoRA factors live in buffers shared by the three methods
  (ExecuTorch's ``share_mutable_buffers``) and their ops stay out of XNNPACK, so new factors take effect
  without re-export.
* :func:`lorafleet.export.compiler.executorch.training.lower_training` — the training program (its own module).

Program–data separation: every frozen weight is tagged for the data file :data:`FOUNDATION_TAG`; the LoRA factors stay
inside the per-rank ``.pte``. Frozen weights keep the same key in every program (the wrappers share module names;
XNNPACK keys its weights by content hash), so :class:`~lorafleet.export.compiler.executorch.foundation.FoundationStore`
merges the data files of all ranks and of both program kinds into one ``.ptd``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from executorch.exir import (
    EdgeProgramManager,
    ExecutorchBackendConfig,
    ExecutorchProgramManager,
    to_edge_transform_and_lower,
)
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted
from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
from torch.export import ExportedProgram, export

from lorafleet.export.compiler.executorch.partition import (
    ContiguousXnnpackPartitioner,
    pinned_placeholders,
    sort_graph_once,
    weights_shared_across_partitions,
)
from lorafleet.export.compiler.executorch.wrappers import (
    LORA_STATE,
    GetLora,
    InferenceLogits,
    LoraState,
    SetLora,
    lora_parameter_names,
)
from lorafleet.export.formats.atomic import atomic_write
from lorafleet.export.formats.errors import ExportError
from lorafleet.export.formats.program import LORA_METHOD, CompiledLora, LoraSpec

FOUNDATION_TAG = "foundation"  # the frozen weights' data file is FOUNDATION_TAG + ".ptd"
ProgramKind = Literal["inference", "training"]
LORA_STATE_PREFIX = f"b_{LORA_STATE}_w"  # placeholder names of the LoraState buffers in exported graphs


@dataclass
class LoweredProgram:
    """A serialized program and the frozen-weights data it reads (``None`` when it has no external data)."""

    kind: ProgramKind
    pte: bytes
    foundation: bytes | None  # None when there is none, or when it was written to the lowering's ``data_path``
    lora: CompiledLora
    input_shape: tuple[int, int]  # (B, T) of input_ids (and labels)

    def write(self, path: str | Path) -> Path:
        """Write the ``.pte`` atomically; the foundation is written once for all programs by a FoundationStore."""
        return atomic_write(path, self.pte)


def lower_inference(peft_model: Any, seq_len: int, data_path: str | Path | None = None) -> LoweredProgram:
    """Compile ``forward(input_ids (1, seq_len)) -> logits``, ``set_lora``, ``get_lora`` (XNNPACK, fp32).

    With ``data_path`` the frozen weights' data file is written there instead of being returned in memory.
    """
    check_positive(seq_len=seq_len)
    names = lora_parameter_names(peft_model)
    spec = compiled_lora(peft_model, names)
    params = dict(peft_model.named_parameters())
    state = LoraState([params[n] for n in names])
    pinned = {f"{LORA_STATE}.w{i}" for i in range(len(names))}
    ids = torch.zeros((1, seq_len), dtype=torch.long)
    with torch.no_grad():
        forward = _export_with_delegate_tags(InferenceLogits(peft_model, names, state), (ids,), pinned)
        setter = export(SetLora(state), tuple(t.clone() for t in state.tensors()), strict=False)
        getter = export(GetLora(state), (), strict=False)
    methods = {"forward": forward, "set_lora": setter, "get_lora": getter}
    with sort_graph_once(), weights_shared_across_partitions():
        edge = to_edge_transform_and_lower(
            methods,
            partitioner={"forward": [ContiguousXnnpackPartitioner(pinned)], "set_lora": [], "get_lora": []},
            constant_methods={LORA_METHOD: spec.to_json()},
        )
    config = ExecutorchBackendConfig(
        passes=[InitializedMutableBufferPass([LORA_STATE_PREFIX])],  # ship the factors as the state's initial value
        external_constants=foundation_tagger(edge, pinned),
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
        emit_mutable_buffer_names=True,
    )
    return serialize("inference", edge.to_executorch(config), spec, (1, seq_len), data_path)


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


def foundation_tagger(edge: EdgeProgramManager, pinned: set[str]) -> Callable[[torch.fx.Node], str | None]:
    """A ``to_executorch`` tag function: frozen constants go to the foundation file, pinned ones stay inside."""
    inside: set[str] = set()
    for method in edge.methods:
        inside |= pinned_placeholders(edge.exported_program(method), pinned)
    return lambda node: None if node.name in inside else FOUNDATION_TAG


def serialize(kind: ProgramKind, et: ExecutorchProgramManager, spec: CompiledLora, shape: tuple[int, int],
              data_path: str | Path | None = None) -> LoweredProgram:
    """The program's bytes and its foundation data: in memory, or moved to ``data_path`` (never read back: a
    1B model's is gigabytes)."""
    where = Path(data_path).parent if data_path is not None else None
    with tempfile.TemporaryDirectory(prefix="lorafleet-ptd-", dir=where) as tmp:
        if et._tensor_data:  # no public accessor; write_tensor_data_to_file asserts when there is no data
            et.write_tensor_data_to_file(tmp)
        files = {p.stem: p for p in Path(tmp).glob("*.ptd")}
        if set(files) - {FOUNDATION_TAG}:
            raise ExportError(f"unexpected data files from ExecuTorch: {sorted(files)}")
        if FOUNDATION_TAG not in files:
            return LoweredProgram(kind, et.buffer, None, spec, shape)
        if data_path is None:
            return LoweredProgram(kind, et.buffer, files[FOUNDATION_TAG].read_bytes(), spec, shape)
        files[FOUNDATION_TAG].replace(data_path)
        return LoweredProgram(kind, et.buffer, None, spec, shape)


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ExportError(f"{name} must be a positive integer, got {value!r}")


def compiled_lora(peft_model: Any, names: list[str]) -> CompiledLora:
    """What a program compiled from ``peft_model`` states about its LoRA heads: its (single, uniform) PEFT
    ``LoraConfig`` and the LoRA parameter names in program order."""
    configs = getattr(peft_model, "peft_config", None) or {}
    if len(configs) != 1:
        raise ExportError(f"expected a PEFT model with exactly one adapter, found {len(configs)}")
    cfg = next(iter(configs.values()))
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise ExportError("rank_pattern / alpha_pattern are not supported: one rank per program")
    if getattr(cfg, "use_dora", False):
        raise ExportError("DoRA adapters are not supported")
    targets = (cfg.target_modules,) if isinstance(cfg.target_modules, str) else tuple(sorted(cfg.target_modules))
    return CompiledLora(tuple(names), LoraSpec(int(cfg.r), targets, float(cfg.lora_alpha), bool(cfg.use_rslora)))
