"""ExecuTorch programs for edge packages: lowering, one shared foundation data file, and the device runtime.

Lowering (inputs are a PEFT LoRA ``transformers`` causal LM loaded with ``attn_implementation="eager"``):

* ``lower_inference(peft_model, seq_len) -> LoweredProgram`` — XNNPACK-delegated program, methods
  ``forward(input_ids int64 (1, T)) -> logits (1, T, vocab)``, ``set_lora(*factors)``, ``get_lora()``;
  loadable with ``executorch.runtime.Runtime.get().load_program(pte, data_path=foundation)``.
* ``lower_training(peft_model, batch_size, seq_len, lowering=TrainingLowering(backend="xnnpack"))
  -> LoweredProgram`` — ``forward(input_ids (B, T), labels (B, T)) -> loss`` with Hugging Face's causal-LM
  loss, compiled with its backward; trainable parameters are exactly the LoRA factors
  (``executorch.extension.training`` loads it). Backends ``"xnnpack"`` (default: frozen-weight matmuls of
  forward and backward delegated to XNNPACK), ``"linear"``, ``"portable"`` (see ``training.py``).
* ``LoweredProgram.write(pte_path)`` writes the program; ``LoweredProgram.lora`` is its :class:`LoraSpec`
  (PEFT names, ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``), also stored inside the program.
* ``FoundationStore`` — ``add(lowered.foundation)`` for every program (all ranks, both kinds), then
  ``write(path)``: ONE ``.ptd`` holding each frozen tensor once, valid for every program added.

Device runtime (LoRA tensors by PEFT key, ``base_model.model.<module>.lora_A.weight``):

* ``load_inference(pte, foundation) -> InferenceProgram``: ``logits(input_ids)``, ``set_adapter(adapter)``,
  ``adapter()``, ``get_state()``.
* ``load_training(pte, foundation) -> TrainingProgram``: ``step(input_ids, labels) -> StepResult(loss,
  gradients)``, ``parameters()`` (aliasing program memory), ``set_adapter(adapter)``, ``adapter()``.
* ``HostAdamW(program, AdamWConfig(...)).step(gradients)`` — torch's AdamW applied in place to the program's
  parameters (ExecuTorch ships only SGD).

``set_adapter`` rescales an :class:`export.adapter.Adapter` to the program's compiled ``lora_alpha``
(:func:`export.adapter.rescale`); ``adapter()`` returns the program's current factors as an ``Adapter``.

This ``__init__`` imports nothing heavy; the names above load their module (torch, executorch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "lower_inference": "lower", "LoweredProgram": "lower", "FOUNDATION_TAG": "lower",
    "lower_training": "training", "TrainingLowering": "training",
    "FoundationStore": "foundation", "LoraSpec": "spec",
    "load_inference": "runtime", "load_training": "runtime", "InferenceProgram": "runtime",
    "TrainingProgram": "runtime", "StepResult": "runtime", "adapter_from_state": "runtime",
    "HostAdamW": "optim", "AdamWConfig": "optim",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
