"""PoolRegistry (issue 14, findings 2, 3 and 9): a caller speaks only for its own pools,
reports only its own workers, on its own host, within bounds; pools are bounded in
number and expire when silent. The real cluster state; fakes for the local pool and
the job runner."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from orchestrator.config.settings import PoolsConfig
from orchestrator.domain.context import Gpu, HostReading, ProcessInfo
from orchestrator.domain.errors import (
    ErrorCode,
    InvalidRequestError,
    NotFoundError,
    OrchestratorError,
    PermissionDeniedError,
)
from orchestrator.domain.identity import LOCAL_OPERATOR, Identity, Role
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.service.pools import PoolRegistry
from orchestrator.state.cluster import ClusterState
from orchestrator.state.remote_pools import Heartbeat
from tests.fakes import CATALOG, CONFIG, MODEL, FakeLocalPool, GiB, record

NOW = 1_700_000_000_000
POOL_A = Identity("pool-a-key", Role.POOL, pool_ids=frozenset({"gpu-a"}))
POOL_B = Identity("pool-b-key", Role.POOL, pool_ids=frozenset({"gpu-b"}))
TENANT = Identity("acme-app", Role.TENANT, tenant_id="acme")
GPU = Gpu(0, "NVIDIA L4", 24 * GiB)


def worker(worker_id: str, host: str = "10.0.0.1", status: str = "ready") -> ProcessInfo:
    return ProcessInfo(worker_id, MODEL, (0,), 6 * GiB, f"http://{host}:18100", status, NOW)


def beat(pool_id: str, *workers: ProcessInfo, gpus: tuple[Gpu, ...] = (GPU,)) -> Heartbeat:
    return Heartbeat(pool_id, "", gpus, workers, (), HostReading(64 * GiB, 32 * GiB, 5.0, 8))


class FakeRunner:
    """Stops the jobs it is told are lost (the real one retries them: test_apply.py)."""

    def __init__(self) -> None:
        self.abandoned: list[tuple[str, str]] = []

    async def abandon(self, job_id: str, error: str) -> bool:
        self.abandoned.append((job_id, error))
        return True


@dataclasses.dataclass
class Rig:
    config: PoolsConfig
    local: FakeLocalPool = dataclasses.field(default_factory=FakeLocalPool)
    runner: FakeRunner = dataclasses.field(default_factory=FakeRunner)
    metrics: CollectorRegistry = dataclasses.field(default_factory=CollectorRegistry)
    now: int = NOW  # the registry's clock

    def __post_init__(self) -> None:
        self.local.add("local-w1")
        service = dataclasses.replace(CONFIG, pools=self.config)
        self.cluster = ClusterState(service, CATALOG, {}, self.local)
        self.registry = PoolRegistry(
            self.cluster, self.runner, self.local, self.config,
            ServiceMetrics(self.metrics, cycle_stall_s=30), wake=asyncio.Event(),
            clock=lambda: self.now,
        )  # fmt: skip

    def refusals(self, reason: str) -> float:
        value = self.metrics.get_sample_value(
            "orchestrator_pool_refusals_total", {"reason": reason}
        )
        return value or 0.0


@pytest.fixture
def rig() -> Rig:
    return Rig(CONFIG.pools)


def refused(call: Callable[[], object], error: type[OrchestratorError]) -> OrchestratorError:
    with pytest.raises(error) as info:
        call()
    return info.value


def test_a_pool_identity_speaks_only_for_its_own_pool_ids(rig: Rig) -> None:
    """Finding 2: anyone could register a pool, and heartbeat under another pool's id."""
    registry = rig.registry
    registry.register(POOL_A, "gpu-a", "http://10.0.0.1:9200")
    for call in (
        lambda: registry.register(POOL_B, "gpu-a", "http://10.0.0.66:9200"),
        lambda: registry.heartbeat(POOL_B, beat("gpu-a")),
        lambda: registry.register(TENANT, "gpu-t", "http://10.0.0.66:9200"),
        lambda: registry.heartbeat(TENANT, beat("gpu-a")),
    ):
        error = refused(call, PermissionDeniedError)
        assert error.code == ErrorCode.PERMISSION_DENIED
    assert "may not speak for pool 'gpu-a'" in str(error)
    assert rig.refusals("not_its_pool") == 4
    assert rig.cluster.remote.get("gpu-a").endpoint == "http://10.0.0.1:9200"  # type: ignore[union-attr]
    registry.heartbeat(POOL_A, beat("gpu-a"))
    registry.heartbeat(LOCAL_OPERATOR, beat("gpu-a"))  # an operator speaks for every pool


def test_a_heartbeat_of_an_unregistered_pool_is_not_found(rig: Rig) -> None:
    refused(lambda: rig.registry.heartbeat(POOL_A, beat("gpu-a")), NotFoundError)
    # Authorization first: a stranger does not learn which pools exist.
    refused(lambda: rig.registry.heartbeat(POOL_B, beat("gpu-a")), PermissionDeniedError)


def test_worker_uris_must_be_on_the_registered_host(rig: Rig) -> None:
    """Finding 2: a fake pool's worker URI pointed the core (and every tenant's
    prompts) at any server, and the core fetched it: SSRF."""
    rig.registry.register(POOL_A, "gpu-a", "http://10.0.0.1:9200")
    for uri_host in ("169.254.169.254", "127.0.0.1", "10.0.0.2"):
        error = refused(
            lambda h=uri_host: rig.registry.heartbeat(POOL_A, beat("gpu-a", worker("w1", h))),  # type: ignore[misc]
            InvalidRequestError,
        )
        assert isinstance(error, InvalidRequestError) and error.field == "workers[0].uri"
    assert not [w for _, w in rig.cluster.processes() if w.id == "w1"]
    rig.registry.heartbeat(POOL_A, beat("gpu-a", worker("w1")))
    assert ("gpu-a", "w1") in {(p, w.id) for p, w in rig.cluster.processes()}


@pytest.mark.parametrize("endpoint", ["", "not a url", "ftp://10.0.0.1:21", "10.0.0.1"])
def test_register_needs_a_valid_endpoint(rig: Rig, endpoint: str) -> None:
    error = refused(lambda: rig.registry.register(POOL_A, "gpu-a", endpoint), InvalidRequestError)
    assert isinstance(error, InvalidRequestError) and error.field == "endpoint"
    assert "gpu-a" not in rig.cluster.remote


def test_a_pool_may_not_report_another_pools_or_the_local_pools_worker(rig: Rig) -> None:
    """Finding 2: reporting an existing worker's id stole that worker's dispatches."""
    rig.registry.register(POOL_A, "gpu-a", "http://10.0.0.1:9200")
    rig.registry.register(POOL_B, "gpu-b", "http://10.0.0.2:9200")
    rig.registry.heartbeat(POOL_A, beat("gpu-a", worker("a-w1")))
    for stolen in ("a-w1", "local-w1"):
        error = refused(
            lambda s=stolen: rig.registry.heartbeat(POOL_B, beat("gpu-b", worker(s, "10.0.0.2"))),  # type: ignore[misc]
            PermissionDeniedError,
        )
        assert f"workers[0].id: {stolen!r} is another pool's worker" in str(error)
    assert rig.refusals("worker_taken") == 2
    owners = {w.id: p for p, w in rig.cluster.processes()}
    assert owners == {"local-w1": "local", "a-w1": "gpu-a"}
    # Once gpu-a stops running it, the id is free to take.
    rig.registry.heartbeat(POOL_A, beat("gpu-a"))
    rig.registry.heartbeat(POOL_B, beat("gpu-b", worker("a-w1", "10.0.0.2")))


def test_a_heartbeat_out_of_range_never_reaches_the_cluster_state(rig: Rig) -> None:
    """Finding 3: one heartbeat with two GPUs of 2**62 bytes stopped all scheduling."""
    rig.registry.register(POOL_A, "gpu-a", "http://10.0.0.1:9200")
    version = rig.cluster.version
    huge = (Gpu(0, "x", 2**62), Gpu(1, "x", 2**62))
    error = refused(lambda: rig.registry.heartbeat(POOL_A, beat("gpu-a", gpus=huge)),
                    InvalidRequestError)  # fmt: skip
    assert (
        str(error)
        == "gpus[0].vram_total_bytes: 4611686018427387904 is outside 0..1125899906842624 (and 1 more)"
    )
    assert rig.cluster.version == version
    assert rig.cluster.remote.get("gpu-a").gpus == ()  # type: ignore[union-attr]
    assert rig.refusals("out_of_range") == 1


def test_the_number_of_pools_is_bounded() -> None:
    """Finding 9: pools had no limit."""
    small = Rig(dataclasses.replace(CONFIG.pools, max_pools=2))
    for pool_id in ("p1", "p2"):
        small.registry.register(LOCAL_OPERATOR, pool_id, f"http://{pool_id}:9200")
    error = refused(lambda: small.registry.register(LOCAL_OPERATOR, "p3", "http://p3:9200"),
                    OrchestratorError)  # fmt: skip
    assert error.code == ErrorCode.QUEUE_FULL  # RESOURCE_EXHAUSTED at the edge
    assert "pools.max_pools" in str(error)
    small.registry.register(LOCAL_OPERATOR, "p1", "http://p1:9300")  # registering again is fine


def test_the_local_pool_id_is_not_for_registration(rig: Rig) -> None:
    error = refused(lambda: rig.registry.register(LOCAL_OPERATOR, "local", "http://h:1"),
                    InvalidRequestError)  # fmt: skip
    assert "orchestrator's own pool" in str(error)


async def test_a_silent_pool_expires_and_its_jobs_are_handed_back(rig: Rig) -> None:
    """Finding 3 and 9: remote pools never expired, so an attacker's bad pool stayed
    after it left, and a pool that was gone kept its workers in every context."""
    rig.registry.register(POOL_A, "gpu-a", "http://10.0.0.1:9200")
    rig.registry.heartbeat(POOL_A, beat("gpu-a", worker("a-w1"), worker("a-w2")))
    job = dataclasses.replace(record("j1"), worker_id="a-w1")
    rig.cluster.enqueue(job, NOW)
    rig.cluster.start(job)
    rig.cluster.occupy("a-w1", "j1", NOW)
    rig.now = NOW + CONFIG.pools.expire_after_ms
    await rig.registry.expire()
    assert "gpu-a" in rig.cluster.remote and rig.runner.abandoned == []
    rig.now += 1
    await rig.registry.expire()
    assert "gpu-a" not in rig.cluster.remote
    assert rig.runner.abandoned == [
        ("j1", f"pool 'gpu-a' expired: no heartbeat for {CONFIG.pools.expire_after_ms + 1} ms")
    ]
    assert not rig.cluster.running_jobs("a-w1")
    assert [p.id for p in rig.cluster.context(rig.now).pools] == ["local"]
    assert rig.metrics.get_sample_value("orchestrator_pools_expired_total") == 1
    # The pool comes back: it registers again and reports its workers again.
    refused(lambda: rig.registry.heartbeat(POOL_A, beat("gpu-a")), NotFoundError)
    rig.registry.register(POOL_A, "gpu-a", "http://10.0.0.1:9200")
    rig.registry.heartbeat(POOL_A, beat("gpu-a", worker("a-w1")))


async def test_expiry_runs_in_the_background_until_stopped() -> None:
    rig = Rig(PoolsConfig(heartbeat_ms=10, offline_after_ms=20, expire_after_ms=30))
    rig.registry.register(POOL_A, "gpu-a", "http://10.0.0.1:9200")
    rig.now += 31
    rig.registry.start()
    try:
        async with asyncio.timeout(5):
            while "gpu-a" in rig.cluster.remote:
                await asyncio.sleep(0.01)
    finally:
        await rig.registry.stop()


def test_a_pool_refused_on_every_heartbeat_does_not_flood_the_log(rig: Rig) -> None:
    """Every refusal is counted; a caller's refusals reach the log a few at a time,
    the next line saying how many were not logged."""
    with capture_logs() as logs:
        for _ in range(200):
            refused(lambda: rig.registry.register(POOL_B, "gpu-a", "http://10.0.0.1:9"),
                    PermissionDeniedError)  # fmt: skip
    lines = [e for e in logs if e["event"] == "pool.refused"]
    assert rig.refusals("not_its_pool") == 200
    assert 1 <= len(lines) <= 12 and lines[0]["not_logged_since"] == 0
