"""The optimizer for ExecuTorch training programs: torch's own AdamW, stepping ExecuTorch's parameter memory.

ExecuTorch 1.5 ships only SGD (``executorch.extension.training.get_sgd_optimizer``). The packages' recipe is
AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), the optimizer of the torch
reference and of ONNX Runtime training, so this module applies ``torch.optim.AdamW`` on the host to
ExecuTorch's parameter tensors. They alias the program's memory (``TrainingModule.named_parameters()`` returns
the program outputs uncloned), so the update is in place and the next ``forward_backward`` sees it; the
arithmetic is torch's, so it matches eager torch AdamW bit for bit given equal gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from export.errors import ConfigError
from export.executorch.runtime import StateDict, TrainingProgram


@dataclass(frozen=True)
class AdamWConfig:
    """``torch.optim.AdamW`` hyper-parameters (torch's defaults)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"AdamWConfig.lr must be positive, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"AdamWConfig.betas must lie in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"AdamWConfig.eps must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"AdamWConfig.weight_decay must be >= 0, got {self.weight_decay}")


class HostAdamW:
    """``torch.optim.AdamW`` over a :class:`TrainingProgram`'s LoRA parameters, updated in place."""

    def __init__(self, program: TrainingProgram, config: AdamWConfig | None = None) -> None:
        self.config = config or AdamWConfig()
        # nn.Parameter shares the storage of the tensor it wraps: the program's memory.
        self.params = {k: torch.nn.Parameter(t, requires_grad=True) for k, t in program.parameters().items()}
        c = self.config
        self._opt = torch.optim.AdamW(list(self.params.values()), lr=c.lr, betas=c.betas, eps=c.eps,
                                      weight_decay=c.weight_decay)

    def step(self, gradients: StateDict) -> None:
        """One AdamW update from ``gradients`` (PEFT keys, e.g. a :class:`StepResult`'s)."""
        if set(gradients) != set(self.params):
            raise ConfigError("gradients must name exactly the program's LoRA parameters")
        for k, p in self.params.items():
            p.grad = gradients[k]
        self._opt.step()
        for p in self.params.values():
            p.grad = None
