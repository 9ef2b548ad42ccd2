"""Atomic output: build a directory (or a file) in a hidden sibling, then rename it into place.

An interrupted write leaves at most a hidden temporary, never a half-written checkpoint, artifact or cache entry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from tandemc.errors import TandemcError


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, force: bool = False):
    """Yield a temporary directory that becomes `path` when the block succeeds."""
    path = Path(path)
    if path.exists() and not force:
        raise TandemcError(f"{path} already exists; pass --force to overwrite it")
    if path.exists() and not path.is_dir():
        raise TandemcError(f"{path} exists and is not a directory; remove it or choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
