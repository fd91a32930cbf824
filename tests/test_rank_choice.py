"""Rank choice as a pure function: tables of devices and predictions, and monotonicity properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.edge_client.device import DeviceReport
from lorafleet.edge_client.rank_choice import Budgets, RankPrediction, choose_rank, fmt_bytes, transfer_seconds
from lorafleet.export.formats.errors import ConfigError

MIB = 1 << 20
GIB = 1 << 30
RANKS = [4, 8, 16, 32, 64]


def device(available=GIB, gflops=10.0, host_gflops=None, up=None, down=None):
    return DeviceReport(name="dev", source="profile" if host_gflops else "measured", memory_total_bytes=8 * GIB,
                        memory_available_bytes=available, cpu_count=4, gflops=gflops,
                        memory_bandwidth_gbs=10.0, network_up_mbps=up, network_down_mbps=down,
                        host_gflops=host_gflops)


def preds(base=500 * MIB, per_rank=10 * MIB, step=0.1, step_per_rank=0.01, adapter_per_rank=MIB):
    return [RankPrediction(r, base + per_rank * r, step + step_per_rank * r, adapter_per_rank * r) for r in RANKS]


@pytest.mark.parametrize("available, time_budget, expected, binds", [
    (2 * GIB, None, 64, "no limit binds"),          # everything fits
    (int((500 + 10 * 32) * MIB / 0.9) + 1, None, 32, "rank 64 is too big"),  # memory binds between 32 and 64
    (int((500 + 10 * 4) * MIB / 0.9) + 1, None, 4, "rank 8 is too big"),
    (400 * MIB, None, None, "no packaged rank fits: the smallest, rank 4, is too big"),
    (2 * GIB, 20 * (0.1 + 0.01 * 16) + 0.01, 16, "rank 32 is too slow"),  # time binds
    (2 * GIB, 1.0, None, "rank 4, is too slow"),
    (400 * MIB, 1.0, None, "too big and too slow"),
])
def test_table(available, time_budget, expected, binds):
    decision = choose_rank(device(available), preds(), Budgets(time_budget_seconds=time_budget))
    assert decision.selected_rank == expected
    assert binds in decision.reasons[-1]
    assert [c.rank for c in decision.candidates] == RANKS
    assert [c.fits for c in decision.candidates] == [expected is not None and r <= expected for r in RANKS]


def test_round_time_counts_adapter_transfer_both_ways():
    dev = device(2 * GIB, up=8.0, down=80.0)  # 1 MiB/rank: 8 Mbit/s up → 1.048576 s per MiB
    assert transfer_seconds(MIB, dev) == pytest.approx(MIB * 8 / 8e6 + MIB * 8 / 80e6)
    budgets = Budgets(time_budget_seconds=20 * (0.1 + 0.01 * 8) + transfer_seconds(8 * MIB, dev) + 1e-6)
    decision = choose_rank(dev, preds(), budgets)
    assert decision.selected_rank == 8
    c8 = decision.candidates[1]
    assert c8.predicted_round_seconds == pytest.approx(20 * 0.18 + transfer_seconds(8 * MIB, dev))
    assert "network: 80 Mbit/s down, 8 Mbit/s up" in decision.reasons


def test_unknown_network_is_said_and_not_counted():
    decision = choose_rank(device(2 * GIB), preds(), Budgets())
    assert any("network speed unknown" in r for r in decision.reasons)
    assert decision.candidates[0].predicted_round_seconds == pytest.approx(20 * 0.14)


def test_emulated_device_scales_host_step_times():
    slow = device(2 * GIB, gflops=5.0, host_gflops=20.0)  # 4x slower than the host
    decision = choose_rank(slow, preds(), Budgets())
    assert decision.candidates[0].predicted_step_seconds == pytest.approx(4 * 0.14)
    assert any("scaled from the host by 4.000" in r for r in decision.reasons)


def test_json_shape_and_unsorted_input():
    decision = choose_rank(device(2 * GIB), list(reversed(preds())), Budgets())
    out = decision.to_json()
    assert list(out) == ["candidates", "selected_rank", "reasons"]
    assert list(out["candidates"][0]) == [
        "rank", "predicted_peak_bytes", "predicted_step_seconds", "predicted_round_seconds", "memory_ok", "time_ok",
        "fits", "memory", "round", "why"]
    assert [c["rank"] for c in out["candidates"]] == RANKS


@pytest.mark.parametrize("kwargs, match", [
    ({"memory_fraction": 0}, r"memory_fraction must be in \(0, 1\], got 0"),
    ({"memory_fraction": 1.5}, r"memory_fraction must be in \(0, 1\], got 1.5"),
    ({"time_budget_seconds": -1}, "time_budget_seconds must be positive, got -1"),
    ({"steps_per_round": 0}, "steps_per_round must be positive, got 0"),
])
def test_budget_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Budgets(**kwargs)


@pytest.mark.parametrize("args, match", [
    ((0, 1, 0.1, 1), "rank must be positive, got 0"),
    ((4, -1, 0.1, 1), "bytes must be non-negative"),
    ((4, 1, float("nan"), 1), "step_seconds must be a non-negative number, got nan"),
])
def test_prediction_validation(args, match):
    with pytest.raises(ConfigError, match=match):
        RankPrediction(*args)


def test_no_predictions_is_a_bug():
    with pytest.raises(ValueError, match="at least one rank prediction"):
        choose_rank(device(), [], Budgets())


def test_fmt_bytes():
    assert fmt_bytes(1536 * MIB) == "1.50 GiB" and fmt_bytes(512) == "512 B" and fmt_bytes(2048) == "2.00 KiB"


_pred = st.builds(RankPrediction, rank=st.sampled_from(RANKS), peak_bytes=st.integers(0, 4 * GIB),
                  step_seconds=st.floats(0, 10), adapter_bytes=st.integers(0, 100 * MIB))
_preds = st.lists(_pred, min_size=1, max_size=5, unique_by=lambda p: p.rank)
_budget = st.one_of(st.none(), st.floats(0.1, 1000))


def _rank(decision):
    return -1 if decision.selected_rank is None else decision.selected_rank


@settings(max_examples=200, deadline=None)
@given(_preds, st.integers(1, 8 * GIB), st.integers(1, 8 * GIB), _budget, st.floats(0.1, 1.0))
def test_more_memory_never_yields_a_lower_rank(predictions, mem_a, mem_b, time_budget, fraction):
    low, high = sorted((mem_a, mem_b))
    budgets = Budgets(memory_fraction=fraction, time_budget_seconds=time_budget)
    assert _rank(choose_rank(device(high), predictions, budgets)) >= _rank(choose_rank(device(low), predictions,
                                                                                       budgets))


@settings(max_examples=200, deadline=None)
@given(_preds, st.floats(0.1, 1000), st.floats(0.1, 1000), st.floats(0.5, 100), st.floats(0.5, 100))
def test_more_time_or_speed_never_yields_a_lower_rank(predictions, t_a, t_b, g_a, g_b):
    dev = device(4 * GIB, up=5.0, down=20.0)
    lo, hi = sorted((t_a, t_b))
    assert _rank(choose_rank(dev, predictions, Budgets(time_budget_seconds=hi))) >= _rank(
        choose_rank(dev, predictions, Budgets(time_budget_seconds=lo)))
    slow, fast = sorted((g_a, g_b))
    pick = [_rank(choose_rank(device(4 * GIB, gflops=g, host_gflops=10.0), predictions,
                              Budgets(time_budget_seconds=30.0))) for g in (slow, fast)]
    assert pick[1] >= pick[0]


@settings(max_examples=100, deadline=None)
@given(_preds, st.integers(1, 8 * GIB), _budget)
def test_selected_is_the_largest_fitting_candidate(predictions, mem, time_budget):
    decision = choose_rank(device(mem), predictions, Budgets(time_budget_seconds=time_budget))
    fitting = [c.rank for c in decision.candidates if c.fits]
    assert decision.selected_rank == (max(fitting) if fitting else None)
    assert all(c.why.startswith("fits") == c.fits == (c.memory_ok and c.time_ok) for c in decision.candidates)
    assert all(c.why.startswith("too big") == (not c.memory_ok) for c in decision.candidates)
    assert all((c.limit is None) == c.fits for c in decision.candidates)
