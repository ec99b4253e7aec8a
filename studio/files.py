"""Private files: what both servers use so that their state is readable by this user only.

The decision (README, "Files and modes"): ``studio serve``, ``studio livy`` and ``studio run``
set the process umask to 077 first thing, so everything they and their children create (SQLite
files, logs, Arrow results, outputs, execution folders, what JVMs and JupyterLab write) is 0600 in
0700 folders; state folders are also created with explicit modes. At start each server walks its
state directory, without following symbolic links, and takes group and other bits away from
anything that has them (a state directory of an older version, a file copied in by hand), logging
what it fixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

PRIVATE_UMASK = 0o077
LOOSE_BITS = 0o077  # group and other permission bits
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def private_umask() -> int:
    """Make everything this process and its children create private to this user; the old umask."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """``mkdir -p`` with mode 0700 (the folder itself is tightened if it already existed)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode
    if mode & LOOSE_BITS:
        os.chmod(path, stat.S_IMODE(mode) & ~LOOSE_BITS)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 unless it exists (then take away group and other bits).

    SQLite gives its ``-wal`` and ``-shm`` files the mode of the database file, so creating the
    database this way keeps all three private whatever the umask.

    A file that exists is never opened here: closing any descriptor of a file drops every POSIX
    lock this process holds on it, SQLite's included, so opening and closing a database that
    another connection of this process has open (two ``Directory`` objects on one users.db)
    breaks SQLite's locking: other processes then read a stale database.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_mode & LOOSE_BITS:
            os.chmod(path, stat.S_IMODE(info.st_mode) & ~LOOSE_BITS)
        return path
    os.close(fd)
    return path


def write_private_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path``, mode 0600, atomically: a reader sees the old file or the
    whole new one, never a half-written one (it is written beside it, then renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def tighten(root: Path) -> list[str]:
    """Take group and other bits away from ``root`` and everything under it; what was changed.

    Symbolic links are never followed (their targets are not ours to change) and every change is
    made through a file descriptor opened with ``O_NOFOLLOW``, so a link swapped in during the
    walk cannot redirect it. Entries that cannot be opened (sockets, another user's files) are
    left alone; entries that vanish meanwhile are skipped.
    """
    fixed: list[str] = []
    try:
        root_fd = os.open(root, _OPEN_FLAGS | os.O_DIRECTORY)
    except OSError:
        return fixed
    try:
        _fix(root_fd, str(root), fixed)
    finally:
        os.close(root_fd)
    for top, dirs, names, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in (*dirs, *names):
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if not info.st_mode & LOOSE_BITS or not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                continue
            try:
                fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                _fix(fd, os.path.join(top, name), fixed)
            finally:
                os.close(fd)
    return fixed


def _fix(fd: int, path: str, fixed: list[str]) -> None:
    mode = os.fstat(fd).st_mode
    if mode & LOOSE_BITS:
        try:
            os.fchmod(fd, stat.S_IMODE(mode) & ~LOOSE_BITS)
        except OSError as exc:  # another user's file: say so; the 0700 folder above still keeps others out
            fixed.append(f"{path} ({stat.S_IMODE(mode):04o}, NOT fixed: {exc.strerror})")
            return
        fixed.append(f"{path} ({stat.S_IMODE(mode):04o} -> {stat.S_IMODE(mode) & ~LOOSE_BITS:04o})")


def secure_state_dir(state_dir: Path, log: logging.Logger) -> None:
    """Create the state directory 0700 and fix loose modes under it, logging what was fixed."""
    private_dir(state_dir)
    fixed = tighten(state_dir)
    if fixed:
        shown = "; ".join(fixed[:10]) + (f"; and {len(fixed) - 10} more" if len(fixed) > 10 else "")
        log.warning("took group and other permissions away from %d entries in %s: %s", len(fixed), state_dir, shown)
