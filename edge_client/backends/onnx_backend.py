"""The ONNX Runtime backend: the package's ORT training artifacts through
:class:`lorafleet.export.runtime.onnx.OnnxTrainer`.

The optimizer is compiled into the artifacts (``optimizer_model.onnx``: ORT's AdamW, ``adam_mode=1``, betas
0.9/0.999, eps 1e-6, no weight decay); only the learning rate is set at run time, so a recipe asking for other
AdamW hyper-parameters is refused rather than silently ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafleet.edge_client.backends.base import OptimizerConfig, check_rank
from lorafleet.export.formats.errors import ConfigError

if TYPE_CHECKING:
    from lorafleet.edge_client.data import Batch
    from lorafleet.export.formats.adapter import Adapter
    from lorafleet.export.formats.package import Package


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, trainer: Any, rank: int):
        self.trainer, self.rank = trainer, rank  # lorafleet.export.runtime.onnx.OnnxTrainer

    @classmethod
    def from_package(cls, package: Package, rank: int, optimizer: OptimizerConfig) -> OnnxBackend:
        from lorafleet.export.runtime.onnx import ADAMW, OnnxTrainer

        wanted = {"betas": tuple(optimizer.betas), "eps": optimizer.eps, "weight_decay": optimizer.weight_decay}
        if wanted != dict(ADAMW):
            raise ConfigError(f"the package's ONNX Runtime optimizer is compiled as AdamW {ADAMW}; "
                              f"got {optimizer}")
        backend = cls(OnnxTrainer.from_package(package, rank, lr=optimizer.lr), rank)
        backend.load_adapter(package.initial_adapter(rank))
        return backend

    def step(self, batch: Batch) -> float:
        return float(self.trainer.step(batch.input_ids, batch.labels))

    def adapter_state(self) -> Adapter:
        adapter: Adapter = self.trainer.get_lora()
        return adapter

    def load_adapter(self, adapter: Adapter, *, reset_optimizer: bool = True) -> None:
        check_rank(adapter, self.rank)
        self.trainer.set_lora(adapter, reset_optimizer=reset_optimizer)
