"""The profiler: linear growth fits, real two-rank measurements on the tiny package, `lorafleet profile`."""

import json

import pytest

from lorafleet.cli import main
from lorafleet.edge_client.device import DeviceReport, emulate
from lorafleet.edge_client.profiler import (
    LinearFit,
    RankMeasurement,
    fit_growth,
    fit_linear,
    predict,
    profile_device,
)
from lorafleet.edge_client.profiles import load_profile
from lorafleet.edge_client.rank_choice import Budgets, choose_rank
from lorafleet.export.formats.package import open_package

GIB = 1 << 30
DEVICE_KEYS = ["name", "source", "memory_total_bytes", "memory_available_bytes", "cpu_count", "gflops",
               "memory_bandwidth_gbs"]
CANDIDATE_KEYS = [
        "rank", "predicted_peak_bytes", "predicted_step_seconds", "predicted_round_seconds", "memory_ok", "time_ok",
        "fits", "memory", "round", "why"]


def test_fit_linear():
    f = fit_linear([2.0, 8.0], [10.0, 22.0])
    assert f.slope == pytest.approx(2.0) and f.intercept == pytest.approx(6.0) and f(4) == pytest.approx(14.0)
    g = fit_linear([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert g.slope == pytest.approx(1.5) and g.intercept == pytest.approx(-2 / 3)
    assert fit_linear([2.0, 8.0], [10.0, 9.0]).slope == 0.0  # noise never makes a rank cheaper
    with pytest.raises(ValueError, match="two distinct"):
        fit_linear([4.0, 4.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def pkg(tiny_package):
    return open_package(tiny_package)


def test_one_measurement_takes_its_slopes_from_the_manifest(pkg):
    m = RankMeasurement(2, 500 << 20, 0.01)
    mem, sec = fit_growth(pkg, [m])
    est = {r: pkg.manifest.rank(r).estimates for r in (2, 8)}
    slope = (est[8].training_peak_memory_bytes - est[2].training_peak_memory_bytes) / 6
    assert mem(2) == pytest.approx(500 << 20) and mem.slope == pytest.approx(slope)
    assert sec(2) == pytest.approx(0.01) and sec.slope >= 0
    preds = predict(pkg, mem, sec)
    assert [p.rank for p in preds] == [2, 4, 8]
    assert preds[1].adapter_bytes == 4 * pkg.manifest.rank(4).trainable_parameters


@pytest.fixture(scope="module")
def profiled(pkg):
    host = DeviceReport("host", "measured", 16 * GIB, 8 * GIB, 2, 20.0, 10.0, host_gflops=20.0)
    device = emulate(load_profile("pixel-8"), host.gflops)
    return profile_device(device, pkg, "onnxruntime", Budgets(), steps=2)


def test_profile_measures_two_ranks_and_predicts_every_rank(profiled, pkg):
    assert [m.rank for m in profiled.measurements] == [2, 8]
    # device memory: above the process's baseline with ORT loaded (a few MiB for random:tiny, not the ~300 MiB of
    # an interpreter with torch and ONNX Runtime)
    assert all(0 < m.device_memory_bytes < 100 << 20 and m.step_seconds > 0 for m in profiled.measurements)
    mem = fit_linear([2.0, 8.0], [float(m.device_memory_bytes) for m in profiled.measurements])
    by_rank = {c.rank: c for c in profiled.decision.candidates}
    assert set(by_rank) == {2, 4, 8}
    assert by_rank[4].predicted_peak_bytes == int(mem(4))  # the fit, interpolated
    assert profiled.selected_rank == 8  # 3.6 GiB of app memory is plenty for random:tiny
    assert profiled.decision.reasons[0].startswith("fixed terms: batch 1 × seq_len 16 tokens")
    assert "measured ranks 2 and 8 on onnxruntime" in profiled.decision.reasons[1]
    assert not any("among its runtimes" in r for r in profiled.decision.reasons)  # pixel-8 runs ORT
    out = profiled.to_json()
    assert list(out) == ["device", "candidates", "selected_rank", "reasons"]
    assert list(out["device"]) == DEVICE_KEYS and list(out["candidates"][0]) == CANDIDATE_KEYS


def test_a_device_that_fits_no_rank_says_so(profiled):
    tiny = DeviceReport("watch", "profile", 4 << 20, 2 << 20, 1, 1.0, 1.0, host_gflops=20.0)
    decision = choose_rank(tiny, profiled.predictions, Budgets())
    assert decision.selected_rank is None
    assert decision.reasons[-1].startswith("no packaged rank fits: the smallest, rank 2, is too big")


def test_no_package_profiles_the_device_only():
    dev = DeviceReport("host", "measured", 16 * GIB, 8 * GIB, 2, 20.0, 10.0)
    result = profile_device(dev, None, "torch", Budgets())
    assert result.to_json()["candidates"] == [] and result.selected_rank is None
    assert "no package given" in result.decision.reasons[0]


def test_linear_fit_is_callable():
    assert LinearFit(1.0, 2.0)(3) == 7.0


def test_cli_profile_json_for_a_device_that_fits_no_rank(tiny_package, capsys):
    args = ["profile", "--package", str(tiny_package), "--profile", "android-low-4gb", "--backend", "torch",
            "--memory-fraction", "0.01", "--time-budget", "600", "--json"]
    assert main(args) == 0
    raw = capsys.readouterr().out
    assert '"selected_rank": null' in raw
    out = json.loads(raw)
    assert list(out) == ["device", "candidates", "selected_rank", "reasons"]
    assert list(out["device"]) == DEVICE_KEYS and list(out["candidates"][0]) == CANDIDATE_KEYS
    assert out["device"]["source"] == "profile" and out["device"]["cpu_count"] == 8
    assert out["device"]["memory_available_bytes"] == int(1.25 * GIB)
    assert [c["rank"] for c in out["candidates"]] == [2, 4, 8] and not any(c["fits"] for c in out["candidates"])
    assert all(c["why"].startswith("too big: peak") for c in out["candidates"])
    assert any("memory budget: 0.01 × 1.25 GiB" in r for r in out["reasons"])
    assert any("does not list torch among its runtimes (executorch, onnxruntime)" in r for r in out["reasons"])
    assert out["reasons"][-1].startswith("no packaged rank fits: the smallest, rank 2, is too big")


def test_cli_profile_measured_without_a_package(capsys):
    assert main(["profile", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"]["source"] == "measured" and out["candidates"] == [] and out["selected_rank"] is None
    assert out["device"]["cpu_count"] >= 1 and out["device"]["gflops"] > 0


def test_cli_profile_table(capsys):
    assert main(["profile", "--profile", "iphone-15-pro"]) == 0
    text = capsys.readouterr().out
    assert "Apple iPhone 15 Pro (profile)" in text and "selected rank: none" in text


@pytest.mark.parametrize("args, match", [
    (["--profile", "BAD"], r"bad.toml: field 'memory_total_gib': missing"),
    (["--profile", "no-such-device"], "device profile not found: no-such-device"),
    (["--memory-fraction", "1.5"], r"memory_fraction must be in \(0, 1\], got 1.5"),
    (["--package", "/nonexistent"], "is not an edge package"),
])
def test_cli_profile_errors_are_one_line(tmp_path, capsys, args, match):
    if args[1] == "BAD":
        bad = tmp_path / "bad.toml"
        bad.write_text('name = "x"\nkind = "sbc"\n')
        args = ["--profile", str(bad)]
    assert main(["profile", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and __import__("re").search(match, err), err
