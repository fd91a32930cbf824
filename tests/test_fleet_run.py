"""`lorafleet fleet` end to end on Flower's simulation engine (Ray), `random:tiny`, 50 virtual devices.

The fleet is built so that everything the emulation does must happen: a fast profile (the largest rank), one
whose slow network makes the deadline bind at a smaller rank, one too slow for any rank (dropped as a
straggler whenever it is sampled), and one that is mostly offline. The report is checked against the pure
functions it was made with: the ranks against the profiler's rule, who was sampled against the seeded
availability and sampling, who was dropped against the deadline.
"""

from __future__ import annotations

import json
import os

import pytest

from lorafleet.cli import main
from lorafleet.edge_client.device import emulate
from lorafleet.edge_client.profiles import load_profile
from lorafleet.edge_client.rank_choice import Budgets, RankPrediction, choose_rank
from lorafleet.fleet.emulation import online_mask, sample_devices
from tests.fleet_helpers import write_profile

DEVICES, ROUNDS, DEADLINE, SEED, FRACTION = 50, 2, 6.0, 11, 0.5
PROFILES = {"fast": {"sustained_gflops": 1000.0},
            "slownet": {"network_up_mbps": 0.05, "network_down_mbps": 0.05, "availability": 0.6},
            "slowcpu": {"sustained_gflops": 0.001},
            "flaky": {"availability": 0.3}}


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    """Run the fleet once (its own package cache) and hand back the report directory and profiles."""
    root = tmp_path_factory.mktemp("fleet-run")
    for name, figures in PROFILES.items():
        write_profile(root / "profiles", name, **figures)
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFLEET_CACHE", str(root / "cache"))
        code = main(["fleet", "--devices", str(DEVICES), "--profiles", str(root / "profiles"), "--fraction",
                     str(FRACTION), "--rounds", str(ROUNDS), "--model", "random:tiny", "--method", "flexlora",
                     "--local-steps", "2", "--round-deadline", str(DEADLINE), "--seed", str(SEED), "--out", str(out)])
    assert code == 0
    return out, root / "profiles"


@pytest.mark.slow
def test_metrics_json_has_every_round_with_who_took_part(fleet_run):
    out, _ = fleet_run
    data = json.loads((out / "metrics.json").read_text())
    assert {"rounds", "device_ranks", "config", "device_profiles", "rank_choice"} <= set(data)
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    for r in data["rounds"]:
        for split in ("heldout", "seen"):
            assert {f"{split}/rouge_l", f"{split}/exact_match", f"{split}/loss"} <= set(r["metrics"])
            assert 0.0 <= r["metrics"][f"{split}/rouge_l"] <= 1.0
        assert {"participants", "dropped", "round_time_s", "device_times_s", "online", "sampled"} <= set(r)
    assert not data["rounds"][0]["participants"] and data["rounds"][1]["participants"]
    assert len(data["device_ranks"]) == DEVICES and data["config"]["method"] == "flexlora"
    assert data["config"]["round_deadline_s"] == DEADLINE
    assert len(list((out / "data").glob("device-*.jsonl"))) == DEVICES
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == ROUNDS + 2 and rows[0].startswith("round,online,sampled")
    assert all((out / name).stat().st_size > 5000 for name in ("metrics.png", "rank_histogram.png", "round_times.png"))
    assert "Change from the untrained baseline" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_ranks_come_from_the_profilers_rule(fleet_run):
    """flops emulation (the default): each profile is judged on the package's own per-rank predictions, which
    the report records, at the profile's speed; no host figure is used."""
    out, profiles_dir = fleet_run
    data = json.loads((out / "metrics.json").read_text())
    choice = data["rank_choice"]
    assert choice["host"] is None and choice["emulation"]["mode"] == "flops"
    budgets = Budgets(time_budget_seconds=DEADLINE, steps_per_round=2)
    for device, rank in data["device_ranks"].items():
        pid = data["device_profiles"][device]
        profile = load_profile(profiles_dir / f"{pid}.toml")
        predictions = [RankPrediction(**p) for p in choice["profiles"][pid]["predictions"]]
        assert [p.rank for p in predictions] == [4, 8, 16]
        decision = choose_rank(emulate(profile, profile.sustained_gflops), predictions, budgets)
        assert rank == decision.selected_rank
    by_profile = {data["device_profiles"][d]: r for d, r in data["device_ranks"].items()}
    assert by_profile["fast"] == by_profile["flaky"] == 16
    assert by_profile["slownet"] in (4, 8)  # its network makes rank 16 miss the deadline
    assert by_profile["slowcpu"] is None


@pytest.mark.slow
def test_the_same_fleet_emulates_the_same_on_a_loaded_machine(fleet_run, tmp_path):
    """The fixture's fleet again, with every CPU kept busy by other processes: the same ranks, the same
    devices sampled, dropped and taking part, the same emulated times (flops emulation reads no clock).

    The loaded run stops after round 1 (a loaded round takes minutes): rounds 0 and 1 of both runs are compared."""
    import subprocess
    import sys

    out, profiles_dir = fleet_run
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LORAFLEET_CACHE", str(out.parent / "cache"))
            code = main(["fleet", "--devices", str(DEVICES), "--profiles", str(profiles_dir), "--fraction",
                         str(FRACTION), "--rounds", "1", "--model", "random:tiny", "--method", "flexlora",
                         "--local-steps", "2", "--round-deadline", str(DEADLINE), "--seed", str(SEED), "--out",
                         str(tmp_path / "loaded")])
        load = os.getloadavg()[0]
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert code == 0
    idle, loaded = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "loaded"))
    assert load > 1.0  # the machine really was busy
    assert loaded["device_ranks"] == idle["device_ranks"]
    keys = ("online", "sampled", "participants", "dropped", "drop_reasons", "device_times_s", "round_time_s", "ranks")
    assert [r["round"] for r in loaded["rounds"]] == [0, 1] and loaded["rounds"][1]["participants"]
    for a, b in zip(idle["rounds"][:2], loaded["rounds"], strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["round"]


@pytest.mark.slow
def test_offline_devices_are_not_sampled_and_stragglers_are_dropped(fleet_run):
    out, profiles_dir = fleet_run
    data = json.loads((out / "metrics.json").read_text())
    profiles = data["device_profiles"]
    availability = [load_profile(profiles_dir / f"{profiles[str(d)]}.toml").availability for d in range(DEVICES)]
    stragglers = 0
    for r in data["rounds"][1:]:
        online = online_mask(availability, r["round"], SEED)
        assert r["online"] == int(online.sum()) < DEVICES  # some devices were offline
        assert r["sampled"] == [str(d) for d in sample_devices(online, FRACTION, r["round"], SEED)]
        for d in r["sampled"]:
            if data["device_ranks"][d] is None:  # the slow CPU: no rank makes the deadline
                assert d in r["dropped"] and r["device_times_s"][d] > DEADLINE
                assert "no packaged rank fits" in r["drop_reasons"][d]
                stragglers += 1
            elif r["device_times_s"][d] > DEADLINE:
                assert d in r["dropped"] and r["drop_reasons"][d].startswith("straggler")
            else:
                assert d in r["participants"]
        if any(r["device_times_s"][d] > DEADLINE for d in r["dropped"] if d in r["device_times_s"]):
            assert r["round_time_s"] == DEADLINE
    assert stragglers > 0


@pytest.mark.slow
def test_the_global_adapter_loads_in_peft_at_the_fleets_highest_rank(fleet_run):
    import torch
    from peft import PeftModel

    from lorafleet.export.compiler.models import load_model
    from lorafleet.export.formats.adapter import read_adapter

    out, _ = fleet_run
    adapter = read_adapter(out / "global")
    assert adapter.r == 16
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "global").stat().st_mode & 0o777 == 0o777 & ~umask  # readable by others, like the report
    base = load_model("random:tiny").model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(out / "global"))
        after = model(input_ids=ids).logits
    assert model.peft_config["default"].r == 16
    assert not torch.allclose(before, after)  # the trained adapter changes the model


@pytest.mark.slow
def test_a_second_fleet_reuses_the_cached_package(fleet_run, monkeypatch):
    from lorafleet.fleet.package import fleet_package, package_key

    out, _ = fleet_run
    config = json.loads((out / "metrics.json").read_text())["config"]
    monkeypatch.setenv("LORAFLEET_CACHE", str(out.parent / "cache"))
    args = ("random:tiny", (4, 8, 16), ("q_proj", "v_proj"), 16.0, config["seq_len"])
    path, cached = fleet_package(*args, log=pytest.fail)  # nothing to export
    assert cached and str(path) == config["package"]
    assert package_key(*args) != package_key("random:tiny", (4, 8), ("q_proj", "v_proj"), 16.0, config["seq_len"])
    assert package_key(*args) != package_key(*args[:4], config["seq_len"] + 32)


# --- one-line errors, nothing left behind --------------------------------------------------------------

def _fleet(tmp_path, *extra: str) -> list[str]:
    return ["fleet", "--devices", "4", "--rounds", "1", "--model", "random:tiny", "--method", "flexlora", "--seed",
            "0", "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize(("extra", "message"), [
    (["--mix", "pixel-8=1,no-such-phone=2"], "--mix names unknown profile 'no-such-phone'"),
    (["--mix", "pixel-8"], "--mix: expected name=weight pairs"),
    (["--fraction", "0"], r"fraction must be in \(0, 1\], got 0.0"),
    (["--fraction", "1.5"], r"fraction must be in \(0, 1\], got 1.5"),
    (["--fraction", "half"], "--fraction must be a number, got 'half'"),
    (["--round-deadline", "-5"], "round_deadline must be a positive number"),
    (["--data", "missing.jsonl"], "data must be 'builtin' or a JSONL file; not found: missing.jsonl"),
    (["--method", "fedsgd"], "method must be one of fedavg, hetlora, flexlora"),
    (["--profiles", "nowhere"], "profiles directory not found: nowhere"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, extra, message):
    import re

    assert main(_fleet(tmp_path, *extra)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lorafleet: error: ") and re.search(message, err)
    assert not (tmp_path / "out").exists()


def test_an_existing_report_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    assert main(_fleet(tmp_path)) != 0
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["metrics.json"]
