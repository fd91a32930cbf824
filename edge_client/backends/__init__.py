"""On-device training backends behind one protocol (:mod:`lorafleet.edge_client.backends.base`).

Heavy runtimes are imported only when a backend is built: torch eager + PEFT (the reference), ONNX Runtime
training, ExecuTorch training programs (in this process, or natively in ``lorafleet-native``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafleet.edge_client.backends.base import BACKENDS, AdamW, OptimizerConfig, TrainingBackend
from lorafleet.export.formats.errors import ConfigError

if TYPE_CHECKING:
    from lorafleet.export.formats.package import Package

__all__ = ["BACKENDS", "AdamW", "OptimizerConfig", "TrainingBackend", "make_backend", "package_runtime"]

# the package runtime whose programs each backend runs (torch trains the eager model: none)
_PACKAGE_RUNTIME = {"executorch": "executorch", "native": "executorch", "onnxruntime": "onnx"}


def package_runtime(backend: str | None) -> str | None:
    """The package runtime (``Manifest.runtimes``) whose programs ``backend`` runs; ``None`` for torch (or no
    backend)."""
    return _PACKAGE_RUNTIME.get(backend) if backend else None


def make_backend(name: str, package: Package, rank: int, optimizer: OptimizerConfig, *,
                 device: str = "cpu") -> TrainingBackend:
    """Build backend ``name`` for ``rank`` of ``package``, starting from the package's initial adapter.
    ``device`` (``cpu``, ``cuda``, ``cuda:N``) is where the torch backend computes; the package's programs
    run on the CPU runtimes they were compiled for."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    if name != "torch" and str(device).strip().lower() != "cpu":
        raise ConfigError(f"device {device!r}: only the torch backend runs on a GPU; {name} runs the package's "
                          "CPU programs")
    package.manifest.rank(rank)  # PackageError naming the ranks it has
    if name == "torch":
        from lorafleet.edge_client.backends.torch_backend import TorchBackend

        return TorchBackend.from_package(package, rank, optimizer, device=device)
    if name == "onnxruntime":
        from lorafleet.edge_client.backends.onnx_backend import OnnxBackend

        return OnnxBackend.from_package(package, rank, optimizer)
    if name == "native":
        from lorafleet.edge_client.backends.native_backend import NativeBackend

        return NativeBackend.from_package(package, rank, optimizer)
    from lorafleet.edge_client.backends.executorch_backend import ExecutorchBackend

    return ExecutorchBackend.from_package(package, rank, optimizer)
