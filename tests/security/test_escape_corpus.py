"""The escape corpus (tests/security/corpus.py) against LuaJIT and Lua 5.4, through
real sandbox worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import LANGUAGES
from tests.security.corpus import CASES
from tests.security.harness import run_case


def test_the_corpus_is_big_enough_and_covers_every_category() -> None:
    """At least 60 cases, with unique names, across every category the issue lists."""
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
    categories = {c.category for c in CASES}
    for needed in ("6.1 file I/O", "6.1 network", "6.1 process", "6.1 code loading", "bytecode",
                   "debug", "metatables", "LuaJIT", "collectgarbage", "timeout", "memory",
                   "patterns", "python", "environment", "descriptors", "sockets", "fork",
                   "ctx across cycles"):  # fmt: skip
        assert needed in categories, needed


@pytest.mark.slow
@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_escape_attempt_fails(case: object, language: str, tmp_path: Path) -> None:
    """The hostile script ends as expected, leaks and persists nothing, the core keeps
    scheduling, and the metrics count it."""
    outcome = await run_case(case, language, tmp_path)  # type: ignore[arg-type]
    assert outcome.ok, outcome.problems
