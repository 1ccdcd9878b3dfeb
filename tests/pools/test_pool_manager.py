"""What a pool manager registers as: an endpoint on the host its workers serve on."""

from __future__ import annotations

import pytest

from orchestrator.config.settings import LocalPoolConfig, WorkerLaunchConfig
from orchestrator.domain.errors import ConfigError
from orchestrator.pools.pool_manager import pool_endpoint


def config(endpoint: str, worker_host: str = "10.0.0.2") -> LocalPoolConfig:
    return LocalPoolConfig(endpoint=endpoint, worker=WorkerLaunchConfig(host=worker_host))


def test_the_endpoint_defaults_to_the_workers_host() -> None:
    assert pool_endpoint(config("")) == "http://10.0.0.2"
    assert pool_endpoint(config("http://10.0.0.2:9200")) == "http://10.0.0.2:9200"
    assert pool_endpoint(config("GPU-host:9200", "gpu-host")) == "GPU-host:9200"


@pytest.mark.parametrize(
    ("endpoint", "worker_host", "message"),
    [
        ("http://gpu-host-2:9200", "127.0.0.1", "local_pool.worker.host: '127.0.0.1' is not"),
        ("http://10.0.0.2:9200", "0.0.0.0", "local_pool.worker.host: '0.0.0.0' is not"),
        ("not a url", "10.0.0.2", "local_pool.endpoint: 'not a url' is not"),
        ("", "0.0.0.0", "local_pool.worker.host: 'http://0.0.0.0' is not"),
    ],
)
def test_a_mismatch_is_refused_at_start(endpoint: str, worker_host: str, message: str) -> None:
    """The core refuses workers off the registered host: better said once, at start."""
    with pytest.raises(ConfigError, match=message):
        pool_endpoint(config(endpoint, worker_host))
