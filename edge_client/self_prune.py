"""HetLoRA's local rank self-pruning (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", 2024, arXiv:2401.06432, §3).

During local training the client penalises its highest rank components: λ · Σ_modules ‖B_tail‖_F · ‖A_tail‖_F,
the tail being the last ``r − ⌊γ·r⌋`` components (the last (1 − γ) fraction of the rank, at least one). After
training, if the tail's norm is smaller than in the adapter the client received, the client shrinks its rank
to ⌊γ·r⌋. Ranks never grow. γ = 0.99 in the paper's main results.

Where lorafleet differs, and why:

* **Decoupled regulariser step.** The packaged ExecuTorch and ONNX Runtime programs compile their loss, so the
  penalty cannot be added to it. Instead, after every optimizer step the client takes one plain gradient
  step on the penalty, ``w ← w − lr · ∂R/∂w`` (:func:`regularizer_step`) — the same decoupling AdamW uses for
  weight decay (Loshchilov & Hutter, 2019) — identically on every backend. Like weight decay, λ is therefore
  on the scale of a decay coefficient, not of a loss term under Adam's normalisation.
* **Packaged ranks only.** A device can train only ranks that have programs in the package, so the new rank
  ⌊γ·r⌋ is capped to the largest packaged rank ≤ ⌊γ·r⌋ (r = 8, γ = 0.99 → 7 → 4 with ranks {4, 8, 16});
  when no packaged rank is that small the rank stays. The output adapter is the first ``new_rank``
  components (:func:`lorafleet.export.formats.adapter.truncate`), so ΔW loses exactly the pruned components.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lorafleet.export.formats.adapter import Adapter, LoraPair, truncate, with_modules
from lorafleet.export.formats.errors import ConfigError


@dataclass(frozen=True)
class SelfPruneConfig:
    """``gamma``: the share of rank kept when pruning; ``lam``: the penalty's coefficient λ."""

    gamma: float = 0.99
    lam: float = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.gamma < 1):
            raise ConfigError(f"self-prune gamma must be in (0, 1), got {self.gamma}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"self-prune lam must be a non-negative number, got {self.lam}")


@dataclass(frozen=True)
class PruneDecision:
    old_rank: int
    new_rank: int
    tail_norm_received: float
    tail_norm_trained: float
    reason: str


def head_size(r: int, gamma: float) -> int:
    """⌊γ·r⌋: the components kept when pruning (at least 1)."""
    return max(1, math.floor(gamma * r + 1e-9))


def tail_norm(adapter: Adapter, gamma: float) -> float:
    """Σ_modules ‖B[:, k:]‖_F · ‖A[k:, :]‖_F with k = ⌊γ·r⌋ per module: the quantity the penalty shrinks."""
    total = 0.0
    for p in adapter.modules.values():
        k = head_size(p.r, gamma)
        total += float(p.lora_B[:, k:].norm()) * float(p.lora_A[k:].norm())
    return total


def regularizer_step(adapter: Adapter, config: SelfPruneConfig, lr: float) -> Adapter:
    """One gradient step of size ``lr`` on λ·Σ ‖B_tail‖·‖A_tail‖; the head components are untouched.

    ∂/∂B_tail = λ‖A_tail‖ · B_tail/‖B_tail‖ and ∂/∂A_tail = λ‖B_tail‖ · A_tail/‖A_tail‖ (zero where a norm is 0,
    e.g. B's PEFT initialisation).
    """
    modules = {}
    for name, p in adapter.modules.items():
        k = head_size(p.r, config.gamma)
        a, b = p.lora_A.clone(), p.lora_B.clone()  # (r, in), (out, r)
        na, nb = float(a[k:].norm()), float(b[:, k:].norm())
        if na > 0 and nb > 0:
            b[:, k:] -= lr * config.lam * na / nb * p.lora_B[:, k:]
            a[k:] -= lr * config.lam * nb / na * p.lora_A[k:]
        modules[name] = LoraPair(a, b, p.scaling)
    return with_modules(adapter, modules)


def pruned_rank(received: Adapter, trained: Adapter, gamma: float,
                available_ranks: Iterable[int] | None = None) -> PruneDecision:
    """HetLoRA's decision: shrink to ⌊γ·r⌋ (capped to a packaged rank) if the tail norm decreased."""
    r = trained.r
    before, after = tail_norm(received, gamma), tail_norm(trained, gamma)
    if not after < before:
        return PruneDecision(r, r, before, after, f"kept rank {r}: tail norm {after:.4g} did not decrease "
                                                  f"from {before:.4g}")
    target = head_size(r, gamma)
    allowed = sorted(x for x in (available_ranks or [target]) if x <= target)
    if not allowed:
        return PruneDecision(r, r, before, after, f"kept rank {r}: tail norm decreased ({before:.4g} → "
                                                  f"{after:.4g}) but no packaged rank is ≤ {target}")
    new = allowed[-1]
    return PruneDecision(r, new, before, after, f"pruned rank {r} → {new}: tail norm decreased ({before:.4g} → "
                                                f"{after:.4g}); ⌊γ·r⌋ = {target}, largest packaged rank ≤ it")


def self_prune(received: Adapter, trained: Adapter, config: SelfPruneConfig,
               available_ranks: Iterable[int] | None = None) -> tuple[Adapter, PruneDecision]:
    """The trained adapter at its (possibly) reduced rank, and the decision."""
    decision = pruned_rank(received, trained, config.gamma, available_ranks)
    if decision.new_rank == decision.old_rank:
        return trained, decision
    return truncate(trained, decision.new_rank), decision
