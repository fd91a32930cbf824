"""The CLI frame: every command registered, one-line errors, exit codes."""

import json
import os
import subprocess
import sys

COMMANDS = ["aggregate", "cache", "certs", "client", "data", "demo", "distribute", "export", "fleet", "gateway",
            "models", "node-key", "package", "profile", "serve", "train"]  # `cache` and `package` are groups


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, timeout=300)


def test_every_subcommand_is_registered_and_answers_help():
    """The app's registered commands are exactly these, and each one's --help exits 0 naming it."""
    import typer.main

    from lorafleet.cli import app

    group = typer.main.get_command(app)
    assert sorted(group.commands) == COMMANDS  # type: ignore[attr-defined]
    for name in COMMANDS:
        proc = _run(name, "--help")
        assert proc.returncode == 0, (name, proc.stderr[-500:])
        assert f"Usage: lorafleet {name} " in " ".join(proc.stdout.split()), name


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
