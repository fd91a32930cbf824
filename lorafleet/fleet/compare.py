"""Paired comparisons of two fleet methods on the same evaluation examples, with bootstrap intervals.

Two runs of the same fleet (same devices, data, sampling and seed) that differ only in the method are scored on
the same examples, so their difference is estimated from the paired per-example scores
(:class:`lorafleet.fleet.evaluate.ExampleScore`). The statistic is what the report shows: the macro average over
families (Rouge-L: the mean of each family's mean; loss: each family's Σ NLL / Σ tokens), averaged over the
seeds. The interval is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) stratified by seed and family:
every resample redraws, with replacement, each family's examples of each seed and takes the same examples for
both methods, so the spread is that of the examples, the source of noise the comparison must beat. A difference
whose 95 % interval excludes 0 is called significant (two-sided, 5 %, per comparison; no correction for
multiple comparisons).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.evaluate import ExampleScore

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[np.float64]

METRICS = ("rouge_l", "loss")


@dataclass(frozen=True)
class Difference:
    """``mean`` of method − reference with its bootstrap interval [``low``, ``high``] at ``level``."""

    metric: str
    mean: float
    low: float
    high: float
    level: float
    pairs: int  # examples × seeds

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict[str, float | int | str | bool]:
        return {"metric": self.metric, "mean": self.mean, "low": self.low, "high": self.high, "level": self.level,
                "pairs": self.pairs, "significant": self.significant}


def paired_difference(method: Sequence[Sequence[ExampleScore]], reference: Sequence[Sequence[ExampleScore]], *,
                      metric: str = "rouge_l", resamples: int = 4000, level: float = 0.95,
                      seed: int = 0) -> Difference:
    """method − reference on ``metric`` from per-seed lists of the same examples' scores (one list per seed,
    the same families and order in both), with a stratified paired bootstrap interval."""
    import numpy as np

    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not 0 < level < 1 or resamples < 100:
        raise ConfigError(f"need 0 < level < 1 and at least 100 resamples, got {level}, {resamples}")
    if len(method) != len(reference) or not method:
        raise ConfigError(f"need the same seeds for both runs, got {len(method)} and {len(reference)}")
    rng = np.random.default_rng(seed)
    per_seed_est, per_seed_draws, pairs = [], [], 0
    for m, r in zip(method, reference, strict=True):
        if [(e.family, e.tokens) for e in m] != [(e.family, e.tokens) for e in r] or not m:
            raise ConfigError("the two runs were not scored on the same examples")
        families = sorted({e.family for e in m})
        est, draws = [], []
        for fam in families:
            idx = [i for i, e in enumerate(m) if e.family == fam]
            a, b = _values(m, idx, metric), _values(r, idx, metric)
            pick = rng.integers(0, len(idx), size=(resamples, len(idx)))
            est.append(_stat(a, b, metric, None))
            draws.append(_stat(a, b, metric, pick))
        per_seed_est.append(float(np.mean(est)))
        per_seed_draws.append(np.mean(draws, axis=0))
        pairs += len(m)
    boot = np.mean(per_seed_draws, axis=0)  # (resamples,)
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return Difference(metric, float(np.mean(per_seed_est)), float(low), float(high), level, pairs)


def _values(scores: Sequence[ExampleScore], idx: list[int], metric: str) -> Array:
    import numpy as np

    if metric == "rouge_l":
        return np.array([scores[i].rouge_l for i in idx])
    return np.array([[scores[i].nll, scores[i].tokens] for i in idx], dtype=float)  # (n, 2)


def _stat(a: Array, b: Array, metric: str, pick: npt.NDArray[np.int64] | None) -> Any:
    """The family's method − reference statistic on the examples ``pick`` (None: all; else (resamples, n))."""
    if metric == "rouge_l":
        return (a - b).mean() if pick is None else (a[pick] - b[pick]).mean(axis=1)
    if pick is None:
        return _loss(a[:, 0].sum(), a[:, 1].sum()) - _loss(b[:, 0].sum(), b[:, 1].sum())
    return _loss(a[pick, 0].sum(axis=1), a[pick, 1].sum(axis=1)) - _loss(b[pick, 0].sum(axis=1),
                                                                         b[pick, 1].sum(axis=1))


def _loss(nll: Any, tokens: Any) -> Any:
    import numpy as np

    return np.divide(nll, tokens, out=np.zeros_like(np.asarray(nll, dtype=float)), where=np.asarray(tokens) > 0)
