"""Script log records into the service log: a rate per scheduler, with an injected clock."""

from __future__ import annotations

from structlog.testing import capture_logs

from orchestrator.scheduling.accounting import ScriptLogRate, ScriptLogRelay
from orchestrator.scheduling.cycle import ScriptLog
from orchestrator.scheduling.metrics import EngineMetrics
from tests.fakes import Clock

RATE = ScriptLogRate(burst=10, per_second=2.0, max_record_chars=20, summary_interval_s=10.0)


def lines(n: int, message: str = "hello") -> list[ScriptLog]:
    return [ScriptLog("info", message)] * n


def test_records_over_the_rate_are_counted_and_summarised_once_per_interval() -> None:
    """A burst, then the sustained rate; what is over it is counted at once and told in
    one summary line when the interval is over (the script may have stopped logging)."""
    clock, metrics = Clock(), EngineMetrics()
    relay = ScriptLogRelay(RATE, metrics, clock=clock)
    with capture_logs() as logs:
        relay.relay(lines(100))  # a cycle with one call's worth of records
        clock.now = 1.0
        relay.relay(lines(100))  # 2 more tokens by now
        clock.now = 10.0
        relay.relay([])  # the interval is over: the count of 188
        clock.now = 15.0
        relay.relay(lines(100))  # 10 tokens back; the next summary waits for 20.0
        clock.now = 20.0
        relay.relay([])
    relayed = [e for e in logs if e["event"] == "scheduler.script_log"]
    summaries = [e for e in logs if e["event"] == "scheduler.script_logs_rate_limited"]
    assert len(relayed) == 10 + 2 + 10
    assert [s["dropped"] for s in summaries] == [188, 90]
    assert summaries[0]["message"].startswith("188 script log records dropped in the last 10 s")
    assert summaries[0]["log_level"] == "warning"
    assert metrics.value("scheduler_script_logs_rate_limited_total", tenant="") == 278


def test_one_scheduler_cannot_use_up_anothers_rate() -> None:
    """Each scheduler (the main one, each tenant's) has a bucket of its own, and its lines
    and counter name the tenant."""
    clock, metrics = Clock(), EngineMetrics()
    acme = ScriptLogRelay(RATE, metrics, "acme", clock=clock)
    globex = ScriptLogRelay(RATE, metrics, "globex", clock=clock)
    with capture_logs() as logs:
        acme.relay(lines(1000))
        globex.relay(lines(5))
    relayed = [e.get("tenant") for e in logs if e["event"] == "scheduler.script_log"]
    assert relayed.count("acme") == 10 and relayed.count("globex") == 5
    assert metrics.value("scheduler_script_logs_rate_limited_total", tenant="acme") == 990
    assert metrics.value("scheduler_script_logs_rate_limited_total", tenant="globex") == 0


def test_a_long_record_is_cut_in_the_service_log() -> None:
    clock = Clock()
    relay = ScriptLogRelay(RATE, EngineMetrics(), clock=clock)
    with capture_logs() as logs:
        relay.relay(lines(1, "x" * 25) + lines(1, "y" * 20))
    assert [e["message"] for e in logs] == ["x" * 20 + "... (5 more characters)", "y" * 20]
