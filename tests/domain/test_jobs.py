"""Submit limits and validation, and job scopes, pure."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.domain.errors import InvalidRequestError
from orchestrator.domain.jobs import (
    SubmitLimits,
    SubmitSpec,
    TenantLimits,
    in_scope,
    prompt_tokens,
    validate_submit,
)
from tests.fakes import CATALOG, MODEL


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


LONE = "a\ud800b"  # a lone surrogate: JSON's "\\ud800" decodes to it, UTF-8 has no bytes for it


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": LONE}, "prompt"),
        ({"prompt": "", "messages": (("system", "fine"), ("user", LONE))}, "messages"),
        ({"stop": ("ok", LONE)}, "stop"),
        ({"request_id": LONE}, "request_id"),
        ({"session_id": LONE}, "session_id"),
        ({"tenant_id": LONE}, "tenant_id"),
    ],
)
def test_text_that_is_not_utf8_is_refused_by_field(fields: dict[str, Any], field: str) -> None:
    """Before, a lone surrogate passed validation and raised UnicodeEncodeError later
    (hashing the prompt, storing the job): a server error instead of a refusal."""
    spec = SubmitSpec(**{"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields})
    with pytest.raises(InvalidRequestError) as refused:
        validate_submit(spec, catalog=CATALOG, tenants={}, limits=SubmitLimits(),
                        platform_mode=False)  # fmt: skip
    assert (refused.value.field, str(refused.value)) == (
        field,
        f"{field}: must be valid UTF-8 text",
    )
