"""Jobs' output as it is produced (service/outputs.py): followers, retries, late
followers, and entries dropped once nobody needs them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from orchestrator.domain.jobs import JobState
from orchestrator.service.outputs import JobOutputs, OutputChunk
from tests.fakes import record

JOB = record("j1")
DONE = dataclasses.replace(JOB, state=JobState.COMPLETED, output="abc", tokens_generated=3)
RETRIED = dataclasses.replace(JOB, state=JobState.QUEUED, attempts=1)


async def _next(chunks: AsyncIterator[OutputChunk]) -> OutputChunk:
    return await anext(chunks)


async def test_a_follower_sees_the_text_in_order_then_the_job_as_it_ended() -> None:
    outputs = JobOutputs()
    outputs.begin("j1", 1)
    with outputs.subscribe("j1") as chunks:
        outputs.append("j1", "a", 1)
        first = await _next(chunks)
        outputs.append("j1", "b", 2)
        outputs.append("j1", "c", 3)  # both before the follower reads: one chunk
        second = await _next(chunks)
        outputs.end(DONE)
        last = await _next(chunks)
        assert [c async for c in chunks] == []  # the last chunk ended it
    assert first == OutputChunk("a", 1, 1)
    assert second == OutputChunk("bc", 3, 1)
    assert last == OutputChunk("", 3, 1, DONE)
    assert len(outputs) == 0


async def test_a_retry_starts_the_text_again_with_a_higher_attempt() -> None:
    outputs = JobOutputs()
    outputs.begin("j1", 1)
    with outputs.subscribe("j1") as chunks:
        outputs.append("j1", "lost", 1)
        assert await _next(chunks) == OutputChunk("lost", 1, 1)
        outputs.end(RETRIED)  # back to the queue: not the end of the stream
        outputs.append("j1", "late", 2)  # a stale attempt's text after it ended: ignored
        outputs.begin("j1", 2)
        outputs.append("j1", "kept", 1)
        assert await _next(chunks) == OutputChunk("kept", 1, 2)
        outputs.end(DONE)
        assert (await _next(chunks)).final == DONE


async def test_followers_hear_of_a_retry_at_once_by_a_chunk_of_the_next_attempt() -> None:
    """The job goes back to the queue: a follower that had text of attempt 1 gets an
    empty chunk of attempt 2 now, not when attempt 2's first token comes (maybe never,
    or after a backoff), so a client can drop what it showed (D28)."""
    outputs = JobOutputs()
    outputs.begin("j1", 1)
    with outputs.subscribe("j1") as chunks:
        outputs.append("j1", "lost", 1)
        assert await _next(chunks) == OutputChunk("lost", 1, 1)
        outputs.end(RETRIED)
        assert await _next(chunks) == OutputChunk("", 0, 2)
        outputs.begin("j1", 2)  # the attempt followers were told of: no news
        outputs.append("j1", "kept", 1)
        assert await _next(chunks) == OutputChunk("kept", 1, 2)
    with outputs.subscribe("j1") as late:  # one that saw no earlier attempt: no empty chunk
        outputs.end(DONE)
        assert await _next(late) == OutputChunk("kept", 1, 2, DONE)


async def test_a_late_follower_gets_all_the_text_so_far() -> None:
    outputs = JobOutputs()
    outputs.begin("j1", 1)
    outputs.append("j1", "he", 1)
    outputs.append("j1", "llo", 2)
    with outputs.subscribe("j1") as chunks:
        assert await _next(chunks) == OutputChunk("hello", 2, 1)
    with outputs.subscribe("j1") as again:  # a second follower reads from its own start
        assert await _next(again) == OutputChunk("hello", 2, 1)


async def test_entries_are_dropped_when_nobody_follows() -> None:
    outputs = JobOutputs()
    outputs.begin("j1", 1)
    outputs.append("j1", "x", 1)
    outputs.end(RETRIED)  # nobody follows: nothing to keep across the retry
    assert len(outputs) == 0
    outputs.begin("j1", 2)
    with outputs.subscribe("j1") as chunks:
        outputs.end(DONE)
        assert len(outputs) == 1  # its follower has yet to read the end
        assert (await _next(chunks)).final == DONE
    assert len(outputs) == 0
    with outputs.subscribe("unknown"):  # following a job that never runs holds nothing after
        pass
    assert len(outputs) == 0
    outputs.append("unknown", "x", 1)  # text of a job not begun: ignored
    assert len(outputs) == 0
