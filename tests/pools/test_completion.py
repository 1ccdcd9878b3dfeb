"""The completion client against servers that are not well-behaved workers (issue 14,
finding 2: a worker URI is fetched by the core, and what came back was echoed into
`job.error`, which the tenant reads: an SSRF with the response in hand)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from orchestrator.pools.completion import CompletionClient, Outcome
from tests.fakes import record

SECRET = "aws_secret_access_key=AKIA-NOT-FOR-TENANTS"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serves one handler at /completion on loopback; gives its base URI."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/completion", handler)
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


async def run(uri: str) -> Outcome:
    client = CompletionClient()
    try:
        return await client.run(record("j1"), uri, 5.0, _no_op)
    finally:
        await client.close()


async def _no_op() -> None:
    return None


async def test_an_error_status_keeps_its_code_and_standard_phrase_only(serve: Serve) -> None:
    async def leaky(request: web.Request) -> web.Response:
        return web.Response(status=500, reason="Oops " + SECRET, text=SECRET)

    outcome = await run(await serve(leaky))
    assert outcome == Outcome(False, error="worker answered 500 (Internal Server Error)")


async def test_redirects_are_not_followed(serve: Serve) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/internal")

    outcome = await run(await serve(redirect))
    assert outcome == Outcome(False, error="worker answered 307 (Temporary Redirect)")
    assert SECRET not in outcome.output


@pytest.mark.parametrize(
    "body",
    [
        b"data: [1, 2, 3]\n\n",
        b'data: {"content": 42}\n\n',
        b'data: {"content": "x", "stop": true, "tokens_predicted": "many"}\n\n',
        b"data: " + SECRET.encode() + b"\n\n",
    ],
)
async def test_a_malformed_stream_fails_the_attempt_without_quoting_it(
    serve: Serve, body: bytes
) -> None:
    """Before, a JSON value that is not an object raised AttributeError out of the job's
    task (the job stayed dispatched for good), and a parse error quoted the peer."""

    async def odd(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/event-stream")

    outcome = await run(await serve(odd))
    assert not outcome.ok and outcome.worker_failed
    assert outcome.error in ("worker failed: ValueError", "worker failed: JSONDecodeError")
    assert SECRET not in outcome.error


async def test_a_good_stream_still_completes(serve: Serve) -> None:
    async def good(request: web.Request) -> web.Response:
        events = [b'data: {"content": "he"}\n\n',
                  b'data: {"content": "llo", "stop": true, "tokens_predicted": 2}\n\n']  # fmt: skip
        return web.Response(body=b"".join(events), content_type="text/event-stream")

    assert await run(await serve(good)) == Outcome(True, "hello", 2)


async def test_an_unreachable_worker_is_named_as_such() -> None:
    outcome = await run("http://127.0.0.1:1")
    assert outcome.worker_failed and outcome.error.startswith("worker unreachable: ")


@pytest.mark.parametrize("event", [b'data: {"content": "x"}\n\n',
                                   b'data: {"content": "' + b"y" * 4000 + b'"}\n\n'])  # fmt: skip
async def test_a_worker_streaming_past_max_tokens_is_cut_off(serve: Serve, event: bytes) -> None:
    """A worker (or a peer posing as one) that streams without end: more events than
    max_tokens allows, or more bytes, fails the attempt instead of filling memory."""

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(10_000):
            await response.write(event)
        return response

    outcome = await run(await serve(endless))
    assert outcome == Outcome(False, error="the worker sent more than max_tokens")


async def test_a_worker_cannot_charge_more_tokens_than_the_job_asked_for(serve: Serve) -> None:
    """tokens_predicted is the worker's word and is charged to the tenant's daily quota:
    2**63 once overflowed the store and the context (every cycle failed)."""

    async def boastful(request: web.Request) -> web.Response:
        body = f'data: {{"content": "x", "stop": true, "tokens_predicted": {2**63}}}\n\n'
        return web.Response(body=body.encode(), content_type="text/event-stream")

    assert await run(await serve(boastful)) == Outcome(True, "x", record("j1").max_tokens)
