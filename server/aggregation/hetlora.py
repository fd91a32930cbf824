"""HetLoRA's sparsity-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024, §3).

The global adapter keeps rank r_max = max_k r_k. Every client's factors are zero-padded to r_max (lora_A
with zero rows, lora_B with zero columns) and averaged with sparsity weights

    p_k = ‖ΔW_k‖_F / Σ_j ‖ΔW_j‖_F,     ΔW_k = s_k B_k A_k,

optionally multiplied by the client weights n_k (``use_weights=True``) and renormalized. A client of rank r
then receives the first r components (:func:`lorafleet.server.aggregation.distribute`).

Choices lorafleet makes where the paper is silent:

* **Per module.** p_k is computed for each target module separately (the paper's "LoRA module"; one of the
  two public re-implementations does this, the other sums the norms over a client's modules).
* **Scalings.** s_k is folded into B_k before padding (B̃_k = s_k B_k) and the average is taken of
  (B̃_k, A_k), so clients that used different ``lora_alpha`` are combined exactly as their ΔW_k say, and
  ‖ΔW_k‖_F includes s_k. With equal scalings this is the paper's rule verbatim.
* **Norms without out × in.** ‖ΔW_k‖_F² = s_k² · trace((B_kᵀB_k)(A_k A_kᵀ)), two r×r Gram products.
* **All-zero updates.** If every ΔW_k is zero (e.g. lora_B still at its zero init) the sparsity weights are
  undefined; the clients are then weighted by n_k (``use_weights``) or equally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorafleet.export.formats.adapter import LoraPair
from lorafleet.export.formats.errors import AggregationError
from lorafleet.server.aggregation.common import AggregationMethod, folded

if TYPE_CHECKING:
    import torch


def delta_norm(pair: LoraPair) -> float:
    """‖s·B @ A‖_F from r×r Gram products: sqrt(trace((BᵀB)(AAᵀ))) · |s|, in float64."""
    import torch

    b = pair.lora_B.to(torch.float64)
    a = pair.lora_A.to(torch.float64)
    tr = float(((b.T @ b) * (a @ a.T)).sum())  # trace(XY) = Σ X∘Y for symmetric X, Y
    return abs(pair.scaling) * math.sqrt(max(tr, 0.0))


def sparsity_weights(pairs: Sequence[LoraPair], weights: Sequence[float], use_weights: bool) -> list[float]:
    """p_k ∝ ‖ΔW_k‖_F (times n_k with ``use_weights``), normalized; see the module docstring for zeros."""
    raw = [delta_norm(p) * (w if use_weights else 1.0) for p, w in zip(pairs, weights, strict=True)]
    total = math.fsum(raw)
    if total == 0.0:
        raw = list(weights) if use_weights else [1.0] * len(pairs)
        total = math.fsum(raw)
    return [x / total for x in raw]


def aggregate_module(pairs: Sequence[LoraPair], weights: Sequence[float], rank: int, *,
                     use_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad every client to ``rank`` and average (s_k B_k, A_k) with the sparsity weights p_k."""
    import torch

    p = sparsity_weights(pairs, weights, use_weights)
    b = torch.zeros(pairs[0].lora_B.shape[0], rank, dtype=torch.float64)  # (out, r_max)
    a = torch.zeros(rank, pairs[0].lora_A.shape[1], dtype=torch.float64)  # (r_max, in)
    for pk, pair in zip(p, pairs, strict=True):
        sb, ak = folded(pair, torch.float64)
        b[:, : pair.r] += pk * sb  # zero padding = adding into the first r_k components only
        a[: pair.r] += pk * ak
    return b, a


def global_rank(name: str, ranks: Sequence[int], rank: int | None, limit: int) -> int:
    r_max = max(ranks)
    if rank is None:
        return r_max
    if rank < r_max:
        raise AggregationError(f"hetlora keeps the global adapter at the largest client rank {r_max} (module "
                               f"{name}); got rank {rank} (cut it afterwards with distribute)")
    return rank


METHOD = AggregationMethod(
    name="hetlora",
    summary="HetLoRA: zero-pad to r_max, sparsity-weighted average (Cho et al., 2024)",
    aggregate_module=aggregate_module,
    global_rank=global_rank,
    options=frozenset({"use_weights"}),
)
