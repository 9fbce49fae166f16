"""Atomic file writes: readers (and a job killed mid-write) never see half a file."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# errno values that say the storage refused a write (full, over quota, read-only, not ours): the
# user frees space or writes elsewhere; a traceback would only bury the reason.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError `e` is, or was raised from or while handling. torch.save reports a failed write
    as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`, raised while
    handling the OSError that says why (No space left on device)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """write(f) into a temp file in the same directory, fsync, rename over `path`. The file gets the
    mode a plain open() would (mkstemp's 0600 would hide a data set from every other user). A write
    the storage refuses raises the OSError that says why, naming `path` (not the temp file, which
    is gone): `path` itself is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = os_error_in(e) if isinstance(e, (OSError, RuntimeError)) else None
        if cause is None or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing) for the block: separate jobs that write the
    same files (two seeds started at once in one folder) take turns instead of renaming each other's
    temporary files."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
