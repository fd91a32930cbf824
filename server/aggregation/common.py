"""Pieces every aggregation method shares: the method record, client weights, scalings, and client checks.

A method works on one target module at a time. It receives every client's
:class:`~lorafleet.export.formats.adapter.LoraPair` for that module (each with its own PEFT scaling s_k) and the
normalized client weights, and returns factors ``(B, A)`` of the global update at scaling 1 (ΔW = B @ A, the scalings
already folded in). The engine (:mod:`lorafleet.server.aggregation.engine`) then re-expresses that at the output's PEFT
scaling, so a method never deals with ``lora_alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorafleet.export.formats.adapter import Adapter, LoraPair, scaling_for
from lorafleet.export.formats.errors import AdapterError, AggregationError

if TYPE_CHECKING:
    import torch


# (pairs, normalized weights, global rank, **options) -> (B (out, rank), A (rank, in)), ΔW_global = B @ A
ModuleAggregator = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


# (module name, the clients' ranks for it, --rank or None, min(out, in)) -> the global rank of that module
RankRule = Callable[[str, Sequence[int], int | None, int], int]


@dataclass(frozen=True)
class AggregationMethod:
    """One registered aggregation method (see :data:`lorafleet.server.aggregation.METHODS`)."""

    name: str
    summary: str
    aggregate_module: ModuleAggregator
    global_rank: RankRule
    options: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ModuleSpec:
    """What a client adapter declares about one module, known without reading its values."""

    r: int
    shape: tuple[int, int]  # (out, in) of the base linear
    scaling: float


def specs_of(adapter: Adapter) -> dict[str, ModuleSpec]:
    return {n: ModuleSpec(p.r, p.shape, p.scaling) for n, p in adapter.modules.items()}


def client_weights(weights: Sequence[float] | None, n_clients: int) -> list[float]:
    """Client weights n_k normalized to sum 1; ``None`` weighs every client equally."""
    if n_clients == 0:
        raise AggregationError("no client adapters to aggregate")
    if weights is None:
        return [1.0 / n_clients] * n_clients
    ws = list(weights)
    if len(ws) != n_clients:
        raise AggregationError(f"got {len(ws)} weights for {n_clients} client adapters")
    for i, w in enumerate(ws):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise AggregationError(f"weight {i + 1} must be a positive finite number, got {w!r}")
    top = max(ws)  # divide by the largest first: 1e308 + 1e308 overflows, their ratios do not
    scaled = [w / top for w in ws]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def check_specs(specs: Sequence[dict[str, ModuleSpec]], origins: Sequence[str]) -> None:
    """Raise unless every client adapts the same modules with the same base shapes at ranks ≤ min(out, in)."""
    if not specs:
        raise AggregationError("no client adapters to aggregate")
    ref, ref_origin = specs[0], origins[0]
    for spec, origin in zip(specs, origins, strict=True):
        for name, m in spec.items():
            if m.r > min(m.shape):
                raise AdapterError(f"{origin}: module {name} has rank {m.r}, larger than min(out, in) = "
                                   f"{min(m.shape)} of its {m.shape[0]}x{m.shape[1]} base weight")
        if spec.keys() != ref.keys():
            missing, extra = sorted(ref.keys() - spec.keys()), sorted(spec.keys() - ref.keys())
            raise AggregationError(f"{origin} adapts different modules than {ref_origin}: "
                                   f"missing {_few(missing)}, extra {_few(extra)}")
        for name, m in spec.items():
            if m.shape != ref[name].shape:
                raise AggregationError(f"{origin}: module {name} adapts a {m.shape[0]}x{m.shape[1]} base weight, "
                                       f"{ref_origin} a {ref[name].shape[0]}x{ref[name].shape[1]} one")


def check_finite(adapter: Adapter, origin: str) -> None:
    import torch

    for name, p in adapter.modules.items():
        if not (torch.isfinite(p.lora_A).all() and torch.isfinite(p.lora_B).all()):
            raise AdapterError(f"{origin}: module {name} has NaN or Inf values")


def folded(pair: LoraPair, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·B, A)`` in ``dtype``: the pair's scaling folded into lora_B, so ΔW = (s·B) @ A."""
    return pair.lora_B.to(dtype) * pair.scaling, pair.lora_A.to(dtype)


def output_scaling(specs: Sequence[ModuleSpec], r_out: int, use_rslora: bool) -> float:
    """The PEFT scaling the global module is written at.

    If every client used the same ``lora_alpha`` for this module (the usual case: ranks differ, alpha does
    not), the output keeps that alpha at its own rank: ``scaling_for(r_out, alpha)``. Otherwise no common
    alpha exists and the output is written at scaling 1 (``lora_alpha = r``). Either way ΔW is the same.
    """
    alphas = [s.scaling * (math.sqrt(s.r) if use_rslora else s.r) for s in specs]
    if max(alphas) - min(alphas) <= 1e-9 * max(alphas):
        return scaling_for(r_out, alphas[0], use_rslora)
    return 1.0


def equal_ranks(method: str, name: str, ranks: Sequence[int]) -> int:
    if len(set(ranks)) != 1:
        raise AggregationError(f"{method} needs equal ranks, but module {name} has ranks {sorted(set(ranks))} "
                               f"(use hetlora or flexlora for heterogeneous ranks)")
    return ranks[0]


def check_positive_rank(method: str, rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AggregationError(f"{method}: rank must be a positive integer, got {rank!r}")
    return rank


def check_rank(method: str, name: str, rank: int, limit: int) -> int:
    """``rank`` as the global rank of module ``name``, whose base weight allows at most ``limit``."""
    check_positive_rank(method, rank)
    if rank > limit:
        raise AggregationError(f"{method}: rank {rank} exceeds min(out, in) = {limit} of module {name}")
    return rank


def _few(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:3])
    return shown + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
