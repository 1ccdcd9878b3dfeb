"""The client that runs a job on an inference worker: stream it from its completion API.

The API is llama.cpp's llama-server `POST /completion` with `"stream": true`
(server-sent events, one JSON object per `data:` line, the last with
`"stop": true`); the development worker speaks the same.

A worker's URI comes from its pool, so what answers may not be a worker at all
(issue 14): redirects are not followed, and an error says what kind of failure it
was (an HTTP status with its standard phrase, an exception's type) but never carries
the bytes that came back, which end up in `job.error` for the client to read.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import aiohttp

from orchestrator.domain.jobs import JobRecord

# What a job's output may hold: llama-server sends one event per token, plus a final
# one, and a few servers split a token's bytes over two events (EVENT_SLACK covers
# those); no token of any tokenizer we know is longer than a few dozen bytes.
EVENT_SLACK = 8
MAX_BYTES_PER_TOKEN = 128


@dataclass(frozen=True)
class Outcome:
    ok: bool
    output: str = ""
    tokens: int = 0
    error: str = ""
    worker_failed: bool = False  # the worker itself is gone, not just this request


class CompletionClient:
    """One HTTP session for every job the core streams from its workers."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No overall timeout here: the caller bounds each job by its own timeout.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
            )
        return self._session

    async def run(
        self,
        record: JobRecord,
        uri: str,
        timeout_s: float,
        on_first_token: Callable[[], Awaitable[None]],
    ) -> Outcome:
        body = {
            "prompt": record.prompt,
            "n_predict": record.max_tokens,
            "temperature": record.temperature,
            "seed": record.seed if record.seed is not None else -1,
            "stream": True,
        }
        parts: list[str] = []
        tokens = size = 0
        most_bytes = record.max_tokens * MAX_BYTES_PER_TOKEN
        started = False
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session().post(
                    uri + "/completion", json=body, allow_redirects=False
                ) as response:
                    if response.status != 200:
                        return Outcome(False, error=f"worker answered {_status(response.status)}")
                    async for raw in response.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        chunk = _event(line[5:])
                        if not started:
                            started = True
                            await on_first_token()
                        parts.append(chunk.content)
                        size += len(chunk.content.encode())
                        if tokens > record.max_tokens + EVENT_SLACK or size > most_bytes:
                            # A worker that streams past what was asked for, or a peer
                            # posing as one: the core holds no more of it.
                            return Outcome(False, error="the worker sent more than max_tokens")
                        if chunk.stop:
                            if chunk.tokens_predicted >= 0:
                                tokens = chunk.tokens_predicted
                            # The count is the worker's word, and it is charged to the
                            # tenant's daily quota: never more than the job asked for.
                            return Outcome(True, "".join(parts), min(tokens, record.max_tokens))
                        tokens += 1
            return Outcome(False, error="the worker closed the stream before finishing")
        except TimeoutError:
            return Outcome(False, error=f"no result within {timeout_s:.0f} s")
        except aiohttp.ClientConnectorError as exc:
            # The core's own words about the address it was given, nothing the peer sent.
            reason = exc.strerror or "connection failed"
            return Outcome(False, error=f"worker unreachable: {reason}", worker_failed=True)
        except (aiohttp.ClientError, ValueError) as exc:
            # Exception messages may quote what the peer sent: keep only the kind.
            return Outcome(False, error=f"worker failed: {type(exc).__name__}", worker_failed=True)


@dataclass(frozen=True)
class _Event:
    content: str
    stop: bool
    tokens_predicted: int  # -1: not said


def _event(data: bytes) -> _Event:
    """One streamed event; ValueError when it is not llama-server's JSON object."""
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError("an event is not a JSON object")  # noqa: TRY004 - bad stream data
    content = chunk.get("content", "")
    predicted = chunk.get("tokens_predicted", -1)
    if not isinstance(content, str) or type(predicted) is not int:
        raise ValueError("an event's content or tokens_predicted has the wrong type")
    return _Event(content, bool(chunk.get("stop")), predicted)


def _status(code: int) -> str:
    """`404 (Not Found)`: the standard phrase, never the reason line the peer sent."""
    try:
        return f"{code} ({HTTPStatus(code).phrase})"
    except ValueError:
        return str(code)
