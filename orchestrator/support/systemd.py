"""sd_notify for Type=notify units: READY, WATCHDOG, STOPPING and STATUS.

Ten lines of protocol (a datagram on $NOTIFY_SOCKET) do not need a dependency.
Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send `KEY=value` lines to systemd; False when not running under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(states).encode())
    return True


def watchdog_interval_s() -> float | None:
    """Half the unit's WatchdogSec, the recommended ping interval; None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
