"""The modules each ExecuTorch method is exported from, all wrapping one PEFT causal LM.

Every wrapper keeps the PEFT model under the same attribute (:data:`WRAPPED`), so a frozen weight has the same
fully qualified name in every program — inference or training, any rank — and the programs can share one
foundation data file keyed by those names.

* :class:`CausalLMLoss` — ``forward(input_ids (B, T), labels (B, T)) -> (loss,)``, Hugging Face's causal-LM loss
  (labels shifted inside, -100 ignored, mean over the counted tokens). Its trainable parameters are the PEFT
  LoRA tensors themselves; ExecuTorch's training runtime exposes them.
* :class:`InferenceLogits` — ``forward(input_ids (1, T)) -> logits (1, T, vocab)``. The LoRA tensors are read
  from :class:`LoraState` *buffers* instead of the PEFT parameters (``torch.func.functional_call``), so that the
  sibling methods :class:`SetLora` / :class:`GetLora` can overwrite and read them at run time: ExecuTorch keeps
  buffers written by one method in memory shared by all methods (``share_mutable_buffers``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from export.adapter import PEFT_PREFIX
from export.errors import ExportError

WRAPPED = "model"  # attribute name of the PEFT model inside every wrapper
LORA_STATE = "lora"  # attribute name of the LoraState inside the inference wrappers (buffers lora.w0, ...)
IGNORE_INDEX = -100  # Hugging Face's label value for "not counted in the loss"
_LORA_PARAM = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[A-Za-z0-9_-]+)\.weight$")


def lora_parameter_names(peft_model: Any) -> list[str]:
    """PEFT's parameter names of the LoRA factors, in module order
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ...)."""
    names = [n for n, _ in peft_model.named_parameters() if _LORA_PARAM.match(n)]
    if not names:
        raise ExportError("the model has no LoRA parameters (wrap it with peft.get_peft_model first)")
    return names


def peft_key(name: str) -> str:
    """A LoRA parameter name as PEFT saves it: the adapter name dropped
    (``...q_proj.lora_A.default.weight`` → ``...q_proj.lora_A.weight``)."""
    m = _LORA_PARAM.match(name)
    if m is None:
        raise ValueError(f"not a PEFT LoRA parameter name: {name!r}")
    return f"{m['module']}.lora_{m['which']}.weight"


def split_lora_name(name: str) -> tuple[str, str]:
    """``(module inside the base model, "A" | "B")`` of a PEFT LoRA parameter name."""
    m = _LORA_PARAM.match(name)
    if m is None:
        raise ValueError(f"not a PEFT LoRA parameter name: {name!r}")
    module = m["module"].removeprefix(PEFT_PREFIX)
    return module, m["which"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``ForCausalLMLoss``: position t predicts label t+1; -100 is ignored; mean over the rest.

    Labels are shifted by padding one -100 on the right (as transformers does), so the logits (B, T, V) are
    used unsliced.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class CausalLMLoss(nn.Module):
    """``forward(input_ids (B, T), labels (B, T)) -> (loss,)`` of a PEFT causal LM."""

    def __init__(self, peft_model: Any) -> None:
        super().__init__()
        setattr(self, WRAPPED, peft_model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor]:
        logits = getattr(self, WRAPPED)(input_ids=input_ids).logits  # (B, T, V)
        return (causal_lm_loss(logits, labels),)


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
