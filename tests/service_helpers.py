"""Helpers for tests that run the real service: configs, a server in-process, gRPC stubs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc import aio

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc
from orchestrator.api.server import Server
from orchestrator.config.credentials import token_hash
from orchestrator.config.settings import ServiceConfig, load_config
from orchestrator.wire.channel import ClientAuth, open_channel

LLAMA = "hf:meta-llama/Llama-3.1-8B-Instruct@main::file=Q4_K_M.gguf"
# The operator key of test configs that need credentials (platform mode): tests that
# are not about authentication call as this operator.
OPERATOR_TOKEN = "orch_test-operator"
OPERATOR_KEY = {"name": "test-operator", "role": "operator", "sha256": token_hash(OPERATOR_TOKEN)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, **overrides: Any) -> Path:
    """A config file for tests: the embedded default, on free ports, state in `directory`."""
    base = yaml.safe_load(
        (
            Path(__file__).parent.parent / "orchestrator" / "config" / "default_config.yaml"
        ).read_text()
    )
    base["state_dir"] = str(directory / "state")
    base["listen"] = {"grpc": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}"}
    base["scheduler"] = {**base["scheduler"], "tick_ms": 100}
    base["local_pool"]["worker"]["tokens_per_sec"] = 500
    low = free_port()
    base["local_pool"]["worker"]["port_range"] = [low, min(low + 400, 65535)]
    base["retry"] = {
        "enabled": True,
        "max_attempts": 5,
        "initial_delay_ms": 50,
        "multiplier": 2.0,
        "max_delay_ms": 1000,
    }
    merge(base, overrides)
    if base.get("deployment_mode") == "platform" and "auth" not in base:
        base["auth"] = {"keys": [OPERATOR_KEY]}
    path = directory / "orchestratord.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Deep-merge `overrides` into `base`; None removes a key."""
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


@dataclass
class Running:
    server: Server
    config: ServiceConfig
    channel: aio.Channel

    @property
    def jobs(self) -> pb_grpc.JobServiceStub:
        return pb_grpc.JobServiceStub(self.channel)

    @property
    def pools(self) -> pb_grpc.PoolServiceStub:
        return pb_grpc.PoolServiceStub(self.channel)

    @property
    def admin(self) -> pb_grpc.AdminServiceStub:
        return pb_grpc.AdminServiceStub(self.channel)

    @property
    def http(self) -> str:
        scheme = "https" if self.config.tls.enabled else "http"
        return f"{scheme}://127.0.0.1:{self.server.http_port}"

    @property
    def operator_headers(self) -> dict[str, str]:
        """What an HTTP call as the test operator sends (nothing when no keys are set)."""
        return {"Authorization": f"Bearer {OPERATOR_TOKEN}"} if self.config.auth.configured else {}

    async def submit(self, **fields: Any) -> pb.JobInfo:
        fields.setdefault("model", "llama-8b")
        fields.setdefault("prompt", "hello")
        fields.setdefault("max_tokens", 8)
        reply: pb.JobInfo = await self.jobs.Submit(pb.SubmitRequest(**fields))
        return reply

    async def wait_finished(self, job_id: str, timeout_s: float = 30.0) -> pb.JobInfo:
        """Follow Watch until the job ends."""
        last = None
        async with asyncio.timeout(timeout_s):
            async for event in self.jobs.Watch(pb.WatchRequest(job_id=job_id)):
                last = event.job
        assert last is not None
        return last


@contextlib.asynccontextmanager
async def running_service(
    config_path: Path, *, auth: ClientAuth | None = None, **kwargs: Any
) -> AsyncIterator[Running]:
    """The service of `config_path`, and a channel to it as `auth` (default: the test
    operator when the config has keys)."""
    config = load_config(config_path)
    server = Server(config, **kwargs)
    await server.start()
    if auth is None:
        assert not config.tls.enabled, "a TLS service needs auth= naming its CA"
        auth = ClientAuth(token=OPERATOR_TOKEN if config.auth.configured else "")
    channel = open_channel(f"127.0.0.1:{server.grpc_port}", auth)
    try:
        yield Running(server, config, channel)
    finally:
        await channel.close()
        try:
            async with asyncio.timeout(90):
                await server.stop()
        except TimeoutError:
            for task in asyncio.all_tasks():
                task.print_stack()  # name the coroutine that kept the drain from finishing
            raise


def code_of(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, aio.AioRpcError), exc
    return exc.code()
