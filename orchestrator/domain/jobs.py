"""Jobs: the record the service keeps, its states, and submit validation. Pure.

How a job moves between states is `orchestrator/domain/transitions.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum

from orchestrator.domain.context import PRIORITIES, Catalog, Job, RetryConfig, Tenant, estimate_job
from orchestrator.domain.errors import InvalidRequestError


class JobState(StrEnum):
    """A job's state. The values are what the store, the logs and the metrics carry."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = frozenset({JobState.QUEUED, JobState.DISPATCHED, JobState.RUNNING})
IN_FLIGHT = frozenset({JobState.DISPATCHED, JobState.RUNNING})
TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """What one tenant may hold queued and submit per minute (jobs without a tenant
    count as the tenant ""). The config's `limits.per_tenant` are the defaults; a
    tenant's `limits` in the tenants file override them field by field.

    None: not set (an override falls back to the default; a default means unlimited);
    -1: unlimited. Tokens are `max_tokens` plus the prompt's bytes / 4, the usual
    estimate of a prompt's tokens, so that a limit holds before the prompt is tokenized.
    """

    max_queued_jobs: int | None = None
    max_queued_prompt_bytes: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value != -1 and value <= 0:
                raise ValueError(f"{f.name} must be positive, or -1 for unlimited; got {value}")

    def over(self, defaults: TenantLimits) -> TenantLimits:
        """These limits where they are set, `defaults` elsewhere."""
        mine = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(defaults, **{k: v for k, v in mine.items() if v is not None})


def prompt_tokens(prompt_bytes: int) -> int:
    """The tokens a prompt is counted as before it is tokenized: its bytes / 4, rounded up."""
    return -(-prompt_bytes // 4)


def finish_reason_of(said: str, tokens: int, max_tokens: int) -> str:
    """Why a completed generation stopped, as OpenAI says it: what the worker `said`,
    or, when it did not, "length" if it reached `max_tokens` and "stop" before."""
    return said or ("length" if tokens >= max_tokens else "stop")


@dataclass(frozen=True, slots=True)
class SubmitLimits:
    """Bounds on a submitted job (the config's `limits`)."""

    max_prompt_bytes: int = 1024 * 1024
    max_tokens: int = 32_768
    # Queued prompts stay in the core's memory until their jobs are dispatched: this
    # bounds them for all tenants together (a full queue is RESOURCE_EXHAUSTED).
    max_queued_prompt_bytes: int = 1024**3
    # Every tenant's share of the queue by default: a tenth of the default capacity
    # (100000 jobs) and a quarter of the queued prompt bytes, so that no one tenant can
    # fill the queue for the others. Rates are unlimited unless configured: what a
    # tenant may send per minute depends on the deployment's hardware and contracts.
    per_tenant: TenantLimits = TenantLimits(
        max_queued_jobs=10_000, max_queued_prompt_bytes=256 * 1024**2
    )


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    model_ref: str
    prompt: str
    prompt_hash: str
    priority: str
    max_tokens: int
    temperature: float
    created_at: int
    queued_at: int
    seq: int = 0  # submission order
    state: JobState = JobState.QUEUED
    tenant_id: str | None = None
    session_id: str | None = None
    seed: int | None = None
    request_id: str | None = None
    attempts: int = 0
    not_before: int = 0  # earliest time a retry may be dispatched
    dispatched_at: int | None = None
    finished_at: int | None = None
    worker_id: str | None = None
    output: str = ""
    tokens_generated: int = 0
    error: str = ""
    estimated_vram_bytes: int = 0
    estimated_duration_ms: int = 0
    # A chat request's messages as JSON (a list of {"role", "content"}), sent as they are
    # to an OpenAI-compatible worker; `prompt` then holds them rendered as one text
    # (`render_chat`), which the llama.cpp dialect sends and the hash and bounds count.
    messages: str = ""
    stop: tuple[str, ...] = ()
    top_p: float = 1.0
    prompt_tokens: int = 0  # as the worker counted them (its usage); 0 until it said
    first_token_at: int | None = None  # of its latest attempt (none while queued again)
    finish_reason: str = ""  # of a completed job: "length" (max_tokens reached) or "stop"

    @property
    def held_bytes(self) -> int:
        """What the job holds in memory while queued: its prompt, and a chat's messages."""
        return len(self.prompt.encode()) + len(self.messages.encode())

    @property
    def tokens_estimate(self) -> int:
        """What the job counts as before it is tokenized: `max_tokens` and its prompt."""
        return self.max_tokens + prompt_tokens(len(self.prompt.encode()))

    @property
    def input_tokens(self) -> int:
        """The prompt's tokens: the worker's count, or bytes / 4 when it did not say."""
        return self.prompt_tokens or prompt_tokens(len(self.prompt.encode()))

    @property
    def ttft_ms(self) -> int | None:
        """Submit to the first token of its latest attempt, for a completed job the one
        that completed (queueing and failed attempts included): what a client waits
        before the output it keeps."""
        return None if self.first_token_at is None else self.first_token_at - self.created_at

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first, of the attempt that completed, for a
        completed job of two or more."""
        if self.first_token_at is None or self.finished_at is None or self.tokens_generated < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.tokens_generated - 1)

    def to_job(self) -> Job:
        """The job as a scheduler sees it in ctx.queue (no prompt: only its hash)."""
        return Job(
            id=self.id,
            model_ref=self.model_ref,
            priority=self.priority,
            tenant_id=self.tenant_id,
            session_id=self.session_id,
            prompt_hash=self.prompt_hash,
            max_tokens=self.max_tokens,
            seed=self.seed,
            temperature=self.temperature,
            created_at=self.created_at,
            queued_at=self.queued_at,
            retry_count=max(0, self.attempts),
            estimated_vram_bytes=self.estimated_vram_bytes,
            estimated_duration_ms=self.estimated_duration_ms,
        )


@dataclass(frozen=True, slots=True)
class SubmitSpec:
    """A submit request as plain values (the servicer fills it from protobuf)."""

    model: str
    prompt: str
    max_tokens: int
    priority: str = ""
    seed: int | None = None
    temperature: float = 0.0
    tenant_id: str = ""
    session_id: str = ""
    request_id: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content); prompt unused then
    stop: tuple[str, ...] = ()
    top_p: float = 1.0


def in_scope(tenant_id: str | None, scope: str | None) -> bool:
    """Whether a job of `tenant_id` exists for a caller whose job scope is `scope`:
    None sees every tenant's jobs, a tenant id only that tenant's, "" only jobs without
    a tenant (domain/identity.py, `Identity.job_scope`)."""
    return scope is None or (tenant_id or "") == scope


CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_CHAT_MESSAGES = 1024
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_STOP_BYTES = 256


def render_chat(messages: tuple[tuple[str, str], ...]) -> str:
    """A chat as one prompt text: what the llama.cpp dialect (which has no chat
    template of its own on `/completion`) is sent, and what the prompt hash and the
    prompt bounds count. One "role: content" line per message, then "assistant:"."""
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


def submitted_prompt(spec: SubmitSpec) -> str:
    """The prompt a submit stands for: its prompt, or its chat rendered."""
    return render_chat(spec.messages) if spec.messages else spec.prompt


def validate_submit(
    spec: SubmitSpec,
    *,
    catalog: Catalog,
    tenants: dict[str, Tenant],
    limits: SubmitLimits,
    platform_mode: bool,
) -> tuple[str, str]:
    """(canonical model_ref, priority), or InvalidRequestError naming the bad field."""
    if not spec.model:
        raise InvalidRequestError("model", "required")
    model = catalog.get(spec.model)
    if model is None:
        known = ", ".join(sorted(catalog.aliases) or sorted(catalog.models)[:5])
        raise InvalidRequestError("model", f"unknown model {spec.model!r} (known: {known})")
    if spec.max_tokens <= 0:
        raise InvalidRequestError("max_tokens", f"must be positive, got {spec.max_tokens}")
    if spec.max_tokens > limits.max_tokens:
        raise InvalidRequestError(
            "max_tokens", f"{spec.max_tokens} exceeds the limit of {limits.max_tokens}"
        )
    if spec.messages and spec.prompt:
        raise InvalidRequestError("prompt", "give a prompt or chat messages, not both")
    if len(spec.messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequestError(
            "messages", f"{len(spec.messages)} messages exceeds the limit of {MAX_CHAT_MESSAGES}"
        )
    for index, (role, _) in enumerate(spec.messages):
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                "messages", f"message {index}: role must be one of {', '.join(CHAT_ROLES)}"
            )
    # Refused here, by field, rather than as a UnicodeEncodeError from the store.
    for field, texts in (
        ("prompt", (spec.prompt,)),
        ("messages", tuple(content for _, content in spec.messages)),
        ("stop", spec.stop),
        ("request_id", (spec.request_id,)),
        ("session_id", (spec.session_id,)),
        ("tenant_id", (spec.tenant_id,)),
    ):
        if not all(_is_utf8(text) for text in texts):
            raise InvalidRequestError(field, "must be valid UTF-8 text")
    if len(spec.stop) > MAX_STOP_SEQUENCES or any(
        not s or len(s.encode()) > MAX_STOP_BYTES for s in spec.stop
    ):
        raise InvalidRequestError(
            "stop", f"at most {MAX_STOP_SEQUENCES} non-empty sequences of {MAX_STOP_BYTES} bytes"
        )
    if not 0.0 < spec.top_p <= 1.0:
        raise InvalidRequestError("top_p", f"must be within (0, 1], got {spec.top_p}")
    size = len(submitted_prompt(spec).encode())
    if size > limits.max_prompt_bytes:
        raise InvalidRequestError(
            "prompt", f"{size} bytes exceeds the limit of {limits.max_prompt_bytes} bytes"
        )
    priority = spec.priority or "batch"
    if priority not in PRIORITIES:
        raise InvalidRequestError(
            "priority", f"must be one of {', '.join(PRIORITIES)}, got {priority!r}"
        )
    if not 0.0 <= spec.temperature <= 2.0:
        raise InvalidRequestError("temperature", f"must be within 0..2, got {spec.temperature}")
    if spec.seed is not None and spec.seed < 0:
        raise InvalidRequestError("seed", f"must not be negative, got {spec.seed}")
    if platform_mode and not spec.tenant_id:
        raise InvalidRequestError("tenant_id", "required in platform mode")
    if spec.tenant_id and platform_mode and spec.tenant_id not in tenants:
        raise InvalidRequestError("tenant_id", f"unknown tenant {spec.tenant_id!r}")
    if len(spec.request_id) > 256 or len(spec.session_id) > 256 or len(spec.tenant_id) > 256:
        raise InvalidRequestError("request_id", "ids are limited to 256 characters")
    return model.model_ref, priority


def _is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8. A lone surrogate ("\\ud800" in JSON, which an
    HTTP client may send) does not: it could be neither stored, hashed nor sent."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def new_record(
    job_id: str, spec: SubmitSpec, model_ref: str, priority: str, catalog: Catalog, now_ms: int
) -> JobRecord:
    vram, duration = estimate_job(catalog, model_ref, spec.max_tokens)
    prompt = submitted_prompt(spec)
    messages = [{"role": role, "content": content} for role, content in spec.messages]
    return JobRecord(
        id=job_id,
        model_ref=model_ref,
        prompt=prompt,
        prompt_hash="sha256:" + hashlib.sha256(prompt.encode()).hexdigest(),
        messages=json.dumps(messages, ensure_ascii=False) if messages else "",
        stop=spec.stop,
        top_p=spec.top_p,
        priority=priority,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        created_at=now_ms,
        queued_at=now_ms,
        tenant_id=spec.tenant_id or None,
        session_id=spec.session_id or None,
        seed=spec.seed,
        request_id=spec.request_id or None,
        estimated_vram_bytes=vram,
        estimated_duration_ms=duration,
    )


def retry_delay_ms(retry: RetryConfig, attempts: int) -> int | None:
    """Backoff before the next attempt, or None when no attempt is left."""
    if not retry.enabled or attempts >= retry.max_attempts:
        return None
    delay = retry.initial_delay_ms * retry.multiplier ** max(0, attempts - 1)
    return int(min(delay, retry.max_delay_ms))
