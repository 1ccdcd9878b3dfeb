"""The client that runs a job on an inference worker: stream it from its completion API.

A worker speaks one of two dialects (WORKER_APIS), both streamed as server-sent
events, one JSON object per `data:` line:

- `llamacpp`: llama-server's `POST /completion` with `"stream": true`; the last
  event has `"stop": true`, the counts (`tokens_predicted`, `tokens_evaluated`) and
  why it stopped (`stop_type`).
- `openai`: the OpenAI-compatible `POST /v1/chat/completions` (a job with chat
  messages) or `POST /v1/completions` of vLLM, SGLang, TGI and llama-server, with
  `stream_options.include_usage`: chunks carry `choices[0].delta.content` (chat) or
  `choices[0].text`, then `finish_reason`, then a chunk with `usage` and no choices,
  then `data: [DONE]`.

A worker's URI comes from its pool, so what answers may not be a worker at all
(issue 14): redirects are not followed, a stream is cut off past what the job asked
for, the tokens it reports are held between what it streamed and what the job asked
for, and an error says what kind of failure it was (an HTTP status with its standard
phrase, an exception's type) but never carries the bytes that came back, which end
up in `job.error` for the client to read.

A job's task is cancelled when its client cancels it or goes away: leaving the
response's context before the response's end then closes the connection (aiohttp
pools only a connection whose response was read to its end), and the server stops
generating. A connection whose response ended is kept for the worker's next job, for
IDLE_KEEP_S at most: opening one per job costs the core a connect and a close, and
the worker an accept, for every request.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from orchestrator.config.settings import MAX_WORKER_SLOTS
from orchestrator.domain.jobs import JobRecord, finish_reason_of

# What a job's output may hold: a server sends one event per token, plus a few that
# carry none (OpenAI's role chunk, finish chunk, usage chunk and [DONE]; llama.cpp's
# final event), and some split a token's bytes over two events (EVENT_SLACK covers
# those); no token of any tokenizer we know is longer than a few dozen bytes.
EVENT_SLACK = 8
MAX_BYTES_PER_TOKEN = 128
# The prompt as the worker counts it may exceed its bytes by the chat template's
# tokens (role headers, a default system message): what a worker may report beyond.
TEMPLATE_TOKENS = 256
# GET /props of llama-server carries its chat template and settings: a few KiB.
MAX_PROPS_BYTES = 1 << 20
# The paths that answer 200 once a worker serves (probe_health).
HEALTH_PATHS = {"llamacpp": "/health", "openai": "/v1/models"}
# How long an idle connection to a worker is kept for the next job: well within the
# idle timeouts of the servers (llama-server's and uvicorn's 5 s, aiohttp's 75 s), so
# that the core closes an idle connection before a server would, never sending a job
# on a connection the server is closing.
IDLE_KEEP_S = 1.0
# llama-server's `stop_type` as OpenAI's finish_reason ("none": it did not stop).
LLAMACPP_STOP_TYPES = {"limit": "length", "word": "stop", "eos": "stop"}


@dataclass(frozen=True)
class Outcome:
    ok: bool
    output: str = ""
    tokens: int = 0
    error: str = ""
    worker_failed: bool = False  # the worker itself is gone, not just this request
    prompt_tokens: int = 0  # as the worker counted them; 0 when it did not say
    finish_reason: str = ""  # of a completed job: "length" (max_tokens reached) or "stop"


@dataclass(frozen=True)
class WorkerEndpoint:
    """Where a worker serves, and the dialect it speaks (WORKER_APIS)."""

    uri: str
    api: str = "llamacpp"


class Progress(Protocol):
    """What the client reports while a job streams (service/running.py). Neither call
    may hold the stream up: what they write is the callee's to await."""

    def first_token(self) -> None: ...
    def text(self, text: str, tokens: int) -> None: ...  # new text; tokens so far


class _WorkerRefused(Exception):
    """The worker reported an error inside its stream (an OpenAI `error` object)."""


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
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_KEEP_S),
            )
        return self._session

    async def run(
        self, record: JobRecord, worker: WorkerEndpoint, timeout_s: float, progress: Progress
    ) -> Outcome:
        parse: Callable[[bytes], _Event]
        if worker.api == "openai":
            chat = bool(record.messages)
            path, body = _openai_request(record, chat)
            parse = functools.partial(_openai_event, chat=chat)
        else:
            path, body, parse = "/completion", _llamacpp_request(record), _llamacpp_event
        stream = _Stream(record, progress)
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session().post(
                    worker.uri + path, json=body, allow_redirects=False
                ) as response:
                    if response.status != 200:
                        return Outcome(False, error=f"worker answered {_status(response.status)}")
                    async for raw in response.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue  # SSE comments (keep-alives), event names, blank lines
                        outcome = stream.take(parse(line[5:].strip()))
                        if outcome is not None:
                            return outcome
            return stream.at_end()
        except TimeoutError:
            return Outcome(False, error=f"no result within {timeout_s:.0f} s")
        except _WorkerRefused:
            return Outcome(False, error="the worker reported an error in its stream")
        except aiohttp.ClientConnectorError as exc:
            # The core's own words about the address it was given, nothing the peer sent.
            reason = exc.strerror or "connection failed"
            return Outcome(False, error=f"worker unreachable: {reason}", worker_failed=True)
        except (aiohttp.ClientError, HttpProcessingError, ValueError, RecursionError) as exc:
            # What a broken or hostile peer can raise: bad HTTP (a line past aiohttp's
            # limit is LineTooLong), bad JSON (nested deep enough, RecursionError).
            # Exception messages may quote what the peer sent: keep only the kind.
            return Outcome(False, error=f"worker failed: {type(exc).__name__}", worker_failed=True)


async def probe_health(session: aiohttp.ClientSession, endpoint: WorkerEndpoint) -> bool:
    """Whether the worker serves, in its dialect's words: llama-server's `GET /health`
    answers 200 once its model is loaded (503 before); vLLM, SGLang, TGI and
    llama-server answer `GET /v1/models` once they take requests. The session bounds
    the wait."""
    try:
        async with session.get(
            endpoint.uri + HEALTH_PATHS[endpoint.api], allow_redirects=False
        ) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def probe_slots(session: aiohttp.ClientSession, endpoint: WorkerEndpoint) -> int | None:
    """How many jobs the worker runs at once, as it says: llama-server's `total_slots`
    from `GET /props` (its `--parallel`), at most MAX_WORKER_SLOTS. None when its
    dialect does not say (the OpenAI API has no such field) or the answer is not a
    count: the configured slots stand then."""
    if endpoint.api != "llamacpp":
        return None
    try:
        async with session.get(endpoint.uri + "/props", allow_redirects=False) as response:
            if response.status != 200:
                return None
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > MAX_PROPS_BYTES:
                    return None
        props = json.loads(body)
    except (aiohttp.ClientError, HttpProcessingError, TimeoutError, ValueError, RecursionError):
        return None
    slots = props.get("total_slots") if isinstance(props, dict) else None
    if type(slots) is not int or slots < 1:
        return None
    return min(slots, MAX_WORKER_SLOTS)


def _llamacpp_request(record: JobRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": record.prompt,
        "n_predict": record.max_tokens,
        "temperature": record.temperature,
        "top_p": record.top_p,
        "seed": record.seed if record.seed is not None else -1,
        "stream": True,
    }
    if record.stop:
        body["stop"] = list(record.stop)
    return body


def _openai_request(record: JobRecord, chat: bool) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": record.model_ref}  # what the worker was started to serve
    if chat:
        body["messages"] = json.loads(record.messages)
    else:
        body["prompt"] = record.prompt
    body |= {
        "max_tokens": record.max_tokens,
        "temperature": record.temperature,
        "top_p": record.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if record.seed is not None:
        body["seed"] = record.seed
    if record.stop:
        body["stop"] = list(record.stop)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@dataclass(frozen=True)
class _Event:
    """One streamed event, in either dialect's terms."""

    text: str = ""
    token: bool = False  # it stands for one generated token (the count's lower bound)
    finished: bool = False  # the generation ended (OpenAI's finish_reason): EOF may follow
    done: bool = False  # the stream's last event (llama.cpp's stop, OpenAI's [DONE])
    tokens: int | None = None  # the worker's count of generated tokens, when it says
    prompt_tokens: int | None = None  # the worker's count of prompt tokens, when it says
    finish_reason: str = ""  # "length" or "stop", when the worker says which


@dataclass
class _Stream:
    """What one job's stream has brought so far, and the bounds it is held to."""

    record: JobRecord
    progress: Progress
    parts: list[str] = field(default_factory=list)
    events: int = 0
    counted: int = 0  # events that stood for a token
    size: int = 0
    tokens: int | None = None
    prompt_tokens: int | None = None
    finished: bool = False
    finish_reason: str = ""

    def take(self, event: _Event) -> Outcome | None:
        """The outcome when this event ends the stream, None while it goes on."""
        record = self.record
        self.events += 1
        self.counted += event.token
        self.size += len(event.text.encode())
        if (
            self.events > record.max_tokens + EVENT_SLACK
            or self.size > record.max_tokens * MAX_BYTES_PER_TOKEN
        ):
            # A worker that streams past what was asked for, or a peer posing as
            # one: the core holds no more of it.
            return Outcome(False, error="the worker sent more than max_tokens")
        if event.text:
            if not self.parts:
                self.progress.first_token()
            self.parts.append(event.text)
            self.progress.text(event.text, min(self.counted, record.max_tokens))
        if event.tokens is not None:
            self.tokens = event.tokens
        if event.prompt_tokens is not None:
            self.prompt_tokens = event.prompt_tokens
        self.finished = self.finished or event.finished
        self.finish_reason = event.finish_reason or self.finish_reason
        return self.outcome() if event.done else None

    def at_end(self) -> Outcome:
        """The stream ended without its last event: complete only if the generation
        had (a server that sends no `[DONE]` after its finish_reason)."""
        if self.finished:
            return self.outcome()
        return Outcome(False, error="the worker closed the stream before finishing")

    def outcome(self) -> Outcome:
        # The counts are the worker's word, and the tokens are charged to the tenant's
        # daily quota: never fewer than the tokens it streamed (each content event is
        # one at least), never more than the job asked for, nor a prompt much longer
        # than the one it was sent.
        record = self.record
        tokens = min(max(self.tokens or 0, self.counted), record.max_tokens)
        prompt_tokens = min(self.prompt_tokens or 0, len(record.prompt.encode()) + TEMPLATE_TOKENS)
        return Outcome(
            True,
            "".join(self.parts),
            tokens,
            prompt_tokens=prompt_tokens,
            finish_reason=finish_reason_of(self.finish_reason, tokens, record.max_tokens),
        )


def _llamacpp_event(data: bytes) -> _Event:
    """One llama-server event; ValueError when it is not its JSON object."""
    chunk = _object(data)
    content = chunk.get("content", "")
    if not isinstance(content, str):
        raise ValueError("an event's content is not a string")  # noqa: TRY004 - bad stream data
    stop = bool(chunk.get("stop"))
    if not stop:
        return _Event(content, token=True)
    # Only the last event carries the counts (-1: not said) and why it stopped.
    predicted = _count(chunk.get("tokens_predicted", -1))
    evaluated = _count(chunk.get("tokens_evaluated", -1))
    stop_type = chunk.get("stop_type")
    return _Event(
        content,
        done=True,
        tokens=predicted,
        prompt_tokens=evaluated,
        finish_reason=LLAMACPP_STOP_TYPES.get(stop_type, "") if isinstance(stop_type, str) else "",
    )


def _openai_event(data: bytes, chat: bool) -> _Event:
    """One OpenAI chunk (a chat.completion.chunk, or a text_completion when not
    `chat`), or [DONE]; ValueError when it is neither, _WorkerRefused for an error."""
    if data == b"[DONE]":
        return _Event(done=True)
    chunk = _object(data)
    if "error" in chunk or chunk.get("object") == "error":
        raise _WorkerRefused  # vLLM and SGLang report a failure mid-stream so
    text, finish_reason, finished = "", None, False
    choices = chunk.get("choices") or []  # none in the usage chunk
    if not isinstance(choices, list):
        raise ValueError("a chunk's choices are not a list")  # noqa: TRY004 - bad stream data
    if choices:
        choice = choices[0]
        if not isinstance(choice, dict):
            raise ValueError("a choice is not an object")
        if chat:
            delta = choice.get("delta") or {}  # the first may carry only the role
            if not isinstance(delta, dict):
                raise ValueError("a delta is not an object")
            text = delta.get("content") or ""
        else:
            text = choice.get("text") or ""
        if not isinstance(text, str):
            raise ValueError("a chunk's text is not a string")
        finish_reason = choice.get("finish_reason")
        finished = finish_reason is not None
    usage = chunk.get("usage") or {}  # null in every chunk but the last, if present at all
    if not isinstance(usage, dict):
        raise ValueError("a chunk's usage is not an object")  # noqa: TRY004 - bad stream data
    return _Event(
        text,
        token=bool(text),
        finished=finished,
        tokens=_count(usage.get("completion_tokens")),
        prompt_tokens=_count(usage.get("prompt_tokens")),
        # Any other reason (vLLM's "abort", "tool_calls") is left to the counts to say.
        finish_reason=finish_reason if finish_reason in ("length", "stop") else "",
    )


def _object(data: bytes) -> dict[str, Any]:
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError("an event is not a JSON object")  # noqa: TRY004 - bad stream data
    return chunk


def _count(value: object) -> int | None:
    """A count the worker reported: None when it did not say (absent, null or -1),
    ValueError when it is not a count at all."""
    if value is None or value == -1:
        return None
    if type(value) is not int or value < 0:
        raise ValueError("a count is not a non-negative integer")
    return value


def _status(code: int) -> str:
    """`404 (Not Found)`: the standard phrase, never the reason line the peer sent."""
    try:
        return f"{code} ({HTTPStatus(code).phrase})"
    except ValueError:
        return str(code)
