"""Directories and files the service creates where a path alone is no proof of what
is there: private directories, logs never written through a planted link, and new
files holding secrets.

Every log the service writes (sandbox and inference workers' output, the decision
log) is opened here, and every directory of sandbox sockets is checked here. A log
opened by name follows a symbolic link: whoever could plant one made the service
truncate and write a file of their choosing. A directory reused by name may belong to
someone else, who can then move the sockets in it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path


class UnsafePathError(OSError):
    """A path refused: a link, not ours, writable by others, or not a regular file.
    The message names the path; callers map it to their own error (and code)."""


def private_dir(path: Path) -> Path:
    """`path` as a directory only this user controls: created with mode 0700, or, when
    it exists, reused only if it is a directory itself (not a link to one), owned by
    this user and writable by no group and no one else. Raises UnsafePathError."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(f"{path}: a symbolic link, not a directory; not followed")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{path}: not a directory")
    if info.st_uid != os.geteuid():
        raise UnsafePathError(
            f"{path}: owned by uid {info.st_uid}, not by this service (uid {os.geteuid()})"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            f"{path}: writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "expected 0700"
        )
    return path


def open_log(path: Path, *, append: bool = False, mode: int = 0o600) -> int:
    """A descriptor to write the log at `path`: created with `mode` (0600: the service's
    own), emptied unless `append`. Never through a symbolic link (O_NOFOLLOW), not
    inherited by a child unless passed to it (O_CLOEXEC), and only a regular file of
    ours with no other name: it is checked before it is emptied, so a planted hard
    link is not truncated either. A FIFO fails instead of blocking (O_NONBLOCK).
    Raises UnsafePathError for a path refused, OSError for others."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | (os.O_APPEND if append else 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{path}: a symbolic link; not followed") from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise UnsafePathError(f"{path}: not a regular file") from None
        raise
    try:
        _only_ours(path, os.fstat(fd))
        if not append:
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)  # the writer (a child's stderr, say) expects blocking
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_secret(path: Path, data: bytes) -> None:
    """A new file holding a secret (an API key, a private key): created 0600, so never
    readable by others even for a moment, never over an existing file or through a
    link. Raises OSError (FileExistsError when the path is taken)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _only_ours(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePathError(f"{path}: not a regular file")
    if info.st_uid != os.geteuid() or info.st_nlink != 1:
        raise UnsafePathError(f"{path}: owned by another user, or linked elsewhere")
