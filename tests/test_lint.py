"""The library code stays ruff- and mypy-clean (configuration in pyproject.toml).

mypy runs through .ci/typecheck, which lays the installed namespace (lorafleet.export, lorafleet.server,
lorafleet.edge_client live in top-level folders) out as symlinks for it, as `make typecheck` does.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["mypy"]])
def test_clean(tool):
    exe = BIN / tool[0]
    if not exe.exists():
        pytest.skip(f"{tool[0]} is not installed in this environment (make install adds it)")
    if tool[0] == "mypy":
        cmd, env = [str(ROOT / ".ci" / "typecheck")], {**os.environ, "MYPY": str(exe)}
    else:
        cmd, env = [str(exe), *tool[1:]], None
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
