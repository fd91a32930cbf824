"""Atomic writes: build in a temporary sibling, then rename, so nothing already saved is ever half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from lorafleet.export.formats.errors import LorafleetError


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``out`` when the block succeeds.

    On any exception the temporary directory is removed and ``out`` is untouched. With ``overwrite`` an
    existing ``out`` is replaced only after the new one is complete; without it, an existing ``out`` is an
    error raised before any work is done — and one that appears while the block runs is left alone: the
    final rename refuses to replace anything (``renameat2(RENAME_NOREPLACE)`` on Linux).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise LorafleetError(f"output {out} already exists")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.tmp-"))
    except OSError as exc:
        raise LorafleetError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        if out.exists() and overwrite:
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            rename_noreplace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (an empty directory included); raises otherwise."""
    if _renameat2_noreplace(src, dst):
        return
    if dst.exists() or dst.is_symlink():  # no renameat2 here: a narrower check-then-rename window
        raise _appeared(dst)
    os.rename(src, dst)


def _appeared(dst: Path) -> LorafleetError:
    return LorafleetError(f"output {dst} appeared while it was being written; it was left untouched and the new "
                          f"output was discarded")


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """``renameat2(..., RENAME_NOREPLACE)``; ``False`` if this system has no such call (then nothing moved)."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_noreplace_flag = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace_flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # old kernel or a filesystem without the flag
        return False
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise _appeared(dst)
    raise OSError(err, os.strerror(err), str(dst))


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, text, or a function writing to an open binary file) to ``path`` through a
    temporary sibling, fsync and a rename, so ``path`` is never half-written; returns ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    except OSError as exc:
        raise LorafleetError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode())
            elif isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    atomic_write(path, text)
