"""The fleet plan (ranks from the profiler's rule, never assigned), the fleet's config and its one-line errors."""

from __future__ import annotations

import math

import pytest

from lorafleet.edge_client.device import DeviceReport, emulate
from lorafleet.edge_client.profiler import ProfileResult
from lorafleet.edge_client.rank_choice import Budgets, RankDecision, RankPrediction, choose_rank
from lorafleet.export.formats.errors import ConfigError
from lorafleet.fleet.config import FleetConfig, parse_mix
from lorafleet.fleet.plan import HostProfile, load_mix, plan_fleet
from tests.fleet_helpers import write_profile

HOST_GFLOPS = 50.0


def _host() -> HostProfile:
    device = DeviceReport("host", "measured", 16 << 30, 8 << 30, 2, HOST_GFLOPS, 10.0, host_gflops=HOST_GFLOPS)
    predictions = [RankPrediction(r, 400 << 20, 0.02 + 0.0005 * r, 4 * 1000 * r) for r in (4, 8, 16)]
    return HostProfile(ProfileResult(device, RankDecision([], 16, []), [], predictions), "torch")


@pytest.fixture
def profiles_dir(tmp_path):
    d = tmp_path / "profiles"
    write_profile(d, "fast", sustained_gflops=1000.0)
    write_profile(d, "slownet", network_up_mbps=0.05, network_down_mbps=0.05)  # transfer time grows with rank
    write_profile(d, "slowcpu", sustained_gflops=0.01)  # no rank makes the deadline
    write_profile(d, "small", app_memory_gib=0.1, memory_total_gib=1.0)  # no rank fits in memory
    return d


def test_every_device_gets_the_rank_the_profilers_rule_gives_its_profile(profiles_dir):
    budgets = Budgets(time_budget_seconds=6.0, steps_per_round=3)
    profiles = load_mix(profiles_dir, None)
    plan = plan_fleet(_host(), profiles, None, 40, budgets, seed=3)
    assert len(plan.devices) == 40 and {d.profile for d in plan.devices} == set(profiles)
    for d in plan.devices:
        expected = choose_rank(emulate(profiles[d.profile], HOST_GFLOPS), _host().result.predictions, budgets)
        assert d.rank == expected.selected_rank
        assert d.time_scale == pytest.approx(HOST_GFLOPS / profiles[d.profile].sustained_gflops)
    by_profile = {d.profile: d for d in plan.devices}
    assert by_profile["fast"].rank == 16
    assert by_profile["slownet"].rank is not None and by_profile["slownet"].rank < 16  # ranks differ by profile
    slow = by_profile["slowcpu"]
    assert slow.rank is None and slow.unable_seconds > 6.0 and "too slow" in slow.unable_reason
    small = by_profile["small"]
    assert small.rank is None and small.unable_seconds is None and "too big" in small.unable_reason
    json = plan.rank_choice_json(budgets)
    assert json["profiles"]["fast"]["selected_rank"] == 16 and json["budgets"]["time_budget_seconds"] == 6.0


def test_without_a_deadline_ranks_follow_memory_only(profiles_dir):
    plan = plan_fleet(_host(), load_mix(profiles_dir, None), None, 8, Budgets(steps_per_round=3), seed=0)
    assert {d.profile: d.rank for d in plan.devices} == {"fast": 16, "slownet": 16, "slowcpu": 16, "small": None}


def test_the_mix_chooses_and_weighs_profiles(profiles_dir):
    profiles = load_mix(profiles_dir, {"fast": 3, "slownet": 1, "small": 0})
    assert set(profiles) == {"fast", "slownet"}  # weight 0: not in the fleet
    plan = plan_fleet(_host(), profiles, {"fast": 3, "slownet": 1, "small": 0}, 8, Budgets(), seed=0)
    assert [d.profile for d in plan.devices].count("fast") == 6
    with pytest.raises(ConfigError, match=r"--mix names unknown profile 'nope' \(profiles in .*: fast, slowcpu"):
        load_mix(profiles_dir, {"nope": 1.0})
    with pytest.raises(ConfigError, match="no device profiles"):
        load_mix(profiles_dir / "missing", None)


def _package(flops_per_rank: int = 10**9, peak: int = 400 << 20, device_memory: dict | None = None):
    """A package as the plan reads it: per-rank FLOPs, estimated peak (and, given ``device_memory``
    ``{runtime: bytes}``, a program-derived prediction per runtime) and trainable parameters."""
    from types import SimpleNamespace

    from lorafleet.export.formats.manifest import Estimates

    ranks = (4, 8, 16)
    est = {r: Estimates(peak + r, int(flops_per_rank * (1 + r / 64)),
                        device_memory={rt: {"planned": b + r, "runtime": 1} for rt, b in (device_memory or {}).items()})
           for r in ranks}
    return SimpleNamespace(ranks=ranks, manifest=SimpleNamespace(
        rank=lambda r: SimpleNamespace(estimates=est[r], trainable_parameters=1000 * r)))


def test_flops_emulation_needs_no_host_and_times_steps_from_flops(profiles_dir):
    """The plan from the package alone: each profile's step time is FLOPs / (GFLOP/s × efficiency), so the
    same fleet plans the same on any host at any load."""
    from lorafleet.fleet.emulation import TRAINING_EFFICIENCY
    from lorafleet.fleet.plan import flops_predictions

    pkg, budgets = _package(), Budgets(time_budget_seconds=6.0, steps_per_round=3)
    profiles = load_mix(profiles_dir, None)
    plan = plan_fleet(None, profiles, None, 40, budgets, seed=3, pkg=pkg, emulation="flops")
    assert plan.host is None
    for d in plan.devices:
        p = profiles[d.profile]
        preds = flops_predictions(pkg, p)
        assert d.rank == choose_rank(emulate(p, p.sustained_gflops), preds, budgets).selected_rank
        assert d.step_seconds[16] == pytest.approx(pkg.manifest.rank(16).estimates.flops_per_step
                                                   / (p.sustained_gflops * 1e9 * TRAINING_EFFICIENCY))
    by_profile = {d.profile: d.rank for d in plan.devices}
    assert by_profile["fast"] == 16 and by_profile["slowcpu"] is None and by_profile["small"] is None
    assert by_profile["slownet"] is not None and by_profile["slownet"] < 16
    again = plan_fleet(None, profiles, None, 40, budgets, seed=3, pkg=pkg, emulation="flops")
    assert again.devices == plan.devices
    emulation = plan.rank_choice_json(budgets)["emulation"]
    assert emulation == {"mode": "flops", "rank_distribution": "profiler", "efficiency": TRAINING_EFFICIENCY,
                         "memory": "formula"}
    with pytest.raises(ConfigError, match="needs the package"):
        plan_fleet(None, profiles, None, 4, budgets, seed=3, emulation="flops")
    with pytest.raises(ConfigError, match="needs this host's profile"):
        plan_fleet(None, profiles, None, 4, budgets, seed=3, pkg=pkg, emulation="measured")


def test_ranks_drawn_from_a_distribution_keep_each_devices_profile(profiles_dir):
    from lorafleet.fleet.emulation import draw_ranks

    pkg, budgets = _package(), Budgets(steps_per_round=3)
    profiles = load_mix(profiles_dir, None)
    base = plan_fleet(None, profiles, None, 20, budgets, seed=5, pkg=pkg, emulation="flops")
    plan = plan_fleet(None, profiles, None, 20, budgets, seed=5, pkg=pkg, emulation="flops",
                      rank_distribution="heavy-tail-strong")
    assert [d.rank for d in plan.devices] == draw_ranks(20, (4, 8, 16), "heavy-tail-strong", 5)
    assert [d.profile for d in plan.devices] == [d.profile for d in base.devices]
    assert [d.rank for d in plan.devices].count(16) == 17  # 85 % of 20
    assert plan.rank_choice_json(budgets)["emulation"]["rank_distribution"] == "heavy-tail-strong"


def test_fleet_config_checks_the_rank_distribution_and_emulation(profiles_dir, tmp_path):
    common = dict(devices=2, rounds=1, model="random:tiny", method="flexlora", seed=0, out=tmp_path / "o",
                  profiles_dir=profiles_dir)
    with pytest.raises(ConfigError, match="rank_distribution must be one of profiler, uniform"):
        FleetConfig(**common, rank_distribution="zipf")
    with pytest.raises(ConfigError, match="emulation must be one of flops, measured"):
        FleetConfig(**common, emulation="wall")
    assert FleetConfig(**common).emulation == "flops"


def test_parse_mix_and_its_errors():
    assert parse_mix("pixel-8=2, jetson-orin-nano-8gb=0.5") == {"pixel-8": 2.0, "jetson-orin-nano-8gb": 0.5}
    for text, message in (("pixel-8", "expected name=weight pairs"), ("=2", "expected name=weight pairs"),
                          ("a=x", "weight of 'a' must be a number"), ("a=-1", "non-negative"),
                          ("a=inf", "non-negative"), ("a=1,a=2", "given twice"), ("a=0,b=0", "must not all be zero")):
        with pytest.raises(ConfigError, match=message):
            parse_mix(text)


def test_fleet_config_names_the_bad_field(tmp_path):
    ok = {"devices": 4, "rounds": 1, "model": "random:tiny", "method": "flexlora", "seed": 0, "out": tmp_path / "o"}
    assert FleetConfig(**ok).to_json()["round_deadline_s"] is None
    for change, message in (({"devices": 0}, "devices must be a positive integer, got 0"),
                            ({"rounds": -1}, "rounds must be a positive integer"),
                            ({"method": "fedprox"}, "method must be one of fedavg, hetlora, flexlora"),
                            ({"fraction": 0.0}, r"fraction must be in \(0, 1\], got 0.0"),
                            ({"fraction": 1.5}, r"fraction must be in \(0, 1\], got 1.5"),
                            ({"round_deadline": -3.0}, "round_deadline must be a positive number"),
                            ({"round_deadline": math.inf}, "round_deadline must be a positive number"),
                            ({"local_steps": 0}, "local_steps must be a positive integer"),
                            ({"ranks": (4, 4)}, "ranks must be distinct positive integers"),
                            ({"seq_len": 4}, "seq_len must be 0"),
                            ({"quantize": "int3"}, "quantize: unknown mode 'int3'"),
                            ({"quantize": "int4:7"}, "int4 group size must be an even integer"),
                            ({"quantize": 8}, "quantize must be none, int8, int4 or int4:G, got 8"),
                            ({"backend": "executorch"}, "backend must be one of onnxruntime, torch"),
                            ({"fedavg_rank": "median"}, "fedavg_rank must be one of"),
                            ({"data": str(tmp_path / "none.jsonl")}, "data must be .builtin. or a JSONL file"),
                            ({"profiles_dir": tmp_path / "nope"}, "profiles directory not found")):
        with pytest.raises(ConfigError, match=message):
            FleetConfig(**{**ok, **change})


def test_a_quantized_base_is_its_own_package(tmp_path):
    from lorafleet.fleet.package import package_key

    ok = {"devices": 4, "rounds": 1, "model": "random:tiny", "method": "flexlora", "seed": 0, "out": tmp_path / "o"}
    assert FleetConfig(**ok).quantize == "none"
    assert FleetConfig(**ok, quantize="INT4").quantize == "int4:32"  # the manifest's spelling
    assert FleetConfig(**ok, quantize="int4:64").to_json()["quantize"] == "int4:64"
    args = ("random:tiny", (4, 8), ("q_proj", "v_proj"), 16.0, 64)
    keys = {q: package_key(*args, quantize=q) for q in ("none", "int8", "int4", "int4:64")}
    assert len(set(keys.values())) == 4
    assert keys["none"] == package_key(*args)  # fp32 packages keep their cached key
    assert package_key(*args, quantize="int4:32") == keys["int4"]


def test_flops_emulation_takes_the_backends_program_memory_where_the_package_has_it(profiles_dir):
    """An ExecuTorch (or native) fleet judges each rank on the manifest's program-derived device memory of the
    ExecuTorch programs; a torch fleet, and a runtime the package has no prediction for, on the formula."""
    from lorafleet.fleet.plan import flops_predictions, memory_source

    pkg = _package(peak=400 << 20, device_memory={"executorch": 5 << 30})
    profiles = load_mix(profiles_dir, None)
    p = next(iter(profiles.values()))
    for backend in ("executorch", "native"):
        assert [x.peak_bytes for x in flops_predictions(pkg, p, backend=backend)] == \
            [(5 << 30) + r + 1 for r in (4, 8, 16)]
        assert memory_source(pkg, backend) == "executorch program"
    for backend in ("torch", "onnxruntime", None):
        assert [x.peak_bytes for x in flops_predictions(pkg, p, backend=backend)] == \
            [(400 << 20) + r for r in (4, 8, 16)]
        assert memory_source(pkg, backend) == "formula"
    budgets = Budgets(time_budget_seconds=6.0, steps_per_round=3)
    small = plan_fleet(None, profiles, None, 40, budgets, seed=3, pkg=pkg, emulation="flops", backend="torch")
    big = plan_fleet(None, profiles, None, 40, budgets, seed=3, pkg=pkg, emulation="flops", backend="executorch")
    assert big.rank_choice_json(budgets)["emulation"]["memory"] == "executorch program"
    # 5 GiB programs fit none of the 4 GiB profiles that 400 MiB ones fit
    assert not any(d.rank for d in big.devices) and any(d.rank for d in small.devices)
