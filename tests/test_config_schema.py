"""The shared pydantic schema helpers (export/formats/schema.py) and what the schemas built on them add:
one-line messages in each file's own wording, profile bounds, and run/node configs missing a required key."""

import re
import tomllib
from typing import Annotated

import pytest
from pydantic import AfterValidator, Field

from lorafleet.edge_client.flower_client import NodeSettings
from lorafleet.edge_client.profiles import (
    MAXIMA,
    NUMERIC_FIELDS,
    OPTIONAL,
    PROFILES_DIR,
    REQUIRED,
    ProfileFile,
    Sources,
    parse_profile,
)
from lorafleet.export.formats.errors import ConfigError, LorafleetError
from lorafleet.export.formats.schema import Problem, Strict, invalid, validate
from lorafleet.server.server_app import ServerConfig


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise invalid(f"must be odd {{not templated}}, got {value}\nsecond line")
    return value


Odd = Annotated[int, AfterValidator(_odd)]


class _Inner(Strict):
    x: int


class _Model(Strict):
    a: int = Field(ge=0)
    b: int = 1
    odd: Odd = 1
    inner: _Inner | None = None


def test_default_line_is_as_before():
    with pytest.raises(LorafleetError, match=r"^f.json: field 'a': Input should be greater than or equal to 0, "
                                             r"got -1$"):
        validate(_Model, {"a": -1}, "f.json")
    with pytest.raises(ConfigError, match=r"^f.json: missing field 'a'$"):
        validate(_Model, {}, "f.json", ConfigError)


def test_own_messages_are_shown_as_is_on_one_line():
    with pytest.raises(LorafleetError) as info:
        validate(_Model, {"a": 0, "odd": 2}, "f.json")
    assert str(info.value) == "f.json: field 'odd': must be odd {not templated}, got 2 second line"


def test_the_first_problem_is_the_outermost_then_missing_then_unknown_then_wrong():
    seen: list[Problem] = []

    def render(p: Problem) -> str:
        seen.append(p)
        return p.field

    for data, field, kind in (({"b": "x", "zz": 1}, "a", "missing"),
                              ({"a": 1, "b": "x", "zz": 1}, "zz", "extra_forbidden"),
                              ({"a": 1, "inner": {}, "b": "x"}, "b", "int_type"),
                              ({"a": 1, "inner": {"x": "y", "q": 1}}, "inner.q", "extra_forbidden")):
        with pytest.raises(LorafleetError, match=f"^{field}$"):
            validate(_Model, data, render=render)
        assert seen[-1].type == kind
    assert seen[0].unknown() == ["zz"] and seen[0].more == 2


def _profile():
    return tomllib.loads((PROFILES_DIR / "raspberry-pi-5-8gb.toml").read_text())


def test_the_profile_model_is_the_documented_schema():
    assert tuple(ProfileFile.model_fields) == ("name", "kind", "notes", *NUMERIC_FIELDS, "runtimes", "sources")
    assert set(ProfileFile.model_fields) == set(REQUIRED + OPTIONAL)
    assert tuple(Sources.model_fields) == tuple(NUMERIC_FIELDS)


@pytest.mark.parametrize("name", list(NUMERIC_FIELDS))
def test_every_figure_is_bounded(name):
    data = _profile()
    data["memory_total_gib"] = data["app_memory_gib"] = MAXIMA["memory_total_gib"]
    data[name] = NUMERIC_FIELDS[name](MAXIMA[name])
    assert getattr(parse_profile(data, origin="x.toml"), name) == MAXIMA[name]  # the maximum itself is allowed
    data[name] = MAXIMA[name] * 2
    if name == "availability":
        match = r"field 'availability': must be a fraction in \(0, 1\], got 2.0"
    else:
        match = re.escape(f"field '{name}': must be at most {MAXIMA[name]:g}, "
                          f"got {NUMERIC_FIELDS[name](MAXIMA[name] * 2)!r}")
    with pytest.raises(ConfigError, match=match):
        parse_profile(data, origin="x.toml")
    infinite = "must be an integer, got inf" if NUMERIC_FIELDS[name] is int else "must be positive, got inf"
    for bad, problem in ((True, "must be a number, got True"), (float("inf"), infinite),
                         (-1, "must be positive, got -1")):
        data[name] = bad
        with pytest.raises(ConfigError, match=rf"^x.toml: field '{name}': {problem}$"):
            parse_profile(data, origin="x.toml")


def test_profile_figures_keep_their_types():
    data = _profile()
    data["memory_total_gib"] = 8  # an integer in the file is still a float figure
    prof = parse_profile(data, origin="x.toml")
    assert type(prof.memory_total_gib) is float and type(prof.cpu_cores) is int
    assert list(prof.sources) == list(data["sources"])  # the file's order


def test_run_config_missing_keys_and_types():
    with pytest.raises(ConfigError, match=r"^run config rounds is missing \(required\)$"):
        ServerConfig.from_run_config({"package": "/p", "method": "hetlora"})
    with pytest.raises(ConfigError, match=r"^unknown run-config keys \['a', 'b'\] \(known: "):
        ServerConfig.from_run_config({"package": "/p", "method": "hetlora", "rounds": "3", "b": 1, "a": 2})
    for key, value, wanted in (("resume", 1, "true or false"), ("seed", True, "an integer"),
                               ("lr", True, "a number"), ("lr", "0.1", "a number"), ("package", 3, "a string")):
        with pytest.raises(ConfigError, match=f"^run config {key} must be {wanted}, got {value!r}$"):
            ServerConfig.from_run_config({"package": "/p", "method": "hetlora", "rounds": 3, key: value})
    cfg = ServerConfig.from_run_config({"package": "/p", "method": "hetlora", "rounds": 3, "lr": 1, "fraction": 1})
    assert type(cfg.lr) is float and type(cfg.fraction) is float and cfg.round_timeout == 600.0
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\], got 2.0"):  # __post_init__'s bounds
        ServerConfig.from_run_config({"package": "/p", "method": "hetlora", "rounds": 3, "fraction": 2})


def test_node_config_missing_keys_and_types():
    with pytest.raises(ConfigError, match=r"^node-config package is missing \(a node needs package and data\)$"):
        NodeSettings.from_node_config({"data": "/d", "profile": "/x.toml"})
    with pytest.raises(ConfigError, match=r"^node-config rank must be int, got True$"):
        NodeSettings.from_node_config({"package": "/p", "data": "/d", "rank": True})
    with pytest.raises(ConfigError, match=r"^node-config measure must be bool, got 1$"):
        NodeSettings.from_node_config({"package": "/p", "data": "/d", "measure": 1})
    with pytest.raises(ConfigError, match=r"^node-config cache_dir must be a string, got 3$"):
        NodeSettings.from_node_config({"package": "/p", "data": "/d", "rank": 2, "cache-dir": 3})
    s = NodeSettings.from_node_config({"package": "/p", "data": "/d", "rank": 2})
    assert s == NodeSettings(package="/p", data="/d", rank=2)
