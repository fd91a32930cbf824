"""The README's blocks, for the tests that run them (tests/test_readme.py, tests/test_readme_sections.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent


def section_blocks(heading: str, lang: str) -> list[str]:
    """The ```lang blocks of the README section under ``## heading``."""
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def substituted(block: str, changes: list[tuple[str, str]]) -> str:
    """``block`` with each (as written, what the suite runs) change made; a change whose text the README no
    longer has fails, so the substitutions stay the ones the README announces."""
    for old, new in changes:
        assert old in block, f"the README's block no longer has {old!r}:\n{block}"
        block = block.replace(old, new)
    return block


def readme_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell after `source .venv/bin/activate`, with the cache and home in ``tmp_path``."""
    return {**os.environ, "LORAFLEET_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def user_folder(path: Path) -> Path:
    """``path`` made a folder the README's commands run in as from the repository root: its ``.venv`` is this
    interpreter's environment (so ``.venv/bin/lorafleet`` works), and nothing else of the repository is there."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return path


def run_bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``script`` under ``set -euo pipefail`` in its own process group, which is killed afterwards (what the
    script left in the background goes with it). Output goes through files, so a background child holding
    it open does not keep the call waiting. Fails the test on a non-zero exit."""
    logs = cwd.parent / f"{cwd.name}-bash"
    logs.mkdir(exist_ok=True)
    with open(logs / "out", "w+") as out, open(logs / "err", "w+") as err:
        proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, text=True,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert proc.returncode == 0, (script[:300], stdout[-3000:], stderr[-3000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
