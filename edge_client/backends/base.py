"""The one protocol every on-device training backend speaks, and the shared recipe.

A backend holds one LoRA rank of one package and trains it: ``step(batch) -> loss`` (forward, backward and one
optimizer step on a :class:`lorafleet.edge_client.data.Batch`), ``adapter_state() -> Adapter`` (the current LoRA
weights, PEFT layout) and ``load_adapter(adapter)`` (new LoRA weights, rescaled to the package's compiled
``lora_alpha``; the optimizer state is reset unless ``reset_optimizer=False``). Everything above this module is
backend-agnostic.

The recipe is the same on every backend: the loss is Hugging Face's causal-LM cross-entropy over the response
tokens (labels unshifted, ``-100`` ignored, mean over the rest), and the optimizer is AdamW exactly as ONNX
Runtime's training artifacts run it — ``AdamWOptimizer`` with ``adam_mode=1`` (the Hugging Face
``transformers`` variant: bias correction folded into the learning rate, ``eps`` added to ``sqrt(v)``,
decoupled weight decay after the update) and ORT's ``onnxblock.optim.AdamW`` defaults ``betas=(0.9, 0.999)``,
``eps=1e-6``, ``weight_decay=0``. :class:`AdamW` reproduces it in torch for the backends whose runtime has no
such optimizer (eager torch; ExecuTorch, whose Python bindings offer only SGD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lorafleet.export.formats.errors import AdapterError, ConfigError

if TYPE_CHECKING:
    import torch

    from lorafleet.edge_client.data import Batch
    from lorafleet.export.formats.adapter import Adapter

BACKENDS = ("executorch", "onnxruntime", "torch", "native")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters (ORT's artifact defaults; only ``lr`` is a runtime input there)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must lie in [0, 1), got {self.betas}")
        if not (self.eps > 0 and self.weight_decay >= 0):
            raise ConfigError(f"eps must be positive and weight_decay non-negative, got {self.eps}, "
                              f"{self.weight_decay}")


class TrainingBackend(Protocol):
    """What the trainer, the profiler and the Flower client use; nothing more."""

    name: str
    rank: int

    def step(self, batch: Batch) -> float: ...

    def adapter_state(self) -> Adapter: ...

    def load_adapter(self, adapter: Adapter, *, reset_optimizer: bool = True) -> None: ...


class AdamW:
    """ONNX Runtime's ``AdamWOptimizer`` (``adam_mode=1``, bias correction on) over torch tensors, in place.

    Per step t (1-based): ``m = β1·m + (1−β1)·g``; ``v = β2·v + (1−β2)·g²``;
    ``w -= lr·sqrt(1−β2^t)/(1−β1^t) · m / (sqrt(v) + eps)``; then ``w -= lr·weight_decay·w``
    (Loshchilov & Hutter 2019 as implemented by transformers' AdamW and ORT's CPU kernel).
    """

    def __init__(self, params: list[torch.Tensor], config: OptimizerConfig):
        import torch

        self.params, self.config = params, config
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def reset(self) -> None:
        for buf in (*self.m, *self.v):
            buf.zero_()
        self.t = 0

    def step(self, grads: list[torch.Tensor]) -> None:
        import torch

        c = self.config
        b1, b2 = c.betas
        self.t += 1
        # ORT rounds the corrections to float32; computing them in float64 differs by ~1e-7 relative
        lr_t = c.lr * math.sqrt(1.0 - b2 ** self.t) / (1.0 - b1 ** self.t)
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                p.addcdiv_(m, v.sqrt().add_(c.eps), value=-lr_t)
                if c.weight_decay:
                    p.mul_(1.0 - c.lr * c.weight_decay)


def check_rank(adapter: Adapter, rank: int) -> None:
    """Raise :class:`AdapterError` unless every module of ``adapter`` has rank ``rank`` (what a program trains)."""
    if adapter.ranks != {rank}:
        raise AdapterError(f"adapter has rank {sorted(adapter.ranks)}, the program trains rank {rank} "
                           f"(truncate it first: lorafleet.export.formats.adapter.truncate)")
