"""The modules each ExecuTorch method is exported from, all wrapping one PEFT causal LM.

Every wrapper keeps the PEFT model under the same attribute (:data:`WRAPPED`), so a frozen weight has the same
fully qualified name in every program — inference or training, any rank — and the programs can share one
foundation data file keyed by those names.

* :class:`lorafleet.export.compiler.loss.CausalLMLoss` — the training method, shared with ONNX Runtime. Its
  trainable parameters are the PEFT LoRA tensors themselves; ExecuTorch's training runtime exposes them.
* :class:`InferenceLogits` — ``forward(input_ids (1, T)) -> logits (1, T, vocab)``. The LoRA tensors are read
  from :class:`LoraState` *buffers* instead of the PEFT parameters (``torch.func.functional_call``), so that the
  sibling methods :class:`SetLora` / :class:`GetLora` can overwrite and read them at run time: ExecuTorch keeps
  buffers written by one method in memory shared by all methods (``share_mutable_buffers``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lorafleet.export.formats.adapter import LORA_KEY
from lorafleet.export.formats.errors import ExportError
from lorafleet.export.formats.program import WRAPPED

LORA_STATE = "lora"  # attribute name of the LoraState inside the inference wrappers (buffers lora.w0, ...)


def lora_parameter_names(peft_model: Any) -> list[str]:
    """PEFT's parameter names of the LoRA factors, in module order
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ...)."""
    names = [n for n, _ in peft_model.named_parameters() if (m := LORA_KEY.match(n)) is not None and m["adapter"]]
    if not names:
        raise ExportError("the model has no LoRA parameters (wrap it with peft.get_peft_model first)")
    return names


class LoraState(nn.Module):
    """The LoRA factors as buffers ``w0 … w{n-1}`` (order of :func:`lora_parameter_names`)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"w{i}", t.detach().clone().contiguous())
        self.count = len(tensors)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f"w{i}") for i in range(self.count)]


class InferenceLogits(nn.Module):
    """``forward(input_ids (1, T)) -> logits (1, T, vocab)`` with the LoRA factors read from ``state``."""

    def __init__(self, peft_model: Any, names: list[str], state: LoraState) -> None:
        super().__init__()
        setattr(self, WRAPPED, peft_model)
        setattr(self, LORA_STATE, state)
        self.names = list(names)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        swapped = dict(zip(self.names, getattr(self, LORA_STATE).tensors(), strict=True))
        out = functional_call(getattr(self, WRAPPED), swapped, (), {"input_ids": input_ids})
        return out.logits


class SetLora(nn.Module):
    """``set_lora(*factors) -> checksum``: copies new LoRA factors into the shared state buffers."""

    def __init__(self, state: LoraState) -> None:
        super().__init__()
        setattr(self, LORA_STATE, state)

    def forward(self, *factors: torch.Tensor) -> torch.Tensor:
        for buf, new in zip(getattr(self, LORA_STATE).tensors(), factors, strict=True):
            buf.copy_(new)
        # a method needs an output; the sum of the factors lets a caller check what arrived
        return torch.stack([f.sum() for f in factors]).sum()


class GetLora(nn.Module):
    """``get_lora() -> factors``: the current LoRA state buffers."""

    def __init__(self, state: LoraState) -> None:
        super().__init__()
        setattr(self, LORA_STATE, state)

    def forward(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in getattr(self, LORA_STATE).tensors())
