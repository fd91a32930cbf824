"""Energy per rank segment of a LoRA adapter — the "rank collapse" measurement.

With ranks r_1 < … < r_k in a fleet, the global adapter's rank components split into segments
[0, r_1), [r_1, r_2), …, [r_{k-1}, r_k): components in [0, r_1) reach every device, later segments only the
devices of higher rank. Later work on FlexLoRA (arXiv 2602.13486) reports that SVD redistribution with
rank-agnostic weights concentrates the update's energy in the first segment round after round; this module
measures it: segment s holds ‖Σ_m scaling_m · B_m[:, s] A_m[s, :]‖_F² summed over modules m, as a fraction
of the total over segments. For an adapter in SVD form (B = U S, A = Vᵀ, as FlexLoRA distributes it) the
segments are orthogonal and the fractions are exactly the share of ‖ΔW‖_F² each carries.

Computed from r×r Gram products, ‖B A‖_F² = tr((BᵀB)(AAᵀ)), never forming the out × in matrix.
"""

from __future__ import annotations

from collections.abc import Iterable

from lorafleet.export.formats.adapter import Adapter
from lorafleet.export.formats.errors import ConfigError


def rank_segments(ranks: Iterable[int]) -> list[tuple[int, int]]:
    """``[(0, r_1), (r_1, r_2), …]`` from the distinct ranks in use."""
    distinct = sorted(set(ranks))
    if not distinct or distinct[0] <= 0:
        raise ConfigError(f"ranks must be positive integers, got {distinct}")
    return list(zip([0, *distinct[:-1]], distinct, strict=True))


def segment_label(segment: tuple[int, int]) -> str:
    """1-based, inclusive component range: ``(0, 4)`` → ``"1-4"``, ``(4, 5)`` → ``"5"``."""
    lo, hi = segment
    return f"{lo + 1}" if hi == lo + 1 else f"{lo + 1}-{hi}"


def segment_energy(adapter: Adapter, segments: list[tuple[int, int]]) -> dict[str, float]:
    """Fraction of the adapter's energy in each rank segment (keys from :func:`segment_label`).

    Components a module lacks (its rank is below the segment) contribute nothing. All zeros if the
    adapter is zero.
    """
    import torch

    energy = []
    for lo, hi in segments:
        total = torch.zeros((), dtype=torch.float64)
        for pair in adapter.modules.values():
            a = pair.lora_A[lo:hi].double()  # (s, in)
            b = pair.lora_B[:, lo:hi].double()  # (out, s)
            if a.shape[0]:
                total += pair.scaling ** 2 * torch.trace((b.T @ b) @ (a @ a.T))
        energy.append(float(total))
    whole = sum(energy)
    return {segment_label(s): (e / whole if whole > 0 else 0.0) for s, e in zip(segments, energy, strict=True)}
