"""The wall clock the core stamps jobs, pools and decisions with."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return int(time.time() * 1000)
