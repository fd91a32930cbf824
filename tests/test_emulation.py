"""The emulated fleet's pure logic: profiles per device, availability, sampling, round time, stragglers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.edge_client.device import emulate
from lorafleet.edge_client.profiles import load_profile
from lorafleet.edge_client.rank_choice import Budgets, RankPrediction, choose_rank
from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.emulation import (
    assign_profiles,
    online_mask,
    round_duration,
    round_seconds,
    sample_devices,
    sample_size,
    split_stragglers,
)


@given(n=st.integers(1, 300), weights=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6), seed=st.integers(0, 9))
@settings(max_examples=80, deadline=None)
def test_profiles_follow_the_mix_within_one_device(n, weights, seed):
    mix = {f"p{i}": w for i, w in enumerate(weights)}
    if sum(weights) <= 0:
        with pytest.raises(ConfigError, match="positive sum"):
            assign_profiles(n, mix, seed)
        return
    devices = assign_profiles(n, mix, seed)
    assert len(devices) == n
    total = sum(weights)
    for name, w in mix.items():
        assert abs(devices.count(name) - n * w / total) < 1  # largest remainder: off by less than one
    assert devices == assign_profiles(n, mix, seed)  # seeded


def test_eight_devices_of_four_equal_profiles_are_two_each_in_a_seeded_order():
    mix = {"a": 1, "b": 1, "c": 1, "d": 1}
    first = assign_profiles(8, mix, 0)
    assert sorted(first) == ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert any(assign_profiles(8, mix, s) != first for s in range(1, 6))  # the seed shuffles
    with pytest.raises(ConfigError, match="num_devices must be positive"):
        assign_profiles(0, mix, 0)


def test_availability_is_a_seeded_bernoulli_per_device_and_round():
    p = np.array([0.0, 1.0, 0.3, 0.9] * 500)
    rounds = np.stack([online_mask(p, t, seed=7) for t in range(1, 41)])  # (rounds, devices)
    assert not rounds[:, p == 0.0].any() and rounds[:, p == 1.0].all()
    assert rounds[:, p == 0.3].mean() == pytest.approx(0.3, abs=0.01)
    assert rounds[:, p == 0.9].mean() == pytest.approx(0.9, abs=0.01)
    assert (online_mask(p, 3, seed=7) == rounds[2]).all()  # reproducible
    assert (rounds[0] != rounds[1]).any()  # rounds differ
    with pytest.raises(ConfigError, match="availability must lie in"):
        online_mask([1.5], 1, seed=0)


@given(n=st.integers(1, 400), fraction=st.floats(0.001, 1.0), p=st.floats(0.0, 1.0), rnd=st.integers(1, 50))
@settings(max_examples=80, deadline=None)
def test_sampling_takes_only_online_devices(n, fraction, p, rnd):
    online = online_mask([p] * n, rnd, seed=1)
    sampled = sample_devices(online, fraction, rnd, seed=1)
    assert all(online[d] for d in sampled)
    assert sampled == sorted(set(sampled))
    assert len(sampled) == min(sample_size(n, fraction), int(online.sum()))
    assert sampled == sample_devices(online, fraction, rnd, seed=1)


def test_sample_size_is_a_share_of_the_whole_fleet():
    assert sample_size(1000, 0.1) == 100 and sample_size(8, 0.01) == 1 and sample_size(8, 1.0) == 8
    assert sample_devices(np.zeros(5, dtype=bool), 1.0, 1, seed=0) == []
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="fraction must be in"):
            sample_size(10, bad)


def test_round_time_is_the_rank_rules_prediction_when_steps_take_the_predicted_time():
    """The emulated round (measured host seconds scaled + adapter down and up) is the quantity the device's
    rank choice predicted: given the predicted step time, both agree exactly, for every bundled profile."""
    host_gflops, steps = 80.0, 7
    predictions = [RankPrediction(r, 10**8, 0.05 + 0.001 * r, 4 * 1000 * r) for r in (2, 4, 8)]
    for name in ("pixel-8", "android-low-4gb", "jetson-orin-nano-8gb"):
        profile = load_profile(name)
        device = emulate(profile, host_gflops)
        decision = choose_rank(device, predictions, Budgets(steps_per_round=steps))
        for cand, pred in zip(decision.candidates, predictions, strict=True):
            t = round_seconds(steps * pred.step_seconds, host_gflops / profile.sustained_gflops, pred.adapter_bytes,
                              profile.network_down_mbps, profile.network_up_mbps)
            assert t == pytest.approx(cand.predicted_round_seconds, rel=1e-12)


def test_round_time_by_hand_and_its_checks():
    # 2 s on the host, device half as fast; 1 MB at 8 Mbit/s down (1 s) and 4 Mbit/s up (2 s)
    assert round_seconds(2.0, 2.0, 1_000_000, 8.0, 4.0) == pytest.approx(7.0)
    with pytest.raises(ConfigError, match="host_train_seconds must be a non-negative number"):
        round_seconds(float("nan"), 1.0, 0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="positive bandwidths"):
        round_seconds(1.0, 1.0, 10, 0.0, 1.0)


def test_stragglers_are_those_past_the_deadline_and_the_round_waits_for_it():
    times = {3: 4.0, 1: 12.0, 7: 10.0, 2: 10.5}
    assert split_stragglers(times, 10.0) == ([3, 7], [1, 2])
    assert split_stragglers(times, None) == ([1, 2, 3, 7], [])
    assert round_duration([4.0, 10.0], 10.0, any_late=True) == 10.0
    assert round_duration([4.0, 9.0], 10.0, any_late=False) == 9.0
    assert round_duration([4.0, 12.0], None, any_late=False) == 12.0
    assert round_duration([], 10.0, any_late=False) == 0.0


def test_which_rounds_are_evaluated():
    from lorafleet.fleet.server import evaluated

    assert [r for r in range(7) if evaluated(r, 6, 1)] == list(range(7))
    assert [r for r in range(7) if evaluated(r, 6, 4)] == [0, 4, 6]
    assert [r for r in range(7) if evaluated(r, 6, 0)] == [0, 6]


# --- ranks drawn from a distribution, step times from FLOPs ---------------------------------------------

@pytest.mark.parametrize("distribution", ["uniform", "heavy-tail-light", "heavy-tail-strong", "normal"])
@given(n=st.integers(1, 200), ranks=st.sets(st.integers(1, 256), min_size=1, max_size=6), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_drawn_ranks_follow_the_distribution_within_one_device(distribution, n, ranks, seed):
    from lorafleet.fleet.emulation import draw_ranks, rank_weights

    weights = rank_weights(ranks, distribution)
    assert set(weights) == ranks and abs(sum(weights.values()) - 1) < 1e-12
    drawn = draw_ranks(n, ranks, distribution, seed)
    assert len(drawn) == n and set(drawn) <= ranks
    for r, w in weights.items():
        assert abs(drawn.count(r) - w * n) < 1 + 1e-9  # largest remainder: within one device of the share
    assert drawn == draw_ranks(n, ranks, distribution, seed)  # seeded


def test_the_papers_distributions_by_hand():
    from lorafleet.fleet.emulation import rank_weights

    light, strong = rank_weights([8, 4, 16, 32], "heavy-tail-light"), rank_weights([4, 8, 16, 32], "heavy-tail-strong")
    assert light[4] == pytest.approx(0.85) and light[8] == light[16] == light[32] == pytest.approx(0.05)
    assert strong[32] == pytest.approx(0.85) and strong[4] == pytest.approx(0.05)
    normal = rank_weights([4, 8, 16, 32, 64], "normal")
    assert normal[16] > normal[8] > normal[4] and normal[16] > normal[32] > normal[64]
    assert normal[8] == pytest.approx(normal[32]) and normal[4] == pytest.approx(normal[64])
    assert rank_weights([4, 8], "uniform") == {4: 0.5, 8: 0.5}
    with pytest.raises(ConfigError, match="unknown rank distribution 'zipf'"):
        rank_weights([4], "zipf")


def test_a_flops_step_is_the_steps_flops_over_the_devices_throughput():
    from lorafleet.fleet.emulation import TRAINING_EFFICIENCY, flops_step_seconds

    assert flops_step_seconds(8 * 10**9, 10.0, 0.5) == pytest.approx(1.6)
    assert flops_step_seconds(10**9, 1.0) == pytest.approx(1 / TRAINING_EFFICIENCY)
    for bad in ((-1, 1.0, 0.5), (1, 0.0, 0.5), (1, 1.0, 1.5)):
        with pytest.raises(ConfigError):
            flops_step_seconds(*bad)


def test_measured_predictions_are_made_plausible():
    """A loaded host can measure rank 4 slower than rank 64, or a step faster than its FLOPs allow: the plan
    never uses such predictions."""
    from types import SimpleNamespace

    from lorafleet.fleet.plan import plausible

    flops = {4: 10**9, 8: 2 * 10**9, 16: 3 * 10**9}
    pkg = SimpleNamespace(ranks=[4, 8, 16], manifest=SimpleNamespace(
        rank=lambda r: SimpleNamespace(estimates=SimpleNamespace(flops_per_step=flops[r]))))
    raw = [RankPrediction(4, 900, 2.0, 10), RankPrediction(8, 800, 0.5, 20), RankPrediction(16, 1000, 0.001, 40)]
    got = plausible(raw, pkg, host_gflops=1.0)  # 1 GFLOP/s: rank 16 needs at least 3 s
    assert [p.step_seconds for p in got] == [2.0, 2.0, 3.0]
    assert [p.peak_bytes for p in got] == [900, 900, 1000]
    assert [p.adapter_bytes for p in got] == [10, 20, 40]
