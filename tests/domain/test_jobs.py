"""Submit limits and job scopes, pure."""

from __future__ import annotations

import pytest

from orchestrator.domain.jobs import TenantLimits, in_scope, prompt_tokens


def test_a_tenants_limits_override_the_defaults_field_by_field() -> None:
    defaults = TenantLimits(max_queued_jobs=10, requests_per_minute=60)
    mine = TenantLimits(requests_per_minute=-1, tokens_per_minute=1000)
    assert mine.over(defaults) == TenantLimits(
        max_queued_jobs=10, requests_per_minute=-1, tokens_per_minute=1000
    )
    assert TenantLimits().over(defaults) == defaults


@pytest.mark.parametrize("value", [0, -2])
def test_a_limit_is_positive_or_minus_one(value: int) -> None:
    with pytest.raises(ValueError, match="requests_per_minute must be positive, or -1"):
        TenantLimits(requests_per_minute=value)


def test_scopes() -> None:
    assert in_scope("acme", None) and in_scope(None, None)
    assert in_scope("acme", "acme") and not in_scope("acme", "globex")
    assert in_scope(None, "") and in_scope("", "") and not in_scope("acme", "")
    assert not in_scope(None, "acme")


def test_a_prompt_counts_a_token_for_every_four_bytes_begun() -> None:
    assert [prompt_tokens(n) for n in (0, 1, 4, 5, 400)] == [0, 1, 1, 2, 100]
