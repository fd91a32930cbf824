"""The library code stays ruff- and mypy-clean (configuration in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["mypy"]])
def test_clean(tool):
    exe = Path(sys.executable).parent / tool[0]
    if not exe.exists():
        pytest.skip(f"{tool[0]} is not installed in this environment (make install adds it)")
    proc = subprocess.run([str(exe), *tool[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
