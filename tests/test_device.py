"""Device measurement: cgroup v1/v2 limits respected, probes return sane figures, emulation from a profile."""

import math

import pytest

from lorafleet.edge_client.device import (
    DeviceReport,
    cgroup_memory,
    cpu_count,
    emulate,
    matmul_gflops,
    measure_device,
    memory_bandwidth_gbs,
    memory_bytes,
)
from lorafleet.edge_client.profiles import load_profile

GIB = 1 << 30
JSON_KEYS = ["name", "source", "memory_total_bytes", "memory_available_bytes", "cpu_count", "gflops",
             "memory_bandwidth_gbs"]


def _v2(tmp_path, leaf_max="max", parent_max=str(2 * GIB), current=str(GIB // 2)):
    root = tmp_path / "cg2"
    leaf = root / "parent" / "leaf"
    leaf.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "parent" / "memory.max").write_text(parent_max + "\n")
    (leaf / "memory.max").write_text(leaf_max + "\n")
    (leaf / "memory.current").write_text(current + "\n")
    proc = tmp_path / "cgroup2"
    proc.write_text("0::/parent/leaf\n")
    return root, proc


def _v1(tmp_path, limit=str(3 * GIB), hierarchical=None, usage=str(GIB)):
    root = tmp_path / "cg1"
    d = root / "memory" / "pod"
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(limit + "\n")
    (d / "memory.usage_in_bytes").write_text(usage + "\n")
    stat = "cache 0\n" + (f"hierarchical_memory_limit {hierarchical}\n" if hierarchical else "")
    (d / "memory.stat").write_text(stat)
    proc = tmp_path / "cgroup1"
    proc.write_text("5:cpu,cpuacct:/\n4:memory:/pod\n0::/\n")
    return root, proc


def test_cgroup_v2_takes_the_tightest_ancestor_limit(tmp_path):
    root, proc = _v2(tmp_path)
    assert cgroup_memory(root, proc) == (2 * GIB, GIB // 2)
    root, proc = _v2(tmp_path / "b", leaf_max=str(GIB), parent_max="max")
    assert cgroup_memory(root, proc) == (GIB, GIB // 2)


def test_cgroup_v2_unlimited(tmp_path):
    root, proc = _v2(tmp_path, parent_max="max")
    assert cgroup_memory(root, proc) == (None, GIB // 2)


def test_cgroup_v1_limit_and_hierarchical_limit(tmp_path):
    root, proc = _v1(tmp_path)
    assert cgroup_memory(root, proc) == (3 * GIB, GIB)
    root, proc = _v1(tmp_path / "b", limit=str(2**63 - 4096), hierarchical=str(GIB))
    assert cgroup_memory(root, proc) == (GIB, GIB)
    root, proc = _v1(tmp_path / "c", limit=str(2**63 - 4096))
    assert cgroup_memory(root, proc) == (None, GIB)


def test_no_cgroup_files(tmp_path):
    assert cgroup_memory(tmp_path, tmp_path / "missing") == (None, None)


def test_memory_respects_a_cgroup_limit_below_physical_memory(tmp_path):
    import psutil

    physical = psutil.virtual_memory().total
    root, proc = _v1(tmp_path, limit=str(GIB), usage=str(GIB // 4))
    assert memory_bytes(root, proc) == (GIB, GIB - GIB // 4)
    root, proc = _v2(tmp_path / "big", parent_max=str(physical * 4))
    total, available = memory_bytes(root, proc)
    assert total == physical and 0 < available <= total


def test_cpu_count_respects_quota(tmp_path):
    assert cpu_count(tmp_path) >= 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_count(tmp_path) == min(2, cpu_count(tmp_path / "none"))
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_count(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_count(v1) == cpu_count(tmp_path / "none")


def test_probes_return_positive_finite_figures():
    g = matmul_gflops([(16, 64, 32)], min_seconds=0.01, repeats=3)
    bw = memory_bandwidth_gbs(1 << 20, repeats=3)
    assert math.isfinite(g) and g > 0 and math.isfinite(bw) and bw > 0


def test_measure_device_reports_this_machine():
    r = measure_device([(16, 64, 32)], min_seconds=0.01)
    assert r.source == "measured" and r.time_scale == 1.0
    assert 0 < r.memory_available_bytes <= r.memory_total_bytes
    assert list(r.to_json()) == JSON_KEYS


def test_emulation_takes_memory_and_speed_from_the_profile():
    prof = load_profile("jetson-orin-nano-8gb")
    r = emulate(prof, host_gflops=33.0)
    assert r.source == "profile" and r.name == prof.name
    assert r.memory_total_bytes == 8 * GIB and r.memory_available_bytes == int(5.2 * GIB)
    assert r.cpu_count == 6 and r.gflops == 66 and r.memory_bandwidth_gbs == 68
    assert r.network_up_mbps == 100 and r.runtimes == prof.runtimes
    assert r.time_scale == pytest.approx(0.5)  # the device is twice as fast as the host


@pytest.mark.parametrize("field, value, match", [
    ("memory_total_bytes", 0, "memory_total_bytes must be positive, got 0"),
    ("cpu_count", -1, "cpu_count must be positive, got -1"),
    ("gflops", float("inf"), "gflops must be a positive number, got inf"),
    ("memory_bandwidth_gbs", 0.0, "memory_bandwidth_gbs must be a positive number, got 0.0"),
])
def test_report_validation(field, value, match):
    kwargs = dict(name="d", source="measured", memory_total_bytes=GIB, memory_available_bytes=GIB, cpu_count=1,
                  gflops=1.0, memory_bandwidth_gbs=1.0)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        DeviceReport(**kwargs)
