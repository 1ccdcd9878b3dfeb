"""The quick soak: the full soak (tests/system/soak.py, `make soak`) for 25 seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.soak import soak


@pytest.mark.slow
async def test_quick_soak_loses_nothing_under_faults(tmp_path: Path) -> None:
    """Under worker kills and stops, a killed fork server, flaky scheduling, silent
    heartbeats and a core restart, every accepted job ends exactly once and every
    failed cycle was covered by the fallback."""
    result = await soak(25.0, clients=3, seed=7, workdir=tmp_path)
    assert result.ok, (result.lost[:5], result.ended_twice[:5], result.uncovered_cycles)
    assert result.submitted >= 30
    assert result.completed + result.failed == result.submitted
    assert result.completed >= 0.9 * result.submitted
    assert result.faults["orchestrator SIGKILLed and restarted"] == 1
    assert result.faults["fork server SIGKILL (its workers die)"] == 1
    assert sum(result.faults.values()) >= 5
    assert result.failed_cycles > 0 and result.fallbacks["timeout"] > 0
    assert result.max_outage_s >= result.max_gap_s > 0
