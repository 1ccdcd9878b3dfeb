"""The template library: every template, in YAML and in Lua, passes validation on the bank."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.policy.parse import parse_policy
from orchestrator.policy.validate import validate_policy
from orchestrator.scheduling.engine import platform_source
from tests.conftest import REPO

TEMPLATES = REPO / "schedulers" / "templates"
NAMES = [
    "clone-platform",
    "batch-optimized",
    "determinism-first",
    "gpu-affinity",
    "vram-aware-eviction",
    "fair-share",
    "cache-aware",
]


def test_every_template_exists_in_both_languages_with_a_description() -> None:
    """Seven templates, each as .yaml and .lua, each described in the README and the YAML."""
    readme = (TEMPLATES / "README.md").read_text()
    for name in NAMES:
        assert (TEMPLATES / f"{name}.lua").exists() and f"`{name}`" in readme
        policy = parse_policy((TEMPLATES / f"{name}.yaml").read_text(), f"{name}.yaml")
        assert policy.name == name and len(policy.description) > 80


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The heap as the service keeps it (api/server.py freezes what start-up built).

    Deep in a full test run, one measured cycle once took 55.8 ms against a usual p99 of
    about 3 ms, failing the speed stage; a cyclic collection of everything earlier tests
    left in this process is the likely pause, and it is the harness's cost, not the
    policy's."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("frozen_heap")
@pytest.mark.parametrize(
    "path", sorted(TEMPLATES.glob("*.yaml")) + sorted(TEMPLATES.glob("*.lua")), ids=lambda p: p.name
)
async def test_template_is_valid_on_the_bank(path: Path) -> None:
    """Syntax, semantics on all eight bank contexts, and speed within 50 ms."""
    report = await validate_policy(path.read_text(), path.name)
    assert report.ok, report.summary()
    assert len(report.semantics["cases"]) == 8
    assert all(case["source"] == "user" for case in report.semantics["cases"])


def test_clone_platform_lua_is_the_platform_scheduler() -> None:
    """The Lua clone is platform.lua under a two-line header, so it cannot drift."""
    clone = (TEMPLATES / "clone-platform.lua").read_text()
    assert clone.split("\n", 2)[2] == platform_source()
