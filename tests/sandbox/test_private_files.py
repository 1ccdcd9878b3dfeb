"""Where the sandbox workers' sockets and logs live, and the logs the service writes:
private directories, and no file written through a link another user planted."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config.settings import load_config
from orchestrator.domain.errors import ConfigError, PoolError, SandboxUnavailableError
from orchestrator.pools.hardware import NvmlProbe, PsutilProbe
from orchestrator.pools.local_pool import LocalPool
from orchestrator.sandbox.process import SchedulerSpec, WorkerProcess
from orchestrator.scheduling.engine import platform_source
from orchestrator.service.assembly import assemble
from tests.service_helpers import write_config

PRECIOUS = b"another file the service can write, which a planted link points at\n"


def _private(path: Path) -> bool:
    info = os.lstat(path)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077


@pytest.mark.parametrize("planted", ["mode 0777", "symlink"])
async def test_a_predictable_tmp_sandbox_dir_is_not_used(tmp_path: Path, planted: str) -> None:
    """With a state path too long for unix socket paths, the sandbox directory was
    /tmp/orch-<sha1 of the path>: anyone could create it first (world-writable, or a
    link to their own directory) and it was used as found. Now each engine makes its
    own with mkdtemp: unpredictable, 0700, removed when the engine closes."""
    state_dir = tmp_path / ("a-state-directory-whose-path-is-long-" + "s" * 40)
    name = hashlib.sha1(str(state_dir / "sandbox").encode()).hexdigest()[:12]
    predictable = Path("/tmp") / f"orch-{name}"
    theirs = tmp_path / "someone-elses"
    theirs.mkdir(mode=0o777)
    if planted == "symlink":
        predictable.symlink_to(theirs)
    else:
        predictable.mkdir()
        predictable.chmod(0o777)
    orchestrator = None
    try:
        config = load_config(write_config(tmp_path, state_dir=str(state_dir)))
        orchestrator = assemble(config)
        runtime = orchestrator.engine.runtime_dir
        assert runtime.resolve() not in (predictable.resolve(), theirs.resolve())
        assert _private(runtime)
    finally:
        if orchestrator is not None:
            await orchestrator.close()
        if predictable.is_symlink():
            predictable.unlink()
        else:
            shutil.rmtree(predictable, ignore_errors=True)
    assert not runtime.exists()
    assert not any(theirs.iterdir())


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose state_dir/sandbox is short enough for unix socket paths
    (tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="orch-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("planted", ["mode 0777", "symlink"])
async def test_an_unsafe_sandbox_dir_in_the_state_dir_is_refused(
    short_dir: Path, planted: str
) -> None:
    """state_dir/sandbox is reused across restarts, but only as a private directory
    of this user: anything else is refused at start, naming the path."""
    sandbox = short_dir / "state" / "sandbox"
    sandbox.parent.mkdir()
    if planted == "symlink":
        elsewhere = short_dir / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        sandbox.symlink_to(elsewhere)
    else:
        sandbox.mkdir()
        sandbox.chmod(0o777)
    config = load_config(write_config(short_dir))
    with pytest.raises(ConfigError, match=f"sandbox directory {sandbox}: "):
        assemble(config)
    if planted == "symlink":
        sandbox.unlink()
    else:
        sandbox.chmod(0o700)
    orchestrator = assemble(config)  # as it should be: used
    try:
        assert orchestrator.engine.runtime_dir == sandbox and _private(sandbox)
    finally:
        await orchestrator.close()


@pytest.mark.parametrize("spawn", ["fork-server", "exec"])
async def test_a_symlinked_worker_log_is_not_followed(tmp_path: Path, spawn: str) -> None:
    """A worker's log (its stderr) is opened by the service with O_NOFOLLOW: a link
    planted in its place fails the start clearly and its target is untouched (it was
    truncated, then written by the worker)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_bytes(PRECIOUS)
    (runtime / "x1.log").symlink_to(target)
    source = platform_source()
    spec = SchedulerSpec(name="platform.lua", source=source, platform_source=source, spawn=spawn)
    worker = WorkerProcess(spec, runtime, "x1")
    try:
        with pytest.raises(SandboxUnavailableError, match="symbolic link"):
            await worker.start()
    finally:
        worker.kill()
    assert target.read_bytes() == PRECIOUS


async def test_a_symlinked_inference_worker_log_is_not_followed(tmp_path: Path) -> None:
    """The local pool's worker logs (state_dir/worker-ID.log) likewise."""
    command = ["{python}", "-c", "print('written through the link')"]
    config = load_config(write_config(tmp_path, local_pool={"worker": {"command": command}}))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    target = tmp_path / "precious"
    target.write_bytes(PRECIOUS)
    (state_dir / "worker-w1.log").symlink_to(target)
    pool = LocalPool(config.local_pool, NvmlProbe(), PsutilProbe(), state_dir)
    try:
        with pytest.raises(PoolError, match="symbolic link"):
            await pool.start_worker("w1", "some-model", 0, 1)
    finally:
        await pool.close()
    assert target.read_bytes() == PRECIOUS
