"""Every sandbox limit, in one frozen dataclass shared by the core and the workers."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from orchestrator._proto import sandbox_pb2

MiB = 1024 * 1024

# Both ends of the sandbox channel: a full snapshot of 100,000 jobs is ~20 MB.
GRPC_MESSAGE_OPTIONS = (
    ("grpc.max_receive_message_length", 512 * MiB),
    ("grpc.max_send_message_length", 512 * MiB),
)
# Both ends of the fork server's socketpair: one JSON request or reply per datagram.
FORK_SERVER_MESSAGE_BYTES = MiB


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandbox worker and of each schedule() call it serves."""

    # The core's gRPC deadline for Schedule; past it the worker is SIGKILLed.
    deadline_ms: int = 50
    # Lua heap for the script, on top of the memory the context itself takes.
    lua_heap_bytes: int = 64 * MiB
    # Backstop for the whole process (virtual memory: a threaded gRPC worker maps ~310 MB).
    address_space_bytes: int = 1024 * MiB
    # Cumulative CPU seconds before the kernel ends the worker (it is then replaced).
    cpu_seconds: int = 3600
    open_files: int = 64
    file_size_bytes: int = 8 * MiB
    # Per call: what ctx.log_* and ctx.emit_metric may send back.
    max_log_records: int = 100
    max_log_bytes: int = 16 * 1024
    max_metrics: int = 50
    max_batch_actions: int = 256
    # Longest string accepted in a decision (ids, reasons).
    max_string_bytes: int = 1024
    # Time allowed for Load (compiling and running the chunk's top level).
    load_timeout_ms: int = 2000
    # Time allowed for spawning a worker until it answers Health.
    spawn_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{field.name} must be a positive integer")

    def to_proto(self) -> sandbox_pb2.Limits:
        """The Lua-side limits, sent with Load."""
        return sandbox_pb2.Limits(
            lua_heap_bytes=self.lua_heap_bytes,
            max_log_records=self.max_log_records,
            max_log_bytes=self.max_log_bytes,
            max_metrics=self.max_metrics,
            max_batch_actions=self.max_batch_actions,
            max_string_bytes=self.max_string_bytes,
        )

    @classmethod
    def from_proto(cls, msg: sandbox_pb2.Limits) -> SandboxLimits:
        """Rebuild the Lua-side limits in the worker (process limits keep their defaults)."""
        return cls(
            lua_heap_bytes=msg.lua_heap_bytes,
            max_log_records=msg.max_log_records,
            max_log_bytes=msg.max_log_bytes,
            max_metrics=msg.max_metrics,
            max_batch_actions=msg.max_batch_actions,
            max_string_bytes=msg.max_string_bytes,
        )

    def to_json(self) -> str:
        """Serialized for the worker's command line (process limits apply before gRPC starts)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SandboxLimits:
        return cls(**json.loads(text))
