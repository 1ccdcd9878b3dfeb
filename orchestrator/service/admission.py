"""Submit admission: whether a valid job fits the service's bounds, checked in order:

1. the queue (every tenant): `queue.capacity` jobs and `limits.max_queued_prompt_bytes`,
   since queued prompts stay in memory until their jobs are dispatched (QueueFullError);
2. the tenant's share of the queue: its `max_queued_jobs` and `max_queued_prompt_bytes`
   (RateLimitedError);
3. the tenant's rates: `requests_per_minute` and `tokens_per_minute`, each a token
   bucket that refills continuously and holds one minute's worth, so a tenant may spend
   a minute's worth at once, as gateways allow (RateLimitedError, saying when to retry).

A tenant's limits are its `limits` in the tenants file over the config's
`limits.per_tenant`; jobs without a tenant (home and lab) have the queue's bounds only,
so that `queue.capacity` alone sizes a service without tenants. A job that could
never fit (a prompt larger than a byte limit, more tokens than a minute's worth) is
INVALID_ARGUMENT rather than a refusal to retry. Every refusal is counted by limit
(`orchestrator_jobs_limited_total`). State is in memory: a restart refills the buckets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from orchestrator.domain.context import QueueConfig
from orchestrator.domain.errors import (
    InvalidRequestError,
    OrchestratorError,
    QueueFullError,
    RateLimitedError,
)
from orchestrator.domain.jobs import SubmitLimits, TenantLimits
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.support.rate import TokenBucket

# Buckets of tenants that have not submitted for a minute are full, the same as no
# bucket: they are dropped once there are this many (tenant ids may be the client's).
PRUNE_AT = 4096


class QueuedJobs(Protocol):
    """The queue as the live cluster state counts it (orchestrator/state/cluster.py)."""

    @property
    def queue_depth(self) -> int: ...
    @property
    def queued_prompt_bytes(self) -> int: ...
    def tenant_queued(self, tenant: str) -> tuple[int, int]: ...


class Admission:
    def __init__(
        self,
        live: QueuedJobs,
        metrics: ServiceMetrics,
        *,
        limits: SubmitLimits,
        queue: QueueConfig,
        tenant_limits: Mapping[str, TenantLimits],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.live = live
        self.metrics = metrics
        self.limits = limits
        self.queue = queue
        self.tenant_limits = tenant_limits  # the tenants file's overrides; replaced on reload
        self.clock = clock
        # Admitted jobs that the store is still writing: they count as queued, so that
        # concurrent submits cannot all pass a bound that only one of them fits.
        self._pending: dict[str, tuple[int, int]] = {}  # tenant -> (jobs, prompt bytes)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}  # (tenant, limit) -> bucket
        self._prune_at = PRUNE_AT

    def limits_of(self, tenant: str) -> TenantLimits:
        defaults = self.limits.per_tenant
        mine = self.tenant_limits.get(tenant)
        return mine.over(defaults) if mine is not None else defaults

    @contextlib.contextmanager
    def admit(self, tenant: str, prompt_bytes: int, tokens: int) -> Iterator[None]:
        """Admit one job of `tenant` ("": none) that holds `prompt_bytes` while queued
        and counts as `tokens` (`JobRecord.held_bytes`, `.tokens_estimate`), or raise;
        the job counts as queued while the context is open, which is while it is being
        stored and queued."""
        limits = self.limits_of(tenant)
        self._check_queue(tenant, limits, prompt_bytes)
        self._spend(tenant, limits, tokens)
        jobs, held = self._pending.get(tenant, (0, 0))
        self._pending[tenant] = (jobs + 1, held + prompt_bytes)
        try:
            yield
        finally:
            jobs, held = self._pending.pop(tenant)
            if jobs > 1:
                self._pending[tenant] = (jobs - 1, held - prompt_bytes)

    def _check_queue(self, tenant: str, limits: TenantLimits, size: int) -> None:
        pending_jobs = sum(jobs for jobs, _ in self._pending.values())
        pending_bytes = sum(held for _, held in self._pending.values())
        capacity = self.queue.capacity
        if capacity >= 0 and self.live.queue_depth + pending_jobs >= capacity:
            full = QueueFullError(f"the queue is full ({capacity} jobs); retry when it has drained")
            raise self._refused("queue_capacity", full)
        maximum = self.limits.max_queued_prompt_bytes
        held = self.live.queued_prompt_bytes + pending_bytes
        self._check_size("queued_prompt_bytes", "limits.max_queued_prompt_bytes", size, maximum)
        if held + size > maximum:
            full = QueueFullError(
                f"queued prompts hold {held} bytes, and {size} more would exceed "
                f"limits.max_queued_prompt_bytes ({maximum}); retry when the queue has drained"
            )
            raise self._refused("queued_prompt_bytes", full)
        if not tenant:
            return  # jobs without a tenant share the queue's own bounds, not a tenant's
        who = _who(tenant)
        queued, held = self.live.tenant_queued(tenant)
        pending_jobs, pending_bytes = self._pending.get(tenant, (0, 0))
        queued, held = queued + pending_jobs, held + pending_bytes
        max_jobs = _bound(limits.max_queued_jobs)
        if max_jobs is not None and queued >= max_jobs:
            limited = RateLimitedError(
                f"{who} has {queued} jobs queued, its max_queued_jobs ({max_jobs}); retry "
                "when some of them have been dispatched"
            )
            raise self._refused("tenant_queued_jobs", limited)
        max_bytes = _bound(limits.max_queued_prompt_bytes)
        if max_bytes is None:
            return
        what = f"the max_queued_prompt_bytes of {who}"
        self._check_size("tenant_queued_prompt_bytes", what, size, max_bytes)
        if held + size > max_bytes:
            limited = RateLimitedError(
                f"{who} has {held} prompt bytes queued, and {size} more would exceed its "
                f"max_queued_prompt_bytes ({max_bytes}); retry when some of its jobs have "
                "been dispatched"
            )
            raise self._refused("tenant_queued_prompt_bytes", limited)

    def _spend(self, tenant: str, limits: TenantLimits, tokens: int) -> None:
        """Take one request and `tokens` from the tenant's buckets: from both or neither."""
        if not tenant:
            return  # rates are per tenant; a service without tenants has the queue's bounds
        taken: list[tuple[tuple[str, str], TokenBucket, int]] = []
        for name, cost in (("requests_per_minute", 1), ("tokens_per_minute", tokens)):
            per_minute = _bound(getattr(limits, name))
            if per_minute is None:
                continue
            if cost > per_minute:
                never = InvalidRequestError(
                    "max_tokens",
                    f"{cost} tokens (max_tokens plus the prompt's bytes / 4) exceed the "
                    f"{name} of {_who(tenant)} ({per_minute}): such a job is never admitted",
                )
                raise self._refused(f"tenant_{name}", never)
            key = (tenant, name)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = TokenBucket(per_minute, per_minute / 60, self.clock)
            elif bucket.burst != per_minute:  # the tenants file was reloaded
                bucket.retune(per_minute, per_minute / 60)
            if bucket.level < cost:
                wait_s = bucket.seconds_until(cost)
                limited = RateLimitedError(
                    f"{_who(tenant)} is over its {name} ({per_minute}); retry in {wait_s:.1f} s"
                )
                raise self._refused(f"tenant_{name}", limited)
            taken.append((key, bucket, cost))
        for key, bucket, cost in taken:
            bucket.take(cost)
            self._buckets[key] = bucket
        if len(self._buckets) > self._prune_at:
            self._prune()

    def _prune(self) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.level >= bucket.burst:
                del self._buckets[key]
        # Pruning again only after the table doubled keeps a submit's cost constant.
        self._prune_at = max(PRUNE_AT, 2 * len(self._buckets))

    def _check_size(self, limit: str, what: str, size: int, maximum: int) -> None:
        """A prompt larger than a byte limit on its own could never be queued."""
        if size > maximum:
            never = InvalidRequestError(
                "prompt", f"{size} bytes exceed {what} ({maximum}): never admitted"
            )
            raise self._refused(limit, never)

    def _refused(self, limit: str, error: OrchestratorError) -> OrchestratorError:
        self.metrics.limited.labels(limit).inc()
        return error


def _bound(limit: int | None) -> int | None:
    """A limit to compare with, or None when it is unlimited (unset or -1)."""
    return None if limit is None or limit < 0 else limit


def _who(tenant: str) -> str:
    return f"tenant {tenant!r}"
