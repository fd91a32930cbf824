"""The training objective every runtime compiles: Hugging Face's causal-LM loss as a two-input module.

``CausalLMLoss(model)(input_ids, labels)`` is the loss of ``model``'s logits: logits at position t predict
``labels[t + 1]`` (the shift happens inside), labels equal to :data:`IGNORE_INDEX` are ignored and the loss
is the mean over the remaining tokens — transformers' ``ForCausalLMLoss``. Exporting this module (rather
than logits) keeps the loss, the shift and the ignore index identical across eager PyTorch, ExecuTorch and
ONNX Runtime; the model sits under :data:`~lorafleet.export.formats.program.WRAPPED`, so a frozen weight has
the same fully qualified name in every program.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorafleet.export.formats.program import IGNORE_INDEX, WRAPPED

__all__ = ["IGNORE_INDEX", "CausalLMLoss", "causal_lm_loss", "example_batch"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts label t+1; :data:`IGNORE_INDEX` is ignored; mean over the rest (in float32).

    Labels are shifted by padding one ignored label on the right (as transformers does), so the logits
    ``(B, T, V)`` are used unsliced.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class CausalLMLoss(torch.nn.Module):
    """``(input_ids (B, T) int64, labels (B, T) int64) -> loss ()`` of a (PEFT) causal LM."""

    def __init__(self, model: Any):
        super().__init__()
        setattr(self, WRAPPED, model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = getattr(self, WRAPPED)(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
        return causal_lm_loss(logits, labels)


def example_batch(vocab_size: int, batch_size: int, seq_len: int, *,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch for export and verification: random tokens, labels = tokens with the first 2 ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g, dtype=torch.int64)
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    return ids, labels
