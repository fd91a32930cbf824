"""The README's commands: every `lorafleet` line of its ```bash blocks parses with that command's own parser;
the cheap ones run for real, as written, in an empty directory (SUBSTITUTED marks those that get a small
stand-in for an input the README assumes); the first hour's block runs as written (a real TLS federation of
two devices on `random:tiny`), followed by the offline-aggregation section and the Python of two sections.
The long ones elsewhere (the real model's export, fleets, the demo) are parsed only."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main
from export_helpers import fake_package

from lorafleet.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
LORAFLEET = re.compile(r"^(?:\.venv/bin/)?lorafleet(?=\s|$)")
# Run for real in an empty directory, in this order. SUBSTITUTED: the README assumes `pkg` exists (made by
# `export`, minutes): a placeholder-programs package stands in, enough for inspect and verify.
RUN = ["--version", "models", "data --out data.jsonl", "certs --out tls --name server.example.org",
       "node-key --out keys/jetson-1", "cache list"]
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
    assert (tmp_path / "data.jsonl").is_file() and (tmp_path / "tls" / "ca.pem").is_file()
    assert (tmp_path / "keys" / "jetson-1.pub").is_file()


def section_blocks(heading: str, lang: str) -> list[str]:
    """The ```lang blocks of the README section under ``## heading``."""
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


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

    # then, in the same directory: the offline aggregation section's commands and Python, as written, and the
    # export section's Python on the first hour's package (SUBSTITUTED: `pkg` at rank 8 -> `tiny-pkg` at rank 4)
    (aggregate_block,) = section_blocks("Aggregate adapters offline", "bash")
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + aggregate_block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert read_adapter(tmp_path / "global").r == 4 and read_adapter(tmp_path / "for-rank-2").r == 2
    (export_python,) = section_blocks("Export an edge package", "python")
    (aggregate_python,) = section_blocks("Aggregate adapters offline", "python")
    export_python = export_python.replace('"pkg"', '"tiny-pkg"').replace("(pkg, 8)", "(pkg, 4)") \
        .replace("initial_adapter(8)", "initial_adapter(4)")
    # the profile and train sections (SUBSTITUTED: the export section's `pkg` -> `tiny-pkg`, rank 8 -> 4)
    for heading in ("Profile a device", "Train locally"):
        (block,) = section_blocks(heading, "bash")
        block = block.replace(".venv/bin/lorafleet", "lorafleet").replace("--package pkg", "--package tiny-pkg") \
            .replace("--rank 8", "--rank 4")
        proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        assert proc.returncode == 0, (heading, proc.stdout[-3000:], proc.stderr[-3000:])
        expected = "selected" if heading.startswith("Profile") else "trained rank 4"
        assert expected in proc.stdout, (heading, proc.stdout[-3000:])
    assert read_adapter(tmp_path / "adapter-r8").r == 4
    for code in (export_python + "assert adapter.r == 4 and loss > 0\n",
                 aggregate_python + "assert glob.r == 4 and client.r == 2\n"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        assert proc.returncode == 0, (code, proc.stderr[-3000:])
