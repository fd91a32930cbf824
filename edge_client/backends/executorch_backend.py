"""The ExecuTorch backend: the package's training program (``executorch/rank-<r>/training.pte`` reading the
shared ``foundation.ptd``) through :mod:`lorafleet.export.compiler.executorch`'s runtime helpers.

The program computes the loss and the LoRA gradients (``TrainingModule.forward_backward``); ExecuTorch 1.5's
Python bindings offer only SGD, so the recipe's AdamW (:class:`lorafleet.edge_client.backends.base.AdamW`, ORT's
variant) updates the program's parameter tensors in place — they alias the program's memory, so the next step
sees the update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafleet.edge_client.backends.base import AdamW, OptimizerConfig, check_rank

if TYPE_CHECKING:
    from lorafleet.edge_client.data import Batch
    from lorafleet.export.formats.adapter import Adapter
    from lorafleet.export.formats.package import Package


class ExecutorchBackend:
    name = "executorch"

    def __init__(self, program: Any, rank: int, optimizer: OptimizerConfig):
        self.program, self.rank = program, rank  # lorafleet.export.compiler.executorch.TrainingProgram
        params = program.parameters()  # PEFT key -> tensor aliasing program memory
        self.keys = sorted(params)
        self.optimizer = AdamW([params[k] for k in self.keys], optimizer)

    @classmethod
    def from_package(cls, package: Package, rank: int, optimizer: OptimizerConfig) -> ExecutorchBackend:
        from lorafleet.export.compiler.executorch import load_training
        from lorafleet.export.formats.program import check_compiled

        program = load_training(package.path_of(rank, "executorch_training"), package.foundation("executorch"))
        lora = program.lora
        check_compiled(package.manifest, rank, "executorch_training", lora.spec, program.input_shape)
        backend = cls(program, rank, optimizer)
        backend.load_adapter(package.initial_adapter(rank))
        return backend

    def step(self, batch: Batch) -> float:
        import torch

        result = self.program.step(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.labels))
        self.optimizer.step([result.gradients[k] for k in self.keys])
        return float(result.loss)

    def adapter_state(self) -> Adapter:
        adapter: Adapter = self.program.adapter()
        return adapter

    def load_adapter(self, adapter: Adapter, *, reset_optimizer: bool = True) -> None:
        check_rank(adapter, self.rank)
        self.program.set_adapter(adapter)
        if reset_optimizer:
            self.optimizer.reset()
