"""The development worker: a stand-in for an inference server, for development and tests.

Contract: it serves both dialects the core speaks to workers, at once, on one port:

- llama.cpp's llama-server (`llamacpp`): `GET /health`, `GET /props`, `GET /slots`,
  `POST /completion` (server-sent events with `"stream": true`, one JSON object per
  `data:` line, the last with `"stop": true`);
- OpenAI's (`openai`, as vLLM serves it): `GET /v1/models`, `POST /v1/completions`,
  `POST /v1/chat/completions` (streamed as `data:` chunks ending with `data: [DONE]`),
  which refuse a `model` other than its `--model` (404, as vLLM).

It loads no model, needs no GPU and is not an inference engine. It answers with
deterministic filler (`generate`: the same model, prompt and seed always give the
same tokens) and models a GPU's timing only roughly:

- `--slots` sequences run at once; a request arriving when all are busy waits for
  one, first come first served, like llama-server's queue;
- the time to first token is the prompt's prefill, prompt tokens / `--prefill-tokens-per-sec`
  (a prompt counts ceil(UTF-8 bytes / 4) tokens, at least 1: about what a BPE
  tokenizer gives for English), plus at most one decode step;
- decoding runs in steps, one token for every decoding sequence per step (continuous
  batching): with n sequences decoding, the aggregate rate is
  `--tokens-per-sec` * n ** `--batch-exponent`, so each sequence slows as n grows
  while the batch as a whole speeds up.

A client that goes away mid-request frees its slot at once. Field names follow the
llama.cpp server README (github.com/ggml-org/llama.cpp, tools/server/README.md:
`/completion`'s response, `/props`, `/slots`, the `timings` object, the error body)
and OpenAI's API reference as the openai-python types spell it
(src/openai/types/completion_choice.py, chat/chat_completion.py,
chat/chat_completion_chunk.py: `stream_options.include_usage` adds a last chunk with
`"choices": []` and the usage, every other chunk then carries `"usage": null`).

    python -m orchestrator.pools.devworker --port 18100 --model llama-8b --slots 8
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import heapq
import itertools
import json
import math
import signal
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiohttp import web

from orchestrator.config.settings import MAX_WORKER_SLOTS
from orchestrator.domain.jobs import MAX_CHAT_MESSAGES, render_chat

VOCABULARY = (
    "the", "a", "model", "token", "stream", "GPU", "queue", "worker", "batch", "latency",
    "cache", "prompt", "policy", "tensor", "kernel", "memory", "schedule", "fair", "fast", "quiet",
)  # fmt: skip

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_NEW_TOKENS = 1_000_000
MAX_STOPS = 16
MAX_STOP_CHARS = 256
# What the filler answer runs to when the request sets no limit: the model "ends its
# answer" there (llama-server's stop_type "eos", OpenAI's finish_reason "stop").
NATURAL_LENGTH = 16
# OpenAI's legacy completions default `max_tokens` (API reference: "Defaults to 16").
OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# The scheduler sleeps at least this long between steps, so a fast rate costs a few
# tokens per wake-up rather than a wake-up per token (the rates hold either way).
MIN_TICK_S = 0.002
# Steps owed after a stall (the machine busy elsewhere) are made up for at most this
# far back: catching up further would be a burst no GPU gives.
CATCH_UP_S = 0.25
SHUTDOWN_GRACE_S = 0.5  # SIGTERM: requests still running are cut after this long


def _tokens(model: str, prompt: str, seed: int | None) -> Iterator[str]:
    """The endless deterministic token stream for (model, prompt, seed)."""
    state = hashlib.sha256(f"{model}\x00{prompt}\x00{seed}".encode()).digest()
    while True:
        state = hashlib.sha256(state).digest()
        yield " " + VOCABULARY[state[0] % len(VOCABULARY)]


def generate(model: str, prompt: str, seed: int | None, n_tokens: int) -> list[str]:
    """The tokens the development worker answers with; a pure function of its inputs."""
    return list(itertools.islice(_tokens(model, prompt, seed), max(0, n_tokens)))


def count_prompt_tokens(prompt: str) -> int:
    """A prompt's size in tokens as the worker counts it: ceil(UTF-8 bytes / 4), at
    least 1 (a real server adds a BOS token to an empty prompt)."""
    return max(1, math.ceil(len(prompt.encode()) / 4))


# -- requests ------------------------------------------------------------------------


class BadRequest(Exception):
    """A request the worker refuses: 400, in the dialect's error shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Job:
    """One completion request, whichever dialect it came in."""

    prompt: str
    limit: int | None  # tokens at most; None: the filler's natural end (NATURAL_LENGTH)
    seed: int | None
    stops: tuple[str, ...] = ()
    temperature: float = 0.8
    top_p: float = 0.95
    stream: bool = False
    include_usage: bool = False


class Body:
    """A JSON request body, read field by field with types and bounds checked."""

    def __init__(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        self.data: dict[str, Any] = data

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if type(value) is not int:
            raise BadRequest(f"{name} must be an integer", name)
        if not low <= value <= high:
            raise BadRequest(f"{name} must be within {low}..{high}, not {value}", name)
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        # json reads NaN and Infinity, which no JSON writer may echo back
        if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
            bounds = f" within {low}..{high}" if math.isfinite(low) else ""
            raise BadRequest(f"{name} must be a finite number{bounds}", name)
        return float(value)

    def boolean(self, name: str) -> bool:
        value = self.data.get(name, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be a boolean", name)
        return value

    def stops(self, name: str, *, single_string: bool) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return ()
        if single_string and isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, list)
            or len(value) > MAX_STOPS
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in value)
        ):
            raise BadRequest(
                f"{name} must be a list of at most {MAX_STOPS} strings"
                f" of at most {MAX_STOP_CHARS} characters",
                name,
            )
        return tuple(s for s in value if s)  # an empty stop would end every answer at once


def parse_llamacpp(body: Body) -> Job:
    """`POST /completion`: prompt, n_predict (-1: no limit), seed (-1: none), stop,
    stream, temperature, top_p. A prompt of token ids is not supported."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest('"prompt" must be provided, as a string', "prompt")
    n_predict = body.integer("n_predict", -1, -1, MAX_NEW_TOKENS)
    seed = body.integer("seed", -1, -1, 2**64 - 1)
    return Job(
        prompt=prompt,
        limit=None if n_predict == -1 else n_predict,
        seed=None if seed == -1 else seed,
        stops=body.stops("stop", single_string=False),
        temperature=body.number("temperature", 0.8, -math.inf, math.inf),
        top_p=body.number("top_p", 0.95, 0.0, 1.0),
        stream=body.boolean("stream"),
    )


def _openai_sampling(body: Body, prompt: str, limit: int | None) -> Job:
    """What the two OpenAI endpoints share: sampling, stop, seed and streaming."""
    body.integer("n", 1, 1, 1)  # one choice only
    stream = body.boolean("stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if include_usage is not None and not isinstance(include_usage, bool):
        raise BadRequest("stream_options.include_usage must be a boolean", "stream_options")
    return Job(
        prompt=prompt,
        limit=limit,
        seed=body.integer("seed", None, -(2**63), 2**63 - 1),
        stops=body.stops("stop", single_string=True),
        temperature=body.number("temperature", 1.0, 0.0, 2.0),
        top_p=body.number("top_p", 1.0, 0.0, 1.0),
        stream=stream,
        include_usage=bool(include_usage),
    )


def parse_openai_completion(body: Body) -> Job:
    """`POST /v1/completions`: a prompt string (or a list of one), max_tokens (default 16)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string or a list of one string", "prompt")
    limit = body.integer("max_tokens", OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS, 1, MAX_NEW_TOKENS)
    return _openai_sampling(body, prompt, limit)


def parse_openai_chat(body: Body) -> Job:
    """`POST /v1/chat/completions`: messages of {role, content}, content a string or a
    list of text parts (joined with newlines, as vLLM does), rendered to one prompt as
    the core renders a chat (`render_chat`); max_completion_tokens or max_tokens."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise BadRequest(f"at most {MAX_CHAT_MESSAGES} messages", "messages")
    chat: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with a role", "messages")
        chat.append((message["role"], _content(message.get("content"), index)))
    limit = body.integer("max_completion_tokens", None, 1, MAX_NEW_TOKENS)
    if limit is None:
        limit = body.integer("max_tokens", None, 1, MAX_NEW_TOKENS)
    return _openai_sampling(body, render_chat(tuple(chat)), limit)


def _content(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ]
        if len(texts) == len(content):
            return "\n".join(texts)
    raise BadRequest(
        f"messages[{index}].content must be a string or a list of text parts", "messages"
    )


# -- the engine ----------------------------------------------------------------------


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could begin a stop string: they are not
    sent until the next tokens say whether the stop string follows."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class Piece(NamedTuple):
    """Text decoded, and how many tokens the sequence had decoded by then."""

    text: str
    n_decoded: int


@dataclass(eq=False)
class Sequence:
    """One request holding a slot: prefilling, then decoding, then finished."""

    job: Job
    slot: int
    task_id: int
    tokens: Iterator[str]
    prompt_tokens: int
    admitted_at: float
    decode_at: float  # when the prefill ends and decoding starts
    n_decoded: int = 0
    stop_type: str = ""  # "", then llama-server's "limit", "word" or "eos"
    stopping_word: str = ""
    finished_at: float = 0.0
    _tail: str = ""  # generated text held back, as it may begin a stop string
    _out: list[Piece] = field(default_factory=list)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def n_max(self) -> int:
        return NATURAL_LENGTH if self.job.limit is None else self.job.limit

    @property
    def finished(self) -> bool:
        return bool(self.stop_type)

    def advance(self, steps: int, now: float) -> None:
        """Decode `steps` tokens (fewer if it ends first) and hand their text over."""
        stops = self.job.stops
        for _ in range(min(steps, self.n_max - self.n_decoded)):
            self.n_decoded += 1
            token = next(self.tokens)
            if not stops:
                self._out.append(Piece(token, self.n_decoded))
                continue
            self._tail += token
            hits = [(at, stop) for stop in stops if (at := self._tail.find(stop)) >= 0]
            if hits:
                at, stop = min(hits)
                self._emit(self._tail[:at])
                self._tail = ""
                self.stopping_word = stop
                self._finish("word", now)
                return
            keep = _held_back(self._tail, stops)
            self._emit(self._tail[: len(self._tail) - keep])
            self._tail = self._tail[len(self._tail) - keep :]
        if self.n_decoded >= self.n_max:
            self._emit(self._tail)  # a stop string begun but never completed is text
            self._finish("eos" if self.job.limit is None else "limit", now)
        self._ready.set()

    def _emit(self, text: str) -> None:
        if text:
            self._out.append(Piece(text, self.n_decoded))

    def _finish(self, stop_type: str, now: float) -> None:
        self.stop_type = stop_type
        self.finished_at = now
        self._ready.set()

    async def pieces(self) -> AsyncIterator[list[Piece]]:
        """The text as it is decoded, a batch of pieces (one per token, bar held-back
        stop prefixes) per wake-up, until the sequence finishes."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            out, self._out = self._out, []
            if out:
                yield out
            if self.finished:
                return

    def timings(self) -> dict[str, float | int]:
        """llama-server's `timings` object for this sequence."""
        prompt_ms = (self.decode_at - self.admitted_at) * 1000
        predicted_ms = max(0.0, self.finished_at - self.decode_at) * 1000
        return {
            "cache_n": 0,
            "prompt_n": self.prompt_tokens,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / self.prompt_tokens,
            "prompt_per_second": self.prompt_tokens / prompt_ms * 1000 if prompt_ms else 0.0,
            "predicted_n": self.n_decoded,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / self.n_decoded if self.n_decoded else 0.0,
            "predicted_per_second": (self.n_decoded / predicted_ms * 1000 if predicted_ms else 0.0),
        }


class Engine:
    """The slots and the continuous-batching loop that decodes every sequence in them."""

    def __init__(
        self, model: str, slots: int, rate: float, prefill_rate: float, exponent: float
    ) -> None:
        self.model = model
        self.slots = slots
        self.rate = rate
        self.prefill_rate = prefill_rate
        self.exponent = exponent
        self.by_slot: dict[int, Sequence] = {}
        self._free = list(range(slots))  # a heap: the lowest free slot first, as in /slots
        self._waiting: deque[asyncio.Future[int]] = deque()
        self._prefilling: list[Sequence] = []
        self._decoding: list[Sequence] = []
        self._task_ids = itertools.count()
        self._alarm: asyncio.Future[None] | None = None

    def step_s(self, batch: int) -> float:
        """One decode step with `batch` sequences decoding: each gets one token, so the
        aggregate is rate * batch**exponent tokens/s."""
        return 1.0 / (self.rate * math.pow(batch, self.exponent - 1.0))

    @asynccontextmanager
    async def sequence(self, job: Job) -> AsyncIterator[Sequence]:
        """A slot for `job` (waiting for one, first come first served) for as long as
        the caller reads it; leaving, by finishing, failing or being cancelled because
        the client went away, frees the slot at once."""
        slot = await self._acquire()
        now = asyncio.get_running_loop().time()
        prompt_tokens = count_prompt_tokens(job.prompt)
        seq = Sequence(
            job=job,
            slot=slot,
            task_id=next(self._task_ids),
            tokens=_tokens(self.model, job.prompt, job.seed),
            prompt_tokens=prompt_tokens,
            admitted_at=now,
            decode_at=now + prompt_tokens / self.prefill_rate,
        )
        self.by_slot[slot] = seq
        self._prefilling.append(seq)
        self._wake()
        try:
            yield seq
        finally:
            for running in (self._prefilling, self._decoding):
                if seq in running:
                    running.remove(seq)
            del self.by_slot[slot]
            self._release(slot)

    async def _acquire(self) -> int:
        if self._free and not self._waiting:
            return heapq.heappop(self._free)
        turn: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(turn.result())  # handed a slot just as the client left
            else:
                self._waiting.remove(turn)
            raise

    def _release(self, slot: int) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(slot)
                return
        heapq.heappush(self._free, slot)

    async def run(self) -> None:
        """The batching loop: every step, each decoding sequence gets one token; the
        step time follows the batch size; a prefilled sequence joins at the next step.
        Steps are counted against the loop's monotonic clock, so a late wake-up is made
        up for by the next one and the rates hold."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        owed = 0.0  # decode steps due and not yet taken, as a fraction
        while True:
            now = loop.time()
            if self._decoding:
                step = self.step_s(len(self._decoding))
                owed = min(owed + (now - last) / step, max(1.0, CATCH_UP_S / step))
                steps = int(owed)
                owed -= steps
                if steps:
                    for seq in self._decoding:
                        seq.advance(steps, now)
                    self._decoding = [seq for seq in self._decoding if not seq.finished]
            else:
                owed = 0.0
            last = now
            for seq in [seq for seq in self._prefilling if seq.decode_at <= now]:
                self._prefilling.remove(seq)
                if seq.n_max == 0:
                    seq.advance(0, now)  # n_predict 0: the prompt is evaluated, nothing more
                else:
                    self._decoding.append(seq)
            deadline = None
            if self._decoding:
                due = (1.0 - owed) * self.step_s(len(self._decoding))
                deadline = now + max(due, MIN_TICK_S)
            if self._prefilling:
                prefilled = min(seq.decode_at for seq in self._prefilling)
                deadline = prefilled if deadline is None else min(deadline, prefilled)
            await self._sleep_until(deadline)

    async def _sleep_until(self, deadline: float | None) -> None:
        """Sleep until `deadline` (loop time; None: indefinitely) or a new arrival."""
        loop = asyncio.get_running_loop()
        self._alarm = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, _ring, self._alarm)
        try:
            await self._alarm
        finally:
            if timer is not None:
                timer.cancel()
            self._alarm = None

    def _wake(self) -> None:
        if self._alarm is not None:
            _ring(self._alarm)


def _ring(alarm: asyncio.Future[None]) -> None:
    if not alarm.done():
        alarm.set_result(None)


# -- the dialects --------------------------------------------------------------------


def _sse(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
    return b"data: " + data.encode() + b"\n\n"


class Dialect(ABC):
    """How one endpoint reads its request and writes its answer."""

    openai: bool

    def __init__(self, worker: DevWorker, job: Job) -> None:
        self.worker = worker
        self.job = job
        self.created = int(time.time())

    @staticmethod
    @abstractmethod
    def parse(body: Body) -> Job:
        """The job a request body asks for; BadRequest if it is not one."""

    def opening(self) -> list[dict[str, Any]]:
        """Events sent before the first token."""
        return []

    @abstractmethod
    def piece(self, seq: Sequence, piece: Piece) -> dict[str, Any]:
        """The event carrying one piece of text."""

    @abstractmethod
    def closing(self, seq: Sequence) -> list[dict[str, Any] | str]:
        """The events that end a stream."""

    @abstractmethod
    def whole(self, seq: Sequence, text: str) -> dict[str, Any]:
        """The answer when not streaming."""


class LlamaCpp(Dialect):
    openai = False
    parse = staticmethod(parse_llamacpp)

    def piece(self, seq: Sequence, piece: Piece) -> dict[str, Any]:
        return {
            "index": 0,
            "content": piece.text,
            "stop": False,
            "id_slot": seq.slot,
            "tokens_predicted": piece.n_decoded,
            "tokens_evaluated": seq.prompt_tokens,
        }

    def closing(self, seq: Sequence) -> list[dict[str, Any] | str]:
        return [self.whole(seq, "")]

    def whole(self, seq: Sequence, text: str) -> dict[str, Any]:
        # As llama-server's final result, bar `prompt` (a long one would make the line
        # too long for line-reading clients) and `tokens` (filler has no token ids).
        job = self.job
        return {
            "index": 0,
            "content": text,
            "id_slot": seq.slot,
            "stop": True,
            "model": self.worker.engine.model,
            "tokens_predicted": seq.n_decoded,
            "tokens_evaluated": seq.prompt_tokens,
            "has_new_line": "\n" in text,
            "truncated": False,
            "stop_type": seq.stop_type,
            "stopping_word": seq.stopping_word,
            "tokens_cached": 0,
            "generation_settings": {
                "n_predict": -1 if job.limit is None else job.limit,
                "seed": -1 if job.seed is None else job.seed,
                "temperature": job.temperature,
                "top_p": job.top_p,
                "stop": list(job.stops),
                "stream": job.stream,
            },
            "timings": seq.timings(),
        }


class _OpenAI(Dialect):
    openai = True
    object: str  # of a whole answer
    chunk_object: str  # of a streamed chunk
    id_prefix: str

    def __init__(self, worker: DevWorker, job: Job) -> None:
        super().__init__(worker, job)
        self.id = self.id_prefix + uuid.uuid4().hex

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.worker.engine.model,
            "choices": [{"index": 0, "logprobs": None, "finish_reason": None, **choice}],
        }
        if self.job.include_usage:
            chunk["usage"] = None  # all but the last chunk, when usage is asked for
        return chunk

    @staticmethod
    def finish_reason(seq: Sequence) -> str:
        return "length" if seq.stop_type == "limit" else "stop"

    @staticmethod
    def usage(seq: Sequence) -> dict[str, int]:
        return {
            "prompt_tokens": seq.prompt_tokens,
            "completion_tokens": seq.n_decoded,
            "total_tokens": seq.prompt_tokens + seq.n_decoded,
        }

    @abstractmethod
    def last_choice(self, seq: Sequence) -> dict[str, Any]:
        """The choice of the chunk that says why the answer ended."""

    def closing(self, seq: Sequence) -> list[dict[str, Any] | str]:
        events: list[dict[str, Any] | str] = [self._chunk(self.last_choice(seq))]
        if self.job.include_usage:
            usage = self._chunk({})
            usage["choices"] = []
            usage["usage"] = self.usage(seq)
            events.append(usage)
        events.append("[DONE]")
        return events

    def _whole(self, choice: dict[str, Any], seq: Sequence) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.worker.engine.model,
            "choices": [
                {"index": 0, "logprobs": None, "finish_reason": self.finish_reason(seq), **choice}
            ],
            "usage": self.usage(seq),
        }


class OpenAICompletion(_OpenAI):
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"
    parse = staticmethod(parse_openai_completion)

    def piece(self, seq: Sequence, piece: Piece) -> dict[str, Any]:
        return self._chunk({"text": piece.text})

    def last_choice(self, seq: Sequence) -> dict[str, Any]:
        return {"text": "", "finish_reason": self.finish_reason(seq)}

    def whole(self, seq: Sequence, text: str) -> dict[str, Any]:
        return self._whole({"text": text}, seq)


class OpenAIChat(_OpenAI):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    parse = staticmethod(parse_openai_chat)

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"delta": {"role": "assistant", "content": ""}})]

    def piece(self, seq: Sequence, piece: Piece) -> dict[str, Any]:
        return self._chunk({"delta": {"content": piece.text}})

    def last_choice(self, seq: Sequence) -> dict[str, Any]:
        return {"delta": {}, "finish_reason": self.finish_reason(seq)}

    def whole(self, seq: Sequence, text: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        return self._whole({"message": message}, seq)


# The error types llama-server gives (its format_error_response), which OpenAI's are.
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "unavailable_error",
}


def error_response(
    openai: bool, status: int, message: str, param: str | None = None
) -> web.Response:
    """An error in the dialect's shape: llama-server's {"error": {code, message, type}},
    OpenAI's {"error": {message, type, param, code}}."""
    kind = ERROR_TYPES[status]
    if openai:
        error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": None}
    else:
        error = {"code": status, "message": message, "type": kind}
    return web.json_response({"error": error}, status=status)


def model_not_found(model: str) -> web.Response:
    """A request for a model this worker does not serve, as vLLM refuses it: 404,
    "The model `x` does not exist." of type NotFoundError (vLLM's _check_model), with
    OpenAI's code for it."""
    error = {
        "message": f"The model `{model}` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": "model_not_found",
    }
    return web.json_response({"error": error}, status=404)


# -- the server ----------------------------------------------------------------------


class DevWorker:
    """The HTTP face of an Engine."""

    def __init__(self, engine: Engine, load_ms: int) -> None:
        self.engine = engine
        self.ready_at = time.monotonic() + load_ms / 1000
        self.started = int(time.time())

    @property
    def loading(self) -> bool:
        return time.monotonic() < self.ready_at

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/props", self.props)
        app.router.add_get("/slots", self.slots)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/completion", self.completion)
        app.router.add_post("/v1/completions", self.openai_completion)
        app.router.add_post("/v1/chat/completions", self.openai_chat)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self.loading:
            # The llama-server README's body, and the `status` older llama-servers sent.
            body = {
                "status": "loading model",
                "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"},
            }
            return web.json_response(body, status=503)
        return web.json_response({"status": "ok"})

    async def props(self, request: web.Request) -> web.Response:
        engine = self.engine
        return web.json_response(
            {
                "default_generation_settings": {
                    "params": {"n_predict": -1, "seed": -1, "temperature": 0.8, "top_p": 0.95}
                },
                "total_slots": engine.slots,
                "model_path": engine.model,
                "model_alias": engine.model,
                "build_info": "development worker",
                "is_sleeping": False,
                "development_worker": True,
            }
        )

    async def slots(self, request: web.Request) -> web.Response:
        slots = []
        for slot in range(self.engine.slots):
            seq = self.engine.by_slot.get(slot)
            slots.append(
                {
                    "id": slot,
                    "id_task": -1 if seq is None else seq.task_id,
                    "is_processing": seq is not None,
                    "next_token": {
                        "has_next_token": seq is not None and not seq.finished,
                        "n_remain": -1 if seq is None else seq.n_max - seq.n_decoded,
                        "n_decoded": 0 if seq is None else seq.n_decoded,
                    },
                }
            )
        return web.json_response(slots)

    async def models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.engine.model,
            "object": "model",
            "created": self.started,
            "owned_by": "devworker",
        }
        return web.json_response({"object": "list", "data": [model]})

    async def not_found(self, request: web.Request) -> web.Response:
        openai = request.path.startswith("/v1/")
        return error_response(openai, 404, f"no route {request.method} {request.path}")

    async def completion(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, LlamaCpp)

    async def openai_completion(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, OpenAICompletion)

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, OpenAIChat)

    async def _complete(self, request: web.Request, kind: type[Dialect]) -> web.StreamResponse:
        try:
            body = Body(await request.read())
            job = kind.parse(body)
        except web.HTTPRequestEntityTooLarge:
            return error_response(kind.openai, 413, f"the body exceeds {MAX_BODY_BYTES} bytes")
        except BadRequest as exc:
            return error_response(kind.openai, 400, exc.message, exc.param)
        # vLLM serves only the names it was started with (--served-model-name, else the
        # model's path), so a core that sends another name must fail here as it would
        # there. llama-server ignores `model`, and so does /completion here.
        model = body.get("model")
        if kind.openai and model is not None:
            if not isinstance(model, str):
                return error_response(kind.openai, 400, "model must be a string", "model")
            if model != self.engine.model:
                return model_not_found(model)
        if self.loading:
            return error_response(kind.openai, 503, "Loading model")
        dialect = kind(self, job)
        # aiohttp cancels this handler when the client disconnects (handler_cancellation),
        # which leaves `sequence` and frees the slot, wherever the request is.
        async with self.engine.sequence(job) as seq:
            if not job.stream:
                parts = [piece.text async for pieces in seq.pieces() for piece in pieces]
                return web.json_response(dialect.whole(seq, "".join(parts)))
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            try:
                await response.prepare(request)
                opening = dialect.opening()
                if opening:
                    await response.write(b"".join(_sse(event) for event in opening))
                async for pieces in seq.pieces():
                    await response.write(b"".join(_sse(dialect.piece(seq, p)) for p in pieces))
                # The last events and the response's end in one write: a client then
                # sees the end with them, and may keep the connection for another.
                await response.write_eof(b"".join(_sse(event) for event in dialect.closing(seq)))
            except ConnectionError:
                pass  # the client went away; leaving `sequence` frees the slot
            return response


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT; a failed batching loop ends the process too."""
    engine = Engine(
        args.model,
        args.slots,
        args.tokens_per_sec,
        args.prefill_tokens_per_sec,
        args.batch_exponent,
    )
    worker = DevWorker(engine, args.load_ms)
    runner = web.AppRunner(
        worker.app(),
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        access_log=None,  # quiet: the orchestrator logs what matters
    )
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    batching = asyncio.create_task(engine.run())
    stopped = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({batching, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await runner.cleanup()
        stopped.cancel()
        if batching.done():
            batching.result()  # raise what ended the loop: the worker is broken
        batching.cancel()


DESCRIPTION = """\
A DEVELOPMENT STAND-IN for an inference server: it loads no model and needs no GPU.
It answers with deterministic filler text (the same model, prompt and seed always
give the same tokens) and models a GPU's timing only roughly: a time to first token
that grows with the prompt (prefill), and continuous batching, where the aggregate
rate grows with the number of sequences decoding while each one slows.

It speaks llama.cpp's llama-server API (GET /health, /props, /slots; POST /completion)
and OpenAI's (GET /v1/models; POST /v1/completions, /v1/chat/completions), both at once.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="devworker",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the name it answers as")
    parser.add_argument(
        "--tokens-per-sec",
        type=float,
        default=200.0,
        help="decode rate of one sequence alone (default: %(default)s)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=1,
        help=f"sequences served at once, 1..{MAX_WORKER_SLOTS}; more requests wait their turn"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-tokens-per-sec",
        type=float,
        default=4000.0,
        help="prompt processing rate: the time to first token is prompt tokens / this,"
        " a prompt counting ceil(UTF-8 bytes / 4) tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-exponent",
        type=float,
        default=0.7,
        help="with n sequences decoding, the aggregate rate is tokens-per-sec * n**this,"
        " each sequence getting tokens-per-sec * n**(this - 1) (default: %(default)s)",
    )
    parser.add_argument(
        "--load-ms", type=int, default=0, help="simulated model load time (default: 0)"
    )
    args = parser.parse_args(argv)
    if args.tokens_per_sec <= 0 or args.prefill_tokens_per_sec <= 0:
        parser.error("--tokens-per-sec and --prefill-tokens-per-sec must be positive")
    if not 1 <= args.slots <= MAX_WORKER_SLOTS:
        parser.error(f"--slots must be within 1..{MAX_WORKER_SLOTS}")
    if not 0 <= args.batch_exponent <= 1:
        parser.error("--batch-exponent must be within 0..1")
    _die_with_parent()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
