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


def where_it_waits(task: asyncio.Task[Any]) -> str:
    """The await chain of a suspended task, outermost first, down to what it waits on.

    Task.print_stack shows only the outermost frame of a suspended coroutine; this
    follows cr_await through every coroutine it awaits.
    """
    lines = [repr(task)]
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_qualname}")
        else:
            lines.append(f"  waiting on {awaited!r}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return "\n".join(lines)
