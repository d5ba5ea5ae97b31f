"""Atomic file writes (bytes and YAML configs) and content hashes, shared by checkpoints, configs, metrics and the
data cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from titans.typed_yaml import dump_yaml

TMP_PREFIX = ".tmp-"


class LockedError(RuntimeError):
    """Another process holds the lock."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, as on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | Callable[[Path], None]) -> None:
    """Write `data` (bytes, or a function that writes a given path) to a temporary file beside `path`, fsync it and
    rename it into place: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a dataclass as YAML atomically (see `atomic_write`)."""
    atomic_write(path, dump_yaml(obj).encode("utf-8"))


def check_new_dir(path: str | Path) -> Path:
    """`path`, absolute, unless it exists as anything but an empty directory (FileExistsError)."""
    path = Path(os.path.abspath(path))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not an empty directory; give a new one")
    return path


def write_new_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Make the directory `path` (absent or empty) from what `write` puts into a temporary directory beside it,
    fsynced and renamed into place: readers see all of it or nothing. A `path` holding anything is refused
    (FileExistsError), and nothing is ever deleted but the temporary directory."""
    path = check_new_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        write(tmp)
        for item in sorted(tmp.rglob("*"), reverse=True):  # files before the directories holding them
            if item.is_dir():
                fsync_dir(item)
            else:
                with open(item, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        os.replace(tmp, path)  # over an empty directory only: one that filled up meanwhile is an error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: str | Path, held_message: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent) or raise `LockedError(held_message)` at once. The
    operating system releases the lock when the holder exits, even when killed, so no stale lock is ever left. The
    file is never deleted (deleting a lock file lets two holders lock different files). No-op where `fcntl` is
    unavailable (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(held_message) from None
        yield
    finally:
        os.close(fd)  # releases the lock
