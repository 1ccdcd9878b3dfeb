"""Jobs' output as their workers produce it, for the clients that stream it.

`JobOutputs` holds the text of each running job (bounded: the completion client cuts
a job off past its `max_tokens`) and wakes whoever follows it. A follower reads from
its own offset into that text, so a slow client costs no queue and never makes the
worker wait; it gets what arrived since its last read in one chunk.

A job's text starts again when it is retried (its `attempt` grows): the tokens of the
failed attempt are not the ones that will be completed. Followers hear of a retry as
soon as the job goes back to the queue, by a chunk of the new attempt with no text: a
chunk whose attempt differs from the one text was sent under means the job was
retried. What a streaming client does about that is the edge's choice
(api/web/openai.py ends its stream, D28).

The store, not this, is the record: the last chunk carries the job as it ended, and a
job that ended before anyone followed it is read from the store by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from orchestrator.domain.jobs import TERMINAL, JobRecord


@dataclass(frozen=True, slots=True)
class OutputChunk:
    text: str  # new text since this follower's previous chunk of the same attempt
    tokens: int  # tokens of this attempt so far
    attempt: int  # 1 for the first dispatch; more after a retry (the text starts again)
    final: JobRecord | None = None  # set on the last chunk: the job as it ended


@dataclass(slots=True)
class _Output:
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    attempt: int = 0
    final: JobRecord | None = None
    followers: int = 0
    running: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        woken, self.changed = self.changed, asyncio.Event()
        woken.set()


class JobOutputs:
    def __init__(self) -> None:
        self._jobs: dict[str, _Output] = {}
        self.closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def begin(self, job_id: str, attempt: int) -> None:
        """Attempt `attempt` of `job_id` starts on a worker: its text starts empty."""
        output = self._jobs.setdefault(job_id, _Output())
        output.parts = []
        output.tokens = 0
        output.attempt = attempt
        output.running = True
        output.wake()

    def append(self, job_id: str, text: str, tokens: int) -> None:
        """The worker sent `text`; the attempt's tokens so far are `tokens`."""
        output = self._jobs.get(job_id)
        if output is None or not output.running:
            return
        output.parts.append(text)
        output.tokens = tokens
        output.wake()

    def end(self, record: JobRecord) -> None:
        """The job left its worker: for good (a terminal state), or back to the queue."""
        output = self._jobs.get(record.id)
        if output is None:
            return
        output.running = False
        if record.state in TERMINAL:
            output.final = record
        else:
            # Retried: followers learn now that the text they got is void, not at the
            # next attempt's first token. `begin` later starts this same attempt.
            output.attempt = record.attempts + 1
            output.parts = []
            output.tokens = 0
        if not output.followers:
            del self._jobs[record.id]
        output.wake()

    def close(self) -> None:
        """The service stops: every follower ends now, without a last chunk (its job
        stays in the store, and is retried by the next start if it was running)."""
        self.closed = True
        for output in self._jobs.values():
            output.wake()

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[AsyncIterator[OutputChunk]]:
        """Follow `job_id`'s output from now on. Subscribe before reading the job from
        the store: a job that ends after this is seen here, one that ended before is
        terminal in the store, so none falls between."""
        output = self._jobs.setdefault(job_id, _Output())
        output.followers += 1
        try:
            yield self._follow(output)
        finally:
            output.followers -= 1
            if not output.followers and not output.running and self._jobs.get(job_id) is output:
                del self._jobs[job_id]

    async def _follow(self, output: _Output) -> AsyncIterator[OutputChunk]:
        """Chunks until the job ends, the last carrying it as it ended, or until the
        service closes."""
        attempt = offset = 0
        while not self.closed:
            changed = output.changed
            # A new attempt after one this follower saw is news even without text (the
            # job was retried); the first it sees is not.
            retried = attempt not in (0, output.attempt)
            if output.attempt != attempt:
                attempt, offset = output.attempt, 0
            final = output.final
            if retried or offset < len(output.parts) or final is not None:
                text = "".join(output.parts[offset:])
                offset = len(output.parts)
                yield OutputChunk(text, output.tokens, attempt, final)
                if final is not None:
                    return
                continue
            await changed.wait()
