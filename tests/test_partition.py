"""Dirichlet non-IID partition: exact coverage, balance, determinism, and the two limits of α."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.partition import dirichlet_partition, family_counts, family_mixtures, family_shares


def _labels(num_families: int, per_family: int) -> np.ndarray:
    return np.repeat(np.arange(num_families), per_family)


@settings(max_examples=60, deadline=None)
@given(num_families=st.integers(1, 8), per_family=st.integers(1, 30), num_devices=st.integers(1, 40),
       alpha=st.sampled_from([1e-3, 0.1, 1.0, 10.0, math.inf]), seed=st.integers(0, 2**31))
def test_every_example_is_assigned_exactly_once_and_sizes_are_balanced(num_families, per_family, num_devices,
                                                                        alpha, seed):
    labels = np.random.default_rng(seed).permutation(_labels(num_families, per_family))
    if len(labels) < num_devices:
        return
    parts = dirichlet_partition(labels, num_devices, alpha, seed=seed)
    assert len(parts) == num_devices
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_partition_is_deterministic_in_seed():
    labels = _labels(5, 40)
    a = dirichlet_partition(labels, 10, 0.5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, dirichlet_partition(labels, 10, 0.5, seed=1), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, dirichlet_partition(labels, 10, 0.5, seed=2),
                                                        strict=True))


@pytest.mark.parametrize("alpha", [1e4, math.inf])
def test_large_alpha_approaches_the_pool_mix(alpha):
    labels = _labels(5, 400)
    shares = family_shares(dirichlet_partition(labels, 10, alpha, seed=0), labels)
    tv = 0.5 * np.abs(shares - 0.2).sum(axis=1)  # total variation to the uniform mix, per device
    assert tv.mean() < 0.06


def test_small_alpha_concentrates_families_and_concentration_falls_with_alpha():
    labels = _labels(8, 200)
    top = {a: family_shares(dirichlet_partition(labels, 40, a, seed=0), labels).max(axis=1).mean()
           for a in (0.01, 1.0, 100.0)}
    assert top[0.01] > 0.85
    assert top[0.01] > top[1.0] > top[100.0]
    assert top[100.0] < 0.25  # uniform over 8 families would be 0.125 plus sampling noise


def test_family_counts_follow_the_mixtures():
    counts = family_counts(50, 6, 20, math.inf, seed=0)
    assert counts.shape == (50, 6) and (counts.sum(axis=1) == 20).all()
    assert counts.min() >= 3 and counts.max() <= 4  # 20 / 6 rounded either way
    small = family_counts(50, 6, 20, 0.01, seed=0)
    assert (small.max(axis=1) / 20).mean() > 0.9
    with pytest.raises(ConfigError, match="must be positive, got 0, 6, 20"):
        family_counts(0, 6, 20, 1.0, seed=0)


def test_mixtures_are_distributions_even_when_alpha_underflows():
    q = family_mixtures(200, 6, 1e-6, np.random.default_rng(0))
    assert np.allclose(q.sum(axis=1), 1.0) and np.isfinite(q).all()
    assert np.allclose(family_mixtures(3, 4, math.inf, np.random.default_rng(0)), 0.25)


def test_partition_errors_name_field_and_value():
    with pytest.raises(ConfigError, match="alpha must be positive.*got 0"):
        dirichlet_partition([0, 1], 1, 0.0, seed=0)
    with pytest.raises(ConfigError, match="alpha must be positive.*got nan"):
        dirichlet_partition([0, 1], 1, float("nan"), seed=0)
    with pytest.raises(ConfigError, match="cannot give 3 devices .* from 2 examples"):
        dirichlet_partition([0, 1], 3, 1.0, seed=0)
    with pytest.raises(ConfigError, match="num_devices must be positive, got 0"):
        dirichlet_partition([0, 1], 0, 1.0, seed=0)
    with pytest.raises(ConfigError, match="non-negative family indices"):
        dirichlet_partition([0, -1], 1, 1.0, seed=0)


# --- per-device data for the fleet ---------------------------------------------------------------------

def test_builtin_device_data_uses_only_seen_families_and_is_non_iid():
    from lorafleet import tasks
    from lorafleet.fleet.data import builtin_device_data

    seen = {tasks.family(n).instruction for n in tasks.seen_families()}
    data = builtin_device_data(12, examples_per_device=8, alpha=0.001, seed=0)
    assert len(data) == 12 and all(len(d) == 8 for d in data)
    assert {ex.instruction for d in data for ex in d} <= seen
    families_per_device = [len({ex.instruction for ex in d}) for d in data]
    assert np.mean(families_per_device) < 1.5  # α = 0.001: about one family each
    spread = builtin_device_data(12, examples_per_device=8, alpha=math.inf, seed=0)
    assert np.mean([len({ex.instruction for ex in d}) for d in spread]) > 6
    assert builtin_device_data(12, examples_per_device=8, alpha=0.001, seed=0) == data
    with pytest.raises(ConfigError, match="examples_per_device must be positive, got 0"):
        builtin_device_data(3, examples_per_device=0, alpha=1.0, seed=0)


def test_jsonl_device_data_splits_a_file_evenly(tmp_path):
    import json

    from lorafleet.fleet.data import jsonl_device_data

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": "say", "input": str(i), "output": str(i)}) + "\n"
                            for i in range(10)))
    parts = jsonl_device_data(path, 3, seed=0)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(int(ex.input) for p in parts for ex in p) == list(range(10))
    with pytest.raises(ConfigError, match="cannot give 11 devices"):
        jsonl_device_data(path, 11, seed=0)
