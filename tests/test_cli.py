"""The CLI frame: every command registered, one-line errors, exit codes."""

import json
import os
import subprocess
import sys

COMMANDS = ["aggregate", "batches", "cache", "certs", "client", "data", "demo", "distribute", "export", "fleet",
            "gateway", "models", "node-key", "package", "profile", "serve", "train"]  # `cache` and `package` are groups


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


def test_demo_samples_are_the_best_and_worst_by_their_score_with_an_interval():
    from lorafleet.commands.demo import sample_lines
    from lorafleet.edge_client.data import Example

    refs = ["a b c d", "e f g h", "i j k l", "m n o p", "q r s t"]
    examples = [(f"fam{i}", Example(instruction=f"task {i}", input="", output=r)) for i, r in enumerate(refs)]
    before = ["x"] * 5
    after = ["a b c d", "e f", "zzz", "m n o", "q"]  # Rouge-L F: 1.0, 0.67, 0.0, 0.86, 0.4
    lines = sample_lines(examples, before, after, shown=2)
    labels = [(line.split()[0], line.split()[1]) for line in lines[1:-1]]
    assert labels == [("best", "[fam0]"), ("best", "[fam3]"), ("worst", "[fam2]"), ("worst", "[fam4]")]
    assert "fleet (1.00): 'a b c d'" in lines[1] and "fleet (0.00): 'zzz'" in lines[3]
    mean = (1.0 + 2 / 3 + 0.0 + 6 / 7 + 0.4) / 5
    assert f"0.00 → {mean:.2f}, change +{mean:.2f}" in lines[-1]
    low, high = (float(v) for v in lines[-1].split("interval ")[1].split(")")[0].split(" … "))
    assert 0.0 <= low < mean < high <= 1.0
