"""How far one device can move the global adapter: bounds, clipping and the finiteness of aggregates.

Validation (:mod:`lorafleet.server.validation`) makes sure a reply *is* a rank-r adapter of the right modules; it says
nothing about its size. A reply of ``randn × 1e19`` is finite float32 and well formed, and one such device turns
FlexLoRA's global adapter into Inf. These functions bound every reply against the adapter it was sent, clip it if asked,
and check an aggregate before it may replace the global adapter. All are pure functions of
:class:`lorafleet.export.formats.adapter.Adapter` s; the strategy applies them, ``lorafleet aggregate`` applies the
absolute one.

**The change a reply makes.** For a device sent factors (A, B) at scaling s that returns (A', B') at s', the
change to the model's weights is D = s'B'A' − sBA per module, and ‖D‖_F² is computed exactly from small
Gram products of the stacked factors G = [s'B', −sB] (out × (r'+r)) and H = [A'; A] ((r'+r) × in):
‖GH‖_F² = Σ (GᵀG) ∘ (HHᵀ) — in float64, never forming an out × in matrix.

**The bound.** A device training with the packages' AdamW (β = (0.9, 0.999), ε > 0) moves every factor
element by at most ``κ · lr`` per step, κ = (1 − β1)/√(1 − β2) · 1/√(1 − β1²/β2) ≈ 7.27 (the Cauchy–Schwarz
bound on |m̂/√v̂|; Kingma & Ba 2015 §2.1 give 3.16 for the typical case), plus ``lr · λ · max(1, ‖factor‖)``
from HetLoRA's decoupled self-pruning step. So after S steps every element of A' − A and B' − B is at most
δ = (κ + λ·m) · lr · S (:func:`adamw_step_limit` returns twice that). By default a reply is held to exactly
this, elementwise (:func:`max_abs_change`; one pass over its factors): a reply beyond it did not come from
the training it was asked for and is dropped. It implies a bound on the weight change — with
‖X‖_F ≤ √(numel)·max|X|, a module's ‖D‖_F ≤ ``s·(δ√(out·r)·(‖A‖_F + δ√(r·in)) + ‖B‖_F·δ√(r·in))``
(:func:`adamw_bound`, twice the root-sum-square over modules, + the pruned tail's ‖ΔW‖ when the rank shrank).
A fixed ``max_update_norm`` instead bounds ‖D‖_F itself, measured exactly (:class:`Reference`).

**Clipping (``clip_updates``, off by default).** Norm clipping of the *parameter* update u_k = (A'−A, B'−B)
to K × the round's median ‖u‖ (adaptive clipping in the spirit of Andrew et al., "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021, with the median as the quantile; Sun et al. 2019, "Can You
Really Backdoor Federated Learning?", for norm bounding as a defence): the factors become A + c(A'−A),
B + c(B'−B), c = min(1, K·median/‖u_k‖). Clipping in parameter space is exact at the reply's rank.

**The aggregate.** :func:`finite_adapter` accepts an adapter only if every factor is finite and every
module's ‖ΔW‖_F fits in float32 (so no product a runtime computes overflows).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafleet.export.formats.adapter import Adapter, LoraPair, truncate, with_modules

if TYPE_CHECKING:
    import torch

BETAS = (0.9, 0.999)  # the devices' AdamW (lorafleet.edge_client.backends.base.OptimizerConfig)
MARGIN = 2.0
FLOAT32_MAX = 3.4028234663852886e38
# Offline plausibility bound: root-mean-square ΔW per base weight. Trained LoRA updates are ~1e-3 and base
# weights ~1e-2; a thousand per weight is no model any more, and far below what overflows float32.
DEFAULT_MAX_DELTA_RMS = 1e3


def adam_step_bound(betas: tuple[float, float] = BETAS) -> float:
    """sup_t |m̂_t / √v̂_t| for Adam with bias correction (≈ 7.27 for β = (0.9, 0.999))."""
    b1, b2 = betas
    ratio = b1 * b1 / b2
    if ratio >= 1:
        return math.inf
    return (1 - b1) / math.sqrt(1 - b2) / math.sqrt(1 - ratio)


def change_sq_norm(new: LoraPair, old: LoraPair | None) -> float:
    """‖s'B'A' − sBA‖_F² (or ‖s'B'A'‖_F² with no ``old``), exact, in float64; ``inf`` if it overflows."""
    import torch

    lefts = [new.lora_B.to(torch.float64) * new.scaling]
    rights = [new.lora_A.to(torch.float64)]
    if old is not None:
        lefts.append(old.lora_B.to(torch.float64) * -old.scaling)
        rights.append(old.lora_A.to(torch.float64))
    g = torch.cat(lefts, dim=1)  # (out, r' + r)
    h = torch.cat(rights, dim=0)  # (r' + r, in)
    with torch.no_grad():
        value = float(((g.T @ g) * (h @ h.T)).sum())
    return math.inf if not math.isfinite(value) else max(value, 0.0)


def change_norm(new: Adapter, old: Adapter | None) -> float:
    """‖ΔW_new − ΔW_old‖_F over every module (‖ΔW_new‖_F with no ``old``); modules must match."""
    if old is None:
        total = math.fsum(change_sq_norm(p, None) for p in new.modules.values())
        return math.sqrt(total) if math.isfinite(total) else math.inf
    return Reference(old).change_norm(new)


class Reference:
    """An adapter that many others are measured against (the adapter a round sent at one rank).

    Its modules are stacked once by shape and rank, so one reply costs a few batched r×r products per group
    of same-shaped modules. The change is expanded around the reference so that every term is small when the
    change is (no cancellation between large numbers, so float32 products suffice): with U = s'B' − sB and
    E = A' − A (the reply zero-padded to the reference's rank if it pruned),
    D = s'B'A' − sBA = U·A' + sB·E and ‖D‖² = ⟨UᵀU, A'A'ᵀ⟩ + 2⟨Uᵀ(sB), A'Eᵀ⟩ + ⟨(sB)ᵀ(sB), EEᵀ⟩.
    A result that is not finite (overflow of hostile values) reads as ``inf``.
    """

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self._groups: list[tuple[list[str], int, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._limits: dict[tuple[float, int, float], float] = {}

    def _stacked(self) -> list[tuple[list[str], int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        import torch

        if self._groups is None:
            groups: dict[tuple[int, int, int], list[str]] = {}
            for name, p in sorted(self.adapter.modules.items()):
                groups.setdefault((*p.shape, p.r), []).append(name)
            mods = self.adapter.modules
            self._groups = []
            for (_, _, r), names in groups.items():
                a = torch.stack([mods[n].lora_A for n in names]).float()  # (L, r, in)
                sb = torch.stack([mods[n].lora_B * mods[n].scaling for n in names]).float()  # (L, out, r)
                self._groups.append((names, r, a, sb, _gram(sb, sb)))  # (sB)ᵀ(sB): (L, r, r)
        return self._groups

    def change_norm(self, new: Adapter) -> float:
        """‖ΔW_new − ΔW_reference‖_F over every module; ``new`` may have a smaller rank (self-pruning)."""
        import torch

        total = 0.0
        for names, r, a, sb, sb_gram in self._stacked():
            pairs = [new.modules[n] for n in names]
            if all(p.r == r for p in pairs):
                a2 = torch.stack([p.lora_A for p in pairs]).float()
                sb2 = torch.stack([p.lora_B * p.scaling for p in pairs]).float()
            else:  # the reply zero-padded to rank r (self-pruning): the same ΔW
                a2, sb2 = torch.zeros_like(a), torch.zeros_like(sb)
                for i, p in enumerate(pairs):
                    a2[i, : p.r] = p.lora_A
                    sb2[i, :, : p.r] = p.lora_B * p.scaling
            u, e = sb2 - sb, a2 - a
            terms = ((_gram(u, u) * _gram_rows(a2, a2)).sum()
                     + 2 * (_gram(u, sb) * _gram_rows(a2, e)).sum() + (sb_gram * _gram_rows(e, e)).sum())
            total += float(terms)
        if not math.isfinite(total):  # float32 overflowed (hostile magnitudes): measure exactly in float64
            exact = math.fsum(change_sq_norm(p, self.adapter.modules[n]) for n, p in new.modules.items())
            return math.sqrt(exact) if math.isfinite(exact) else math.inf
        return math.sqrt(max(total, 0.0))

    def step_limit(self, lr: float, steps: int, prune_lam: float = 0.0) -> float:
        """:func:`adamw_step_limit` of the reference, computed once per setting."""
        key = (lr, steps, prune_lam)
        if key not in self._limits:
            self._limits[key] = adamw_step_limit(self.adapter, lr, steps, prune_lam=prune_lam)
        return self._limits[key]


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """xᵀy per batch: (L, out, r1), (L, out, r2) -> (L, r1, r2)."""
    return x.transpose(1, 2) @ y


def _gram_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x yᵀ per batch: (L, r1, in), (L, r2, in) -> (L, r1, r2)."""
    return x @ y.transpose(1, 2)


def adamw_bound(sent: Adapter, lr: float, steps: int, *, prune_lam: float = 0.0, pruned_to: int | None = None,
                betas: tuple[float, float] = BETAS) -> float:
    """The largest ‖ΔW‖_F change an honest device can make to ``sent`` (see the module docstring)."""
    kappa = adam_step_bound(betas)
    total = 0.0
    for pair in sent.modules.values():
        a_norm = _fro(pair.lora_A)
        b_norm = _fro(pair.lora_B)
        delta = (kappa + prune_lam * max(1.0, a_norm, b_norm)) * lr * steps
        (out, inp), r = pair.shape, pair.r
        bound = abs(pair.scaling) * (delta * math.sqrt(out * r) * (a_norm + delta * math.sqrt(r * inp))
                                     + b_norm * delta * math.sqrt(r * inp))
        total += bound * bound
    limit = MARGIN * math.sqrt(total)
    if pruned_to is not None and pruned_to < sent.r:
        limit += change_norm(sent, truncate(sent, pruned_to))  # the components self-pruning removes
    return limit


def adamw_step_limit(sent: Adapter, lr: float, steps: int, *, prune_lam: float = 0.0,
                     betas: tuple[float, float] = BETAS) -> float:
    """The most an honest device moves any one LoRA factor element of ``sent`` (margin included)."""
    largest = max((max(_fro(p.lora_A), _fro(p.lora_B)) for p in sent.modules.values()), default=0.0)
    return MARGIN * (adam_step_bound(betas) + prune_lam * max(1.0, largest)) * lr * steps


def max_abs_change(new: Adapter, old: Adapter) -> float:
    """max |A' − A|, |B' − B| over every element of every module (``old`` cut to ``new``'s rank if larger)."""
    import torch

    worst = 0.0
    for name, p in new.modules.items():
        q = old.modules[name]
        r = p.r
        with torch.no_grad():
            worst = max(worst, float((p.lora_A - q.lora_A[:r]).abs().max()),
                        float((p.lora_B - q.lora_B[:, :r]).abs().max()))
        if not math.isfinite(worst):
            return math.inf
    return worst


def rms_bound(adapter: Adapter, rms: float = DEFAULT_MAX_DELTA_RMS) -> float:
    """‖ΔW‖_F of a change of root-mean-square ``rms`` per base weight over ``adapter``'s modules."""
    return rms * math.sqrt(sum(p.shape[0] * p.shape[1] for p in adapter.modules.values()))


def parameter_update_norm(new: Adapter, old: Adapter) -> float:
    """‖(A'−A, B'−B)‖ over every module: the norm of what the device's optimizer changed."""
    import torch

    total = 0.0
    for name, p in new.modules.items():
        q = old.modules[name]
        total += float(torch.sum((p.lora_A.double() - q.lora_A.double()) ** 2))
        total += float(torch.sum((p.lora_B.double() - q.lora_B.double()) ** 2))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clip_update(new: Adapter, old: Adapter, limit: float) -> tuple[Adapter, float]:
    """``new`` with its parameter update scaled to norm ≤ ``limit``; returns it and the factor c applied."""
    norm = parameter_update_norm(new, old)
    if norm <= limit:
        return new, 1.0
    c = limit / norm
    mods = {}
    for name, p in new.modules.items():
        q = old.modules[name]
        mods[name] = LoraPair(q.lora_A + c * (p.lora_A - q.lora_A), q.lora_B + c * (p.lora_B - q.lora_B), p.scaling)
    return with_modules(new, mods), c


def clip_limit(norms: Sequence[float], multiple: float) -> float:
    """K × the median of the round's update norms (the clipping threshold)."""
    return multiple * statistics.median(norms)


@dataclass(frozen=True)
class Finiteness:
    finite: bool
    reason: str = ""


def finite_adapter(adapter: Adapter) -> Finiteness:
    """Whether every factor is finite and every module's ‖ΔW‖_F fits float32."""
    import torch

    for name, p in sorted(adapter.modules.items()):
        if not (bool(torch.isfinite(p.lora_A).all()) and bool(torch.isfinite(p.lora_B).all())):
            return Finiteness(False, f"module {name} has NaN or Inf factors")
        norm = math.sqrt(change_sq_norm(p, None))
        if not norm <= FLOAT32_MAX:
            return Finiteness(False, f"module {name}'s ΔW overflows float32 (‖ΔW‖_F = {norm:.3g})")
    return Finiteness(True)


def _fro(t: torch.Tensor) -> float:
    import torch

    value = float(torch.linalg.vector_norm(t.double()))
    return value if math.isfinite(value) else math.inf
