"""The completion client in both dialects (llama.cpp's `/completion`, the OpenAI API),
its health probes, and servers that are not well-behaved workers (issue 14, finding 2:
a worker URI is fetched by the core, and what came back was echoed into `job.error`,
which the tenant reads: an SSRF with the response in hand)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from orchestrator.config.settings import MAX_WORKER_SLOTS
from orchestrator.domain.jobs import JobRecord
from orchestrator.pools.completion import (
    TEMPLATE_TOKENS,
    CompletionClient,
    Outcome,
    WorkerEndpoint,
    probe_health,
    probe_slots,
)
from tests.fakes import record

SECRET = "aws_secret_access_key=AKIA-NOT-FOR-TENANTS"
COMPLETION_PATHS = ("/completion", "/v1/completions", "/v1/chat/completions")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[..., Awaitable[str]]
CHAT = record("j1", prompt="", messages=(("system", "be brief"), ("user", "hi")), seed=5,
              stop=("\n\n", "END"), top_p=0.9)  # fmt: skip


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serves `handler` on loopback at every completion path (or at `paths` for
    `method`); gives its base URI."""
    runners: list[web.AppRunner] = []

    async def start(
        handler: Handler, *, method: str = "POST", paths: tuple[str, ...] = COMPLETION_PATHS
    ) -> str:
        app = web.Application()
        for path in paths:
            app.router.add_route(method, path, handler)
        app.router.add_route("*", "/internal", secret)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def secret(request: web.Request) -> web.Response:
    return web.Response(text=f'data: {{"content": "{SECRET}", "stop": true}}\n\n')


@dataclasses.dataclass
class Recorder:
    """The Progress a job's runner would get: what the client reported, in order."""

    first_tokens: int = 0
    texts: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def first_token(self) -> None:
        self.first_tokens += 1

    def text(self, text: str, tokens: int) -> None:
        self.texts.append((text, tokens))
        self.arrived.set()


async def run(
    uri: str, job: JobRecord | None = None, api: str = "llamacpp", progress: Recorder | None = None
) -> Outcome:
    client = CompletionClient()
    try:
        return await client.run(
            job or record("j1"), WorkerEndpoint(uri, api), 5.0, progress or Recorder()
        )
    finally:
        await client.close()


def sse(*events: object) -> web.Response:
    """A whole stream of `data:` events at once (str as it is, others as JSON)."""
    body = "".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events
    ).encode()
    return web.Response(body=body, content_type="text/event-stream")


def chat_chunk(content: str | None = None, finish: str | None = None, **delta: str) -> object:
    if content is not None:
        delta["content"] = content
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None}  # fmt: skip


def text_chunk(text: str, finish: str | None = None) -> object:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip


def usage(prompt: object, completion: object) -> object:
    return {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": 0}}  # fmt: skip


# ---------------------------------------------------------------------- llama.cpp
async def test_an_error_status_keeps_its_code_and_standard_phrase_only(serve: Serve) -> None:
    async def leaky(request: web.Request) -> web.Response:
        return web.Response(status=500, reason="Oops " + SECRET, text=SECRET)

    uri = await serve(leaky)
    for api in ("llamacpp", "openai"):
        outcome = await run(uri, api=api)
        assert outcome == Outcome(False, error="worker answered 500 (Internal Server Error)")


async def test_redirects_are_not_followed(serve: Serve) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/internal")

    uri = await serve(redirect)
    for api in ("llamacpp", "openai"):
        outcome = await run(uri, api=api)
        assert outcome == Outcome(False, error="worker answered 307 (Temporary Redirect)")


@pytest.mark.parametrize(
    ("api", "body"),
    [
        ("llamacpp", b"data: [1, 2, 3]\n\n"),
        ("llamacpp", b'data: {"content": 42}\n\n'),
        ("llamacpp", b'data: {"content": "x", "stop": true, "tokens_predicted": "many"}\n\n'),
        ("llamacpp", b'data: {"content": "x", "stop": true, "tokens_evaluated": -5}\n\n'),
        ("llamacpp", b"data: " + SECRET.encode() + b"\n\n"),
        ("openai", b"data: " + SECRET.encode() + b"\n\n"),
        ("openai", b'data: {"choices": {"text": "x"}}\n\n'),
        ("openai", b'data: {"choices": ["x"]}\n\n'),
        ("openai", b'data: {"choices": [{"text": 7}]}\n\n'),
        ("openai", b'data: {"choices": [], "usage": "lots"}\n\n'),
        ("openai", b'data: {"choices": [], "usage": {"completion_tokens": "9"}}\n\n'),
        ("openai", b'data: {"choices": [], "usage": {"prompt_tokens": 1.5}}\n\n'),
    ],
)
async def test_a_malformed_stream_fails_the_attempt_without_quoting_it(
    serve: Serve, api: str, body: bytes
) -> None:
    """Before, a JSON value that is not an object raised AttributeError out of the job's
    task (the job stayed dispatched for good), and a parse error quoted the peer."""

    async def odd(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/event-stream")

    outcome = await run(await serve(odd), api=api)
    assert not outcome.ok and outcome.worker_failed
    assert outcome.error in ("worker failed: ValueError", "worker failed: JSONDecodeError")
    assert SECRET not in outcome.error


@pytest.mark.parametrize("api", ["llamacpp", "openai"])
@pytest.mark.parametrize(
    ("body", "error"),
    [
        # One line past aiohttp's limit on a line: LineTooLong, an HttpProcessingError.
        (b"data: " + SECRET.encode() + b"x" * (600 * 1024) + b"\n\n", "LineTooLong"),
        # JSON nested past the parser's recursion limit.
        (b"data: " + b"[" * 100_000 + b"\n\n", "RecursionError"),
    ],
)
async def test_a_stream_that_breaks_the_parsers_fails_the_attempt(
    serve: Serve, api: str, body: bytes, error: str
) -> None:
    """Before, these escaped the client: the job's task died with the job in flight
    and its slot held for good (the runner's own guard: tests/service/test_apply.py)."""

    async def hostile(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        return response

    outcome = await run(await serve(hostile), api=api)
    assert outcome == Outcome(False, error=f"worker failed: {error}", worker_failed=True)


@pytest.mark.parametrize(
    ("final", "tokens", "finish_reason"),
    [
        ({"stop_type": "limit"}, 2, "length"),
        ({"stop_type": "word", "stopping_word": "END"}, 2, "stop"),
        ({"stop_type": "eos"}, 2, "stop"),
        ({"stop_type": "none"}, 2, "stop"),  # not a reason: the counts say
        ({"stop_type": ["limit"]}, 2, "stop"),  # nor is anything but a string
        ({}, 2, "stop"),
        ({"tokens_predicted": 8}, 8, "length"),  # not said, but max_tokens reached
    ],
)
async def test_llamacpps_stop_type_is_the_finish_reason(
    serve: Serve, final: dict[str, Any], tokens: int, finish_reason: str
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return sse({"content": "a"}, {"content": "b"}, {"content": "", "stop": True, **final})

    outcome = await run(await serve(answer))
    assert (outcome.ok, outcome.tokens, outcome.finish_reason) == (True, tokens, finish_reason)


@pytest.mark.parametrize(
    ("reason", "completion_tokens", "finish_reason"),
    [
        ("length", 2, "length"),
        ("stop", 2, "stop"),
        ("abort", 2, "stop"),  # vLLM's, neither of ours: the counts say
        ("abort", 8, "length"),
        (["length"], 2, "stop"),
    ],
)
async def test_openais_finish_reason_is_the_finish_reason(
    serve: Serve, reason: object, completion_tokens: int, finish_reason: str
) -> None:
    async def answer(request: web.Request) -> web.Response:
        finish = {"choices": [{"index": 0, "text": "", "finish_reason": reason}]}
        return sse(text_chunk("a"), text_chunk("b"), finish, usage(1, completion_tokens), "[DONE]")

    outcome = await run(await serve(answer), api="openai")
    assert (outcome.ok, outcome.finish_reason) == (True, finish_reason)


@pytest.mark.parametrize("api", ["llamacpp", "openai"])
async def test_a_worker_cannot_charge_fewer_tokens_than_it_streamed(serve: Serve, api: str) -> None:
    """The tokens are charged to the tenant's daily quota: a worker reporting 1 after
    streaming 5 content events is charged the 5 (each event is one token at least)."""

    async def modest(request: web.Request) -> web.Response:
        if api == "llamacpp":
            events: list[object] = [{"content": c} for c in "abcde"]
            events.append({"content": "", "stop": True, "tokens_predicted": 1})
        else:
            events = [*(text_chunk(c) for c in "abcd"), text_chunk("e", "stop"), usage(1, 1),
                      "[DONE]"]  # fmt: skip
        return sse(*events)

    outcome = await run(await serve(modest), api=api)
    assert (outcome.ok, outcome.output, outcome.tokens) == (True, "abcde", 5)


async def test_a_good_stream_completes_with_the_workers_counts(serve: Serve) -> None:
    sent: list[dict[str, Any]] = []

    async def good(request: web.Request) -> web.Response:
        sent.append(await request.json())
        return sse({"content": "he"}, {"content": "llo"},
                   {"content": "", "stop": True, "tokens_predicted": 2, "tokens_evaluated": 6})  # fmt: skip

    progress = Recorder()
    job = record("j1", stop=("END",), top_p=0.5)
    assert await run(await serve(good), job, progress=progress) == Outcome(
        True, "hello", 2, prompt_tokens=6, finish_reason="stop"
    )
    assert sent == [{"prompt": "prompt of j1", "n_predict": 8, "temperature": 0.0, "top_p": 0.5,
                     "seed": -1, "stream": True, "stop": ["END"]}]  # fmt: skip
    assert progress.first_tokens == 1 and progress.texts == [("he", 1), ("llo", 2)]


async def test_a_chat_goes_to_llamacpp_as_its_rendered_prompt(serve: Serve) -> None:
    sent: list[dict[str, Any]] = []

    async def good(request: web.Request) -> web.Response:
        sent.append(await request.json())
        return sse({"content": "ok", "stop": True})

    assert await run(await serve(good), CHAT) == Outcome(True, "ok", 0, finish_reason="stop")
    assert sent[0]["prompt"] == "system: be brief\nuser: hi\nassistant:"
    assert (sent[0]["seed"], sent[0]["stop"], sent[0]["top_p"]) == (5, ["\n\n", "END"], 0.9)


async def test_an_unreachable_worker_is_named_as_such() -> None:
    for api in ("llamacpp", "openai"):
        outcome = await run("http://127.0.0.1:1", api=api)
        assert outcome.worker_failed and outcome.error.startswith("worker unreachable: ")


@pytest.mark.parametrize(
    ("api", "event"),
    [
        ("llamacpp", b'data: {"content": "x"}\n\n'),
        ("llamacpp", b'data: {"content": "' + b"y" * 4000 + b'"}\n\n'),
        ("openai", b'data: {"choices": [{"text": "x"}]}\n\n'),
        ("openai", b'data: {"choices": [{"text": "' + b"y" * 4000 + b'"}]}\n\n'),
        ("openai", b'data: {"choices": [{"text": ""}]}\n\n'),  # no text, but no end either
    ],
)
async def test_a_worker_streaming_past_max_tokens_is_cut_off(
    serve: Serve, api: str, event: bytes
) -> None:
    """A worker (or a peer posing as one) that streams without end: more events than
    max_tokens allows, or more bytes, fails the attempt instead of filling memory."""

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(10_000):
            await response.write(event)
        return response

    outcome = await run(await serve(endless), api=api)
    assert outcome == Outcome(False, error="the worker sent more than max_tokens")


async def test_a_worker_cannot_charge_more_tokens_than_the_job_asked_for(serve: Serve) -> None:
    """tokens_predicted is the worker's word and is charged to the tenant's daily quota:
    2**63 once overflowed the store and the context (every cycle failed)."""

    async def boastful(request: web.Request) -> web.Response:
        return sse({"content": "x", "stop": True, "tokens_predicted": 2**63,
                    "tokens_evaluated": 2**63})  # fmt: skip

    prompt_bound = len(b"prompt of j1") + TEMPLATE_TOKENS
    assert await run(await serve(boastful)) == Outcome(
        True, "x", record("j1").max_tokens, prompt_tokens=prompt_bound, finish_reason="length"
    )


async def test_a_stream_that_ends_before_its_last_event_fails_the_attempt(serve: Serve) -> None:
    async def cut(request: web.Request) -> web.Response:
        return sse({"content": "x"}) if request.path == "/completion" else sse(text_chunk("x"))

    uri = await serve(cut)
    for api in ("llamacpp", "openai"):
        outcome = await run(uri, api=api)
        assert outcome == Outcome(False, error="the worker closed the stream before finishing")


# ---------------------------------------------------------------------- OpenAI
async def test_a_chat_streams_from_chat_completions_with_usage(serve: Serve) -> None:
    """vLLM's shapes: a role-only first chunk, content deltas, a finish chunk, then the
    usage chunk (no choices) and [DONE]."""
    seen: list[tuple[str, dict[str, Any]]] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append((request.path, await request.json()))
        return sse(chat_chunk("", role="assistant"), chat_chunk("Hel"), chat_chunk("lo"),
                   chat_chunk(finish="stop"), usage(17, 2), "[DONE]")  # fmt: skip

    progress = Recorder()
    outcome = await run(await serve(chat), CHAT, "openai", progress)
    assert outcome == Outcome(True, "Hello", 2, prompt_tokens=17, finish_reason="stop")
    assert progress.first_tokens == 1 and progress.texts == [("Hel", 1), ("lo", 2)]
    ((path, body),) = seen
    assert path == "/v1/chat/completions"
    assert body == {
        "model": "llama-8b",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 8, "temperature": 0.0, "top_p": 0.9, "seed": 5, "stop": ["\n\n", "END"],
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip


async def test_a_prompt_streams_from_completions(serve: Serve) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def completions(request: web.Request) -> web.Response:
        seen.append((request.path, await request.json()))
        return sse(text_chunk("a"), text_chunk("b"), text_chunk("", "length"), usage(3, 8),
                   "[DONE]")  # fmt: skip

    assert await run(await serve(completions), api="openai") == Outcome(
        True, "ab", 8, prompt_tokens=3, finish_reason="length"
    )
    ((path, body),) = seen
    assert path == "/v1/completions"
    assert body == {"model": "llama-8b", "prompt": "prompt of j1", "max_tokens": 8,
                    "temperature": 0.0, "top_p": 1.0, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip


async def test_without_usage_the_content_chunks_are_counted(serve: Serve) -> None:
    """A server that ignores stream_options and sends no [DONE] after its finish_reason
    (the stream just ends): the job still completes, its tokens counted by chunk."""

    async def terse(request: web.Request) -> web.Response:
        return sse(text_chunk("a"), text_chunk("b"), text_chunk("c", "stop"))

    assert await run(await serve(terse), api="openai") == Outcome(
        True, "abc", 3, finish_reason="stop"
    )


async def test_usage_is_the_workers_word_and_is_clamped(serve: Serve) -> None:
    async def boastful(request: web.Request) -> web.Response:
        return sse(chat_chunk("x"), chat_chunk(finish="stop"), usage(2**63, 2**63), "[DONE]")

    outcome = await run(await serve(boastful), CHAT, "openai")
    assert outcome == Outcome(
        True, "x", CHAT.max_tokens, prompt_tokens=len(CHAT.prompt.encode()) + TEMPLATE_TOKENS,
        finish_reason="stop",
    )  # fmt: skip


@pytest.mark.parametrize(
    "error",
    [
        {"error": {"message": SECRET, "type": "BadRequestError", "code": 400}},  # vLLM
        {"object": "error", "message": SECRET, "code": 400},  # older vLLM, SGLang
    ],
)
async def test_an_error_in_the_stream_fails_the_attempt_without_quoting_it(
    serve: Serve, error: object
) -> None:
    async def failing(request: web.Request) -> web.Response:
        return sse(chat_chunk("x"), error, "[DONE]")

    outcome = await run(await serve(failing), CHAT, "openai")
    assert outcome == Outcome(False, error="the worker reported an error in its stream")


# ---------------------------------------------------------------------- cancelling
@pytest.mark.parametrize("api", ["llamacpp", "openai"])
async def test_a_cancelled_job_closes_the_connection_so_the_server_stops(
    serve: Serve, api: str
) -> None:
    """The job's task is cancelled (its client cancelled it, or went away): the server
    sees the connection close, which is what makes llama-server and vLLM abort the
    generation, and stops writing."""
    stopped = asyncio.Event()
    event = b'data: {"content": "x"}\n\n' if api == "llamacpp" else b'data: {"choices": [{"text": "x"}]}\n\n'  # fmt: skip

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for _ in range(10_000):
                await response.write(event)
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            stopped.set()
            raise
        return response

    progress = Recorder()
    job = dataclasses.replace(record("j1"), max_tokens=100_000)
    task = asyncio.create_task(run(await serve(slow), job, api, progress))
    await progress.arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(10):
        await stopped.wait()


# ---------------------------------------------------------------------- probes
async def test_health_is_probed_in_each_dialects_words(serve: Serve) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "data": []})

    async def loading(request: web.Request) -> web.Response:
        return web.json_response({"error": "Loading model"}, status=503)

    llama = await serve(ok, method="GET", paths=("/health",))
    openai = await serve(ok, method="GET", paths=("/v1/models",))
    busy = await serve(loading, method="GET", paths=("/health", "/v1/models"))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        assert await probe_health(session, WorkerEndpoint(llama, "llamacpp"))
        assert not await probe_health(session, WorkerEndpoint(llama, "openai"))  # 404
        assert await probe_health(session, WorkerEndpoint(openai, "openai"))
        for api in ("llamacpp", "openai"):
            assert not await probe_health(session, WorkerEndpoint(busy, api))
            assert not await probe_health(session, WorkerEndpoint("http://127.0.0.1:1", api))


@pytest.mark.parametrize(
    ("props", "slots"),
    [
        ({"total_slots": 4, "chat_template": "x" * 10_000}, 4),
        ({"total_slots": 10**9}, MAX_WORKER_SLOTS),
        ({"total_slots": 0}, None),
        ({"total_slots": "4"}, None),
        ({"total_slots": True}, None),
        ([4], None),
        ({}, None),
        ({"total_slots": 4, "padding": "x" * (2 << 20)}, None),  # past MAX_PROPS_BYTES
    ],
)
async def test_slots_are_read_from_llama_servers_props(
    serve: Serve, props: object, slots: int | None
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(props)

    uri = await serve(answer, method="GET", paths=("/props",))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await probe_slots(session, WorkerEndpoint(uri, "llamacpp")) == slots
        assert await probe_slots(session, WorkerEndpoint(uri, "openai")) is None  # not asked
        assert await probe_slots(session, WorkerEndpoint("http://127.0.0.1:1")) is None


async def test_props_nested_past_the_parsers_limit_say_no_slots(serve: Serve) -> None:
    """A `/props` body nested deep enough for RecursionError in json.loads: no count,
    not an exception out of the worker's health check."""

    async def nested(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 100_000, content_type="application/json")

    uri = await serve(nested, method="GET", paths=("/props",))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        assert await probe_slots(session, WorkerEndpoint(uri, "llamacpp")) is None
