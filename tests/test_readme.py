"""The README's commands: every `lorafleet` line of its ```bash blocks parses with that command's own parser;
the cheap ones run for real, as written, in an empty directory (SUBSTITUTED marks those that get a small
stand-in for an input the README assumes); the first hour's block runs as written (a real TLS federation of
two devices on `random:tiny`), followed by the offline-aggregation section; the fleet sections run at a small
scale. tests/test_readme_sections.py runs the export, profile, train, inspect and federation sections. Only
`make demo` is not run (its ranks 4, 16, 64 need a model wider than random:tiny, and the real one takes ~10 min)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main
from export_helpers import fake_package
from readme_helpers import README, REPO, readme_env, run_bash, section_blocks, substituted, user_folder

from lorafleet.cli import app

LORAFLEET = re.compile(r"^(?:\.venv/bin/)?lorafleet(?=\s|$)")
# Run for real in an empty directory, in this order. SUBSTITUTED: the README assumes `pkg` exists (made by
# `export`, minutes): a placeholder-programs package stands in, enough for inspect and verify.
RUN = ["--version", "models", "data --out heldout.jsonl --split heldout",
       "certs --out tls --name server.example.org --name 127.0.0.1",
       "node-key --out keys/jetson-1", "cache list",
       "export random:llama-3.2-3b --ranks 8 --target-modules q_proj,v_proj --quantize int4 --seq-len 128 "
       "--runtimes onnx --out pkg-3b/ --dry-run"]
SUBSTITUTED = {"package inspect pkg": "pkg", "package verify pkg": "pkg"}


def readme_commands() -> list[list[str]]:
    """The words of every `lorafleet` command line in the README's bash blocks (continuations joined, comments
    and trailing `&` dropped), without the program name."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if LORAFLEET.match(line):
                words = shlex.split(line, comments=True)
                commands.append([w for w in words[1:] if w != "&"])
    return commands


def _command(words: list[str]) -> tuple[click.Command, list[str]]:
    cmd: click.Command = typer.main.get_command(app)
    rest = list(words)
    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
        cmd = cmd.commands[rest.pop(0)]
    return cmd, rest


def test_the_readme_has_the_first_hour_commands():
    commands = [" ".join(w) for w in readme_commands()]
    assert len(commands) >= 30
    for needed in ("client --dry-run", "--exit-on-finish", "certs --out tls --name 127.0.0.1", "data --out"):
        assert any(needed in c for c in commands), needed


@pytest.mark.parametrize("words", readme_commands(), ids=lambda w: " ".join(w)[:60])
def test_every_readme_command_parses(words):
    cmd, rest = _command(words)
    if words[0].startswith("-"):  # an option of `lorafleet` itself (--version, --install-completion): not run here
        assert len(words) == 1 and words[0] in {o for p in cmd.params for o in getattr(p, "opts", [])}, words
        return
    assert not isinstance(cmd, click.Group), f"`lorafleet {' '.join(words)}` names no command"
    cmd.make_context(cmd.name or "", rest)  # unknown options, missing required ones, bad values: an error


def test_the_cheap_readme_commands_run_as_written(tmp_path):
    written = {" ".join(w) for w in readme_commands()}
    env = {**os.environ, "LORAFLEET_CACHE": str(tmp_path / "cache")}
    for line in [*RUN, *SUBSTITUTED]:
        assert line in written, f"the README no longer has `lorafleet {line}`"
        if line in SUBSTITUTED and not (tmp_path / SUBSTITUTED[line]).exists():
            fake_package(tmp_path / SUBSTITUTED[line], ranks=(2, 4))
        proc = subprocess.run([sys.executable, "-m", "lorafleet", *shlex.split(line)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert proc.returncode == 0, (line, proc.stdout[-500:], proc.stderr[-500:])
    assert (tmp_path / "heldout.jsonl").is_file() and (tmp_path / "tls" / "ca.pem").is_file()
    assert (tmp_path / "keys" / "jetson-1.pub").is_file() and not (tmp_path / "pkg-3b").exists()  # a dry run


def first_hour_script(port: int) -> str:
    """The README's first-hour block as a bash script, as written but for two substitutions: no `make demo`
    (the suite does not run the demo) and no `source .venv/bin/activate` (the test puts .venv/bin on PATH),
    and a free port for 9092 (the suite's workers run side by side)."""
    section = README.read_text().split("## The first hour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the first-hour section has no bash block"
    lines = [ln for ln in block.group(1).splitlines() if not ln.startswith(("make demo", "source .venv"))]
    assert len(lines) == len(block.group(1).splitlines()) - 2, "the block no longer starts with the two set-up lines"
    return "set -euo pipefail\n" + "\n".join(lines).replace("9092", str(port)) + "\n"


@pytest.mark.slow
def test_the_first_hour_runs_as_written(tmp_path):
    from lorafleet.export.formats.adapter import read_adapter
    from lorafleet.federation import free_port

    env = {**os.environ, "LORAFLEET_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", first_hour_script(free_port())], cwd=tmp_path, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = proc.stdout
    assert re.search(r"trained rank 4 on onnxruntime: 20 steps", out), out[-3000:]
    assert "rank" in out and "step" in out  # the dry run's report
    # lorafleet's own progress on stderr: export stages with their times, train's loss lines
    assert re.search(r"^\[export\] rank 4: export ONNX Runtime training artifacts .*\(at \d+ s\)$", proc.stderr, re.M)
    assert re.search(r"^step 20/20: loss \d+\.\d+ \([\d.]+ s\)$", proc.stderr, re.M), proc.stderr[-3000:]
    # both devices: one owner's line per round, no colours or Flower message ids, and both exit when it is over
    assert out.count("lorafleet: training at rank 4") == 2, out[-3000:]
    rounds = re.findall(r"^lorafleet: round (\d)/2: rank 4, \d+ steps on 256 examples, loss [\d.]+ → [\d.]+, [\d.]+ s$",
                        out, re.M)
    assert sorted(rounds) == ["1", "1", "2", "2"], out[-3000:]
    assert out.count("lorafleet: the run is over") == 2
    assert "\x1b[" not in out and "(ID: " not in out and "Connection refused" not in out, out[-3000:]
    state = tmp_path / "fed-state"
    assert '"finished": true' in (state / "state.json").read_text()
    assert read_adapter(state / "global").r == 4 and (state / "global" / "README.md").is_file()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()

    # then, in the same directory: the offline aggregation section's commands and Python, as written
    (aggregate_block,) = section_blocks("Aggregate adapters offline", "bash")
    run_bash(aggregate_block, tmp_path, env, timeout=600)
    assert read_adapter(tmp_path / "global").r == 4 and read_adapter(tmp_path / "for-rank-2").r == 2
    (aggregate_python,) = section_blocks("Aggregate adapters offline", "python")
    proc = subprocess.run([sys.executable, "-c", aggregate_python + "assert glob.r == 4 and client.r == 2\n"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# SUBSTITUTED (scale): fewer devices; the second fleet on random:tiny instead of the real model
FLEET_CHANGES = [("--devices 1000", "--devices 20"), ("--model smollm2-135m", "--model random:tiny"),
                 ("--devices 100", "--devices 20")]
CI_CHANGES = [("--config docs/ci/fleet.toml", "--config docs/ci/fleet.toml --devices 20")]


@pytest.mark.slow
def test_the_fleet_sections_run_at_a_small_scale(tmp_path):
    """The emulated-fleet and fleets-in-CI sections' commands, from a folder holding the repository's
    docs/ci/, with FLEET_CHANGES and CI_CHANGES."""
    env = readme_env(tmp_path)
    work = user_folder(tmp_path / "work")
    shutil.copytree(REPO / "docs" / "ci", work / "docs" / "ci")
    (fleet_block,) = section_blocks("Train an emulated fleet", "bash")
    (ci_block,) = section_blocks("Fleets in CI", "bash")
    out = run_bash(substituted(fleet_block, FLEET_CHANGES) + substituted(ci_block, CI_CHANGES), work, env,
                   timeout=1500).stdout
    for report in ("fleet-out", "my-fleet", "skewed-fleet", "main-report", "fleet-report"):
        metrics = json.loads((work / report / "metrics.json").read_text())
        assert metrics["rounds"], report
    assert json.loads((work / "my-fleet" / "metrics.json").read_text())["config"]["quantize"] == "int8"
    skewed = json.loads((work / "skewed-fleet" / "metrics.json").read_text())
    assert skewed["config"]["method"] == "raflora" and len(skewed["device_ranks"]) == 20
    assert json.loads((work / "fleet-report" / "summary.json").read_text())["passed"], out[-2000:]
    assert "devices = 20" in out and "rounds = 5" in out, out[-2000:]  # the printed configuration
