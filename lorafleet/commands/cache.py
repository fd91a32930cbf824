"""`lorafleet cache list|remove`: what lorafleet keeps in its cache, and removing it.

    lorafleet cache list [--json]
    lorafleet cache remove KEY
    lorafleet cache remove --all

The cache is ``$LORAFLEET_CACHE`` (default ``~/.cache/lorafleet``,
:func:`lorafleet.export.formats.cache.cache_dir`). Its entries, each named by a key without path separators:

* ``packages/<key>/``: an edge package a fleet exported (kind ``package``); its ``<key>.export.log`` beside it
  belongs to it;
* ``models/<key>/``: a downloaded or converted model (kind ``model``);
* anything else, in those two folders or at the top (``ranks/``, the profilers' rank decisions): kind ``other``.

Nothing is followed out of the cache: a symbolic link is an entry of its own (its size is the link's), and
removing it removes the link, not what it points to.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.commands.options import examples

cache_app = typer.Typer(name="cache", help="List and remove what lorafleet keeps in its cache.",
                        no_args_is_help=True)

CATEGORIES = {"packages": "package", "models": "model"}
LOG_SUFFIX = ".export.log"


@dataclass(frozen=True)
class Entry:
    key: str
    kind: str  # "package", "model" or "other"
    paths: tuple[Path, ...]  # the entry's own path first (a package's export log after it)
    size_bytes: int


def entries(root: Path) -> list[Entry]:
    """The cache's entries under ``root``, sorted by kind then key."""
    found: list[Entry] = []
    for child in _children(root):
        if child.name in CATEGORIES and child.is_dir() and not child.is_symlink():
            found += _category(child, CATEGORIES[child.name])
        else:
            found.append(_entry(child.name, "other", (child,)))
    order = {"package": 0, "model": 1, "other": 2}
    return sorted(found, key=lambda e: (order[e.kind], e.key))


def _category(folder: Path, kind: str) -> list[Entry]:
    children = _children(folder)
    names = {c.name for c in children}
    out = []
    for child in children:
        if kind == "package" and child.name.endswith(LOG_SUFFIX) and child.name[:-len(LOG_SUFFIX)] in names:
            continue  # counted with its package
        if child.is_symlink() or not child.is_dir():
            out.append(_entry(child.name, "other", (child,)))
            continue
        paths: tuple[Path, ...] = (child,)
        log = folder / (child.name + LOG_SUFFIX)
        if kind == "package" and log.name in names:
            paths = (child, log)
        out.append(_entry(child.name, kind, paths))
    return out


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def _entry(key: str, kind: str, paths: tuple[Path, ...]) -> Entry:
    return Entry(key, kind, paths, sum(_size(p) for p in paths))


def _size(path: Path) -> int:
    """Bytes under ``path``, never following a symbolic link (a link counts as its own size)."""
    st = path.lstat()
    if path.is_symlink() or not path.is_dir():
        return st.st_size
    total = 0
    for top, dirs, files in os.walk(path, followlinks=False):
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]  # listed, never entered
        for name in files + links:
            with contextlib.suppress(FileNotFoundError):  # removed while we walked
                total += os.lstat(os.path.join(top, name)).st_size
    return total


def human_size(n: int) -> str:
    """``n`` bytes as ``"12 B"``, ``"3.4 kB"``, ``"5.6 MB"`` or ``"7.8 GB"`` (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@cache_app.command("list", epilog=examples("lorafleet cache list", "lorafleet cache list --json"))
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """List the cache's entries with their kind (package, model, other) and size."""
    from lorafleet.export.formats.cache import cache_dir

    root = cache_dir()
    found = entries(root)
    total = sum(e.size_bytes for e in found)
    if as_json:
        typer.echo(json.dumps({"cache": str(root), "size_bytes": total, "entries": [
            {"key": e.key, "kind": e.kind, "size_bytes": e.size_bytes, "path": str(e.paths[0])} for e in found]},
            indent=2))
        return
    if not found:
        typer.echo(f"the cache {root} is empty")
        return
    from rich.table import Table

    from lorafleet.commands.output import console as make_console

    table = Table(title=f"lorafleet cache {root}")
    for col, justify in (("key", "left"), ("kind", "left"), ("size", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for e in found:
        table.add_row(e.key, e.kind, human_size(e.size_bytes))
    console = make_console(highlight=False)
    console.print(table)
    console.print(f"{len(found)} entries, {human_size(total)}; remove one with: lorafleet cache remove KEY")


@cache_app.command("remove", epilog=examples("lorafleet cache remove --all"))
def remove(
    key: Annotated[str | None, typer.Argument(metavar="KEY", help="The entry to remove (see cache list).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
) -> None:
    """Remove one cache entry (by its key from cache list), or all of them."""
    from lorafleet.export.formats.cache import cache_dir
    from lorafleet.export.formats.errors import ConfigError

    if (key is None) == (not all_):
        raise ConfigError("give either a KEY (see lorafleet cache list) or --all, not both" if all_
                          else "give a KEY (see lorafleet cache list) or --all")
    root = cache_dir()
    found = entries(root)
    if all_:
        targets = list(root.iterdir())
        size = sum(e.size_bytes for e in found)
        for p in targets:
            _remove(p, root)
        typer.echo(f"removed {len(found)} entries ({human_size(size)}) from {root}")
        return
    assert key is not None
    check_key(key)
    matches = [e for e in found if e.key == key]
    if not matches:
        raise ConfigError(f"no cache entry {key!r} in {root} (see lorafleet cache list)")
    if len(matches) > 1:
        raise ConfigError(f"key {key!r} names {len(matches)} entries in {root} "
                          f"({', '.join(str(e.paths[0].relative_to(root)) for e in matches)}); remove them by hand")
    entry = matches[0]
    for p in entry.paths:
        _remove(p, root)
    typer.echo(f"removed {entry.kind} {key} ({human_size(entry.size_bytes)}) from {root}")


def check_key(key: str) -> None:
    """A key is one name: no path separators, not ``.`` or ``..``, no ``..`` inside."""
    from lorafleet.export.formats.errors import ConfigError

    seps = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    if not key or any(s in key for s in seps) or ".." in key or key == "." or "\0" in key:
        raise ConfigError(f"bad cache key {key!r}: a key is one name from lorafleet cache list "
                          f"(no path separators or '..')")


def _remove(path: Path, root: Path) -> None:
    """Remove ``path`` (inside ``root``) without following symbolic links: a link is unlinked, not its target."""
    parent = path.parent
    if not (parent == root or (parent.parent == root and parent.name in CATEGORIES and not parent.is_symlink())):
        raise AssertionError(f"{path} is not an entry of the cache {root}")  # entries() never yields one
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)  # never follows links inside (and refuses a link itself)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
