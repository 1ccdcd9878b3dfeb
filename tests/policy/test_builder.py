"""The web UI's server side: the builder's YAML mapping, its endpoints, and the guard."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from orchestrator.config.settings import load_config
from orchestrator.domain.errors import ConfigError
from orchestrator.policy import builder
from orchestrator.policy.compile import compile_yaml
from orchestrator.policy.parse import FIELDS
from tests.conftest import REPO
from tests.service_helpers import OPERATOR_KEY, OPERATOR_TOKEN, running_service, write_config

POLICIES = sorted((REPO / "schedulers").glob("*/*.yaml"))


def _code(lua: str) -> str:
    return "\n".join(re.sub(r", line \d+\)", ")", line) for line in lua.splitlines()[1:])


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_every_shipped_policy_round_trips_through_the_builder(path: Path) -> None:
    """YAML -> builder -> YAML compiles to the same Lua for every template and example."""
    text = path.read_text()
    policy, why = builder.from_yaml(text, path.name)
    assert policy is not None, why
    assert _code(compile_yaml(builder.to_yaml(policy), path.name)) == _code(
        compile_yaml(text, path.name)
    )


def test_what_the_builder_cannot_show_it_says() -> None:
    """`any` and `not` stay YAML, with the reason; the menus offer the compiler's fields."""
    text = (
        "scheduler:\n  name: x\n  rules:\n    - name: r\n      condition:\n"
        "        any: [{job.priority: batch}, {job.seed: {exists: true}}]\n"
        "      action: {use: platform-scheduler}\n"
    )
    policy, why = builder.from_yaml(text)
    assert policy is None and "nested all/any/not" in why and "rule 'r'" in why
    vocab = builder.vocabulary()
    assert vocab["fields"].keys() == FIELDS.keys()
    assert "least-loaded" in vocab["selections"] and "exists" in vocab["operators"]["number"]
    assert list(vocab["selection_help"]) == vocab["selections"]  # a tooltip for each
    assert {"prefix-affinity", "session-affinity"} <= set(vocab["selections"])
    assert (
        builder.rule_at_line(
            (REPO / "schedulers/examples/programmable-3.2-determinism-first.yaml").read_text(), 16
        )
        == 1
    )


async def test_builder_endpoints_and_the_guard(tmp_path: Path) -> None:
    """compile/parse/templates answer; with API keys set, no key means 401, and a
    state change from a foreign Origin is refused."""
    config = write_config(tmp_path, auth={"keys": [OPERATOR_KEY]})
    async with running_service(config) as svc, aiohttp.ClientSession() as http:
        base = svc.http + "/v2/admin/scheduler"
        auth = svc.operator_headers
        async with http.get(svc.http + "/") as r:
            assert r.status == 200 and "scheduler builder" in await r.text()
        async with http.get(base + "/templates") as r:
            assert r.status == 401
        async with http.get(base + "/templates", headers=auth) as r:
            names = [t["name"] for t in (await r.json())["templates"]]
            assert "clone-platform" in names and len(names) == 7
        policy = {
            "name": "p",
            "rules": [{"name": "w", "tests": [], "action": {"type": "wait", "duration_ms": -5}}],
        }
        async with http.post(base + "/compile", json={"policy": policy}, headers=auth) as r:
            reply = await r.json()
            assert (
                reply["lua"] == ""
                and reply["error"]["rule"] == 0
                and "duration_ms" in reply["error"]["detail"]
            )
        async with http.post(
            base + "/parse", json={"source": "scheduler: [", "name": "x.yaml"}, headers=auth
        ) as r:
            assert (await r.json())["error"]["message"].startswith("x.yaml:")
        async with http.post(
            base + "/rollback", json={}, headers={**auth, "Origin": "http://evil.example"}
        ) as r:
            assert r.status == 403
        async with http.get(svc.http + f"/v2/admin/events?token={OPERATOR_TOKEN}") as r:
            line = await r.content.readline()
            assert line == b"event: state\n"
        async with http.get(svc.http + "/metrics") as r:
            assert r.status == 401  # every tenant's labels: an operator's, on loopback too
        async with http.get(svc.http + "/metrics", headers=auth) as r:
            assert r.status == 200


def test_a_non_loopback_admin_needs_tls_and_keys(tmp_path: Path) -> None:
    """Binding the admin HTTP elsewhere than localhost without TLS and keys is refused."""
    config = write_config(tmp_path, listen={"grpc": "127.0.0.1:0", "http": "0.0.0.0:8080"})
    with pytest.raises(ConfigError, match=r"listen\.http .* set tls\.cert_file"):
        load_config(config)
