"""The client that runs a job on an inference worker: stream it from its completion API.

The API is llama.cpp's llama-server `POST /completion` with `"stream": true`
(server-sent events, one JSON object per `data:` line, the last with
`"stop": true`); the development worker speaks the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from orchestrator.domain.jobs import JobRecord


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
        tokens = 0
        started = False
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session().post(uri + "/completion", json=body) as response:
                    if response.status != 200:
                        text = (await response.text())[:200]
                        return Outcome(False, error=f"worker answered {response.status}: {text}")
                    async for raw in response.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        chunk = json.loads(line[5:])
                        if not started:
                            started = True
                            await on_first_token()
                        if chunk.get("stop"):
                            tokens = int(chunk.get("tokens_predicted", tokens))
                            parts.append(chunk.get("content", ""))
                            return Outcome(True, "".join(parts), tokens)
                        parts.append(chunk.get("content", ""))
                        tokens += 1
            return Outcome(False, error="the worker closed the stream before finishing")
        except TimeoutError:
            return Outcome(False, error=f"no result within {timeout_s:.0f} s")
        except aiohttp.ClientConnectorError as exc:
            return Outcome(False, error=f"worker unreachable: {exc}", worker_failed=True)
        except (aiohttp.ClientError, ValueError) as exc:
            return Outcome(False, error=f"{type(exc).__name__}: {exc}", worker_failed=True)
