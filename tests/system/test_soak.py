"""The quick soak: the full soak (tests/system/soak.py, `make soak`) for 25 seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.soak import soak


@pytest.mark.slow
@pytest.mark.parametrize("config", ["platform", "lab"])
async def test_quick_soak_loses_nothing_under_faults(tmp_path: Path, config: str) -> None:
    """Under worker kills and stops, a killed fork server, flaky scheduling, silent
    heartbeats and a core restart, every accepted job ends exactly once and every
    failed cycle was covered by the fallback. `platform` is deploy/config/platform.yaml
    with TLS and API keys for every client."""
    result = await soak(25.0, clients=3, seed=7, workdir=tmp_path, config=config)
    assert result.ok, (result.lost[:5], result.ended_twice[:5], result.uncovered_cycles,
                       result.harness_errors)  # fmt: skip
    assert result.submitted >= 30
    assert result.completed + result.failed == result.submitted
    assert result.completed >= 0.9 * result.submitted
    assert result.faults["orchestrator SIGKILLed and restarted"] == 1
    assert result.faults["fork server SIGKILL (its workers die)"] == 1
    assert sum(result.faults.values()) >= 5
    assert result.logged_fallbacks["timeout"] > 0  # the flaky scheduler was covered
    if config == "lab":  # the user scheduler's cycles are the decision log's
        assert result.failed_cycles > 0 and result.fallbacks["timeout"] > 0
    assert result.max_outage_s >= result.max_gap_s > 0
