"""A stand-in for systemctl where systemd is not PID 1 (this test machine): `start`
runs the real sandbox worker as orchestrator-sandbox@.service would, detached, on
the unit's socket; `show`, `kill` and `stop` act on it. Commands are logged."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_SYSTEMD_DIR"])
REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    with open(STATE / "commands.log", "a") as log:
        log.write(" ".join(argv) + "\n")
    verb, unit = argv[0], argv[-1]
    match = re.fullmatch(r"orchestrator-sandbox@(.+)\.service", unit)
    if match is None:
        print(f"Unit {unit} not found.", file=sys.stderr)
        return 5
    instance = match.group(1)
    pid_file = STATE / f"{instance}.pid"
    if verb == "start":
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-m", "sandbox_worker", "--socket",
             str(STATE / "run" / f"{instance}.sock")],
            env={}, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        pid_file.write_text(str(proc.pid))
        return 0
    pid = int(pid_file.read_text()) if pid_file.exists() else 0
    if verb == "show":
        print(pid)
    elif verb in ("kill", "stop") and pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
