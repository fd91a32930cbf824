"""lorafleet/commands/output.py: third-party output (Python warnings, log records, C-level writes to fd 2) goes
to a log file that is kept only when something was written; lorafleet's own lines stay on the terminal; tables
do not wrap at 80 columns in a pipe. Each case runs in a fresh interpreter, so fd 2 is a real pipe."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from lorafleet.commands.output import say, third_party_log
    verbose, noisy = sys.argv[1] == "verbose", sys.argv[2] == "noisy"
    with third_party_log("probe", verbose=verbose) as path:
        say("own progress line")
        if noisy:
            warnings.warn("a library's FutureWarning", FutureWarning)
            logging.basicConfig(level=logging.WARNING)  # what executorch's partitioner does on import
            logging.getLogger("some.library").warning("a library's log record")
            os.write(2, b"a C++ runtime line\\n")
    print("log:", path)
""")


def _run(tmp_path, *args):
    env = {**os.environ, "LORAFLEET_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_third_party_output_goes_to_a_log_and_lorafleets_own_to_the_terminal(tmp_path):
    proc = _run(tmp_path, "quiet", "noisy")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "own progress line" and len(lines) == 2, proc.stderr
    (log,) = (tmp_path / "cache" / "logs").glob("probe-*.log")
    assert f"third-party warnings and runtime logs: {log}" in lines[1]
    text = log.read_text()
    for expected in ("a library's FutureWarning", "some.library [WARNING] a library's log record",
                     "a C++ runtime line"):
        assert expected in text
    assert "own progress line" not in text


def test_nothing_written_leaves_no_log(tmp_path):
    proc = _run(tmp_path, "quiet", "silent")
    assert proc.returncode == 0 and proc.stderr == "own progress line\n", proc.stderr
    assert not list((tmp_path / "cache" / "logs").glob("*.log"))


def test_verbose_leaves_everything_on_the_terminal(tmp_path):
    proc = _run(tmp_path, "verbose", "noisy")
    assert proc.returncode == 0, proc.stderr
    assert "a library's FutureWarning" in proc.stderr and "a C++ runtime line" in proc.stderr
    assert "log: None" in proc.stdout and not (tmp_path / "cache" / "logs").exists()


def test_a_table_in_a_pipe_is_not_wrapped_at_80_columns():
    code = ("from rich.table import Table; from lorafleet.commands.output import console\n"
            "t = Table(); [t.add_column(f'column {i}') for i in range(12)]; t.add_row(*[f'value {i}' for i in "
            "range(12)]); console().print(t); console().print('x' * 120)")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60).stdout
    assert "value 11" in out and "x" * 120 in out
    assert max(len(line) for line in out.splitlines()) > 80
