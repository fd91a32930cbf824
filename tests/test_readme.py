"""The README's commands: every `lorafleet` line of its ```bash blocks parses with that command's own parser,
and the cheap ones run for real, as written, in an empty directory (SUBSTITUTED marks those that get a small
stand-in for an input the README assumes). The long ones (export, fleet, serve, demo) are parsed only."""

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
    if words == ["--version"]:
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
