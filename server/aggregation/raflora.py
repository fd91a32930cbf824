"""raFLoRA's rank-partitioned aggregation (Wu et al., "Preventing Rank Collapse in Federated Low-Rank
Adaptation with Client Heterogeneity", arXiv 2602.13486, 2026).

FlexLoRA weighs every client's whole update by n_k, so the components only high-rank clients train are
averaged with the zeros of every low-rank client: their share of the global update shrinks with the
fraction of clients that reach them, and after the SVD redistribution the update's energy collapses into
the smallest shared rank round after round. raFLoRA averages each *rank partition* only over the clients
that trained it. lorafleet's definition, per target module:

    ρ_1 < … < ρ_m   the distinct client ranks,  ρ_0 = 0,
    partition p     the components ρ_{p−1}+1 … ρ_p  (0-based slice [ρ_{p−1}, ρ_p)),
    C_p             = {k : r_k ≥ ρ_p}, the clients whose rank covers partition p,

    ΔW_p = Σ_{k∈C_p} w_k · s_k B_k[:, p] A_k[p, :] / Σ_{k∈C_p} w_k,     w_k = n_k / Σ_j n_j,

    ΔW   = Σ_p ΔW_p,

and the global adapter is the rank-R truncated SVD of ΔW (R = max r_k by default), B = U_R S_R, A = V_Rᵀ,
exactly as FlexLoRA keeps it (:mod:`lorafleet.server.aggregation.flexlora`): a client of rank r receives the first r
components, the rank-r truncated SVD of ΔW. Every client's components each lie in one partition it
covers, so ΔW is again a sum of low-rank products, Σ_k (s_k B_k D_k) A_k with D_k = diag of the
per-component weights w_k / Σ_{j∈C_{p(i)}} w_j, and it goes through the same solver as FlexLoRA
(:func:`lorafleet.server.aggregation.lowrank.truncated_svd_of_sum`: factored QR + core SVD, or the top-R solver
beyond min(out, in)); ΔW (out × in) is never formed while Σ r_k ≤ min(out, in).

Choices lorafleet makes where the definition above leaves room:

* **Per module.** Partitions come from the ranks clients have *for that module* (``rank_pattern``).
* **Scalings.** s_k is folded into B_k (B̃_k = s_k B_k), as in FlexLoRA, so clients that used different
  ``lora_alpha`` contribute exactly their ΔW_k.
* **The first partition keeps the client weights as given.** Every client covers it, so its renormalizer is
  Σ_k w_k = 1; it is not recomputed (a rounded 1 − 1e-16 would change the bits). With equal ranks there is
  only that partition, and raFLoRA is FlexLoRA bit for bit: same stacked factors, same solver, same signs.
* **Global rank.** Any R ≤ min(out, in), as FlexLoRA; components beyond Σ r_k are zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorafleet.export.formats.adapter import LoraPair
from lorafleet.server.aggregation import flexlora
from lorafleet.server.aggregation.common import AggregationMethod
from lorafleet.server.aggregation.lowrank import Solver, truncated_svd_of_sum

if TYPE_CHECKING:
    import torch


def partitions(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """``[(ρ_0, ρ_1), (ρ_1, ρ_2), …]``: the 0-based component slices between consecutive distinct ranks."""
    distinct = sorted(set(ranks))
    return list(zip([0, *distinct[:-1]], distinct, strict=True))


def component_weights(ranks: Sequence[int], weights: Sequence[float]) -> list[float | list[float]]:
    """Each client's weight per component, w_k / Σ_{j∈C_p} w_j for its components in partition p.

    A client whose components all lie in the first partition gets its plain weight w_k (a float); the others
    one float per component (a list of length r_k).
    """
    parts = partitions(ranks)
    scale = [1.0] + [1.0 / math.fsum(w for w, r in zip(weights, ranks, strict=True) if r >= hi)
                     for _, hi in parts[1:]]  # 1 / Σ_{k∈C_p} w_k; the first partition covers every client
    out: list[float | list[float]] = []
    for w, r in zip(weights, ranks, strict=True):
        if r == parts[0][1]:
            out.append(w)
            continue
        out.append([w * c for (lo, hi), c in zip(parts, scale, strict=True) if hi <= r for _ in range(hi - lo)])
    return out


def aggregate_module(pairs: Sequence[LoraPair], weights: Sequence[float], rank: int, *,
                     solver: Solver = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_R S_R, V_Rᵀ)`` of ΔW = Σ_p ΔW_p (module docstring); ``solver`` as in :func:`truncated_svd_of_sum`."""
    per_component = component_weights([p.r for p in pairs], weights)
    lefts, rights = flexlora.weighted_factors(pairs, per_component)  # (out, r_k), (r_k, in) per client
    return truncated_svd_of_sum(lefts, rights, rank, solver=solver)


METHOD = AggregationMethod(
    name="raflora",
    summary="raFLoRA: each rank partition averaged over the clients that trained it, then FlexLoRA's truncated "
            "SVD (Wu et al., 2026)",
    aggregate_module=aggregate_module,
    global_rank=flexlora.global_rank,
    options=frozenset({"solver"}),
)
