"""Cancelling asyncio tasks without swallowing our own cancellation."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has finished.

    The CancelledError that the finished task raises is absorbed; one aimed at the
    caller is not (absorbing it would leave the caller running forever).
    """
    if task is None:
        return
    task.cancel()
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not task.done() or (current is not None and current.cancelling()):
            raise
    except Exception:
        pass
