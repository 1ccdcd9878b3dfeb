"""Shadow mode: a candidate scheduler decides beside the active one, on the same
contexts, and nothing it decides is executed. What is kept is how often, and how,
its decisions differ from the executed ones.

The shadow never delays the active cycle: it runs in its own task and sandbox
workers, and a cycle that arrives while it is still deciding the previous one is
skipped (and counted).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable

import structlog

from orchestrator.domain import decision as decisions
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine
from orchestrator.support.tasks import cancel_and_wait

log = structlog.get_logger("orchestrator.shadow")

RECENT = 20  # differences kept for status


class Shadow:
    def __init__(
        self,
        lua: str,
        name: str,
        source: str,
        language: str,
        options: EngineOptions,
        on_decided: Callable[[str | None], None] | None = None,
    ) -> None:
        self.name = name
        self.sha256 = hashlib.sha256(source.encode()).hexdigest()
        self.started_at_ms = int(time.time() * 1000)
        self.engine = SchedulingEngine(
            user_source=lua, user_name=name, language=language, options=options
        )
        self.cycles = self.differing = self.skipped = self.fallbacks = 0
        self.by_kind: dict[str, int] = {}
        self.recent: deque[str] = deque(maxlen=RECENT)
        self._task: asyncio.Task[None] | None = None
        self._on_decided = on_decided

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await self.engine.close()

    def offer(self, active: CycleResult) -> None:
        """The active scheduler decided; decide the same context in the background."""
        if self._task is not None and not self._task.done():
            self.skipped += 1
            return
        self._task = asyncio.get_running_loop().create_task(self._decide(active))

    async def _decide(self, active: CycleResult) -> None:
        try:
            result = await self.engine.schedule(active.context)
        except Exception:
            log.exception("shadow.cycle_failed", shadow=self.name)
            return
        self.cycles += 1
        if result.source != "user":
            self.fallbacks += 1
        kind = decisions.difference(active.decision, result.decision)
        if self._on_decided is not None:
            self._on_decided(kind)
        if kind is None:
            return
        self.differing += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.recent.append(
            f"seq {active.seq} [{kind}] active: {decisions.describe(active.decision)} | "
            f"shadow ({result.source}): {decisions.describe(result.decision)}"
        )

    async def settle(self) -> None:
        """Wait for the decision in progress (tests and stop use it)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def status(self) -> dict[str, object]:
        return {
            "active": True,
            "name": self.name,
            "sha256": self.sha256,
            "started_at_ms": self.started_at_ms,
            "cycles": self.cycles,
            "differing": self.differing,
            "diff_rate": round(self.differing / self.cycles, 4) if self.cycles else 0.0,
            "skipped": self.skipped,
            "fallbacks": self.fallbacks,
            "by_kind": dict(sorted(self.by_kind.items())),
            "recent": list(self.recent),
        }
