"""The OpenAI-compatible front door, driven by the official `openai` client.

The service tests run the real service with real development workers, in both worker
dialects (llama.cpp's `/completion`, and OpenAI's with 4 slots per worker), with and
without keys. The tests at the end run the routes on a scripted front, to play what
happens to a real service only by accident: a retry after text was sent, a job that
fails, the service stopping under a stream, a key revoked under one, many requests of
one caller, and bad bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.api.authn import Gatekeeper
from orchestrator.api.web import openai as front_door
from orchestrator.api.web.app import MAX_BODY, make_app
from orchestrator.config.credentials import Credentials, credentials_from, token_hash
from orchestrator.config.settings import ApiKey
from orchestrator.domain.errors import NotFoundError
from orchestrator.domain.jobs import JobRecord, JobState, SubmitSpec
from orchestrator.service.events import JobEvent
from orchestrator.service.outputs import JobOutputs, OutputChunk
from tests.fakes import CATALOG, CONFIG, MODEL, record
from tests.service_helpers import OPERATOR_KEY, OPERATOR_TOKEN, Running, running_service
from tests.service_helpers import write_config as service_config

CHAT = [{"role": "user", "content": "hello"}]
JSON = {"Content-Type": "application/json"}
ACME, GLOBEX, POOL = "orch_acme-key", "orch_globex-key", "orch_pool-key"
KEYS = [
    OPERATOR_KEY,
    {"name": "acme-app", "role": "tenant", "tenant": "acme", "sha256": token_hash(ACME)},
    {"name": "globex-app", "role": "tenant", "tenant": "globex", "sha256": token_hash(GLOBEX)},
    {"name": "pool-a", "role": "pool", "pools": ["pool-a"], "sha256": token_hash(POOL)},
]
# The OpenAI dialect with batched workers; the llama.cpp one as configured by default.
OPENAI_WORKERS = {"local_pool": {"worker": {"api": "openai", "slots": 4}}}


def client(svc: Running, key: str = "any key: make run has none") -> openai.AsyncOpenAI:
    # No retries of the client's own: each call here is exactly one request.
    return openai.AsyncOpenAI(base_url=f"{svc.http}/v1", api_key=key, max_retries=0)


def job_id(completion_id: str) -> str:
    return completion_id.split("-", 1)[1]  # "chatcmpl-job-..." or "cmpl-job-..."


async def job_of(svc: Running, completion_id: str) -> pb.JobInfo:
    reply: pb.JobInfo = await svc.jobs.Get(pb.GetJobRequest(job_id=job_id(completion_id)))
    return reply


# ------------------------------------------------------------------ the real service
@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "dialect"),
    [({}, ("llamacpp", 1)), (OPENAI_WORKERS, ("openai", 4))],
    ids=["llamacpp", "openai-4-slots"],
)
async def test_chat_and_completions_streamed_and_not(
    tmp_path: Path, workers: dict[str, Any], dialect: tuple[str, int]
) -> None:
    async with running_service(service_config(tmp_path, **workers)) as svc:
        api = client(svc)
        chat = await api.chat.completions.create(model="llama-8b", messages=CHAT, max_tokens=6)
        (choice,) = chat.choices
        assert chat.id.startswith("chatcmpl-job-") and chat.object == "chat.completion"
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason == "length"  # the dev worker always writes max_tokens
        assert chat.usage is not None and chat.usage.completion_tokens == 6
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + 6
        job = await job_of(svc, chat.id)
        assert job.state == pb.JOB_STATE_COMPLETED and job.output == choice.message.content
        assert job.model_ref == chat.model and job.priority == "interactive"
        pool = svc.server.orchestrator.local_pool
        assert pool is not None  # the worker it ran on speaks the dialect, with its slots
        assert [(w.api, w.slots) for w in pool.processes() if w.id == job.worker_id] == [dialect]

        text = await api.completions.create(model="llama-8b", prompt="once upon", max_tokens=5)
        assert text.object == "text_completion" and text.choices[0].text
        assert (await job_of(svc, text.id)).output == text.choices[0].text

        pieces: list[str] = []
        finishes: list[str | None] = []
        usage = None
        stream = await api.chat.completions.create(
            model="llama-8b", messages=CHAT, max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage is not None:
                usage = chunk.usage
                assert chunk.choices == []
                continue
            pieces.append(chunk.choices[0].delta.content or "")
            finishes.append(chunk.choices[0].finish_reason)
        assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
        assert usage is not None and usage.completion_tokens == 8
        job = await job_of(svc, chunk.id)
        assert "".join(pieces) == job.output and job.tokens_generated == 8

        stream_text = await api.completions.create(
            model="llama-8b", prompt="once upon", max_tokens=5, stream=True
        )
        streamed = [c async for c in stream_text]
        assert streamed[-1].choices[0].finish_reason == "length"
        job = await job_of(svc, streamed[-1].id)
        assert "".join(c.choices[0].text for c in streamed) == job.output


@pytest.mark.slow
async def test_a_client_that_goes_away_cancels_its_job(tmp_path: Path) -> None:
    """Closing a stream after its first chunk, or a connection before the answer, cancels
    the job: its worker stops generating."""
    async with running_service(service_config(tmp_path, **OPENAI_WORKERS)) as svc:
        long = 20_000  # 40 s at the test worker's 500 tokens a second: still running
        stream = await client(svc).chat.completions.create(
            model="llama-8b", messages=CHAT, max_tokens=long, stream=True
        )
        async for chunk in stream:
            if chunk.choices[0].delta.content:
                break
        await stream.close()
        done = await svc.wait_finished(job_id(chunk.id))
        assert done.state == pb.JOB_STATE_CANCELLED

        body = {"model": "llama-8b", "prompt": "hi", "max_tokens": long}
        async with aiohttp.ClientSession() as http:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    await http.post(
                        f"{svc.http}/v1/completions", json=body, headers={"X-Request-Id": "r-1"}
                    )
        # The same request_id names the same job (idempotency), whichever door it took.
        same = await svc.submit(prompt="hi", max_tokens=long, request_id="r-1")
        assert (await svc.wait_finished(same.id)).state == pb.JOB_STATE_CANCELLED


@pytest.mark.slow
async def test_the_tenant_comes_from_the_key_and_the_priority_from_the_request(
    tmp_path: Path,
) -> None:
    config = service_config(
        tmp_path, auth={"keys": KEYS}, tenants={"acme": {}, "globex": {}}
    )  # fmt: skip
    async with running_service(config) as svc:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client(svc, "orch_wrong").models.list()
        assert refused.value.body["type"] == "authentication_error"  # type: ignore[index]
        with pytest.raises(openai.PermissionDeniedError):
            await client(svc, POOL).models.list()

        acme = client(svc, ACME)
        chat = await acme.chat.completions.create(
            model="llama-8b", messages=CHAT, max_tokens=2, user="alice"
        )
        job = await job_of(svc, chat.id)
        assert (job.tenant_id, job.session_id, job.priority) == ("acme", "alice", "interactive")
        with pytest.raises(openai.PermissionDeniedError):  # another tenant's id: refused
            await acme.completions.create(
                model="llama-8b", prompt="x", max_tokens=2, extra_headers={"X-Tenant-Id": "globex"}
            )

        operator = client(svc, OPERATOR_TOKEN)
        text = await operator.completions.create(
            model="llama-8b", prompt="x", max_tokens=2,
            extra_headers={"X-Tenant-Id": "globex", "X-Priority": "batch", "X-Session-Id": "s-9"},
        )  # fmt: skip
        job = await job_of(svc, text.id)
        assert (job.tenant_id, job.session_id, job.priority) == ("globex", "s-9", "batch")
        raw = await operator.chat.completions.with_raw_response.create(
            model="llama-8b", messages=CHAT, max_tokens=2, extra_body={"priority": "batch"}
        )
        job = await svc.jobs.Get(pb.GetJobRequest(job_id=raw.headers["X-Job-Id"]))
        assert (job.tenant_id, job.priority) == ("", "batch")
        assert job_id(raw.parse().id) == job.id


@pytest.mark.slow
async def test_refusals_name_the_field(tmp_path: Path) -> None:
    async with running_service(service_config(tmp_path)) as svc:
        api = client(svc)
        listed = {m.id for m in (await api.models.list()).data}
        catalog = svc.server.orchestrator.catalog
        assert listed == {*catalog.models, *catalog.aliases}
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"n": 2}, "n"),
            ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
            ({"tool_choice": "auto"}, "tool_choice"),
            ({"logprobs": True}, "logprobs"),
            ({"top_logprobs": 2}, "top_logprobs"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"logit_bias": {"42": 5}}, "logit_bias"),
            ({"presence_penalty": 0.5}, "presence_penalty"),
            ({"extra_body": {"top_k": 5}}, "top_k"),  # vLLM's; unknown here
            ({"extra_body": {"priority": 10}}, "priority"),  # vLLM's integer priority
            ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
            ({"max_tokens": 0}, "max_tokens"),
            ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
            ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
             "messages[0].tool_call_id"),
            ({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
             "messages[0].content[0]"),
        ]  # fmt: skip
        for fields, param in refusals:
            request = {"model": "llama-8b", "messages": CHAT, "max_tokens": 4, **fields}
            with pytest.raises(openai.BadRequestError) as refused:
                await api.chat.completions.create(**request)
            assert refused.value.param == param, fields
            assert refused.value.type == "invalid_request_error"
        for fields, param in [
            ({"echo": True}, "echo"),
            ({"best_of": 3}, "best_of"),
            ({"suffix": "end"}, "suffix"),
            ({"logprobs": 2}, "logprobs"),
            ({"prompt": [1, 2, 3]}, "prompt"),
            ({"prompt": ["one", "two"]}, "prompt"),
        ]:
            with pytest.raises(openai.BadRequestError) as refused:
                await api.completions.create(
                    **{"model": "llama-8b", "prompt": "x", "max_tokens": 4, **fields}
                )
            assert refused.value.param == param, fields
        with pytest.raises(openai.NotFoundError):
            await api.chat.completions.create(model="gpt-4o", messages=CHAT)
        # Harmless fields at their neutral values are accepted (and ignored).
        chat = await api.chat.completions.create(
            model="llama-8b", messages=[{"role": "system", "content": [
                {"type": "text", "text": "be brief"}]}, *CHAT],
            max_completion_tokens=2, n=1, presence_penalty=0, frequency_penalty=0,
            logprobs=False, response_format={"type": "text"}, store=False,
            metadata={"run": "test"}, seed=7, temperature=0, top_p=0.9, stop="\n\n",
        )  # fmt: skip
        job = await job_of(svc, chat.id)
        assert (job.max_tokens, job.seed, job.temperature, list(job.stop)) == (2, 7, 0.0, ["\n\n"])
        assert job.top_p == pytest.approx(0.9)

        async with aiohttp.ClientSession() as http:
            url = f"{svc.http}/v1/chat/completions"
            huge = {"model": "llama-8b", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
            async with http.post(url, json=huge) as response:
                assert response.status == 413
                assert (await response.json())["error"]["type"] == "invalid_request_error"
            async with http.post(url, data="model=llama-8b") as response:  # a form: refused
                error = (await response.json())["error"]
                assert response.status == 415 and error["message"] == "send application/json"
            async with http.post(url, data="[" * 100_000, headers=JSON) as response:
                assert response.status == 400
            async with http.get(f"{svc.http}/v1/nowhere") as response:
                assert response.status == 404 and "error" in await response.json()


# ------------------------------------------------------------------ a scripted front
class ScriptedFront:
    """What the routes call of the Orchestrator, playing `chunks` as the job's output, or
    following a real `JobOutputs` that a test drives."""

    def __init__(self, *chunks: OutputChunk, outputs: JobOutputs | None = None) -> None:
        self.chunks = chunks
        self.outputs = outputs
        self.config = CONFIG
        self.catalog = CATALOG
        self.started_ms = 0
        self.submitted: list[SubmitSpec] = []
        self.cancelled: list[str] = []

    async def submit(self, spec: SubmitSpec) -> JobRecord:
        self.submitted.append(spec)
        return record("job-1", **{**dataclasses.asdict(spec), "model": MODEL})

    async def stream_output(
        self, job_id: str, *, tenant: str | None = None
    ) -> AsyncIterator[OutputChunk]:
        if self.outputs is not None:
            with self.outputs.subscribe(job_id) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        for chunk in self.chunks:
            await asyncio.sleep(0)
            yield chunk
        if not self.chunks or self.chunks[-1].final is None:
            await asyncio.Event().wait()  # a job that does not end

    async def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        final = self.chunks[-1].final
        if final is None:
            raise NotFoundError(job_id)
        return final

    @contextlib.asynccontextmanager
    async def subscribe(
        self, job_id: str | None, *, tenant: str | None = None
    ) -> AsyncIterator[asyncio.Queue[JobEvent]]:
        yield asyncio.Queue()

    async def cancel(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        self.cancelled.append(job_id)
        return ended(JobState.CANCELLED)


def ended(
    state: JobState, output: str = "", tokens: int = 0, error: str = "", finish: str = ""
) -> JobRecord:
    return dataclasses.replace(
        record("job-1"), state=state, output=output, tokens_generated=tokens, error=error,
        finish_reason=finish,
    )  # fmt: skip


class Keys:
    """A credential store whose keys a test replaces (config/credentials.py's, without
    its file)."""

    def __init__(self, *keys: ApiKey) -> None:
        self.current = credentials_from(keys, "test")

    def get(self) -> Credentials:
        return self.current


ACME_KEY = ApiKey("acme-app", "tenant", token_hash(ACME), tenant="acme")
GLOBEX_KEY = ApiKey("globex-app", "tenant", token_hash(GLOBEX), tenant="globex")


class Server(TestServer):
    """A test server that, like the service's (api/server.py), lets a handler run on when
    its client leaves: aiohttp's test server cancels it, the service's does not."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **{**kwargs, "handler_cancellation": False})


@contextlib.asynccontextmanager
async def scripted(
    front: ScriptedFront, keys: Keys | None = None, *, retries: int = 2, key: str = "unused"
) -> AsyncIterator[openai.AsyncOpenAI]:
    gate = Gatekeeper(keys, CollectorRegistry())  # type: ignore[arg-type]
    app = make_app(front, gate)  # type: ignore[arg-type]
    async with (
        Server(app, host="127.0.0.1") as server,
        openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")), api_key=key, max_retries=retries
        ) as api,
    ):
        yield api


async def read_stream(api: openai.AsyncOpenAI) -> str:
    stream = await api.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, stream=True
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream])


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def streaming_with_text(
    api: openai.AsyncOpenAI, outputs: JobOutputs, text: str
) -> AsyncIterator[Any]:
    """A chat stream of the scripted job-1, read past its role chunk and a first piece
    of `text` the job's output sent; what comes next is the test's."""
    stream = await api.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, stream=True
    )
    chunks = aiter(stream)
    await anext(chunks)  # the role
    outputs.append("job-1", text, 1)
    assert (await anext(chunks)).choices[0].delta.content == text
    return chunks


def audited(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "audit"]


async def test_a_retry_before_any_text_is_invisible() -> None:
    front = ScriptedFront(
        OutputChunk("", 0, 1),
        OutputChunk("again ", 1, 2),
        OutputChunk("and done", 2, 2, ended(JobState.COMPLETED, "again and done", 2)),
    )
    async with scripted(front) as api:
        assert await read_stream(api) == "again and done"
    assert front.cancelled == [] and front.submitted[0].priority == "interactive"


async def test_a_retry_after_text_was_sent_ends_the_stream_and_the_job_at_once() -> None:
    """The retry is heard as the job goes back to the queue (an empty chunk of the next
    attempt), not at the next attempt's first token, which here never comes."""
    front = ScriptedFront(OutputChunk("first ", 1, 1), OutputChunk("", 0, 2))
    async with scripted(front) as api:
        with capture_logs() as logs:
            with pytest.raises(openai.APIError) as failed:
                await read_stream(api)
            await until(lambda: bool(audited(logs)))
    assert failed.value.code == "worker_failed"
    assert front.cancelled == ["job-1"]
    (line,) = audited(logs)
    assert (line["action"], line["outcome"], line["job_id"]) == ("Cancel", "cancelled", "job-1")
    assert line["caller"] == "local (operator)" and "retried" in line["reason"]

    outputs = JobOutputs()  # the same with the service's outputs: the job goes back to the queue
    front = ScriptedFront(outputs=outputs)
    async with scripted(front) as api:
        outputs.begin("job-1", 1)
        chunks = await streaming_with_text(api, outputs, "first ")
        outputs.end(dataclasses.replace(record("job-1"), attempts=1))  # queued: a retry
        with pytest.raises(openai.APIError) as failed:
            await anext(chunks)
        assert failed.value.code == "worker_failed"
        await until(lambda: front.cancelled == ["job-1"])


async def test_a_failed_job_is_an_error_the_client_does_not_retry() -> None:
    front = ScriptedFront(OutputChunk("", 0, 3, ended(JobState.FAILED, error="worker died")))
    async with scripted(front) as api:
        with pytest.raises(openai.APIStatusError) as failed:
            await api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
        assert failed.value.status_code == 502 and failed.value.code == "job_failed"
        assert "worker died" in failed.value.message
        assert len(front.submitted) == 1  # X-Should-Retry: false, though it may retry 5xx
        with pytest.raises(openai.APIError) as streamed:
            await read_stream(api)
        assert streamed.value.code == "job_failed"
    front = ScriptedFront(OutputChunk("", 0, 1, ended(JobState.CANCELLED)))
    async with scripted(front) as api:
        with pytest.raises(openai.APIStatusError) as cancelled:
            await api.completions.create(model=MODEL, prompt="x", max_tokens=8)
        assert cancelled.value.status_code == 409 and cancelled.value.code == "cancelled"


async def test_the_finish_reason_is_the_workers_and_the_first_chunk_the_role() -> None:
    """The worker's word wins over the token count: a stop sequence can end a job on its
    last allowed token. Without one (a job that ended before workers said), the count."""
    for finish, expected in (("stop", "stop"), ("", "length")):
        done = ended(JobState.COMPLETED, "ab", tokens=8, finish=finish)  # max_tokens is 8
        front = ScriptedFront(OutputChunk("ab", 8, 1, done))
        async with scripted(front) as api:
            chat = await api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
            assert chat.choices[0].finish_reason == expected
            stream = await api.completions.create(
                model=MODEL, prompt="x", max_tokens=8, stream=True
            )
            assert [c.choices[0].finish_reason async for c in stream][-1] == expected
            async with aiohttp.ClientSession() as http:
                url = f"{api.base_url}chat/completions"
                asked = {"model": MODEL, "messages": CHAT, "stream": True}
                async with http.post(url, json=asked) as response:
                    first = json.loads((await response.content.readline()).removeprefix(b"data: "))
                    await response.read()
            assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


async def test_a_stream_ends_with_an_error_when_the_service_closes() -> None:
    """`JobOutputs.close()` ends every follower without the job's end: a stream then
    says `unavailable` (not a silent end, which a client would take for a cut), and an
    answer not streamed is a 503. The job is not cancelled: it runs after the restart."""
    outputs = JobOutputs()
    front = ScriptedFront(outputs=outputs)
    async with scripted(front, retries=0) as api:
        outputs.begin("job-1", 1)
        waiting = asyncio.create_task(api.completions.create(model=MODEL, prompt="x", max_tokens=8))
        chunks = await streaming_with_text(api, outputs, "some ")
        outputs.close()
        with pytest.raises(openai.APIError) as stopped:
            await anext(chunks)
        assert stopped.value.code == "unavailable"
        assert "runs again after the restart" in str(stopped.value)
        with pytest.raises(openai.APIStatusError) as refused:
            await waiting
        assert refused.value.status_code == 503 and refused.value.code == "unavailable"
        assert refused.value.response.headers["X-Job-Id"] == "job-1"
    assert front.cancelled == []  # kept: it runs again after the restart


async def test_a_revoked_key_ends_its_requests_and_cancels_the_job() -> None:
    outputs = JobOutputs()
    keys = Keys(ACME_KEY)
    front = ScriptedFront(outputs=outputs)
    async with scripted(front, keys, retries=0, key=ACME) as api:
        outputs.begin("job-1", 1)
        with capture_logs() as logs:
            chunks = await streaming_with_text(api, outputs, "some ")
            keys.current = credentials_from((), "test")
            outputs.append("job-1", "more ", 2)
            with pytest.raises(openai.APIError) as revoked:
                await anext(chunks)
            assert revoked.value.code == "unauthenticated"
            await until(lambda: front.cancelled == ["job-1"])
        (line,) = audited(logs)
        assert (line["action"], line["caller"]) == ("Cancel", "acme-app (tenant:acme)")
        assert "revoked" in line["reason"]

        keys.current = credentials_from((ACME_KEY,), "test")  # the same, not streamed
        waiting = asyncio.create_task(api.completions.create(model=MODEL, prompt="x", max_tokens=8))
        await until(lambda: len(front.submitted) == 2)
        await asyncio.sleep(0.1)  # following the job
        keys.current = credentials_from((), "test")
        outputs.append("job-1", "again ", 3)
        with pytest.raises(openai.AuthenticationError):
            await waiting
        assert front.cancelled == ["job-1", "job-1"]


async def test_one_caller_holds_a_bounded_number_of_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(front_door, "OPEN_PER_CALLER", 2)
    front = ScriptedFront()  # a job that never ends
    keys = Keys(ACME_KEY, GLOBEX_KEY)
    async with scripted(front, keys, retries=0, key=ACME) as acme:
        globex = acme.with_options(api_key=GLOBEX)
        streams = [
            await acme.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=8, stream=True
            )
            for _ in range(2)
        ]
        with pytest.raises(openai.RateLimitError) as refused:
            await acme.completions.create(model=MODEL, prompt="x", max_tokens=8)
        assert refused.value.code == "rate_limited" and "2 requests open" in refused.value.message
        other = await globex.chat.completions.create(  # another caller's are its own
            model=MODEL, messages=CHAT, max_tokens=8, stream=True
        )
        await streams[0].close()  # one leaves: room for another, once the service sees it
        async with asyncio.timeout(5):
            while True:
                try:
                    again = await acme.chat.completions.create(
                        model=MODEL, messages=CHAT, max_tokens=8, stream=True
                    )
                    break
                except openai.RateLimitError:
                    await asyncio.sleep(0.05)
        for stream in (streams[1], other, again):
            await stream.close()


async def test_requests_that_share_a_job_cancel_it_when_the_last_leaves() -> None:
    """Two requests with one X-Request-Id follow one job: one leaving does not cancel
    it under the other. The last one leaving does, and the audit log says who."""
    front = ScriptedFront()  # a job that never ends
    async with scripted(front, retries=0) as api:
        same = {"X-Request-Id": "r-1"}
        with capture_logs() as logs:
            first, second = [
                await api.chat.completions.create(
                    model=MODEL, messages=CHAT, max_tokens=8, stream=True, extra_headers=same
                )
                for _ in range(2)
            ]
            waiting = asyncio.create_task(
                api.completions.create(
                    model=MODEL, prompt="x", max_tokens=8, extra_headers=same, timeout=30
                )
            )
            await until(lambda: len(front.submitted) == 3)
            await first.close()
            await asyncio.sleep(3 * front_door.CLIENT_CHECK_S)
            assert front.cancelled == []
            await second.close()
            await asyncio.sleep(3 * front_door.CLIENT_CHECK_S)
            assert front.cancelled == []  # the third still waits for it
            waiting.cancel()
            await until(lambda: front.cancelled == ["job-1"])
        (line,) = audited(logs)
        assert (line["action"], line["outcome"], line["caller"]) == (
            "Cancel", "cancelled", "local (operator)",
        )  # fmt: skip
        assert line["reason"] == "the client closed its connection"


async def raw_post(api: openai.AsyncOpenAI, headers: bytes, body: bytes) -> tuple[int, Any]:
    """A request as bytes, which no HTTP client sends: headers that are not UTF-8."""
    url = api.base_url
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n".encode() + headers + b"\r\n" + body
    )  # fmt: skip
    answer = await reader.read()
    writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


async def test_bad_numbers_and_bad_text_are_refused_naming_the_field() -> None:
    """Values that used to reach a 500: integers no float holds, non-finite numbers,
    lone surrogates (JSON's "\\ud800"), and bytes that are not UTF-8 in a header."""
    front = ScriptedFront(OutputChunk("ok", 1, 1, ended(JobState.COMPLETED, "ok", 1)))
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 8}
    huge = 10**400
    async with scripted(front, retries=0) as api:
        for fields, param in [
            ({"temperature": huge}, "temperature"),
            ({"top_p": huge}, "top_p"),
            ({"temperature": -huge}, "temperature"),
            ({"seed": huge}, "seed"),
            ({"max_tokens": huge}, "max_tokens"),
            ({"presence_penalty": huge}, "presence_penalty"),
            ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
            ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
             "messages[0].content[0].text"),
            ({"user": "\ud800"}, "user"),
            ({"user": "u" * 257}, "user"),
            ({"stop": ["ok", "\ud800"]}, "stop[1]"),
            ({"model": "\ud800"}, "model"),
            ({"metadata": {"k": "\ud800"}}, "metadata.k"),
            ({"\ud800": 1}, "body"),
        ]:  # fmt: skip
            status, answer = await raw_post(api, b"", json.dumps({**chat, **fields}).encode())
            assert (status, answer["error"]["param"]) == (400, param), fields
        for number in (b"1e400", b"NaN", b"-Infinity"):
            body = json.dumps(chat).encode()[:-1] + b', "temperature": ' + number + b"}"
            status, answer = await raw_post(api, b"", body)
            assert (status, answer["error"]["param"]) == (400, "temperature"), number
        body = json.dumps(chat).encode()
        for header in ("X-Request-Id", "X-Session-Id", "X-Tenant-Id", "X-Priority"):
            lone = header.encode() + b": a\xed\xa0\x80b\r\n"  # U+D800, as WTF-8 writes it
            status, answer = await raw_post(api, lone, body)
            assert (status, answer["error"]["param"]) == (400, header)
            assert answer["error"]["type"] == "invalid_request_error"
        for header in ("X-Request-Id", "X-Session-Id", "X-Tenant-Id"):
            status, answer = await raw_post(api, f"{header}: {'i' * 257}\r\n".encode(), body)
            assert (status, answer["error"]["param"]) == (400, header)
        status, answer = await raw_post(api, b"X-Request-Id: r-\xc3\xa9\r\n", body)
        assert status == 200 and answer["choices"][0]["message"]["content"] == "ok"
        assert front.submitted[-1].request_id == "r-é"  # UTF-8 is fine


async def test_an_unknown_field_reads_as_a_sentence() -> None:
    async with scripted(ScriptedFront(), retries=0) as api:
        with pytest.raises(openai.BadRequestError) as refused:
            await api.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"top_k": 5})
        assert refused.value.param == "top_k"
        assert refused.value.body["message"] == (  # type: ignore[index]
            "top_k is not a field this service takes; docs/OPENAI.md lists the fields"
        )
        with pytest.raises(openai.BadRequestError) as refused:
            await api.chat.completions.create(
                model=MODEL, messages=CHAT, extra_body={"top_k": 5, "min_p": 0.1}
            )
        assert refused.value.body["message"] == (  # type: ignore[index]
            "min_p, top_k are not fields this service takes; docs/OPENAI.md lists the fields"
        )
