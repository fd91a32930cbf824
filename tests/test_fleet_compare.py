"""Paired bootstrap differences of two methods' per-example scores (lorafleet.fleet.compare)."""

from __future__ import annotations

import numpy as np
import pytest

from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.compare import paired_difference
from lorafleet.fleet.evaluate import ExampleScore


def _scores(rouge: np.ndarray, families: list[str], nll: np.ndarray | None = None,
            tokens: np.ndarray | None = None) -> list[ExampleScore]:
    nll = np.ones(len(rouge)) if nll is None else nll
    tokens = np.ones(len(rouge), dtype=int) if tokens is None else tokens
    return [ExampleScore(f, float(r), False, float(n), int(t)) for f, r, n, t in zip(families, rouge, nll, tokens,
                                                                                    strict=True)]


def _bootstrap_oracle(a: list[list[ExampleScore]], b: list[list[ExampleScore]], resamples: int, seed: int):
    """The definition written out loop by loop: per seed, per family, redraw the examples; macro over
    families, mean over seeds."""
    rng = np.random.default_rng(seed)
    draws = np.zeros((len(a), resamples))
    for s, (m, r) in enumerate(zip(a, b, strict=True)):
        fams = sorted({e.family for e in m})
        per_fam = []
        for fam in fams:
            idx = [i for i, e in enumerate(m) if e.family == fam]
            pick = rng.integers(0, len(idx), size=(resamples, len(idx)))
            vals = np.empty(resamples)
            for k in range(resamples):
                chosen = [idx[j] for j in pick[k]]
                vals[k] = np.mean([m[i].rouge_l - r[i].rouge_l for i in chosen])
            per_fam.append(vals)
        draws[s] = np.mean(per_fam, axis=0)
    return np.percentile(draws.mean(axis=0), [2.5, 97.5])


def test_the_interval_is_the_stratified_paired_bootstrap():
    rng = np.random.default_rng(3)
    fams = ["a"] * 6 + ["b"] * 4
    a = [_scores(rng.random(10), fams) for _ in range(2)]
    b = [_scores(rng.random(10), fams) for _ in range(2)]
    d = paired_difference(a, b, resamples=300, seed=5)
    low, high = _bootstrap_oracle(a, b, 300, 5)
    assert (d.low, d.high) == pytest.approx((low, high), abs=1e-12)
    macro = np.mean([np.mean([np.mean([x.rouge_l - y.rouge_l for x, y in zip(ma, rb, strict=True) if x.family == f])
                              for f in ("a", "b")]) for ma, rb in zip(a, b, strict=True)])
    assert d.mean == pytest.approx(macro) and d.pairs == 20 and d.low <= d.mean <= d.high


def test_a_constant_shift_is_exact_and_significant_and_noise_is_not():
    rng = np.random.default_rng(0)
    fams = ["x"] * 50 + ["y"] * 50
    base = rng.random(100)
    shifted = paired_difference([_scores(base + 0.03, fams)], [_scores(base, fams)])
    assert shifted.mean == pytest.approx(0.03) and shifted.low == pytest.approx(0.03)
    assert shifted.high == pytest.approx(0.03) and shifted.significant
    noisy = paired_difference([_scores(rng.random(100), fams)], [_scores(rng.random(100), fams)])
    assert noisy.low < noisy.mean < noisy.high and noisy.high - noisy.low > 0.05


def test_loss_is_each_familys_token_weighted_nll():
    fams = ["x", "x", "y"]
    tokens = np.array([1, 3, 2])
    a = _scores(np.zeros(3), fams, nll=np.array([2.0, 6.0, 4.0]), tokens=tokens)
    b = _scores(np.zeros(3), fams, nll=np.array([1.0, 3.0, 2.0]), tokens=tokens)
    d = paired_difference([a], [b], metric="loss")
    # x: 8/4 − 4/4 = 1; y: 4/2 − 2/2 = 1
    assert d.mean == pytest.approx(1.0)


@pytest.mark.parametrize(("kw", "message"), [
    ({"metric": "bleu"}, "metric must be one of"),
    ({"level": 1.0}, "0 < level < 1"),
    ({"resamples": 10}, "at least 100 resamples"),
])
def test_bad_settings_are_refused(kw, message):
    a = [_scores(np.zeros(2), ["x", "x"])]
    with pytest.raises(ConfigError, match=message):
        paired_difference(a, a, **kw)


def test_runs_on_other_examples_or_seeds_are_refused():
    a = [_scores(np.zeros(2), ["x", "x"])]
    with pytest.raises(ConfigError, match="same examples"):
        paired_difference(a, [_scores(np.zeros(2), ["x", "y"])])
    with pytest.raises(ConfigError, match="same seeds"):
        paired_difference(a, a + a)
