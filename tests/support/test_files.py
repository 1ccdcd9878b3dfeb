"""Private directories and log files that are never written through a planted link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from orchestrator.support.files import UnsafePathError, open_log, private_dir

PRECIOUS = b"not the service's to write\n"


def _write(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_a_log_is_private_emptied_or_appended(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    fd = open_log(log)
    assert not os.get_inheritable(fd) and os.get_blocking(fd)
    _write(fd, b"first\n")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    _write(open_log(log, append=True), b"second\n")
    assert log.read_bytes() == b"first\nsecond\n"
    _write(open_log(log), b"third\n")
    assert log.read_bytes() == b"third\n"


@pytest.mark.parametrize("append", [False, True])
def test_a_planted_link_is_refused_and_its_target_untouched(tmp_path: Path, append: bool) -> None:
    target = tmp_path / "target"
    target.write_bytes(PRECIOUS)
    (tmp_path / "symbolic.log").symlink_to(target)
    os.link(target, tmp_path / "hard.log")  # checked before it is emptied
    with pytest.raises(UnsafePathError, match=r"symbolic\.log: a symbolic link; not followed"):
        open_log(tmp_path / "symbolic.log", append=append)
    with pytest.raises(UnsafePathError, match=r"hard\.log: owned by another user, or linked"):
        open_log(tmp_path / "hard.log", append=append)
    assert target.read_bytes() == PRECIOUS


def test_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.log")
    with pytest.raises(UnsafePathError, match=r"fifo\.log: not a regular file"):
        open_log(tmp_path / "fifo.log")
    (tmp_path / "dir.log").mkdir()
    with pytest.raises(IsADirectoryError):
        open_log(tmp_path / "dir.log")


def test_a_private_dir_is_made_or_reused_only_if_private(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "made")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert private_dir(made) == made  # reused
    (tmp_path / "readable").mkdir(mode=0o755)
    (tmp_path / "readable").chmod(0o755)
    private_dir(tmp_path / "readable")  # others may read, not write
    for mode in (0o777, 0o770, 0o702):
        path = tmp_path / f"mode-{mode:o}"
        path.mkdir()
        path.chmod(mode)
        with pytest.raises(UnsafePathError, match=f"mode-{mode:o}: writable by group or others"):
            private_dir(path)
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(UnsafePathError, match="link: a symbolic link, not a directory"):
        private_dir(tmp_path / "link")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UnsafePathError, match="file: not a directory"):
        private_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 54321, -1)
    with pytest.raises(UnsafePathError, match="theirs: owned by uid 54321, not by this service"):
        private_dir(theirs)
