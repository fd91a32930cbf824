"""The CLI frame: one-line errors, exit codes, placeholders that do not fake output."""

import json
import os
import subprocess
import sys

import pytest

from lorafleet.cli import main

PENDING = ["export", "profile", "train", "aggregate", "distribute", "serve", "client", "fleet"]


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, timeout=300)


def test_help_lists_every_subcommand():
    out = _run("--help").stdout
    for name in [*PENDING, "models", "demo"]:
        assert name in out


@pytest.mark.parametrize("name", PENDING)
def test_unavailable_commands_exit_2_with_one_line(name, capsys):
    from lorafleet.commands import COMMAND_MODULES

    mod = next(m for m in COMMAND_MODULES if m.__name__.endswith("." + name))
    if "register_unavailable" not in mod.register.__code__.co_names:
        pytest.skip(f"`{name}` is implemented")
    assert main([name, "--anything"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lorafleet: error: `lorafleet {name}` is not yet available in this version"


def test_models_json():
    proc = _run("models", "--json")
    assert proc.returncode == 0
    assert {"spec": "random:tiny"}.items() <= json.loads(proc.stdout)[1].items()


def test_bad_spec_is_one_line_and_nonzero():
    proc = _run("demo", "--model", "random:gpt-17")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown architecture 'gpt-17'" in proc.stderr


def test_debug_shows_the_traceback():
    proc = _run("demo", "--model", "random:gpt-17", env={"LORAFLEET_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModelSpecError" in proc.stderr


def test_usage_error_exits_2():
    assert _run("demo", "--max-new-tokens", "zero").returncode == 2
