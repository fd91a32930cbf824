"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024, §3.2; official code: the FlexLoRA branch of FederatedScope).

For every module the server forms W = Σ_k w_k ΔW_k with ΔW_k = s_k B_k A_k and w_k = n_k / Σ_j n_j, and
keeps its rank-R truncated SVD (R defaults to max r_k) as an ordinary LoRA pair ordered by singular value:
B = U_R S_R, A = V_Rᵀ (the official code's split, and PEFT's ``add_weighted_adapter(combination_type="svd")``).
A client of rank r receives the first r components, which is exactly the rank-r truncated SVD of W.

Where lorafleet differs from the official code: it does not materialize W nor take a full SVD. While
Σ r_k ≤ min(out, in) it works in the factored space (:mod:`lorafleet.server.aggregation.lowrank`: QR of the stacked
factors [w_k s_k B_k] and [A_k], SVD of the small core); beyond that it computes only the top R triplets by
block Krylov iteration on the factored operator, certified by their residual, and falls back to forming W
once (top R of the smaller Gram matrix's eigendecomposition) when they are not. Scalings are exact: s_k
multiplies B_k, so clients with different ranks and ``lora_alpha`` contribute exactly their ΔW_k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorafleet.export.formats.adapter import LoraPair
from lorafleet.server.aggregation.common import AggregationMethod, folded
from lorafleet.server.aggregation.lowrank import Solver, truncated_svd_of_sum

if TYPE_CHECKING:
    import torch


def aggregate_module(pairs: Sequence[LoraPair], weights: Sequence[float], rank: int, *,
                     solver: Solver = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_R S_R, V_Rᵀ)`` of W = Σ w_k s_k B_k A_k; ``solver`` as in :func:`truncated_svd_of_sum`."""
    lefts, rights = weighted_factors(pairs, weights)
    return truncated_svd_of_sum(lefts, rights, rank, solver=solver)


def weighted_factors(pairs: Sequence[LoraPair], weights: Sequence[float | Sequence[float]],
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The stacks ``[w_k s_k B_k]``, ``[A_k]`` whose products sum to W. ``weights[k]`` is client k's weight, or
    one weight per component (its r_k columns of B_k scaled separately: raFLoRA's partitions)."""
    import torch

    lefts, rights = [], []
    for w, pair in zip(weights, pairs, strict=True):
        sb, a = folded(pair, _compute_dtype(pair))
        # (r_k,) weights scale B_k's columns one by one; a scalar scales them all
        lefts.append(sb * (w if isinstance(w, int | float) else torch.tensor(w, dtype=sb.dtype)))  # (out, r_k)
        rights.append(a)  # (r_k, in)
    return lefts, rights


def global_rank(name: str, ranks: Sequence[int], rank: int | None, limit: int) -> int:
    return max(ranks) if rank is None else rank


def _compute_dtype(pair: LoraPair) -> torch.dtype:
    import torch

    return torch.promote_types(pair.lora_B.dtype, torch.float32)


METHOD = AggregationMethod(
    name="flexlora",
    summary="FlexLoRA: truncated SVD of the weighted sum of client updates (Bai et al., 2024)",
    aggregate_module=aggregate_module,
    global_rank=global_rank,
    options=frozenset({"solver"}),
)
