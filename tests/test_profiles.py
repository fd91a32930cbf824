"""Device profiles: every bundled file validates, and every validation error names file and field."""

import tomllib

import pytest

from lorafleet.edge_client.profiles import (
    NUMERIC_FIELDS,
    PROFILES_DIR,
    list_profiles,
    load_all,
    load_profile,
    parse_profile,
)
from lorafleet.export.formats.errors import ConfigError

BUNDLED = list_profiles()


def test_at_least_ten_profiles_are_bundled():
    assert len(BUNDLED) >= 10
    names = {p.stem for p in BUNDLED}
    for wanted in ["jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-nano-4gb",
                   "pixel-8", "galaxy-s24", "iphone-15-pro", "android-mid-6gb", "android-low-4gb",
                   "raspberry-pi-5-8gb"]:
        assert wanted in names


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_every_bundled_profile_validates(path):
    prof = load_profile(path)
    assert prof.id == path.stem
    assert 0 < prof.app_memory_bytes <= prof.memory_total_bytes
    assert set(prof.sources) == set(NUMERIC_FIELDS)
    assert all(s[:3] in ("[S]", "[D]", "[U]") for s in prof.sources.values())


def test_load_by_bundled_name_and_load_all():
    assert load_profile("pixel-8").name == "Google Pixel 8"
    assert len(load_all()) == len(BUNDLED)


def _good():
    return tomllib.loads((PROFILES_DIR / "raspberry-pi-5-8gb.toml").read_text())


def _mutate(**changes):
    data = _good()
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("changes, match", [
    ({"cpu_cores": None}, r"x\.toml: field 'cpu_cores': missing"),
    ({"sources": None}, r"field 'sources': missing"),
    ({"colour": "red"}, r"field 'colour': unknown field"),
    ({"name": ""}, r"field 'name': must be a non-empty string"),
    ({"notes": 3}, r"field 'notes': must be a non-empty string"),
    ({"kind": "toaster"}, r"field 'kind': must be one of .*'toaster'"),
    ({"kind": 3}, r"field 'kind': must be a non-empty string, got 3"),
    ({"cpu_cores": 2.5}, r"field 'cpu_cores': must be an integer, got 2.5"),
    ({"sustained_gflops": "fast"}, r"field 'sustained_gflops': must be a number, got 'fast'"),
    ({"availability": True}, r"field 'availability': must be a number, got True"),
    ({"memory_bandwidth_gbs": 0}, r"field 'memory_bandwidth_gbs': must be positive, got 0"),
    ({"network_up_mbps": float("nan")}, r"field 'network_up_mbps': must be positive, got nan"),
    ({"app_memory_gib": 9}, r"field 'app_memory_gib': must be at most memory_total_gib \(8.0\), got 9"),
    ({"availability": 1.5}, r"field 'availability': must be a fraction in \(0, 1\], got 1.5"),
    ({"runtimes": []}, r"field 'runtimes': must be a non-empty list"),
    ({"runtimes": ["tflite"]}, r"field 'runtimes': unknown runtime 'tflite'"),
    ({"runtimes": ["torch", "torch"]}, r"field 'runtimes': lists a runtime twice"),
    ({"sources": "datasheet"}, r"field 'sources': must be a table"),
])
def test_validation_errors_name_file_and_field(changes, match):
    with pytest.raises(ConfigError, match=match):
        parse_profile(_mutate(**changes), origin="x.toml")


def test_source_errors():
    data = _good()
    del data["sources"]["availability"]
    with pytest.raises(ConfigError, match=r"field 'sources.availability': missing: every figure needs a source"):
        parse_profile(data, origin="x.toml")
    data = _good()
    data["sources"]["gpu_tops"] = "[S] datasheet"
    with pytest.raises(ConfigError, match=r"field 'sources.gpu_tops': names no figure"):
        parse_profile(data, origin="x.toml")
    data = _good()
    data["sources"]["cpu_cores"] = "datasheet"
    with pytest.raises(ConfigError, match=r"field 'sources.cpu_cores': must start with \[S\], \[D\] or \[U\]"):
        parse_profile(data, origin="x.toml")


def test_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML") as info:
        load_profile(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"device profile not found: nowhere.toml \(bundled profiles: .*pixel-8"):
        load_profile("nowhere.toml")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('name = "Café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml: not valid TOML"):
        load_profile(latin1)
    missing = tmp_path / "m.toml"
    missing.write_text("name = 'x'\n")
    with pytest.raises(ConfigError, match=r"m.toml: field 'kind': missing"):
        load_profile(missing)
