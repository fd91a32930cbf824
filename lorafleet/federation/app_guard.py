"""A lorafleet device runs lorafleet's Flower app and nothing else.

A SuperNode runs whatever app its SuperLink hands it: the app's FAB (a zip of its files) is installed and its
ClientApp imported, code included. A device that joined a federation to train lorafleet's adapters must not
run a stranger's code because someone reached the server. Flower's own check (``--trusted-entities``)
verifies signatures that only apps published through Flower's platform carry, so lorafleet checks the FAB
itself: the trusted FAB is the one Flower builds from lorafleet's installed app directory
(``lorafleet/federation/flower-app``: a ``pyproject.toml`` naming lorafleet's installed ServerApp and ClientApp, and no
code), identified by its sha256 — the hash Flower itself keys FABs by.

How the check is placed: a SuperNode starts ``flower-superexec``, which starts one task process per message,
found on ``PATH`` by name (``flwr-clientapp`` for a ClientApp; ``flwr-agentapp``, ``flwr-model``, … for the
other task kinds). :func:`write_guard_bin` writes a directory of lorafleet's replacements that ``lorafleet
client`` puts first on the SuperNode's ``PATH``: ``flwr-clientapp`` runs Flower's own ClientApp process with
the FAB's hash checked before the FAB is installed (a mismatch raises inside Flower's task, so the server
receives an error reply and no file of the FAB is ever written or imported); every other task kind is
refused outright. If the Flower internals the check hooks into are missing, the guard refuses everything
(fail closed).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

APP_DIR = Path(__file__).resolve().parent / "flower-app"
GUARDED = "flwr-clientapp"
REFUSED = ("flwr-agentapp", "flwr-connector", "flwr-model", "flwr-serverapp", "flwr-simulation")


class AppRefused(RuntimeError):
    """A FAB that is not lorafleet's reached this device."""


def fab_sha256(app_dir: Path = APP_DIR) -> str:
    """The sha256 of the FAB Flower builds from ``app_dir`` (deterministic: fixed timestamps, sorted files)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()


def check_fab(content: bytes | Path, trusted: Iterable[str]) -> None:
    """Raise :class:`AppRefused` unless the FAB ``content`` is one of the ``trusted`` sha256 digests."""
    data = content if isinstance(content, bytes) else Path(content).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    allowed = set(trusted)
    if digest not in allowed:
        raise AppRefused(f"lorafleet device: refusing app {digest[:12]} (FAB sha256 {digest}); this device runs "
                         f"only lorafleet's app ({', '.join(sorted(d[:12] for d in allowed))})")


def run_guarded_clientapp(trusted: Iterable[str]) -> None:
    """Flower's ``flwr-clientapp`` entry point, with :func:`check_fab` before the FAB is installed."""
    allowed = tuple(trusted)
    try:
        import flwr.supernode.runtime.run_clientapp as task
        from flwr.supernode.cli import flwr_clientapp
    except ImportError as exc:
        _refuse(f"Flower's ClientApp runner cannot be imported ({exc}); refusing to run any app")
    install = getattr(task, "install_from_fab", None)
    if install is None:
        _refuse("this Flower version installs FABs differently from what lorafleet checks; refusing to run any app")

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        check_fab(fab_file, allowed)
        return install(fab_file, *args, **kwargs)

    task.install_from_fab = checked_install
    flwr_clientapp()


def refuse_task(name: str) -> NoReturn:
    """The entry point of every task kind a lorafleet device never runs."""
    _refuse(f"lorafleet device: refusing to start {name} (a lorafleet device runs only lorafleet's ClientApp)")


def _refuse(message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(3)


def write_guard_bin(directory: Path, trusted: Iterable[str]) -> Path:
    """Write the task-process replacements into ``directory`` (to go first on the SuperNode's ``PATH``)."""
    directory.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    here = __name__  # the scripts import this module
    scripts = {GUARDED: f"from {here} import run_guarded_clientapp\nrun_guarded_clientapp({sorted(set(trusted))!r})\n"}
    scripts.update({name: f"from {here} import refuse_task\nrefuse_task({name!r})\n" for name in REFUSED})
    for name, body in scripts.items():
        path = directory / name
        path.write_text(f"#!{python}\n# Written by lorafleet client ({here}); do not edit.\n{body}")
        path.chmod(0o755)
    return directory
