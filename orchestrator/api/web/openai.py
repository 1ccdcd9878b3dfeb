"""The OpenAI-compatible front door: `POST /v1/chat/completions`, `POST /v1/completions`
and `GET /v1/models`, for ordinary OpenAI clients (docs/OPENAI.md).

The contract:
- every request is a job submitted through `Orchestrator.submit`, as a gRPC Submit is:
  the same validation, admission limits, durability, scheduling and fallback. The
  answer names the job in `X-Job-Id`, and in its `id` ("chatcmpl-" or "cmpl-" + job id);
- the tenant comes from the credential (the guard's caller), never from the body: a
  tenant's key submits as its tenant; an operator's without one, or for the tenant its
  `X-Tenant-Id` header names;
- the priority is the body's `priority` (an extension) or `X-Priority`, "interactive"
  by default; the session is `X-Session-Id`, else `user`; `X-Request-Id` is the
  idempotency key (`request_id`);
- fields are read strictly: each supported field is type-checked, a few harmless ones
  are accepted at the value that asks for nothing and ignored, and anything else is a
  400 that names the field (`_Shape.rules`, the table in docs/OPENAI.md);
- with `stream: true` the answer is server-sent events in OpenAI's chunk shapes, sent
  as the worker produces text. A retry after text was sent cannot be taken back: the
  stream ends with a `worker_failed` error and the job is cancelled. A retry before any
  text is invisible;
- a client that goes away, streaming or not, cancels its job (`Orchestrator.cancel` in
  the caller's scope), which stops the generation on the worker; so does a retry after
  text was sent, and a key revoked while its request waits. Requests that share a job
  (one `X-Request-Id`) are counted: the job is cancelled when the last of them leaves.
  Each such cancel is written to the `audit` log with the caller;
- one caller credential holds at most OPEN_PER_CALLER requests open at once (429);
- when the service closes, its followers end without the job's end: the answer is an
  `unavailable` error, and the job stays in the store for the next start;
- every error is in OpenAI's shape, with its status from errors.py's table; in a stream
  that has begun, an error is a `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from aiohttp import web

from orchestrator.api.web.common import GATE, ORCHESTRATOR, body, caller
from orchestrator.api.web.errors import JobOutcome, openai_error, openai_response
from orchestrator.api.web.guard import audit
from orchestrator.domain.context import INT64_MAX
from orchestrator.domain.errors import (
    ErrorCode,
    InvalidRequestError,
    NotFoundError,
    OrchestratorError,
    RateLimitedError,
)
from orchestrator.domain.identity import Identity
from orchestrator.domain.jobs import JobRecord, JobState, SubmitSpec, finish_reason_of
from orchestrator.service.orchestrator import Orchestrator
from orchestrator.support.holds import Holds
from orchestrator.support.log import get_logger

log = get_logger("openai")
T = TypeVar("T")

# A client of a chat API is usually a person waiting for tokens; batch work says so.
DEFAULT_PRIORITY = "interactive"
# OpenAI's documented default for the legacy completions API.
DEFAULT_COMPLETION_TOKENS = 16
# Chat has no OpenAI default short of the model's context, which this edge cannot size
# (it does not tokenize). A job's max_tokens is also what admission and the scheduler
# count it as, so the default is a modest budget; the answer says "length" when it is hit.
DEFAULT_CHAT_TOKENS = 1024
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (gRPC's is 0: greedy)
# How often a waiting answer looks whether its client is still there: aiohttp does not
# cancel a handler whose client left (handler_cancellation is off, for the admin routes).
CLIENT_CHECK_S = 0.5
# How many completion requests one caller credential may hold open at once. Admission
# bounds the jobs (a tenant's queue share and rates), but not the requests that wait on
# them: those that repeat one X-Request-Id wait on its job without being admitted again.
# Each open request holds a connection, a task and a place among its job's followers,
# a few KB. A gateway that serves many users through one tenant's key legitimately
# holds hundreds of streams: 1,024 leaves it room and bounds one caller to a few MB.
OPEN_PER_CALLER = 1024
# `user` and the id headers, as validate_submit bounds the ids they become.
MAX_ID_CHARS = 256
ID_HEADERS = ("X-Tenant-Id", "X-Session-Id", "X-Request-Id")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# The official client retries 409 and 5xx unless told not to: a job that failed has had
# its retries (the `retry` config), and a cancelled one was cancelled on purpose.
NO_RETRY = {"X-Should-Retry": "false"}

Rule = tuple[Callable[[object], bool], str]  # (the values accepted, why others are refused)


def _one_of(*values: object) -> Callable[[object], bool]:
    """Null, or one of `values` with its JSON type (0 is not false, 1 is not true)."""
    return lambda v: v is None or any(type(v) is type(x) and v == x for x in values)


def _optional_text(value: object) -> bool:
    return value is None or isinstance(value, str)


def _string_map(value: object) -> bool:
    return value is None or (
        isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    )


NOTHING = _one_of()  # only null: a field that asks for what this service does not do
TOOLS = "tool and function calling are not supported"
LOGPROBS = "log probabilities are not supported"
PENALTIES = "presence and frequency penalties are not supported; send 0 or leave them out"
BOTH_RULES: Mapping[str, Rule] = {
    "n": (_one_of(1), "only one choice is supported (n: 1)"),
    "presence_penalty": (_one_of(0, 0.0), PENALTIES),
    "frequency_penalty": (_one_of(0, 0.0), PENALTIES),
    "logit_bias": (_one_of({}), "logit bias is not supported"),
}
CHAT_RULES: Mapping[str, Rule] = {
    **BOTH_RULES,
    "logprobs": (_one_of(False), LOGPROBS),
    "top_logprobs": (NOTHING, LOGPROBS),
    "response_format": (_one_of({"type": "text"}), 'only {"type": "text"} is supported'),
    "modalities": (_one_of(["text"]), 'only text output is supported (["text"])'),
    "tools": (NOTHING, TOOLS),
    "tool_choice": (NOTHING, TOOLS),
    "functions": (NOTHING, TOOLS),
    "function_call": (NOTHING, TOOLS),
    "parallel_tool_calls": (_one_of(True, False), "must be a boolean"),
    "audio": (NOTHING, "audio output is not supported"),
    "store": (_one_of(False), "stored completions are not supported (X-Job-Id names the job)"),
    "metadata": (_string_map, "must be an object of strings"),
    "service_tier": (_one_of("auto", "default"), 'use "priority" (interactive or batch)'),
    "safety_identifier": (_optional_text, "must be a string"),
    "prompt_cache_key": (_optional_text, "must be a string"),
}
TEXT_RULES: Mapping[str, Rule] = {
    **BOTH_RULES,
    "logprobs": (NOTHING, LOGPROBS),
    "echo": (_one_of(False), "echo is not supported"),
    "best_of": (_one_of(1), "best_of other than 1 is not supported"),
    "suffix": (_one_of(""), "suffix (insertion) is not supported"),
}
# Read into the job (`_read`); every other field is checked by the shape's rules.
BOTH_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "user", "priority",
})  # fmt: skip
MESSAGE_FIELDS = frozenset({"role", "content", "name"})  # `name` is accepted and ignored
STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})  # obfuscation: ignored


@dataclass(frozen=True)
class _Shape:
    """What differs between the chat and the text completions API."""

    chat: bool
    fields: frozenset[str]
    rules: Mapping[str, Rule]
    id_prefix: str
    object: str
    chunk_object: str
    default_tokens: int

    def head(self, job: JobRecord, *, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id_prefix + job.id,
            "object": self.chunk_object if chunk else self.object,
            "created": job.created_at // 1000,
            "model": job.model_ref,
        }

    def choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        """A choice of a streamed chunk: new text, or (None) the end."""
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None,
                    "finish_reason": finish_reason}  # fmt: skip
        delta = {"content": text} if text is not None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, record: JobRecord) -> dict[str, Any]:
        """The one choice of an answer that is not streamed."""
        finish = finish_reason(record)
        if not self.chat:
            return {"index": 0, "text": record.output, "logprobs": None, "finish_reason": finish}
        return {
            "index": 0,
            "message": {"role": "assistant", "content": record.output},
            "logprobs": None,
            "finish_reason": finish,
        }


CHAT = _Shape(
    chat=True, fields=BOTH_FIELDS | {"messages", "max_completion_tokens"}, rules=CHAT_RULES,
    id_prefix="chatcmpl-", object="chat.completion", chunk_object="chat.completion.chunk",
    default_tokens=DEFAULT_CHAT_TOKENS,
)  # fmt: skip
TEXT = _Shape(
    chat=False, fields=BOTH_FIELDS | {"prompt"}, rules=TEXT_RULES, id_prefix="cmpl-",
    object="text_completion", chunk_object="text_completion",
    default_tokens=DEFAULT_COMPLETION_TOKENS,
)  # fmt: skip


@dataclass(frozen=True)
class _Asked:
    """A request, read: the job to submit and how to answer."""

    spec: SubmitSpec
    stream: bool
    include_usage: bool


class _End(Enum):
    """Why an answer ended before its job did."""

    GONE = "the client closed its connection"
    RETRIED = "retried after its output had been sent"
    REVOKED = "the key of the request was revoked"
    CLOSED = "the service stopped before the job ended"  # the job is kept for the next start


ABANDONING = frozenset({_End.GONE, _End.RETRIED, _End.REVOKED})  # their jobs are cancelled
REVOKED = "the key this request was made with was revoked"


@dataclass
class _Following:
    """One request's place among the front-door requests that follow a job."""

    followers: Counter[str]
    job_id: str
    left: bool = False

    def __post_init__(self) -> None:
        self.followers[self.job_id] += 1

    def leave(self) -> bool:
        """Stop following (the first call only): whether no other request follows now."""
        if self.left:
            return False
        self.left = True
        self.followers[self.job_id] -= 1
        if self.followers[self.job_id]:
            return False
        del self.followers[self.job_id]
        return True


@dataclass
class _Held:
    """What the open requests hold, in the app's state: how many each caller has open,
    and how many follow each job."""

    by_caller: Holds[Identity] = field(default_factory=Holds)
    by_job: Counter[str] = field(default_factory=Counter)

    @contextlib.contextmanager
    def following(self, job_id: str) -> Iterator[_Following]:
        place = _Following(self.by_job, job_id)
        try:
            yield place
        finally:
            place.leave()


def _too_many_requests(who: Identity) -> RateLimitedError:
    return RateLimitedError(
        f"{who.describe()} has {OPEN_PER_CALLER} requests open already; wait for one to end"
    )


HELD = web.AppKey("openai_held", _Held)


def add_routes(app: web.Application) -> None:
    app[HELD] = _Held()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, TEXT)


async def models(request: web.Request) -> web.Response:
    """Every model of the catalog and every alias, in OpenAI's list shape."""
    o = request.app[ORCHESTRATOR]
    created = o.started_ms // 1000  # the catalog has no dates: when this service began
    names = [*sorted(o.catalog.models), *sorted(o.catalog.aliases)]
    data = [{"id": n, "object": "model", "created": created, "owned_by": "orchestratord"}
            for n in names]  # fmt: skip
    return web.json_response({"object": "list", "data": data})


def finish_reason(record: JobRecord) -> str:
    """As the worker said; from the tokens for a job stored before jobs recorded it."""
    return finish_reason_of(record.finish_reason, record.tokens_generated, record.max_tokens)


def usage(record: JobRecord) -> dict[str, int]:
    """Tokens as the worker counted them; the prompt as bytes / 4 when it did not say."""
    prompt = record.input_tokens
    completion = record.tokens_generated
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


async def _complete(request: web.Request, shape: _Shape) -> web.StreamResponse:
    o = request.app[ORCHESTRATOR]
    who = caller(request)
    held = request.app[HELD]
    with held.by_caller.hold(who, OPEN_PER_CALLER, _too_many_requests):
        ids = _headers(request.headers)
        tenant = who.acting_for(ids["X-Tenant-Id"])
        asked = _read(await body(request), shape, ids, o)
        job = await o.submit(dataclasses.replace(asked.spec, tenant_id=tenant))
        with held.following(job.id) as place:
            headers = {"X-Job-Id": job.id}
            if asked.stream:
                response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
                stream = _stream(request, response, o, shape, job, who, asked.include_usage)
                end = await _unless_gone(request, stream)
                if end in ABANDONING:
                    await _abandon(o, job, who, place, end)
                return response
            ended = await _unless_gone(request, _ended(request, o, job, who))
            if isinstance(ended, _End):
                if ended in ABANDONING:
                    await _abandon(o, job, who, place, ended)
                if ended is _End.REVOKED:
                    return openai_response(REVOKED, ErrorCode.UNAUTHENTICATED, headers=headers)
                if ended is _End.CLOSED:
                    return openai_response(_stopping(job), ErrorCode.UNAVAILABLE, headers=headers)
                return web.Response(status=204)  # to nobody: the connection is closed
            if ended.state == JobState.COMPLETED:
                answer = {**shape.head(ended, chunk=False), "choices": [shape.whole(ended)],
                          "usage": usage(ended)}  # fmt: skip
                return web.json_response(answer, headers=headers)
            outcome, message = _job_error(ended)
            return openai_response(message, outcome, headers={**headers, **NO_RETRY})


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    o: Orchestrator,
    shape: _Shape,
    job: JobRecord,
    who: Identity,
    include_usage: bool,
) -> _End | None:
    """Send the job's text as it arrives, then its end; or why the stream ended first,
    after an error event that says so (none to a client that left)."""
    scope = who.job_scope()
    gate = request.app[GATE]
    head = shape.head(job, chunk=True)
    if include_usage:
        head["usage"] = None  # on every chunk but the usage chunk (OpenAI's shape)

    async def send(text: str | None, finish: str | None = None) -> None:
        await _event(response, {**head, "choices": [shape.choice(text, finish)]})

    sent_under: int | None = None  # the attempt whose text the client has
    try:
        await response.prepare(request)  # the headers leave now, before the first token
        if shape.chat:  # the role first, as OpenAI sends it: bytes before the first token
            role = {"role": "assistant", "content": ""}
            await _event(response, {**head, "choices": [
                {"index": 0, "delta": role, "logprobs": None, "finish_reason": None}
            ]})  # fmt: skip
        async with contextlib.aclosing(o.stream_output(job.id, tenant=scope)) as chunks:
            async for chunk in chunks:
                if not gate.still_admitted(who):  # a revoked key ends its streams
                    await _event(response, openai_error(REVOKED, ErrorCode.UNAUTHENTICATED))
                    return _End.REVOKED
                if sent_under is not None and chunk.attempt != sent_under:
                    # Retried after text went out: the client cannot take it back.
                    await _event(response, openai_error(
                        f"the worker of job {job.id} failed after its output had begun; a "
                        "retry would send other text, so the stream ends and the job is "
                        "cancelled", JobOutcome.WORKER_FAILED,
                    ))  # fmt: skip
                    return _End.RETRIED
                if chunk.text:
                    await send(chunk.text)
                    sent_under = chunk.attempt
                final = chunk.final
                if final is None:
                    continue
                if final.state != JobState.COMPLETED:
                    outcome, message = _job_error(final)
                    await _event(response, openai_error(message, outcome))
                    return None
                await send(None, finish_reason(final))
                if include_usage:
                    await _event(response, {**head, "choices": [], "usage": usage(final)})
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return None
        # The followers ended without the job's end: the service is closing.
        await _event(response, openai_error(_stopping(job), ErrorCode.UNAVAILABLE))
        return _End.CLOSED
    except ConnectionError:
        return _End.GONE


async def _ended(
    request: web.Request, o: Orchestrator, job: JobRecord, who: Identity
) -> JobRecord | _End:
    """The job once it has ended (followed, its text left unread), or why the answer
    cannot wait for that: its key was revoked, or the service closed."""
    gate = request.app[GATE]
    async with contextlib.aclosing(o.stream_output(job.id, tenant=who.job_scope())) as chunks:
        async for chunk in chunks:
            if not gate.still_admitted(who):
                return _End.REVOKED
            if chunk.final is not None:
                return chunk.final
    return _End.CLOSED


async def _unless_gone(request: web.Request, work: Coroutine[Any, Any, T]) -> T | _End:
    """What `work` returns, or GONE if the client closed its connection first (and
    `work` is cancelled): aiohttp does not cancel a handler whose client left. `work`
    runs in this task, and a timer looks at the connection every CLIENT_CHECK_S: a
    task and a sleeping task more per request would cost the event loop more than
    the request does."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None  # a handler runs in a task
    gone = False
    timer: asyncio.TimerHandle

    def look() -> None:
        nonlocal gone, timer
        transport = request.transport
        if transport is None or transport.is_closing():
            gone = True
            me.cancel()
        else:
            timer = loop.call_later(CLIENT_CHECK_S, look)

    timer = loop.call_later(CLIENT_CHECK_S, look)
    try:
        result = await work
    except asyncio.CancelledError:
        if gone and me.uncancel() == 0:  # this timer's cancellation, and no one else's
            return _End.GONE
        raise
    finally:
        timer.cancel()
    if gone:  # `work` ended on its own as the timer cancelled it: its end stands
        me.uncancel()
    return result


async def _abandon(
    o: Orchestrator, job: JobRecord, who: Identity, place: _Following, why: _End
) -> None:
    """Leave a job whose answer this request will not deliver. When no other request
    follows it, cancel it in the caller's scope (which stops the worker), audited."""
    if not place.leave():
        log.info("openai.job_left", job_id=job.id, reason=why.value)  # others still follow it
        return
    outcome: str
    try:
        outcome = (await o.cancel(job.id, tenant=who.job_scope())).state
    except OrchestratorError as exc:  # the service closed meanwhile
        outcome = exc.code
    audit(who, "Cancel", outcome, job_id=job.id, reason=why.value)


async def _event(response: web.StreamResponse, payload: Mapping[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    # A lone surrogate (a worker's "\ud800") becomes that same escape, still valid JSON.
    await response.write(b"data: " + data.encode(errors="backslashreplace") + b"\n\n")


def _job_error(record: JobRecord) -> tuple[JobOutcome, str]:
    """How a job that ended without completing is reported, and the message."""
    if record.state == JobState.CANCELLED:
        return JobOutcome.CANCELLED, f"job {record.id} was cancelled"
    return JobOutcome.JOB_FAILED, f"job {record.id} failed: {record.error or 'no reason given'}"


def _stopping(job: JobRecord) -> str:
    return f"the service is stopping; job {job.id} is kept and runs again after the restart"


# ---------------------------------------------------------------------------- the request
def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a job is made of ("" when absent), or InvalidRequestError naming one.
    aiohttp decodes bytes that are not UTF-8 to lone surrogates, which nothing
    downstream (the store, the log, an answer) could write."""
    read = {}
    for name in (*ID_HEADERS, "X-Priority"):
        value = headers.get(name, "")
        if not _encodable(value):
            raise InvalidRequestError(name, "not UTF-8 text")
        if name in ID_HEADERS and len(value) > MAX_ID_CHARS:
            raise InvalidRequestError(name, f"at most {MAX_ID_CHARS} characters")
        read[name] = value
    return read


def _read(
    data: dict[str, Any], shape: _Shape, headers: Mapping[str, str], o: Orchestrator
) -> _Asked:
    """The request as a job (its tenant aside), or InvalidRequestError naming the field.
    `headers` are those `_headers` read."""
    _check_text(data)
    _check_fields(data, shape)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model", "required: a model of GET /v1/models")
    if o.catalog.get(model) is None:
        raise NotFoundError(f"model {model!r} does not exist here (GET /v1/models lists them)")
    stream = _typed(data, "stream", bool) or False
    options = data.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequestError("stream_options", "only with stream: true")
    include_usage = _stream_options(options)
    messages: tuple[tuple[str, str], ...] = ()
    prompt = ""
    if shape.chat:
        messages = _messages(data.get("messages"))
    else:
        prompt = _prompt(data.get("prompt"))
    temperature = _number(data, "temperature")
    top_p = _number(data, "top_p")
    user = _typed(data, "user", str)
    if user is not None and len(user) > MAX_ID_CHARS:
        raise InvalidRequestError("user", f"at most {MAX_ID_CHARS} characters")
    spec = SubmitSpec(
        model=model,
        prompt=prompt,
        messages=messages,
        max_tokens=_max_tokens(data, shape, o.config.limits.max_tokens),
        priority=_priority(data.get("priority"), headers["X-Priority"]),
        seed=_integer(data, "seed"),
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=_stop(data.get("stop")),
        session_id=headers["X-Session-Id"] or user or "",
        request_id=headers["X-Request-Id"],
    )
    return _Asked(spec, stream, include_usage)


class UnknownFieldError(InvalidRequestError):
    """Fields this service does not take, in a message that reads as a sentence."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names[0], "not a field this service takes")
        verb = "is not a field" if len(names) == 1 else "are not fields"
        self.args = (
            f"{', '.join(names)} {verb} this service takes; docs/OPENAI.md lists the fields",
        )


def _check_text(data: dict[str, Any]) -> None:
    """Every string of the body, field names included, must be encodable as UTF-8:
    JSON's "\\ud800" escapes decode to lone surrogates, which nothing downstream (the
    store, the log, an answer) could write. Iterative: a body may nest deep."""
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                raise InvalidRequestError(where, "not UTF-8 text (a lone surrogate)")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    raise InvalidRequestError(where or "body", "a field name is not UTF-8 text")
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_fields(data: dict[str, Any], shape: _Shape) -> None:
    unknown = sorted(set(data) - shape.fields - set(shape.rules))
    if unknown:
        raise UnknownFieldError(unknown)
    for name, (accepted, why) in shape.rules.items():
        if name in data and not accepted(data[name]):
            raise InvalidRequestError(name, why)


def _typed(data: Mapping[str, Any], name: str, kind: type[T]) -> T | None:
    value = data.get(name)
    if value is None:
        return None
    if type(value) is not kind:  # bool is an int in Python, not in JSON
        raise InvalidRequestError(name, f"must be a {_JSON_TYPE[kind]}")
    return value


_JSON_TYPE: Mapping[type, str] = {bool: "boolean", str: "string", int: "integer"}


def _integer(data: Mapping[str, Any], name: str) -> int | None:
    value = _typed(data, name, int)
    if value is not None and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise InvalidRequestError(name, "out of range (a 64-bit integer)")
    return value


def _number(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise InvalidRequestError(name, "must be a number")
    try:
        number = float(value)  # an integer of 400 digits does not fit
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):  # also 1e400, and the NaN and Infinity Python's JSON reads
        raise InvalidRequestError(name, "out of range")
    return number


def _max_tokens(data: Mapping[str, Any], shape: _Shape, limit: int) -> int:
    asked = _integer(data, "max_tokens")
    if shape.chat:
        newer = _integer(data, "max_completion_tokens")
        if asked is not None and newer is not None and asked != newer:
            raise InvalidRequestError(
                "max_completion_tokens", "differs from max_tokens: send one of them"
            )
        asked = newer if newer is not None else asked
    return asked if asked is not None else min(shape.default_tokens, limit)


def _priority(field: object, header: str | None) -> str:
    if field is not None and not isinstance(field, str):
        raise InvalidRequestError(
            "priority",
            'must be "interactive" or "batch" (this service\'s classes; an integer '
            "priority, as vLLM takes, is not supported)",
        )
    if field and header and field != header:
        raise InvalidRequestError("priority", f"{field!r} differs from X-Priority {header!r}")
    return field or header or DEFAULT_PRIORITY


def _stream_options(options: object) -> bool:
    """Whether the stream ends with a usage chunk."""
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options", "must be an object")
    unknown = sorted(set(options) - STREAM_OPTIONS)
    if unknown:
        raise InvalidRequestError(f"stream_options.{unknown[0]}", "not supported")
    return _typed(options, "include_usage", bool) or False


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise InvalidRequestError("stop", "must be a string or a list of strings")


def _prompt(value: object) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise InvalidRequestError(
            "prompt",
            "required: a string, or a list of one string (token ids and several prompts "
            "are not supported)",
        )
    return value


def _messages(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages", "required: a non-empty list of messages")
    read = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(where, "must be an object with a role and a content")
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            raise InvalidRequestError(
                f"{where}.{unknown[0]}", "not supported (tool calls, audio and refusals are not)"
            )
        role = _typed(message, "role", str)
        if role is None:
            raise InvalidRequestError(f"{where}.role", "required")
        _typed(message, "name", str)
        read.append((role, _content(message.get("content"), f"{where}.content")))
    return tuple(read)


def _content(value: object, where: str) -> str:
    """A message's text: a string, or text parts joined by newlines."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequestError(where, "required: a string or a list of text parts")
    texts = []
    for index, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else None
            raise InvalidRequestError(
                f"{where}[{index}]", f"only text parts are supported, not {kind!r}"
            )
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise InvalidRequestError(f"{where}[{index}]", 'must be {"type": "text", "text": str}')
        texts.append(part["text"])
    return "\n".join(texts)
