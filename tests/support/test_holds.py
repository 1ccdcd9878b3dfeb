"""Holds: counts of what each key holds open, within a bound."""

from __future__ import annotations

import pytest

from orchestrator.support.holds import Holds


class Refused(Exception):
    pass


def test_a_key_holds_at_most_its_bound_and_is_forgotten_at_none() -> None:
    holds: Holds[str] = Holds()
    with holds.hold("a", 2, Refused), holds.hold("a", 2, Refused):
        with pytest.raises(Refused, match="a"), holds.hold("a", 2, Refused):
            pass
        with holds.hold("b", 2, Refused):  # another key's count is its own
            assert holds == {"a": 2, "b": 1}
    assert holds == {}  # nothing open: no key kept


def test_a_hold_ends_when_its_context_fails() -> None:
    holds: Holds[str] = Holds()
    with pytest.raises(ValueError, match="boom"), holds.hold("a", 1, Refused):
        raise ValueError("boom")
    assert holds == {}
