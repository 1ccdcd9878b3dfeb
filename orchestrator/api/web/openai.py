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
  the caller's scope), which stops the generation on the worker;
- every error is in OpenAI's shape (errors.py), the same statuses as the rest of the
  HTTP edge; in a stream that has begun, an error is a `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from aiohttp import web

from orchestrator.api.web.common import GATE, ORCHESTRATOR, body, caller
from orchestrator.api.web.errors import openai_error
from orchestrator.domain.errors import (
    DrainingError,
    ErrorCode,
    InvalidRequestError,
    NotFoundError,
    OrchestratorError,
)
from orchestrator.domain.identity import Identity
from orchestrator.domain.jobs import TERMINAL, JobRecord, JobState, SubmitSpec, prompt_tokens
from orchestrator.service.orchestrator import Orchestrator
from orchestrator.support.log import get_logger
from orchestrator.support.tasks import cancel_and_wait

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
INT64_MAX = 2**63 - 1  # the store's integers; a JSON number may be any size
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


class _Interruption(Enum):
    GONE = "the client closed its connection"
    DRAINED = "the service stopped before the job ended"


def add_routes(app: web.Application) -> None:
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
    return "length" if record.tokens_generated >= record.max_tokens else "stop"


def usage(record: JobRecord) -> dict[str, int]:
    """Tokens as the worker counted them; the prompt as bytes / 4 when it did not say."""
    prompt = record.prompt_tokens or prompt_tokens(len(record.prompt.encode()))
    completion = record.tokens_generated
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


async def _complete(request: web.Request, shape: _Shape) -> web.StreamResponse:
    o = request.app[ORCHESTRATOR]
    who = caller(request)
    tenant = who.acting_for(request.headers.get("X-Tenant-Id", ""))
    asked = _read(await body(request), shape, request.headers, o)
    job = await o.submit(dataclasses.replace(asked.spec, tenant_id=tenant))
    scope = who.job_scope()
    headers = {"X-Job-Id": job.id}
    if asked.stream:
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await response.prepare(request)  # the headers leave now, before the first token
        stream = _stream(request, response, o, shape, job, who, include_usage=asked.include_usage)
        outcome = await _unless_interrupted(request, o, stream)
        if outcome is _Interruption.DRAINED:
            with contextlib.suppress(ConnectionError):
                await _event(response, openai_error(
                    _stopping(job), status=503, code=ErrorCode.UNAVAILABLE
                ))  # fmt: skip
        elif outcome is _Interruption.GONE:
            await _abandon(o, job, scope, outcome.value)
        return response
    ended = await _unless_interrupted(request, o, _ended(o, job.id, scope))
    if ended is _Interruption.GONE:
        await _abandon(o, job, scope, ended.value)
        return web.Response(status=204)  # to nobody: the connection is closed
    if ended is _Interruption.DRAINED:
        raise DrainingError(_stopping(job))
    if ended.state == JobState.COMPLETED:
        answer = {**shape.head(ended, chunk=False), "choices": [shape.whole(ended)],
                  "usage": usage(ended)}  # fmt: skip
        return web.json_response(answer, headers=headers)
    status, error = _job_error(ended)
    return web.json_response(error, status=status, headers={**headers, **NO_RETRY})


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    o: Orchestrator,
    shape: _Shape,
    job: JobRecord,
    who: Identity,
    *,
    include_usage: bool,
) -> None:
    """Send the job's text as it arrives, then its end. A write to a client that left
    raises ConnectionError: the job is abandoned."""
    scope = who.job_scope()
    gate = request.app[GATE]
    head = shape.head(job, chunk=True)
    if include_usage:
        head["usage"] = None  # on every chunk but the usage chunk (OpenAI's shape)

    async def send(text: str | None, finish: str | None = None) -> None:
        await _event(response, {**head, "choices": [shape.choice(text, finish)]})

    attempt = 0
    sent = False
    try:
        if shape.chat:  # the role first, as OpenAI sends it: bytes before the first token
            role = {"role": "assistant", "content": ""}
            await _event(response, {**head, "choices": [
                {"index": 0, "delta": role, "logprobs": None, "finish_reason": None}
            ]})  # fmt: skip
        async with contextlib.aclosing(o.stream_output(job.id, tenant=scope)) as chunks:
            async for chunk in chunks:
                if not gate.still_admitted(who):  # a revoked key ends its streams
                    await _event(response, openai_error(
                        "the key this stream was opened with was revoked",
                        status=401, code=ErrorCode.UNAUTHENTICATED,
                    ))  # fmt: skip
                    return
                if sent and chunk.attempt != attempt:
                    # Retried after text went out: the client cannot take it back.
                    await _event(response, openai_error(
                        f"the worker of job {job.id} failed after its output had begun; a "
                        "retry would send other text, so the stream ends and the job is "
                        "cancelled", status=502, code="worker_failed",
                    ))  # fmt: skip
                    await _abandon(o, job, scope, "retried after its output began")
                    return
                attempt = chunk.attempt
                if chunk.text:
                    await send(chunk.text)
                    sent = True
                final = chunk.final
                if final is None:
                    continue
                if final.state != JobState.COMPLETED:
                    await _event(response, _job_error(final)[1])
                    return
                await send(None, finish_reason(final))
                if include_usage:
                    await _event(response, {**head, "choices": [], "usage": usage(final)})
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return
    except ConnectionError:
        await _abandon(o, job, scope, _Interruption.GONE.value)


async def _ended(o: Orchestrator, job_id: str, scope: str | None) -> JobRecord:
    """The job once it has ended (its events, not its text: nothing is streamed)."""
    async with o.subscribe(job_id, tenant=scope) as events:
        record = await o.get(job_id, tenant=scope)
        while record.state not in TERMINAL:
            record = (await events.get()).record
        return record


async def _unless_interrupted(
    request: web.Request, o: Orchestrator, work: Coroutine[Any, Any, T]
) -> T | _Interruption:
    """What `work` returns, or why it was stopped first (and it is cancelled)."""
    task = asyncio.create_task(work)
    watch = asyncio.create_task(_interruption(request, o))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(watch)
        await cancel_and_wait(task)
    if not task.cancelled():
        return task.result()
    return watch.result()


async def _interruption(request: web.Request, o: Orchestrator) -> _Interruption:
    """Returns when the answer cannot wait for its job: the client closed the connection,
    or the service is stopping and its drain bound has passed (a job still in flight then
    stays in the store and runs again after the restart)."""
    loop = asyncio.get_running_loop()
    give_up_at: float | None = None
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return _Interruption.GONE
        if o.draining and give_up_at is None:
            give_up_at = loop.time() + o.config.drain_timeout_s
        if give_up_at is not None and loop.time() >= give_up_at:
            return _Interruption.DRAINED
        await asyncio.sleep(CLIENT_CHECK_S)


async def _abandon(o: Orchestrator, job: JobRecord, scope: str | None, why: str) -> None:
    """Cancel a job whose answer nobody will read."""
    log.info("openai.job_abandoned", job_id=job.id, reason=why)
    with contextlib.suppress(OrchestratorError):  # it ended meanwhile, or the service closed
        await o.cancel(job.id, tenant=scope)


async def _event(response: web.StreamResponse, payload: Mapping[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    await response.write(b"data: " + data.encode() + b"\n\n")


def _job_error(record: JobRecord) -> tuple[int, dict[str, Any]]:
    """A job that ended without completing, as an HTTP status and an OpenAI error."""
    if record.state == JobState.CANCELLED:
        return 409, openai_error(f"job {record.id} was cancelled", status=409, code="cancelled")
    message = f"job {record.id} failed: {record.error or 'no reason given'}"
    return 502, openai_error(message, status=502, code="job_failed")


def _stopping(job: JobRecord) -> str:
    return f"the service is stopping; job {job.id} is kept and runs again after the restart"


# ---------------------------------------------------------------------------- the request
def _read(
    data: dict[str, Any], shape: _Shape, headers: Mapping[str, str], o: Orchestrator
) -> _Asked:
    """The request as a job (its tenant aside), or InvalidRequestError naming the field."""
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
    spec = SubmitSpec(
        model=model,
        prompt=prompt,
        messages=messages,
        max_tokens=_max_tokens(data, shape, o.config.limits.max_tokens),
        priority=_priority(data.get("priority"), headers.get("X-Priority")),
        seed=_integer(data, "seed"),
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=_stop(data.get("stop")),
        session_id=headers.get("X-Session-Id") or user or "",
        request_id=headers.get("X-Request-Id", ""),
    )
    return _Asked(spec, stream, include_usage)


def _check_fields(data: dict[str, Any], shape: _Shape) -> None:
    unknown = sorted(set(data) - shape.fields - set(shape.rules))
    if unknown:
        names = ", ".join(unknown)
        raise InvalidRequestError(
            unknown[0], f"not a field this service takes ({names}); docs/OPENAI.md lists them"
        )
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
    return float(value)


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
