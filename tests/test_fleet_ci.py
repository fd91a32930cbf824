"""Fleets as a CI check: fleet files, expectations, the exit code, junit.xml / summary.json, the docs' CI files.

Two real fleets run (``random:tiny``, 4 devices, 1 round), each the fleet command of one of docs/ci/'s workflow
files with a small override, in a child process as CI runs it, sharing one package cache: the second finds the
package and skips the export. The other tests judge expectations on the first run's report, through the
command with the simulation replaced by a copy of that report, or through :func:`check_report`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from lorafleet.cli import main
from lorafleet.fleet import FleetConfig, fleetfile
from lorafleet.fleet.expect import (
    JUNIT_XML,
    SUMMARY_JSON,
    check,
    check_report,
    known_metrics,
    parse_expectation,
    report_metrics,
)
from lorafleet.fleet.records import read_report

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "docs" / "ci"
FLEET_TOML = CI / "fleet.toml"
# on top of docs/ci/fleet.toml: 4 devices of two mostly-online profiles (so that some train), 1 round, 2 steps
CHEAP = ["--devices", "4", "--mix", "jetson-orin-nano-8gb=1,raspberry-pi-5-8gb=1", "--fraction", "1", "--rounds", "1",
         "--local-steps", "2"]


def _yaml(path: Path) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def _fleet_argv(lines: list[str]) -> list[str]:
    """The one ``lorafleet fleet`` command among a job's shell lines, split as the shell would."""
    commands = [shlex.split(cmd) for line in lines for cmd in line.splitlines() if "lorafleet fleet" in cmd]
    assert len(commands) == 1, lines
    argv = commands[0]
    assert argv[:2] == ["lorafleet", "fleet"] and "--config" in argv and "--out" in argv
    return argv[1:]


def github_workflow() -> tuple[dict, list[str]]:
    doc = _yaml(CI / "github-actions.yml")
    assert doc.get("on", doc.get(True)) is not None  # YAML 1.1 reads the key `on` as true
    (job,) = doc["jobs"].values()
    return job, _fleet_argv([s["run"] for s in job["steps"] if "run" in s])


def gitlab_job() -> tuple[dict, list[str]]:
    doc = _yaml(CI / "gitlab-ci.yml")
    job = doc["fleet"]
    return job, _fleet_argv(job["script"])


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _run_cli(argv: list[str], out: Path, cache: Path) -> subprocess.CompletedProcess:
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(out)
    env = {**os.environ, "LORAFLEET_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lorafleet", *argv, *CHEAP], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The GitHub workflow's fleet command, then GitLab's, for real (cheap overrides), one package cache."""
    root = tmp_path_factory.mktemp("fleet-ci")
    done = {}
    for name, (_, argv) in (("github", github_workflow()), ("gitlab", gitlab_job())):
        done[name] = (_run_cli(argv, root / name, root / "cache"), root / name)
    return done


@pytest.fixture
def report(runs) -> Path:
    proc, out = runs["github"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


# --- the docs' workflow files run their fleet command ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("ci", ["github", "gitlab"])
def test_the_docs_ci_files_run_their_fleet_command_and_pass(runs, ci):
    job, argv = github_workflow() if ci == "github" else gitlab_job()
    proc, out = runs[ci]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = fleetfile.read_fleet_file(ROOT / _option(argv, "--config")).expect
    assert len(expected) >= 3
    passed = [line for line in proc.stdout.splitlines() if line.startswith("expectation passed: ")]
    assert len(passed) == len(expected) and "expectation failed" not in proc.stdout + proc.stderr
    # the overrides took effect, the rest comes from the fleet file
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["devices"], config["rounds"], config["local_steps"], config["fraction"]) == (4, 1, 2, 1.0)
    assert (config["model"], config["method"], config["round_deadline_s"]) == ("random:tiny", "flexlora", 60.0)
    assert json.loads((out / "metrics.json").read_text())["rounds"][1]["participants"]  # some devices trained
    suite = ET.parse(out / JUNIT_XML).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == str(len(expected)) and suite.get("failures") == "0"
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["passed"] is True and summary["failed"] == 0
    # the first run exported the package; the second found it in the shared cache and skipped the export
    assert summary["run"]["package_cached"] is (ci == "gitlab")
    assert ("exporting random:tiny" in proc.stdout) is (ci == "github")
    # the job publishes the JUnit report the command wrote, and caches the directory the package went to
    published = _option(argv, "--out") + "/" + JUNIT_XML
    if ci == "github":
        steps = job["steps"]
        assert any(s.get("with", {}).get("report_paths") == published for s in steps)
        cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache"))
        assert cache["with"]["path"] == "${{ env.LORAFLEET_CACHE }}" and "LORAFLEET_CACHE" in job["env"]
        assert "docs/ci/fleet.toml" in cache["with"]["key"]
    else:
        assert job["artifacts"]["reports"]["junit"] == published
        assert job["variables"]["LORAFLEET_CACHE"] == "$CI_PROJECT_DIR/.cache/lorafleet"
        assert ".cache/lorafleet" in job["cache"]["paths"] and "docs/ci/fleet.toml" in job["cache"]["key"]["files"]
    assert any(line.startswith("pip install") or "pip install" in line for line in _shell_lines(job))


def _shell_lines(job: dict) -> list[str]:
    if "script" in job:
        return list(job["script"])
    return [s["run"] for s in job["steps"] if "run" in s]


# --- expectations through the command, on the first run's report ------------------------------------------

@pytest.fixture
def replay(report, monkeypatch):
    """Make ``lorafleet fleet`` 'run' by copying the real run's report (its package stays where it was)."""
    import lorafleet.fleet
    from lorafleet.fleet import FleetResult

    def run_fleet(cfg, progress=None, **_):
        shutil.copytree(report, cfg.out, dirs_exist_ok=True)
        for name in (JUNIT_XML, SUMMARY_JSON):
            (cfg.out / name).unlink()
        rep = read_report(cfg.out)
        return FleetResult(cfg.out, rep, None, Path(rep.config["package"]), 8)  # type: ignore[arg-type]

    monkeypatch.setattr(lorafleet.fleet, "run_fleet", run_fleet)
    return report


def _stderr_lines(capsys) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    return captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_a_failing_expectation_exits_1_and_says_which_and_by_how_much(replay, tmp_path, capsys):
    metrics = report_metrics(read_report(replay))
    out = tmp_path / "out"
    code = main(["fleet", "--config", str(FLEET_TOML), "--out", str(out), "--expect", "heldout/rouge_l >= 0.2",
                 "--expect", "dropped_share <= 0.3"])
    assert code == 1
    stdout, err = _stderr_lines(capsys)
    short = 0.2 - metrics["heldout/rouge_l"]
    assert err == [f"expectation failed: heldout/rouge_l >= 0.2: got {metrics['heldout/rouge_l']:.4g} "
                   f"(short by {short:.4g})"]
    assert f"expectation passed: dropped_share <= 0.3: got {metrics['dropped_share']:.4g}" in stdout
    junit = ET.parse(out / JUNIT_XML).getroot()
    suite = junit.find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures")) == ("5", "1")  # 3 in the file + 2
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"delta/seen/loss < 0", "dropped_share <= 0.3", "round_time_p95_s <= 60",
                          "heldout/rouge_l >= 0.2"}  # dropped_share <= 0.3 is in both
    failure = cases["heldout/rouge_l >= 0.2"].find("failure")
    assert failure is not None and "short by" in (failure.get("message") or "")
    assert all(c.find("failure") is None for n, c in cases.items() if n != "heldout/rouge_l >= 0.2")
    properties = suite.find("properties")
    assert properties is not None
    props = {p.get("name"): float(p.get("value") or "nan") for p in properties}
    assert set(known_metrics()) <= set(props)
    assert props["seen/loss"] == pytest.approx(metrics["seen/loss"])
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert (summary["passed"], summary["failed"], len(summary["expectations"])) == (False, 1, 5)
    assert summary["run"]["config_file"] == str(FLEET_TOML) and summary["run"]["package_cached"] is True
    assert (out / "metrics.json").is_file()  # the report is written all the same


def test_expectations_against_a_baseline_report(replay, tmp_path, capsys):
    metrics = report_metrics(read_report(replay))
    out = tmp_path / "out"
    code = main(["fleet", "--config", str(FLEET_TOML), "--out", str(out), "--baseline", str(replay),
                 "--expect", "heldout/rouge_l >= baseline - 0.02", "--expect", "seen/loss <= baseline - 1"])
    assert code == 1
    _, err = _stderr_lines(capsys)
    loss = metrics["seen/loss"]
    assert err == [f"expectation failed: seen/loss <= baseline - 1: got {loss:.4g}, baseline {loss:.4g}, "
                   f"threshold {loss - 1:.4g} (over by 1)"]
    summary = json.loads((out / SUMMARY_JSON).read_text())
    rel = {e["expect"]: e for e in summary["expectations"]}["heldout/rouge_l >= baseline - 0.02"]
    assert rel["passed"] and rel["baseline"] == pytest.approx(metrics["heldout/rouge_l"])
    assert rel["threshold"] == pytest.approx(metrics["heldout/rouge_l"] - 0.02)
    assert summary["run"]["baseline"] == str(replay)


def test_check_report_judges_a_written_report_without_running(report):
    data = json.loads((report / "metrics.json").read_text())
    trained = data["rounds"][1:]
    outcomes = check_report(report, ["participants_mean >= 1", "round_time_p95_s <= 0", "seen/loss == 999",
                                     "delta/seen/loss < 0"])
    assert [o.passed for o in outcomes] == [True, False, False, True]
    metrics = report_metrics(read_report(report))
    sampled = sum(len(r["sampled"]) for r in trained)
    assert metrics["dropped_share"] == sum(len(r["dropped"]) for r in trained) / sampled
    assert metrics["round_time_p95_s"] == pytest.approx(trained[-1]["round_time_s"])  # one round
    assert metrics["delta/seen/loss"] == pytest.approx(data["rounds"][-1]["metrics"]["seen/loss"]
                                                       - data["rounds"][0]["metrics"]["seen/loss"])
    assert outcomes[2].message.startswith("seen/loss == 999: got ") and "off by" in outcomes[2].message
    base = check_report(report, ["seen/loss <= baseline", "seen/loss > baseline"], baseline_dir=report)
    assert [o.passed for o in base] == [True, False] and "must be above" in base[1].message


# --- the resolved configuration, overrides ------------------------------------------------------------

def test_print_config_shows_the_file_with_command_line_overrides(tmp_path, capsys):
    argv = ["fleet", "--config", str(FLEET_TOML), "--rounds", "7", "--ranks", "2,4", "--emulation", "measured",
            "--expect", "seen/loss <= 9", "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    resolved = tomllib.loads(printed)["fleet"]
    assert (resolved["rounds"], resolved["ranks"], resolved["emulation"]) == (7, [2, 4], "measured")
    assert (resolved["devices"], resolved["fraction"], resolved["local_steps"]) == (100, 0.5, 5)  # from the file
    assert resolved["expect"][-1] == "seen/loss <= 9" and len(resolved["expect"]) == 4
    assert "out" not in resolved and "# out: not set" in printed
    # the printed configuration is itself a fleet file that resolves to the same FleetConfig
    (tmp_path / "resolved.toml").write_text(printed)
    again = fleetfile.read_fleet_file(tmp_path / "resolved.toml")
    first = fleetfile.build_config(fleetfile.merge(fleetfile.read_fleet_file(FLEET_TOML),
                                                   {"rounds": 7, "ranks": (2, 4), "emulation": "measured"}),
                                   placeholder_out=True)
    assert fleetfile.build_config(again.settings, placeholder_out=True) == first
    assert not list(tmp_path.glob("*/"))  # nothing ran


def test_printed_paths_survive_a_move(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "fleet.toml").write_text(GOOD + 'out = "rep"\n')
    assert main(["fleet", "--config", str(tmp_path / "a" / "fleet.toml"), "--print-config"]) == 0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "resolved.toml").write_text(capsys.readouterr().out)
    assert fleetfile.read_fleet_file(tmp_path / "b" / "resolved.toml").settings["out"] == tmp_path / "a" / "rep"


def test_every_fleetconfig_field_is_a_key_in_either_spelling(tmp_path):
    fields = fleetfile.config_fields()
    for name in fields:
        assert fleetfile.field_name(name) == name == fleetfile.field_name(name.replace("_", "-"))
    assert fleetfile.field_name("profiles") == "profiles_dir" and fleetfile.field_name("nope") is None
    (tmp_path / "profiles").mkdir()
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "app"\n\n[tool.lorafleet.fleet]\ndevices = 3\nrounds = 2\nmodel = "random:tiny"\n'
        'method = "hetlora"\nseed = 1\nout = "rep"\nprofiles = "profiles"\nmix = "a=1,b=3"\nlocal-steps = 4\n'
        'examples_per_device = 8\ntarget-modules = ["q_proj"]\nround-deadline = 5\nextra = { tag = "ci" }\n')
    file = fleetfile.read_fleet_file(tmp_path / "pyproject.toml")
    cfg = FleetConfig(**file.settings)
    assert (cfg.devices, cfg.local_steps, cfg.examples_per_device, cfg.target_modules) == (3, 4, 8, ("q_proj",))
    assert cfg.out == tmp_path / "rep" and cfg.profiles_dir == tmp_path / "profiles"  # relative to the file
    assert cfg.mix == {"a": 1.0, "b": 3.0} and cfg.round_deadline == 5.0 and cfg.extra == {"tag": "ci"}


def test_docs_ci_md_shows_the_files_as_they_are():
    doc = (ROOT / "docs" / "ci.md").read_text()
    blocks = re.findall(r"```(?:yaml|toml)\n(.*?)```", doc, re.S)
    for name in ("fleet.toml", "github-actions.yml", "gitlab-ci.yml"):
        assert (CI / name).read_text() in blocks, f"docs/ci.md's copy of docs/ci/{name} is out of date"
    for name in known_metrics():
        assert name in doc or name.startswith("delta/"), name


def test_the_metric_names_follow_the_evaluation():
    from lorafleet.fleet.evaluate import METRICS
    from lorafleet.fleet.expect import EVAL_METRICS

    assert EVAL_METRICS == METRICS


def test_expression_forms_and_messages():
    e = parse_expectation("heldout/rouge_l >= baseline - 0.02")
    assert (e.metric, e.op, e.value, e.relative) == ("heldout/rouge_l", ">=", -0.02, True)
    assert str(e) == "heldout/rouge_l >= baseline - 0.02" and str(parse_expectation("x<baseline")) == "x < baseline"
    assert parse_expectation(" dropped_share<=0.3 ").value == 0.3
    [short, over, missing] = check([parse_expectation("a >= 0.2"), parse_expectation("a < 0.1"),
                                    parse_expectation("b > 0")], {"a": 0.13, "b": math.nan})
    assert short.message == "a >= 0.2: got 0.13 (short by 0.07)"
    assert over.message == "a < 0.1: got 0.13 (over by 0.03)"
    assert not missing.passed and "not in the report" in missing.message


# --- one-line errors before anything runs ----------------------------------------------------------------

GOOD = '[fleet]\ndevices = 4\nrounds = 1\nmodel = "random:tiny"\nmethod = "flexlora"\nseed = 0\n'


@pytest.mark.parametrize(("toml", "extra", "message"), [
    ("[fleet\ndevices = 4\n", [], r"fleet.toml: not valid TOML: .*line 1"),
    (GOOD + "roundz = 3\n", [], r"fleet.toml: unknown key 'roundz' in \[fleet\] \(known: .*rounds"),
    (GOOD.replace("devices = 4", 'devices = "four"'), [], r"\[fleet\] devices: expected an integer, got 'four'"),
    (GOOD + "ranks = [4, 8.5]\n", [], r"\[fleet\] ranks\[1\]: expected an integer, got 8.5"),
    ("devices = 4\n", [], r"no \[fleet\] table"),
    ('expect = ["x > 1"]\n' + GOOD, [], r"unknown top-level key 'expect' \(every setting goes in \[fleet\]\)"),
    (GOOD + "local-steps = 1\nlocal_steps = 2\n", [], r"sets 'local_steps' twice"),
    (GOOD + 'expect = ["heldout/rouge_L >= 0.2"]\n', [],
     r"fleet.toml: expect: unknown metric 'heldout/rouge_L' .*\(known: heldout/rouge_l, "),
    (GOOD, ["--expect", "dropped_shares <= 0.3"], r"--expect: unknown metric 'dropped_shares'.*dropped_share"),
    (GOOD, ["--expect", "dropped_share =< 0.3"], r"--expect: cannot read 'dropped_share =< 0.3': expected METRIC OP"),
    (GOOD, ["--expect", "seen/loss <= baseline"], r"compares against the baseline, but no --baseline DIR"),
    (GOOD, ["--baseline", "nowhere"], r"cannot read fleet report nowhere"),
    (GOOD.replace('method = "flexlora"\n', ""), [], r"missing --method \(give it on the command line"),
    (GOOD, ["--method", "fedsgd"], r"--method must be one of fedavg, hetlora, flexlora, raflora, got 'fedsgd'"),
    (GOOD, ["--rank-distribution", "zipf"], r"--rank-distribution must be one of profiler, uniform"),
], ids=["toml-syntax", "unknown-key", "wrong-type", "wrong-item-type", "no-table", "stray-top-level-key",
        "key-twice", "unknown-metric-in-file", "unknown-metric-on-cli", "bad-expression", "baseline-missing",
        "baseline-unreadable", "missing-setting", "unknown-method", "unknown-rank-distribution"])
def test_bad_fleet_files_and_expectations_are_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, toml,
                                                                              extra, message):
    import lorafleet.fleet

    monkeypatch.setattr(lorafleet.fleet, "run_fleet", lambda *a, **k: pytest.fail("the fleet ran"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fleet.toml").write_text(toml)
    assert main(["fleet", "--config", "fleet.toml", "--out", "out", *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lorafleet: error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_fleet_that_fails_midway_still_leaves_junit_and_summary(tmp_path, capsys, monkeypatch):
    import lorafleet.fleet
    from lorafleet.export.formats.errors import ConfigError

    def run_fleet(cfg, progress=None, **_):
        cfg.out.mkdir()
        raise ConfigError("the simulation stopped after 0 of 1 rounds")

    monkeypatch.setattr(lorafleet.fleet, "run_fleet", run_fleet)
    (tmp_path / "fleet.toml").write_text(GOOD + 'expect = ["seen/loss < 9"]\n')
    out = tmp_path / "out"
    assert main(["fleet", "--config", str(tmp_path / "fleet.toml"), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == "lorafleet: error: the simulation stopped after 0 of 1 rounds"
    suite = ET.parse(out / JUNIT_XML).getroot().find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("1", "1", "0")
    error = suite.find("testcase/error")
    assert error is not None and error.get("message") == "the simulation stopped after 0 of 1 rounds"
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["passed"] is False and summary["error"].startswith("the simulation stopped")


def test_a_missing_fleet_file(tmp_path, capsys):
    assert main(["fleet", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"lorafleet: error: fleet file not found: {tmp_path / 'nope.toml'}"
