"""Process hardening applied by a sandbox worker to itself, before gRPC starts threads.

Each step is best effort where the kernel or libraries may lack it (seccomp needs
libseccomp); `harden()` returns the names of the protections actually in force,
which the worker reports in Health.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import socket
import sys

from orchestrator.sandbox.limits import SandboxLimits

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
CLONE_THREAD = 0x00010000

# System calls a scheduler worker never needs; denied with EPERM.
DENIED_SYSCALLS = (
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "kexec_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "sethostname",
    "setdomainname",
)


def prctl(option: int, arg: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0)) == 0


def close_inherited_fds() -> None:
    """Close every descriptor above stderr that the parent may have leaked."""
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def apply_rlimits(limits: SandboxLimits) -> None:
    def cap(kind: int, soft: int, hard: int | None = None) -> None:
        resource.setrlimit(kind, (soft, soft if hard is None else hard))

    cap(resource.RLIMIT_AS, limits.address_space_bytes)
    # SIGXCPU at the soft limit, SIGKILL a little later at the hard one.
    cap(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 5)
    cap(resource.RLIMIT_NOFILE, limits.open_files)
    cap(resource.RLIMIT_FSIZE, limits.file_size_bytes)
    cap(resource.RLIMIT_CORE, 0)


def install_seccomp() -> bool:
    """Deny exec, fork and non-unix sockets; threads (clone with CLONE_THREAD) stay allowed."""
    try:
        import pyseccomp as sc  # noqa: PLC0415 - needs the system libseccomp, optional
    except (ImportError, OSError):
        return False
    try:
        filt = sc.SyscallFilter(defaction=sc.ALLOW)
        eperm = sc.ERRNO(errno.EPERM)
        for name in DENIED_SYSCALLS:
            try:
                filt.add_rule(eperm, name)
            except (OSError, ValueError, RuntimeError):
                continue  # not a syscall on this architecture
        filt.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
        # clone3 passes its flags in memory seccomp cannot read: make libc fall back to clone.
        filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        filt.add_rule(eperm, "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
        filt.add_rule(eperm, "socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
        filt.load()
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"sandbox worker: seccomp not applied: {exc}", file=sys.stderr)
        return False
    return True


def harden(limits: SandboxLimits, *, seccomp: bool = True) -> list[str]:
    """Apply every protection this host supports; returns their names."""
    applied: list[str] = []
    # Die with the orchestrator instead of lingering as an orphan.
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL):
        applied.append("parent_death_signal")
    close_inherited_fds()
    applied.append("closed_fds")
    # The core spawns us with an empty environment; drop what Python itself added
    # (PEP 538 locale coercion) so that nothing can be read back.
    os.environ.clear()
    applied.append("empty_environment")
    apply_rlimits(limits)
    applied.append("rlimits")
    if prctl(PR_SET_NO_NEW_PRIVS, 1):
        applied.append("no_new_privs")
    if seccomp and install_seccomp():
        applied.append("seccomp")
    return applied
