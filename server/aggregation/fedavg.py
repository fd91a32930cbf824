"""FedAvg of LoRA factors (the FedIT baseline: Zhang et al., "Towards Building the Federated GPT: Federated
Instruction Tuning", ICASSP 2024; McMahan et al., 2017).

All clients must have the same rank. lora_A and lora_B are averaged separately with the normalized client
weights w_k = n_k / Σ n_j:  B = Σ w_k s_k B_k,  A = Σ w_k A_k,  ΔW = B @ A.

Scalings: each client's PEFT scaling s_k is folded into its lora_B before averaging (the same convention as
:func:`lorafleet.export.formats.adapter.rescale`). When every client has the same scaling s this is exactly the textbook
FedAvg ``s · (Σ w_k B_k)(Σ w_k A_k)``; when clients used different ``lora_alpha`` the result does not depend
on how each client chose to express its own ΔW_k = s_k B_k A_k through alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorafleet.export.formats.adapter import LoraPair
from lorafleet.export.formats.errors import AggregationError
from lorafleet.server.aggregation.common import AggregationMethod, equal_ranks, folded

if TYPE_CHECKING:
    import torch


def aggregate_module(pairs: Sequence[LoraPair], weights: Sequence[float],
                     rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w_k s_k B_k, Σ w_k A_k)``: (out, r), (r, in), computed in float64."""
    import torch

    b = torch.zeros(pairs[0].lora_B.shape[0], rank, dtype=torch.float64)  # (out, r)
    a = torch.zeros(rank, pairs[0].lora_A.shape[1], dtype=torch.float64)  # (r, in)
    for w, pair in zip(weights, pairs, strict=True):
        sb, ak = folded(pair, torch.float64)
        b += w * sb
        a += w * ak
    return b, a


def global_rank(name: str, ranks: Sequence[int], rank: int | None, limit: int) -> int:
    r = equal_ranks("fedavg", name, ranks)
    if rank is not None and rank != r:
        raise AggregationError(f"fedavg keeps the clients' rank {r} (module {name}); got rank {rank}")
    return r


METHOD = AggregationMethod(
    name="fedavg",
    summary="FedAvg of lora_A and lora_B separately; all clients at one rank (FedIT baseline)",
    aggregate_module=aggregate_module,
    global_rank=global_rank,
)
