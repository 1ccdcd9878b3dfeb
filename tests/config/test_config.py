"""The configuration: the embedded default and every example under deploy/config load."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.records import convert
from orchestrator.config.settings import load_catalog, load_config, load_tenants
from orchestrator.domain.context import Tenant
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.jobs import TenantLimits

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "config"


def test_embedded_default_is_lab_mode_with_a_catalog() -> None:
    """`make run` gets lab mode on localhost, the platform scheduler and three models."""
    config = load_config(None)
    assert config.deployment_mode == "lab" and config.scheduler.file is None
    assert config.listen.grpc.startswith("127.0.0.1:")
    catalog = load_catalog(config)
    assert set(catalog.aliases) == {"llama-8b", "mistral-7b", "qwen-14b"}


@pytest.mark.parametrize("name", ["home.yaml", "lab.yaml", "platform.yaml"])
def test_example_configs_load(name: str) -> None:
    """Each example config parses, and its catalog and tenants files load."""
    config = load_config(EXAMPLES / name)
    assert config.deployment_mode == name.removesuffix(".yaml")
    assert load_catalog(config).models
    tenants = load_tenants(config)
    assert ("acme" in tenants) == (name == "platform.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("deployment_mode: cloud\n", "deployment_mode must be one of"),
        ("scheduler:\n  deadline: 50\n", "scheduler.deadline: unknown field"),
        ("listen: [1, 2]\n", "listen: expected a mapping"),
        ("catalog:\n  aliases: {x: missing}\n", "'missing' is not in the catalog"),
        ("queue: {capacity: lots}\n", "queue.capacity: expected int"),
        (
            "pools: {offline_after_ms: 9000, expire_after_ms: 9000}\n",
            "pools: expire_after_ms (9000) must exceed offline_after_ms (9000)",
        ),
        ("pools: {max_pools: -1}\n", "pools: max_pools must be 0 or more"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    """A bad config is refused with the key that is wrong."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_catalog(load_config(path))
    assert message in str(info.value)


def test_tenant_limits_load_beside_the_quotas_and_stay_out_of_ctx(tmp_path: Path) -> None:
    """A tenant's `limits` bound its submits in the service; schedulers see its quotas."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "tenants:\n  acme:\n    quota_tokens_daily: 100\n"
        "    limits: {max_queued_jobs: 5, requests_per_minute: -1}\n  globex: {}\n"
    )
    tenants = load_tenants(load_config(path))
    assert tenants["acme"].limits == TenantLimits(max_queued_jobs=5, requests_per_minute=-1)
    assert tenants["acme"].tenant("acme") == Tenant(id="acme", quota_tokens_daily=100)
    assert tenants["globex"].limits == TenantLimits()
    path.write_text("tenants:\n  acme:\n    limits: {max_queued_jobs: 0}\n")
    with pytest.raises(ConfigError, match=r"\['acme'\].limits: max_queued_jobs must be positive"):
        load_tenants(load_config(path))


def test_a_number_too_large_for_a_float_is_a_config_error_naming_the_field() -> None:
    """A catalog's performance figure of 400 digits (YAML reads it as an int)."""
    with pytest.raises(ConfigError, match=r"x\.y: a number of 401 digits is too large"):
        convert(float, 10**400, "x.y")
