"""The development worker as a real process: both dialects, its slots and queue,
batching, prefill, stop strings, clients that go away, and the errors it gives.

Timing is only ever compared with wide margins (or not at all: overlap and order are
asserted instead), as these tests run on small, busy machines."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from orchestrator.domain.jobs import render_chat
from orchestrator.pools.devworker import count_prompt_tokens, generate

MODEL = "dev-model"
WORKER = (sys.executable, "-m", "orchestrator.pools.devworker")
Spawn = Callable[..., str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(*args: str, wait_ready: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen([*WORKER, "--port", str(port), "--model", MODEL, *args])
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1):
                return process, uri
        except urllib.error.HTTPError:
            if not wait_ready:  # it answers (503 while loading): that is enough
                return process, uri
        except OSError:
            pass
        assert process.poll() is None, "the worker exited"
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the worker did not start")


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.terminate()
    try:
        return process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    """A fast worker with four slots, shared by the tests that need nothing special."""
    process, uri = _start("--slots", "4", "--tokens-per-sec", "2000")
    yield uri
    _stop(process)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts a worker with the given flags; gives its base URI."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, wait_ready: bool = True) -> str:
        process, uri = _start(*args, wait_ready=wait_ready)
        processes.append(process)
        return uri

    yield start
    for process in processes:
        _stop(process)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@dataclass
class Stream:
    """A streamed answer: its `data:` events, and when each one arrived."""

    events: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Stream:
    out = Stream()
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for raw in response.content:
            line = raw.strip()
            if not line:
                continue
            assert line.startswith(b"data: ")
            data = line[len(b"data: ") :]
            out.events.append(data.decode() if data == b"[DONE]" else json.loads(data))
            out.times.append(time.monotonic())
    return out


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, status: int = 200
) -> dict[str, Any]:
    async with session.post(url, json=body) as response:
        assert response.status == status, await response.text()
        result: dict[str, Any] = await response.json()
        return result


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


def text(*tokens: list[str]) -> str:
    return "".join(t for group in tokens for t in group)


# -- the command line ----------------------------------------------------------------


def test_help_says_it_is_a_development_stand_in() -> None:
    result = subprocess.run(
        [*WORKER, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "DEVELOPMENT STAND-IN" in result.stdout
    assert "loads no model" in result.stdout
    assert "filler" in result.stdout
    assert "roughly" in result.stdout
    for flag in ("--slots", "--prefill-tokens-per-sec", "--batch-exponent", "--load-ms"):
        assert flag in result.stdout


def test_the_launch_template_flags_are_accepted_and_bounds_refused() -> None:
    refused = subprocess.run(
        [*WORKER, "--port", "1", "--model", "m", "--slots", "0"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "--slots must be within 1..1024" in refused.stderr


def test_generate_is_a_pure_function_of_model_prompt_and_seed() -> None:
    assert generate("m", "p", 1, 8) == generate("m", "p", 1, 8)
    assert generate("m", "p", 1, 8) != generate("m", "p", 2, 8)
    assert generate("m", "p", None, 8)[:3] == generate("m", "p", None, 3)
    assert count_prompt_tokens("") == 1
    assert count_prompt_tokens("abcde") == 2


# -- llama.cpp's dialect ---------------------------------------------------------------


async def test_llamacpp_streams_tokens_then_a_final_event(
    worker: str, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": "Hello there", "n_predict": 6, "seed": 7, "stream": True}
    answer = await stream(http, worker + "/completion", body)
    *tokens, final = answer.events
    assert [event["content"] for event in tokens] == generate(MODEL, "Hello there", 7, 6)
    assert all(event["stop"] is False for event in tokens)
    assert final["stop"] is True
    assert final["content"] == ""
    assert final["tokens_predicted"] == 6
    assert final["tokens_evaluated"] == count_prompt_tokens("Hello there")
    assert final["stop_type"] == "limit"
    assert final["model"] == MODEL
    timings = final["timings"]
    assert timings["predicted_n"] == 6
    assert timings["prompt_n"] == final["tokens_evaluated"]
    assert timings["predicted_per_second"] > 0


async def test_llamacpp_answers_whole_when_not_streaming(
    worker: str, http: aiohttp.ClientSession
) -> None:
    answer = await post(http, worker + "/completion", {"prompt": "Hi", "n_predict": 5})
    assert answer["content"] == text(generate(MODEL, "Hi", None, 5))
    assert answer["stop"] is True
    assert answer["tokens_predicted"] == 5
    # seed -1 is llama-server's "no seed": the same as none given
    same = await post(http, worker + "/completion", {"prompt": "Hi", "n_predict": 5, "seed": -1})
    assert same["content"] == answer["content"]


async def test_llamacpp_without_n_predict_ends_like_a_model_at_its_end_of_stream(
    worker: str, http: aiohttp.ClientSession
) -> None:
    answer = await post(http, worker + "/completion", {"prompt": "Hi"})
    assert answer["stop_type"] == "eos"
    assert answer["tokens_predicted"] == 16


async def test_props_and_slots_say_how_many_sequences_it_serves(
    worker: str, http: aiohttp.ClientSession
) -> None:
    props = await get(http, worker + "/props")
    assert props["total_slots"] == 4
    assert props["model_path"] == MODEL
    assert props["development_worker"] is True
    slots = await get(http, worker + "/slots")
    assert [slot["id"] for slot in slots] == [0, 1, 2, 3]
    assert not any(slot["is_processing"] for slot in slots)


@pytest.mark.slow
async def test_health_is_503_while_loading_then_ok(
    spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    uri = spawn("--load-ms", "1500", wait_ready=False)
    async with http.get(uri + "/health") as response:
        assert response.status == 503
        assert (await response.json())["status"] == "loading model"
    async with http.post(uri + "/completion", json={"prompt": "x"}) as response:
        assert response.status == 503
    async with http.post(uri + "/v1/completions", json={"prompt": "x"}) as response:
        assert response.status == 503
        assert (await response.json())["error"]["type"] == "unavailable_error"
    deadline = time.monotonic() + 10
    while True:
        async with http.get(uri + "/health") as response:
            if response.status == 200:
                assert await response.json() == {"status": "ok"}
                break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


# -- OpenAI's dialect ----------------------------------------------------------------


async def test_openai_lists_its_one_model(worker: str, http: aiohttp.ClientSession) -> None:
    models = await get(http, worker + "/v1/models")
    assert models["object"] == "list"
    [model] = models["data"]
    assert model["id"] == MODEL
    assert model["object"] == "model"
    assert model["owned_by"] == "devworker"
    assert isinstance(model["created"], int)


async def test_openai_completion_whole(worker: str, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": ["Once"], "max_tokens": 4, "seed": 3}
    answer = await post(http, worker + "/v1/completions", body)
    assert answer["object"] == "text_completion"
    assert answer["id"].startswith("cmpl-")
    assert answer["model"] == MODEL
    assert isinstance(answer["created"], int)
    [choice] = answer["choices"]
    assert choice == {
        "index": 0,
        "text": text(generate(MODEL, "Once", 3, 4)),
        "logprobs": None,
        "finish_reason": "length",
    }
    prompt_tokens = count_prompt_tokens("Once")
    assert answer["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 4,
        "total_tokens": prompt_tokens + 4,
    }


async def test_openai_completion_streamed_with_usage(
    worker: str, http: aiohttp.ClientSession
) -> None:
    body = {
        "prompt": "Once",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    answer = await stream(http, worker + "/v1/completions", body)
    *chunks, last, usage, done = answer.events
    assert done == "[DONE]"
    assert [c["choices"][0]["text"] for c in chunks] == generate(MODEL, "Once", None, 3)
    assert all(c["object"] == "text_completion" for c in [*chunks, last, usage])
    assert len({c["id"] for c in [*chunks, last, usage]}) == 1
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in chunks)
    assert last["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3


async def test_openai_chat_whole(worker: str, http: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}],
        },
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 5, "seed": 11}
    answer = await post(http, worker + "/v1/chat/completions", body)
    prompt = render_chat((("system", "Be brief."), ("user", "Hi\n!")))
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-")
    [choice] = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == text(generate(MODEL, prompt, 11, 5))
    assert choice["finish_reason"] == "length"
    assert answer["usage"]["prompt_tokens"] == count_prompt_tokens(prompt)


async def test_openai_chat_streamed(worker: str, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    body = {"messages": messages, "max_completion_tokens": 4, "stream": True}
    answer = await stream(http, worker + "/v1/chat/completions", body)
    first, *chunks, last, done = answer.events
    assert done == "[DONE]"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in [first, *chunks, last])
    assert "usage" not in last  # not asked for
    contents = [c["choices"][0]["delta"]["content"] for c in chunks]
    assert contents == generate(MODEL, render_chat((("user", "Hi"),)), None, 4)
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "length"


async def test_openai_chat_without_a_limit_ends_with_stop(
    worker: str, http: aiohttp.ClientSession
) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    answer = await post(http, worker + "/v1/chat/completions", body)
    assert answer["choices"][0]["finish_reason"] == "stop"


# -- stop strings ----------------------------------------------------------------------


def _straddling_stop(prompt: str, seed: int) -> tuple[str, str, int]:
    """A stop string across two tokens, the text before its first occurrence, and the
    tokens decoded by the time it is complete."""
    tokens = generate(MODEL, prompt, seed, 40)
    stop = tokens[5][-2:] + tokens[6][:3]
    full = text(tokens)
    at = full.index(stop)
    decoded = next(i + 1 for i in range(40) if len(text(tokens[: i + 1])) >= at + len(stop))
    return stop, full[:at], decoded


async def test_a_stop_string_ends_the_answer_and_is_not_sent(
    worker: str, http: aiohttp.ClientSession
) -> None:
    stop, before, decoded = _straddling_stop("stops", 5)
    body = {"prompt": "stops", "seed": 5, "n_predict": 40, "stop": [stop], "stream": True}
    answer = await stream(http, worker + "/completion", body)
    *pieces, final = answer.events
    assert "".join(event["content"] for event in pieces) == before
    assert final["stop_type"] == "word"
    assert final["stopping_word"] == stop
    assert final["tokens_predicted"] == decoded

    body = {"prompt": "stops", "seed": 5, "max_tokens": 40, "stop": stop}
    whole = await post(http, worker + "/v1/completions", body)
    assert whole["choices"][0]["text"] == before
    assert whole["choices"][0]["finish_reason"] == "stop"


async def test_a_stop_string_begun_but_not_finished_is_sent_in_the_end(
    worker: str, http: aiohttp.ClientSession
) -> None:
    tokens = generate(MODEL, "partial", None, 4)
    stop = tokens[-1] + "\x00never"  # the last token starts it; nothing completes it
    body = {"prompt": "partial", "n_predict": 4, "stop": [stop], "stream": True}
    answer = await stream(http, worker + "/completion", body)
    *pieces, final = answer.events
    assert "".join(event["content"] for event in pieces) == text(tokens)
    assert final["stop_type"] == "limit"


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1_000_001}, "max_tokens"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "temperature": True}, "temperature"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_openai_bad_requests_are_400_in_openai_shape(
    worker: str, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    answer = await post(http, worker + "/v1/completions", body, status=400)
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": "x"}] * 1025},
    ],
)
async def test_openai_bad_chats_are_400(
    worker: str, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    answer = await post(http, worker + "/v1/chat/completions", body, status=400)
    assert answer["error"]["param"] == "messages"


@pytest.mark.parametrize(
    "body",
    [{}, {"prompt": "x", "n_predict": "5"}, {"prompt": "x", "n_predict": 10**7}, [1, 2]],
)
async def test_llamacpp_bad_requests_are_400_in_llama_server_shape(
    worker: str, http: aiohttp.ClientSession, body: Any
) -> None:
    answer = await post(http, worker + "/completion", body, status=400)
    assert answer["error"]["code"] == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]


async def test_malformed_json_unknown_routes_and_huge_bodies(
    worker: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(worker + "/v1/chat/completions", data=b"{nope") as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    async with http.get(worker + "/v1/engines") as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found_error"
    async with http.get(worker + "/nothing") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == 404
    huge = json.dumps({"prompt": "x" * (9 * 1024 * 1024)})
    async with http.post(worker + "/v1/completions", data=huge) as response:
        assert response.status == 413
        assert "error" in await response.json()


async def test_openai_routes_refuse_a_model_they_do_not_serve_as_vllm_does(
    worker: str, http: aiohttp.ClientSession
) -> None:
    """vLLM serves only its --served-model-name: a core that sends its catalog id to a
    worker started without it must fail against the dev worker as it would there."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", chat)):  # fmt: skip
        answer = await post(http, worker + path, {**body, "model": "llama-8b"}, status=404)
        assert answer == {"error": {"message": "The model `llama-8b` does not exist.",
                                    "type": "NotFoundError", "param": None,
                                    "code": "model_not_found"}}  # fmt: skip
        await post(http, worker + path, {**body, "model": MODEL})
        await post(http, worker + path, body)  # no model: the one it serves, as vLLM
        bad = await post(http, worker + path, {**body, "model": 7}, status=400)
        assert bad["error"]["param"] == "model"
    # llama-server's /completion has no model to check.
    await post(http, worker + "/completion", {"prompt": "hi", "n_predict": 2, "model": "x"})


# -- slots, batching, prefill, departures ----------------------------------------------


async def _processing(http: aiohttp.ClientSession, uri: str) -> int:
    return sum(slot["is_processing"] for slot in await get(http, uri + "/slots"))


async def _until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_four_slots_decode_four_sequences_at_once(
    spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    rate, n = 80, 40
    uri = spawn("--slots", "4", "--tokens-per-sec", str(rate))
    requests = [
        asyncio.create_task(
            stream(http, uri + "/completion", {"prompt": f"p{i}", "n_predict": n, "stream": True})
        )
        for i in range(4)
    ]
    seen = 0

    async def all_four() -> bool:
        nonlocal seen
        seen = max(seen, await _processing(http, uri))
        return seen == 4 or all(r.done() for r in requests)

    await _until(all_four)
    answers = await asyncio.gather(*requests)
    assert seen == 4
    # Every sequence had its first token before any had its last: they overlapped.
    assert max(a.times[0] for a in answers) < min(a.times[-1] for a in answers)
    assert all(a.events[-1]["tokens_predicted"] == n for a in answers)


@pytest.mark.slow
async def test_one_slot_serves_one_sequence_at_a_time_in_arrival_order(
    spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    uri = spawn("--slots", "1", "--tokens-per-sec", "100")
    requests = []
    for i in range(3):
        body = {"prompt": f"p{i}", "n_predict": 10, "stream": True}
        requests.append(asyncio.create_task(stream(http, uri + "/completion", body)))
        await asyncio.sleep(0.05)  # so that they arrive in this order
    most = 0

    async def done() -> bool:
        nonlocal most
        most = max(most, await _processing(http, uri))
        return all(r.done() for r in requests)

    await _until(done)
    answers = [r.result() for r in requests]
    assert most == 1
    for earlier, later in itertools.pairwise(answers):
        assert earlier.times[-1] <= later.times[0]  # no overlap, first come first served


@pytest.mark.slow
async def test_time_to_first_token_grows_with_the_prompt(
    spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    uri = spawn("--slots", "2", "--prefill-tokens-per-sec", "1000", "--tokens-per-sec", "200")

    async def ttft(prompt: str) -> tuple[float, dict[str, Any]]:
        started = time.monotonic()
        body = {"prompt": prompt, "n_predict": 2, "stream": True}
        answer = await stream(http, uri + "/completion", body)
        return answer.times[0] - started, answer.events[-1]

    _, short = await ttft("hi")  # 2 bytes: 1 token, a millisecond's prefill
    long, final = await ttft("word " * 800)  # 4000 bytes: 1000 tokens, a second's prefill
    assert (short["tokens_evaluated"], final["tokens_evaluated"]) == (1, 1000)
    # The prefill the worker reports is the wait it made, prompt tokens / rate...
    assert short["timings"]["prompt_ms"] == pytest.approx(1)
    assert final["timings"]["prompt_ms"] == pytest.approx(1000)
    # ...and the first token really waited for it (a lower bound: a busy machine
    # only makes it later).
    assert long >= 0.9


@pytest.mark.slow
async def test_a_client_that_goes_away_frees_its_slot(
    spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    uri = spawn("--slots", "1", "--tokens-per-sec", "20")
    body = {"prompt": "long", "n_predict": 100_000, "stream": True}
    response = await http.post(uri + "/completion", json=body)
    await response.content.readline()  # the first token: it is decoding
    assert await _processing(http, uri) == 1

    # A second request queues for the slot, then its client gives up too.
    waiting = asyncio.create_task(post(http, uri + "/completion", {"prompt": "q", "n_predict": 2}))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting

    response.close()  # the first client leaves mid-stream

    async def free() -> bool:
        return await _processing(http, uri) == 0

    await _until(free, timeout=5)
    # The slot serves the next request, not the ones that left.
    answer = await post(http, uri + "/completion", {"prompt": "next", "n_predict": 2})
    assert answer["tokens_predicted"] == 2


def test_sigterm_stops_it_cleanly() -> None:
    process, _ = _start()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


# -- the official client -----------------------------------------------------------------


@pytest.mark.slow  # importing openai alone takes most of a second
async def test_the_openai_package_reads_both_endpoints(worker: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=worker + "/v1", api_key="unused")
    try:
        completion = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
        assert completion.choices[0].text == text(generate(MODEL, "Hi", None, 3))
        assert completion.usage.completion_tokens == 3
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        prompt = render_chat((("user", "Hi"),))
        assert chat.choices[0].message.content == text(generate(MODEL, prompt, None, 3))
        pieces = []
        usage = None
        async for chunk in await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            else:
                usage = chunk.usage
        assert "".join(pieces) == text(generate(MODEL, prompt, None, 3))
        assert usage is not None and usage.completion_tokens == 3
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=MODEL, prompt="Hi", max_tokens=-1)
    finally:
        await client.close()
