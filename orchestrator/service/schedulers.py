"""Which scheduler is in charge: versions, deploy, rollback, hot reload, auto-rollback.

A scheduler is validated (orchestrator/policy/validate.py) before it is deployed; the
running one stays on any failure. Every deployment is a version in SQLite
(docs/ARCHITECTURE.md, D14). In home and lab mode the configured file is watched and
redeployed when it changes (D11), and a version that trips the circuit breaker soon
after its deployment gives way to the one before it (D20). In platform mode the
platform scheduler cannot be replaced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import watchfiles

from orchestrator.config.settings import ServiceConfig
from orchestrator.domain.errors import (
    NotFoundError,
    OrchestratorError,
    PermissionDeniedError,
    SchedulerLoadError,
)
from orchestrator.policy.parse import PolicyError
from orchestrator.policy.validate import (
    Report,
    ValidationFailedError,
    detect_language,
    policy_version,
    to_lua,
    validate_policy,
)
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.scheduling.engine import platform_source
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.state.versions import Version
from orchestrator.support.clock import now_ms
from orchestrator.support.log import get_logger
from orchestrator.support.tasks import cancel_and_wait

log = get_logger("service")


@dataclass(frozen=True)
class ActiveScheduler:
    name: str
    source: str
    language: str  # "lua" or "yaml"
    version_id: int  # 0: the platform scheduler
    since_ms: int


@dataclass(frozen=True)
class PolicyFile:
    name: str
    source: str
    language: str
    lua: str


def read_scheduler_file(config: ServiceConfig) -> tuple[PolicyFile | None, str]:
    """The scheduler named in the config, compiled if it is YAML, and why not if it is
    unusable (the platform scheduler then runs, and status says why)."""
    if not config.scheduler.file:
        return None, ""
    path = config.path(config.scheduler.file)
    try:
        source = path.read_text()
    except OSError as exc:
        raise OrchestratorError(f"scheduler.file: {path}: {exc.strerror}") from None
    language = detect_language(source, path.name)
    try:
        lua = to_lua(source, language, path.name)
    except PolicyError as exc:
        log.error("scheduler.load_failed", error=str(exc))
        return None, str(exc)
    return PolicyFile(path.name, source, language, lua), ""


class Breaker(Protocol):
    @property
    def trips(self) -> int: ...


class UserEngine(Protocol):
    """The engine whose user scheduler this part replaces (SchedulingEngine)."""

    @property
    def breaker(self) -> Breaker: ...
    @property
    def user_load_error(self) -> SchedulerLoadError | None: ...
    async def replace_user(self, source: str | None, name: str = "scheduler.lua") -> None: ...


class VersionHistory(Protocol):
    """Deployed versions (orchestrator/state/versions.py, VersionStore)."""

    def add(self, entry: Version) -> Version: ...
    def get(self, version_id: int) -> Version | None: ...
    def active(self) -> Version | None: ...
    def before(self, version_id: int) -> Version | None: ...
    def deactivate(self) -> None: ...


class SchedulerVersions:
    def __init__(
        self,
        config: ServiceConfig,
        engine: UserEngine,
        versions: VersionHistory,
        metrics: EngineMetrics,
        *,
        initial: PolicyFile | None,
        startup_error: str,
    ) -> None:
        self.config = config
        self.engine = engine
        self.versions = versions
        self.metrics = metrics
        self.initial = initial
        self.startup_error = startup_error  # why the configured file is not running
        self.active = ActiveScheduler("platform", platform_source(), "lua", 0, now_ms())
        self._deploy_lock = asyncio.Lock()
        self._trips_at_activation = 0
        self._rollback_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    def start_watching(self) -> None:
        """Redeploy the configured file when it changes (home and lab mode, `hot_reload`)."""
        c = self.config
        if c.scheduler.file and c.scheduler.hot_reload and not c.platform_mode:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        await cancel_and_wait(self._watch_task)
        await cancel_and_wait(self._rollback_task)

    def record_initial(self) -> None:
        """After the engine started: the configured file, if it loaded, is the active
        version (a new one when its content changed since the last start)."""
        initial = self.initial
        load_error = self.engine.user_load_error
        if load_error is not None:
            self.startup_error = str(load_error)
        if initial is None or load_error is not None:
            return
        sha = hashlib.sha256(initial.source.encode()).hexdigest()
        active = self.versions.active()
        if active is None or active.sha256 != sha:
            active = self.versions.add(self._version_entry(
                initial.name, initial.source, initial.language, "file", "startup",
                "loaded at start-up from scheduler.file", "{}",
            ))  # fmt: skip
        self._activate(active)

    def _version_entry(self, name: str, source: str, language: str, deployer: str, reason: str,
                       summary: str, report: str) -> Version:  # fmt: skip
        return Version(
            0, hashlib.sha256(source.encode()).hexdigest(), name,
            policy_version(source, language, name), language, source, deployer, now_ms(), reason,
            summary, report, True,
        )  # fmt: skip

    def _activate(self, version: Version | None) -> None:
        if version is None:
            self.active = ActiveScheduler("platform", platform_source(), "lua", 0, now_ms())
        else:
            self.active = ActiveScheduler(
                version.name, version.source, version.language, version.id, now_ms()
            )
        self._trips_at_activation = self.engine.breaker.trips

    async def validate(self, source: str, language: str, name: str) -> Report:
        return await validate_policy(
            source, name or "policy", language or None, scheduler=self.config.scheduler
        )

    async def deploy(
        self, source: str, language: str = "", name: str = "", deployer: str = "", *,
        reason: str = "deploy",
    ) -> tuple[Version, Report]:  # fmt: skip
        """Validate, then put the scheduler in charge. The running one stays on any failure."""
        if self.config.platform_mode:
            raise PermissionDeniedError("platform mode: the platform scheduler cannot be replaced")
        async with self._deploy_lock:
            name = name or "policy"
            language = language or detect_language(source, name)
            report = await self.validate(source, language, name)
            if not report.ok:
                self.metrics.reloads.labels("rejected").inc()
                log.warning("scheduler.deploy_rejected", name=name, reason=reason,
                            summary=report.summary())  # fmt: skip
                raise ValidationFailedError(report)
            await self.engine.replace_user(report.lua, name)
            version = self.versions.add(self._version_entry(
                name, source, language, deployer or "unknown", reason, report.summary(),
                json.dumps(report.to_dict()),
            ))  # fmt: skip
            self._activate(version)
            self.metrics.reloads.labels("applied").inc()
            log.info("scheduler.deployed", version_id=version.id, name=name,
                     semver=version.version, sha256=version.sha256[:12], reason=reason)  # fmt: skip
            return version, report

    async def rollback(self, version_id: int = 0, *, reason: str = "") -> Version | None:
        """Back to `version_id`, or to the version before the active one; None: the
        platform scheduler. Rolled-back versions were validated when first deployed."""
        if self.config.platform_mode:
            raise PermissionDeniedError("platform mode: there is no user scheduler to roll back")
        async with self._deploy_lock:
            active = self.versions.active()
            if version_id:
                target = self.versions.get(version_id)
                if target is None:
                    raise NotFoundError(f"scheduler version #{version_id} does not exist")
            else:
                target = self.versions.before(active.id) if active else None
                if active is None:
                    raise NotFoundError("no user scheduler is active; nothing to roll back")
            why = reason or (f"rollback to #{target.id}" if target else "rollback to platform")
            if target is None:
                await self.engine.replace_user(None)
                self.versions.deactivate()
                self._activate(None)
                log.info("scheduler.rolled_back", to="platform", reason=why)
                return None
            await self.engine.replace_user(to_lua(target.source, target.language, target.name),
                                           target.name)  # fmt: skip
            version = self.versions.add(dataclasses.replace(
                target, deployer="rollback", reason=why, deployed_at=now_ms(),
            ))  # fmt: skip
            self._activate(version)
            self.metrics.reloads.labels("rollback").inc()
            log.info("scheduler.rolled_back", to=target.id, version_id=version.id, reason=why)
            return version

    async def _watch(self) -> None:
        """Home/lab hot reload: a changed file is validated, then deployed or refused."""
        path = self.config.path(self.config.scheduler.file or "").resolve()
        async for changes in watchfiles.awatch(path.parent, debounce=200, recursive=False):
            if not any(Path(changed).resolve() == path for _, changed in changes):
                continue
            try:
                source = path.read_text()
            except OSError as exc:
                log.warning("scheduler.reload_rejected", file=str(path), error=exc.strerror)
                continue
            active = self.versions.active()
            if hashlib.sha256(source.encode()).hexdigest() == (active.sha256 if active else ""):
                continue
            try:
                await self.deploy(source, "", path.name, "file", reason="reload")
            except OrchestratorError as exc:
                log.warning("scheduler.reload_rejected", file=str(path), error=str(exc),
                            running=self.active.name)  # fmt: skip

    def check_auto_rollback(self, result: CycleResult) -> None:
        """After each cycle (docs/ARCHITECTURE.md, D20): a version that trips the breaker
        soon after deploy goes back to the one before it, if there is one (home/lab only)."""
        window = self.config.scheduler.auto_rollback_window_s
        if self.config.platform_mode or window <= 0 or self.active.version_id == 0:
            return
        trips = self.engine.breaker.trips
        if trips <= self._trips_at_activation:
            return
        if now_ms() - self.active.since_ms > window * 1000:
            return
        if self._rollback_task is not None and not self._rollback_task.done():
            return
        previous = self.versions.before(self.active.version_id)
        if previous is None:
            return
        self._trips_at_activation = trips
        reason = (f"auto-rollback: circuit breaker tripped for #{self.active.version_id} "
                  f"within {window:.0f}s of its deployment")  # fmt: skip
        log.warning("scheduler.auto_rollback", from_version=self.active.version_id,
                    to_version=previous.id)  # fmt: skip
        self.metrics.reloads.labels("auto_rollback").inc()
        self._rollback_task = asyncio.get_running_loop().create_task(
            self._auto_rollback(previous.id, reason)
        )

    async def _auto_rollback(self, version_id: int, reason: str) -> None:
        try:
            await self.rollback(version_id, reason=reason)
        except OrchestratorError as exc:
            log.error("scheduler.auto_rollback_failed", error=str(exc))
