"""`orchestratord job submit --wait` on a terminal: the worker's text is shown, its
control characters are not obeyed (a hostile worker could otherwise send escape
sequences to an operator's terminal: retitle it, rewrite what it shows, write the
clipboard)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.cli.jobs import _stream, terminal_safe

HOSTILE = "ok\x1b]0;pwned\x07\x1b[2J\r\x9b31m\x7f\tend\n"


def test_control_characters_but_newline_and_tab_are_escaped() -> None:
    assert terminal_safe(HOSTILE) == "ok\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x9b31m\\x7f\tend\n"
    assert terminal_safe("plain text, ünïcödé and emoji 🙂\n") == (
        "plain text, ünïcödé and emoji 🙂\n"
    )


class FakeJobs:
    """JobService's StreamOutput: the chunks a test gives, then the job as it ended."""

    def __init__(self, *texts: str) -> None:
        self.texts = texts

    async def StreamOutput(self, request: pb.GetJobRequest) -> AsyncIterator[pb.OutputChunk]:
        for text in self.texts:
            yield pb.OutputChunk(text=text, attempt=1)
        job = pb.JobInfo(id=request.job_id, state=pb.JOB_STATE_COMPLETED, tokens_generated=2)
        yield pb.OutputChunk(attempt=1, job=job)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stdout", "shown"),
    [
        (Terminal(), terminal_safe(HOSTILE)),
        (io.StringIO(), HOSTILE),  # piped: the text as it came, for scripts
    ],
)
async def test_submit_wait_escapes_the_workers_text_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch, stdout: io.StringIO, shown: str
) -> None:
    monkeypatch.setattr("sys.stdout", stdout)
    jobs: Any = FakeJobs(HOSTILE[:8], HOSTILE[8:])
    assert await _stream(jobs, "job-1") == 0
    assert stdout.getvalue() == shown
