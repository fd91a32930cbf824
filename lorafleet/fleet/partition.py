"""Non-IID partition of a pool of examples across devices, with a Dirichlet(α) mixture of task families.

Every device gets an (almost) equal number of examples — ``N // D`` or one more — drawn by its own mixture
over families, ``q_d ~ Dir(α · 1_F)`` (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", applied to task families instead of labels). Large α
gives every device the pool's family mix; small α gives each device few families (α → 0: one), as in
FlexLoRA's one-task-per-client fleets (Bai et al., NeurIPS 2024). Every example is assigned exactly once.

Pure functions over numpy arrays; no files, no globals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lorafleet.export.formats.errors import ConfigError


def family_mixtures(num_devices: int, num_families: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Per-device family proportions, ``(num_devices, num_families)``, rows summing to 1.

    ``alpha = inf`` gives the uniform mixture exactly.
    """
    _check_alpha(alpha)
    if math.isinf(alpha):
        return np.full((num_devices, num_families), 1.0 / num_families)
    q = rng.dirichlet(np.full(num_families, alpha), size=num_devices)
    # Tiny α underflows to an all-zero row in float64: such a device holds one family.
    empty = ~np.isfinite(q).all(axis=1) | (q.sum(axis=1) == 0)
    if empty.any():
        q[empty] = np.eye(num_families)[rng.integers(num_families, size=int(empty.sum()))]
    return q


def dirichlet_partition(labels: Sequence[int] | np.ndarray, num_devices: int, alpha: float, *,
                        seed: int) -> list[np.ndarray]:
    """Split example indices ``0..N-1`` across ``num_devices`` devices; ``labels[i]`` is example i's family.

    Returns one sorted index array per device. The arrays are disjoint and cover every index; their sizes
    differ by at most one. A device draws its family counts from its mixture among the families that still
    have examples left, so the pool's own family sizes are respected (late devices may get families
    outside their mixture once theirs are used up).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if num_devices <= 0:
        raise ConfigError(f"num_devices must be positive, got {num_devices}")
    if n < num_devices:
        raise ConfigError(f"cannot give {num_devices} devices at least one example each from {n} examples")
    if labels.ndim != 1 or (n and labels.min() < 0):
        raise ConfigError("labels must be a flat sequence of non-negative family indices")
    rng = np.random.default_rng(seed)
    num_families = int(labels.max()) + 1
    remaining = np.bincount(labels, minlength=num_families)
    mixtures = family_mixtures(num_devices, num_families, alpha, rng)
    sizes = _equal_sizes(n, num_devices, rng)
    counts = np.zeros((num_devices, num_families), dtype=np.int64)
    for d in rng.permutation(num_devices):
        counts[d] = _draw_counts(int(sizes[d]), mixtures[d], remaining, rng)
        remaining -= counts[d]
    return _deal(labels, counts, rng)


def family_counts(num_devices: int, num_families: int, per_device: int, alpha: float, *,
                  seed: int) -> np.ndarray:
    """How many examples of each family each device holds when examples can be generated on demand:
    ``(num_devices, num_families)``, rows summing to ``per_device``, each row ``per_device · q_d`` rounded.

    No pool to respect, so small α concentrates every device on its own few families whatever the sizes.
    """
    if num_devices <= 0 or num_families <= 0 or per_device <= 0:
        raise ConfigError(f"num_devices, num_families and per_device must be positive, got {num_devices}, "
                          f"{num_families}, {per_device}")
    rng = np.random.default_rng(seed)
    mixtures = family_mixtures(num_devices, num_families, alpha, rng)
    return np.stack([_round_counts(per_device, q, rng) for q in mixtures])


def family_shares(parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Each device's fraction of examples per family, ``(num_devices, num_families)``."""
    labels = np.asarray(labels, dtype=np.int64)
    num_families = int(labels.max()) + 1
    shares = np.zeros((len(parts), num_families))
    for d, idx in enumerate(parts):
        if len(idx):
            shares[d] = np.bincount(labels[idx], minlength=num_families) / len(idx)
    return shares


# --- internals ------------------------------------------------------------------------------------------

def _check_alpha(alpha: float) -> None:
    if not (alpha > 0):  # also rejects NaN
        raise ConfigError(f"alpha must be positive (inf for the pool's own mix), got {alpha}")


def _equal_sizes(n: int, num_devices: int, rng: np.random.Generator) -> np.ndarray:
    sizes = np.full(num_devices, n // num_devices, dtype=np.int64)
    sizes[rng.choice(num_devices, size=n % num_devices, replace=False)] += 1
    return sizes


def _draw_counts(size: int, mixture: np.ndarray, remaining: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``size`` examples by ``mixture`` among families with examples left (rounded, clipped, redrawn)."""
    counts = np.zeros_like(remaining)
    while (need := size - int(counts.sum())) > 0:
        left = remaining - counts
        weights = np.where(left > 0, mixture, 0.0)
        if weights.sum() <= 0:  # the device's families are used up: take from what is left
            weights = left.astype(np.float64)
        draw = _round_counts(need, weights / weights.sum(), rng)
        counts += np.minimum(draw, left)
    return counts


def _round_counts(size: int, q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts summing to ``size`` closest to ``size · q``: floors, then the remainder to families
    drawn by their fractional parts (so α = inf gives the mix exactly, up to one example per family)."""
    exact = size * q
    counts = np.floor(exact).astype(np.int64)
    frac = exact - counts
    extra = size - int(counts.sum())
    if extra > 0:
        counts[rng.choice(len(q), size=extra, replace=False, p=frac / frac.sum())] += 1
    return counts


def _deal(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Give device d ``counts[d, f]`` shuffled examples of family f; no example twice."""
    parts: list[list[np.ndarray]] = [[] for _ in range(counts.shape[0])]
    for f in range(counts.shape[1]):
        pool = rng.permutation(np.flatnonzero(labels == f))
        bounds = np.concatenate([[0], np.cumsum(counts[:, f])])
        for d in np.flatnonzero(counts[:, f]):
            parts[d].append(pool[bounds[d]:bounds[d + 1]])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]
