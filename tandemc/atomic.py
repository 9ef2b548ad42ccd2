"""Atomic output: build a directory (or a file) in a hidden sibling, then rename it into place.

An interrupted write leaves at most a hidden temporary, never a half-written checkpoint, artifact or cache entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path

from tandemc.errors import TandemcError


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, force: bool = False, sources: tuple = ()):
    """Yield a temporary directory that becomes `path` when the block succeeds.

    Refused before any work: an existing `path` without `force`, a `path` that is the current directory or
    contains it, and a `path` that is, contains or lies inside one of `sources` (the inputs being read). With
    `force`, the old directory is swapped for the new one in a single step where the system can (Linux
    renameat2 RENAME_EXCHANGE), so at every instant the complete old or the complete new directory is at `path`.
    Elsewhere it is moved aside to a hidden sibling `.NAME.old-*` first; a crash between the two renames leaves
    it there, and the next write to `path` puts it back before starting. A writer killed while building leaves
    its hidden `.NAME.tmp-<pid>-*`, which the next write deletes (docs/artifact.md)."""
    path = Path(os.path.abspath(path))
    cwd = Path.cwd()
    if path == cwd or path in cwd.parents:
        raise TandemcError(f"refusing to write {path}: it is the current directory or contains it; choose a new "
                           "output path")
    for source in filter(None, sources):  # None: an input that is not on disk
        source = Path(os.path.abspath(source))
        if path == source or path in source.parents or source in path.parents:
            raise TandemcError(f"refusing to write {path}: it overlaps the input {source}; choose an output path "
                               "outside it")
    restore_moved_aside(path)
    remove_abandoned(path)
    if path.exists() and not force:
        raise TandemcError(f"{path} already exists; pass --force to overwrite it")
    if path.exists() and not path.is_dir():
        raise TandemcError(f"{path} exists and is not a directory; remove it or choose another output path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise TandemcError(f"cannot create {path}: {e.strerror} ({e.filename})") from None
    try:
        yield tmp
        if not path.exists() or not force:
            try:
                os.rename(tmp, path)  # fails on a directory that another process put there meanwhile
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if not force:
                    raise TandemcError(f"{path} appeared while it was being written (another tandemc writing "
                                       "it?); nothing was replaced, pass --force to overwrite it") from None
        if tmp.exists() and exchange(tmp, path):  # tmp now holds the old directory
            shutil.rmtree(tmp)
        elif tmp.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def restore_moved_aside(path: Path) -> None:
    """Put back a directory a crashed overwrite left at `.NAME.old-*` while `path` is missing."""
    if path.exists() or not path.parent.is_dir():
        return
    moved = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if moved:
        os.replace(moved[-1], path)


def remove_abandoned(path: Path) -> None:
    """Delete the hidden `.NAME.tmp-<pid>-*` build directories of writers to `path` that died (kill -9, power
    loss) before cleaning up; those of live processes are left alone."""
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{path.name}.tmp-*-*"):
        pid = tmp.name[len(f".{path.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, someone else's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 with RENAME_EXCHANGE); False where the system or file
    system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside `path` that replaces `path` when the block succeeds (readers that still hold
    the old file, memory-mapped or open, keep reading it unchanged)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
