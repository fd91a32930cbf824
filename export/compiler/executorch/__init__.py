"""The ExecuTorch half of the compiler: lowering programs and one shared foundation data file.

Lowering (inputs are a PEFT LoRA ``transformers`` causal LM loaded with ``attn_implementation="eager"``):

* ``lower_inference(peft_model, seq_len) -> LoweredProgram`` — XNNPACK-delegated program, methods
  ``forward(input_ids int64 (1, T)) -> logits (1, T, vocab)``, ``set_lora(*factors)``, ``get_lora()``;
  loadable with ``executorch.runtime.Runtime.get().load_program(pte, data_path=foundation)``.
* ``lower_training(peft_model, batch_size, seq_len, lowering=TrainingLowering(backend="xnnpack"))
  -> LoweredProgram`` — ``forward(input_ids (B, T), labels (B, T)) -> loss`` with Hugging Face's causal-LM
  loss, compiled with its backward; trainable parameters are exactly the LoRA factors
  (``executorch.extension.training`` loads it). Backends ``"xnnpack"`` (default: frozen-weight matmuls of
  forward and backward delegated to XNNPACK), ``"linear"``, ``"portable"`` (see ``training.py``).
* ``LoweredProgram.write(pte_path)`` writes the program; ``LoweredProgram.lora`` is its
  :class:`~lorafleet.export.formats.program.CompiledLora`
  (PEFT names, ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``), also stored inside the program.
* ``FoundationStore`` — ``add(lowered.foundation)`` for every program (all ranks, both kinds), then
  ``write(path)``: ONE ``.ptd`` holding each frozen tensor once, valid for every program added.

The programs run in :mod:`lorafleet.export.runtime.executorch` (``load_inference``, ``load_training``, re-exported
here for the compiler's own verification).

This ``__init__`` imports nothing heavy; the names above load their module (torch, executorch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_RUNTIME = "lorafleet.export.runtime.executorch"
_EXPORTS = {
    "lower_inference": f"{__name__}.lower", "LoweredProgram": f"{__name__}.lower",
    "FOUNDATION_TAG": f"{__name__}.lower", "lower_training": f"{__name__}.training",
    "TrainingLowering": f"{__name__}.training", "FoundationStore": f"{__name__}.foundation",
    "load_inference": _RUNTIME, "load_training": _RUNTIME, "InferenceProgram": _RUNTIME,
    "TrainingProgram": _RUNTIME, "StepResult": _RUNTIME, "adapter_from_state": _RUNTIME,
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
