"""Local training on a device: the one entry point the CLI (`lorafleet train`) and the Flower client call.

:func:`train_local` takes a package, a rank, a backend, instruction examples and an optional received adapter,
runs ``steps`` training steps of the package's fixed shape (``batch_size × seq_len``), optionally applies
HetLoRA's rank self-pruning (:mod:`lorafleet.edge_client.self_prune`), and returns the trained adapter (PEFT layout, the
package's ``lora_alpha`` scaling) with per-step losses, the measured peak RSS of the process during the call,
and the median seconds per step.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.edge_client.backends import BACKENDS, OptimizerConfig, TrainingBackend, make_backend
from lorafleet.edge_client.data import Example, batches, encode_all
from lorafleet.edge_client.self_prune import PruneDecision, SelfPruneConfig, regularizer_step
from lorafleet.edge_client.self_prune import self_prune as apply_self_prune
from lorafleet.export.formats.adapter import Adapter, conform
from lorafleet.export.formats.errors import ConfigError
from lorafleet.export.formats.package import Package, open_package
from lorafleet.export.formats.program import LoraSpec
from lorafleet.export.runtime.memory import peak_rss_bytes, reset_peak_rss

COMPILED = ("executorch", "onnxruntime", "native")  # backends whose programs have a fixed batch shape


@dataclass
class TrainResult:
    adapter: Adapter  # at ``rank`` (after self-pruning), the package's scaling
    losses: list[float]  # one per step, before that step's update
    peak_rss_bytes: int  # peak resident memory of this process during the call
    step_seconds: float  # median wall seconds per step
    num_examples: int
    rank: int  # the output adapter's rank
    trained_rank: int  # the rank the program trained (≥ rank)
    backend: str
    prune: PruneDecision | None = None

    def to_json(self) -> dict[str, Any]:
        """Exactly what ``lorafleet train --json`` prints."""
        return {"losses": [round(x, 6) for x in self.losses], "peak_rss_bytes": self.peak_rss_bytes,
                "step_seconds": round(self.step_seconds, 6), "num_examples": self.num_examples, "rank": self.rank}


def train_local(package: Package | str | Path, rank: int, backend: str | TrainingBackend,
                examples: Sequence[Example], *, initial_adapter: Adapter | None = None, steps: int,
                batch_size: int | None = None, lr: float = 1e-4, seed: int = 0,
                self_prune: SelfPruneConfig | bool = False,
                on_step: Callable[[int, float, float], None] | None = None) -> TrainResult:
    """Train ``rank`` of ``package`` on ``examples`` for ``steps`` steps and return the result.

    ``backend`` is a name (``executorch``, ``onnxruntime``, ``torch``) or a backend built earlier for this
    package and rank (a long-lived client reuses it across rounds; it keeps the optimizer settings it was built
    with, and ``initial_adapter`` then resets its optimizer state). ``initial_adapter`` defaults to the
    package's initial weights; a larger-rank adapter is truncated to ``rank`` (HetLoRA's distribution), a
    smaller one is refused. ``batch_size`` defaults to the package's; compiled programs take only that one.
    ``self_prune``: ``True`` (paper defaults) or a :class:`SelfPruneConfig` turns on HetLoRA self-pruning.
    ``on_step(step, loss, seconds)`` is called after every step (step counts from 1).
    """
    self_prune_config = SelfPruneConfig() if self_prune is True else (self_prune or None)
    reset_peak_rss()
    pkg = package if isinstance(package, Package) else open_package(package, ranks=[rank])
    pkg.manifest.rank(rank)
    bs = _batch_size(pkg, backend, batch_size)
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if not examples:
        raise ConfigError("no training examples")
    optimizer = OptimizerConfig(lr=lr)
    _seed_everything(seed)
    be = _backend(pkg, rank, backend, optimizer)
    if initial_adapter is not None:
        m = pkg.manifest
        spec = LoraSpec(rank, tuple(m.target_modules), m.lora_alpha, m.use_rslora)
        be.load_adapter(conform(initial_adapter, spec, expected=None))  # truncated if larger, rescaled
    from lorafleet.edge_client.tokenizer import load_tokenizer

    encoded = encode_all(load_tokenizer(pkg.manifest.model.spec), examples, pkg.manifest.seq_len)
    received = be.adapter_state() if self_prune_config else None
    losses, seconds = [], []
    for i, batch in enumerate(batches(encoded, bs, steps, seed)):
        start = time.perf_counter()
        loss = be.step(batch)
        if self_prune_config is not None:
            be.load_adapter(regularizer_step(be.adapter_state(), self_prune_config, lr), reset_optimizer=False)
        seconds.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            raise ConfigError(f"training diverged at step {i + 1} (loss {loss}); lower the learning rate "
                              f"(lr={lr})")
        losses.append(loss)
        if on_step is not None:
            on_step(i + 1, loss, seconds[-1])
    adapter, decision = be.adapter_state(), None
    if self_prune_config is not None and received is not None:
        adapter, decision = apply_self_prune(received, adapter, self_prune_config, pkg.ranks)
    # the native backend trains in a process of its own: its peak is the device's
    peak = be.peak_rss_bytes() if hasattr(be, "peak_rss_bytes") else peak_rss_bytes()
    return TrainResult(adapter=adapter, losses=losses, peak_rss_bytes=peak,
                       step_seconds=statistics.median(seconds), num_examples=len(examples), rank=adapter.r,
                       trained_rank=rank, backend=be.name, prune=decision)


def _batch_size(pkg: Package, backend: str | TrainingBackend, batch_size: int | None) -> int:
    name = backend if isinstance(backend, str) else backend.name
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    compiled = pkg.manifest.batch_size
    if batch_size is None:
        return compiled
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if name in COMPILED and batch_size != compiled:
        raise ConfigError(f"the package's {name} programs take batch size {compiled}, got --batch-size "
                          f"{batch_size} (re-export the package with that batch size, or use --backend torch)")
    return batch_size


def _backend(pkg: Package, rank: int, backend: str | TrainingBackend, optimizer: OptimizerConfig) -> TrainingBackend:
    if isinstance(backend, str):
        return make_backend(backend, pkg, rank, optimizer)
    if backend.rank != rank:
        raise ConfigError(f"the {backend.name} backend given trains rank {backend.rank}, not {rank}")
    return backend


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # a device with only ONNX Runtime or ExecuTorch
        pass
