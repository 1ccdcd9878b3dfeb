"""Job events: a watcher's buffer is bounded, and one that falls behind is told so."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from orchestrator.domain.errors import RateLimitedError
from orchestrator.service.events import WATCHER_BYTES, WATCHER_QUEUE, JobEvents
from tests.fakes import record


async def test_a_watcher_that_falls_behind_is_ended_after_the_events_before_the_gap() -> None:
    events = JobEvents()
    job = record("j1")
    async with events.subscribe(None) as watch:
        for i in range(WATCHER_QUEUE + 5):  # nobody reads
            events.publish(job, i, f"change {i}")
        got = [(await watch.get()).at_ms for _ in range(WATCHER_QUEUE)]
        assert got == list(range(WATCHER_QUEUE))  # in order, up to the gap
        with pytest.raises(RateLimitedError, match="behind and missed later events"):
            await asyncio.wait_for(watch.get(), 1)
        events.publish(job, 0, "after the gap")  # an ended watcher takes no more
        assert watch.empty()


async def test_a_watcher_is_bounded_by_bytes_too() -> None:
    events = JobEvents()
    big = dataclasses.replace(record("j1"), output="x" * (WATCHER_BYTES // 2))
    async with events.subscribe("j1") as watch:
        events.publish(big, 1, "completed")
        events.publish(big, 2, "completed again")  # together over the bound
        assert (await watch.get()).at_ms == 1
        with pytest.raises(RateLimitedError):
            await asyncio.wait_for(watch.get(), 1)
    async with events.subscribe("j1") as watch:
        huge = dataclasses.replace(big, output="x" * (2 * WATCHER_BYTES))
        events.publish(huge, 3, "one event larger than the bound is still delivered")
        assert (await watch.get()).at_ms == 3


async def test_a_watcher_that_keeps_up_gets_every_event() -> None:
    events = JobEvents()
    async with events.subscribe(None) as watch:
        for i in range(3 * WATCHER_QUEUE):
            events.publish(record(f"j{i}"), i, "")
            assert (await watch.get()).at_ms == i


async def test_events_carry_no_prompt() -> None:
    events = JobEvents()
    job = record("j1", prompt="a secret the watcher has no use for")
    async with events.subscribe("j1") as one, events.subscribe(None) as every:
        events.publish(job, 1, "submitted")
        for watch in (one, every):
            event = await watch.get()
            assert event.record.prompt == "" and event.record.prompt_hash == job.prompt_hash
    assert not events._subscribers  # closed watchers leave no entry behind
