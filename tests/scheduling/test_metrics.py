"""Custom metrics (ctx.emit_metric) on the registry engines of one service share."""

from __future__ import annotations

from orchestrator.scheduling.metrics import MAX_CUSTOM_METRICS, EngineMetrics


def custom(m: EngineMetrics, tenant: str, name: str) -> float | None:
    """A custom metric's value (None: no such series). EngineMetrics.value takes the
    sample's name as its first argument, so it cannot ask for a label `name`."""
    labels = {"tenant": tenant, "name": name}
    return m.registry.get_sample_value("scheduler_custom_metric", labels)


def test_each_tenants_custom_metrics_are_its_own() -> None:
    """The same name from two tenants' schedulers and the main one: three series, none
    overwriting another (they once shared one series per name, with no tenant label)."""
    m = EngineMetrics()
    m.record_custom("", "custom_depth", 1.0)
    m.record_custom("acme", "custom_depth", 2.0)
    m.record_custom("globex", "custom_depth", 3.0)
    m.record_custom("acme", "custom_depth", 4.0)
    assert custom(m, "", "custom_depth") == 1.0
    assert custom(m, "acme", "custom_depth") == 4.0
    assert custom(m, "globex", "custom_depth") == 3.0


def test_each_tenant_has_its_own_budget_of_names() -> None:
    """A tenant past its cap of distinct names is dropped and counted as its own; the
    others keep their whole budget (the cap was once shared by every scheduler)."""
    m = EngineMetrics()
    for i in range(MAX_CUSTOM_METRICS + 10):
        m.record_custom("acme", f"custom_{i}", float(i))
    assert m.value("scheduler_custom_metrics_dropped_total", tenant="acme") == 10
    assert custom(m, "acme", "custom_0") == 0.0
    assert custom(m, "acme", f"custom_{MAX_CUSTOM_METRICS}") is None
    m.record_custom("acme", "custom_0", 5.0)  # a name it has may still change
    assert custom(m, "acme", "custom_0") == 5.0
    for tenant in ("globex", ""):
        for i in range(MAX_CUSTOM_METRICS):
            m.record_custom(tenant, f"custom_{i}", 1.0)
        assert custom(m, tenant, f"custom_{i}") == 1.0
        assert m.value("scheduler_custom_metrics_dropped_total", tenant=tenant) == 0
