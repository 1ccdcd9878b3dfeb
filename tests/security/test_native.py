"""Below Lua: what a worker process could do if a script ever reached native code.
The hardening a sandbox worker applies at start is applied to a fresh interpreter,
which then tries to fork, exec, open network sockets and read inherited descriptors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, os, socket, sys
from orchestrator.sandbox.limits import SandboxLimits
from sandbox_worker.hardening import harden

applied = harden(SandboxLimits())
out = {"applied": applied}

def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except OSError as exc:
        out[name] = exc.errno

def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

attempt("fork", fork)
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("inet_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("inet6_socket", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close())
attempt("unix_socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
attempt("inherited_fd", lambda: os.fstat(int(sys.argv[1])))
out["environ"] = dict(os.environ)
print(json.dumps(out))
"""


def test_hardened_process_cannot_fork_exec_open_sockets_or_reuse_descriptors(
    tmp_path: Path,
) -> None:
    """fork, exec and non-unix sockets fail with EPERM under seccomp; an inheritable
    descriptor of the parent is closed; the environment is empty."""
    secret = open(tmp_path / "parent-secret", "w")  # noqa: SIM115 - stays open across spawn
    os.set_inheritable(secret.fileno(), True)
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(secret.fileno())],
            capture_output=True, text=True, timeout=60, close_fds=False, check=False,
            env={**os.environ, "ORCH_ESCAPE_SECRET": "leak-me"},
        )  # fmt: skip
    finally:
        secret.close()
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    eperm, ebadf = 1, 9
    assert "no_new_privs" in out["applied"] and "closed_fds" in out["applied"]
    assert out["inherited_fd"] == ebadf
    assert out["environ"] == {}
    assert out["unix_socket"] == "allowed"  # what a worker serves on
    if "seccomp" in out["applied"]:
        assert out["fork"] == out["exec"] == out["inet_socket"] == out["inet6_socket"] == eperm
