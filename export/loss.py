"""The training objective every runtime compiles: Hugging Face's causal-LM loss as a two-input module.

``CausalLMLoss(model)(input_ids, labels)`` returns ``model(input_ids=..., labels=...).loss``: logits at
position t predict ``labels[t + 1]`` (the shift happens inside), labels equal to ``-100`` are ignored and
the loss is the mean over the remaining tokens. Exporting this module (rather than logits) keeps the loss,
the shift and the ignore index identical across eager PyTorch, ExecuTorch and ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


class CausalLMLoss(torch.nn.Module):
    """``(input_ids (B, T) int64, labels (B, T) int64) -> loss ()``."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=labels, use_cache=False).loss


def example_batch(vocab_size: int, batch_size: int, seq_len: int, *,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch for export and verification: random tokens, labels = tokens with the first 2 ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g, dtype=torch.int64)
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    return ids, labels
