"""What a remote pool may report (issue 14): the pure checks of a Register and of a
heartbeat, each refusal naming the request's field and a machine-readable reason."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.domain.context import Gpu, HostReading, ProcessInfo
from orchestrator.state.pool_checks import (
    LIMITS,
    Reason,
    check_heartbeat,
    check_registration,
    endpoint_host,
)
from orchestrator.state.remote_pools import Heartbeat

GiB = 2**30
ENDPOINT = "http://10.0.0.2:9200"
GPU = Gpu(0, "NVIDIA L4", 24 * GiB, 6 * GiB, compute_capability="8.9", utilization_percent=40)
WORKER = ProcessInfo("gpu-a-w1-ab12", "llama-8b", (0,), 6 * GiB, "http://10.0.0.2:18100",
                     "ready", 1_700_000_000_000)  # fmt: skip
HOST = HostReading(64 * GiB, 32 * GiB, 250.0, 16)
BEAT = Heartbeat("gpu-a", "", (GPU,), (WORKER,), ("llama-8b",), HOST)


def reasons(beat: Heartbeat, endpoint: str = ENDPOINT) -> list[tuple[str, Reason]]:
    return [(p.field, p.reason) for p in check_heartbeat(beat, endpoint)]


@pytest.mark.parametrize(
    ("endpoint", "host"),
    [
        ("http://10.0.0.2:9200", "10.0.0.2"),
        ("https://GPU-Host.example:443/v1", "gpu-host.example"),
        ("http://gpu-host", "gpu-host"),
        ("10.0.0.2:9200", "10.0.0.2"),
        ("[fd00::2]:9200", "fd00::2"),
        ("http://[fd00::2]:9200", "fd00::2"),
        ("gpu-host", None),  # host:port needs the port
        ("10.0.0.2:9200/path", None),
        ("ftp://10.0.0.2:21", None),
        ("http://user:pw@10.0.0.2:9200", None),
        ("http://10.0.0.2:99999", None),
        ("http://10.0.0.2:9200?x=1", None),
        ("http://gpu\nhost:9200", None),  # urlsplit would drop the newline silently
        ("http://gpu host:9200", None),
        ("http://[not-ipv6]:9200", None),
        ("http://169.254.169.254", None),  # link-local: a cloud's metadata service
        ("http://[fe80::1]:9200", None),
        ("0.0.0.0:9200", None),  # the core's own host
        ("http://[::]:9200", None),
        ("http://224.0.0.1:9200", None),
        ("http://127.0.0.1:9200", "127.0.0.1"),  # a pool manager on the core's host
        ("http://:9200", None),
        ("", None),
    ],
)
def test_endpoint_host_takes_urls_and_host_port_only(endpoint: str, host: str | None) -> None:
    assert endpoint_host(endpoint) == host


def test_a_good_registration_and_heartbeat_pass() -> None:
    assert check_registration("gpu-a", ENDPOINT) == ()
    assert check_heartbeat(BEAT, ENDPOINT) == ()


@pytest.mark.parametrize(
    ("pool_id", "endpoint", "field", "reason"),
    [
        ("", ENDPOINT, "pool_id", Reason.REQUIRED),
        ("p" * 65, ENDPOINT, "pool_id", Reason.TOO_LONG),
        ("gpu a", ENDPOINT, "pool_id", Reason.BAD_CHARACTERS),
        ("gpu/a", ENDPOINT, "pool_id", Reason.BAD_CHARACTERS),
        ("gpu-a", "", "endpoint", Reason.REQUIRED),
        ("gpu-a", "not a url", "endpoint", Reason.BAD_URL),
        ("gpu-a", "http://" + "h" * 3000, "endpoint", Reason.TOO_LONG),
    ],
)
def test_a_bad_registration_names_its_field(
    pool_id: str, endpoint: str, field: str, reason: Reason
) -> None:
    ((problem,),) = [check_registration(pool_id, endpoint)]
    assert (problem.field, problem.reason) == (field, reason)


def test_vram_beyond_the_bound_is_refused_before_any_sum_can_overflow() -> None:
    """Finding 3: two GPUs of 2**62 bytes each overflowed the int64 ctx.metrics."""
    huge = dataclasses.replace(GPU, vram_total_bytes=2**62, vram_allocated_bytes=0,
                               vram_free_bytes=2**62)  # fmt: skip
    beat = dataclasses.replace(BEAT, gpus=(huge, dataclasses.replace(huge, id=1)))
    assert reasons(beat) == [
        ("gpus[0].vram_total_bytes", Reason.OUT_OF_RANGE),
        ("gpus[1].vram_total_bytes", Reason.OUT_OF_RANGE),
    ]


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"vram_allocated_bytes": 2**51}, "gpus[0].vram_allocated_bytes", Reason.OUT_OF_RANGE),
        ({"vram_allocated_bytes": -1}, "gpus[0].vram_allocated_bytes", Reason.OUT_OF_RANGE),
        ({"vram_free_bytes": 25 * GiB}, "gpus[0].vram_free_bytes", Reason.OUT_OF_RANGE),
        ({"vram_total_bytes": -5}, "gpus[0].vram_total_bytes", Reason.OUT_OF_RANGE),
        ({"utilization_percent": float("nan")}, "gpus[0].utilization_percent",
         Reason.OUT_OF_RANGE),
        ({"temperature_celsius": float("inf")}, "gpus[0].temperature_celsius",
         Reason.OUT_OF_RANGE),
        ({"power_draw_watts": -1.0}, "gpus[0].power_draw_watts", Reason.OUT_OF_RANGE),
        ({"id": -1}, "gpus[0].id", Reason.OUT_OF_RANGE),
        ({"device_name": "x" * 300}, "gpus[0].device_name", Reason.TOO_LONG),
        ({"device_name": "A100\x1b[2J"}, "gpus[0].device_name", Reason.BAD_CHARACTERS),
    ],
)  # fmt: skip
def test_gpu_values_out_of_range_name_the_field(
    change: dict[str, object], field: str, reason: Reason
) -> None:
    beat = dataclasses.replace(BEAT, gpus=(dataclasses.replace(GPU, **change),))  # type: ignore[arg-type]
    assert reasons(beat)[0] == (field, reason)


def test_a_gpu_allocated_beyond_its_total_is_reported_as_it_is() -> None:
    """A pool told to start more than fits says so; refusing that heartbeat stranded
    the pool's jobs for good (found by the platform soak)."""
    over = dataclasses.replace(GPU, vram_allocated_bytes=GPU.vram_total_bytes + 6 * GiB,
                               vram_free_bytes=0)  # fmt: skip
    assert reasons(dataclasses.replace(BEAT, gpus=(over,))) == []


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"id": ""}, "workers[0].id", Reason.REQUIRED),
        ({"id": "w" * 129}, "workers[0].id", Reason.TOO_LONG),
        ({"id": "w1;rm -rf"}, "workers[0].id", Reason.BAD_CHARACTERS),
        ({"model_ref": ""}, "workers[0].model_ref", Reason.REQUIRED),
        ({"model_ref": "m" * 513}, "workers[0].model_ref", Reason.TOO_LONG),
        ({"status": "owned"}, "workers[0].status", Reason.UNKNOWN),
        ({"vram_bytes": 2**51}, "workers[0].vram_bytes", Reason.OUT_OF_RANGE),
        ({"gpu_ids": (-1,)}, "workers[0].gpu_ids", Reason.OUT_OF_RANGE),
        ({"gpu_ids": tuple(range(65))}, "workers[0].gpu_ids", Reason.TOO_MANY),
        ({"started_at_ms": 2**62}, "workers[0].started_at_ms", Reason.OUT_OF_RANGE),
        ({"slots": 0}, "workers[0].slots_total", Reason.OUT_OF_RANGE),
        ({"slots": 1025}, "workers[0].slots_total", Reason.OUT_OF_RANGE),
        ({"api": "vllm"}, "workers[0].api", Reason.UNKNOWN),
        ({"uri": ""}, "workers[0].uri", Reason.REQUIRED),
        ({"uri": "http://169.254.169.254"}, "workers[0].uri", Reason.BAD_URL),
        ({"uri": "http://10.0.0.9:18100"}, "workers[0].uri", Reason.WRONG_HOST),
        ({"uri": "http://127.0.0.1:8080"}, "workers[0].uri", Reason.WRONG_HOST),
        ({"uri": "file:///etc/passwd"}, "workers[0].uri", Reason.BAD_URL),
        ({"uri": "http://10.0.0.2@evil.example:80"}, "workers[0].uri", Reason.BAD_URL),
        ({"uri": "http://10.0.0.2:80/x?y"}, "workers[0].uri", Reason.BAD_URL),
    ],
)
def test_worker_values_name_the_field(
    change: dict[str, object], field: str, reason: Reason
) -> None:
    beat = dataclasses.replace(BEAT, workers=(dataclasses.replace(WORKER, **change),))  # type: ignore[arg-type]
    assert reasons(beat) == [(field, reason)]


def test_a_worker_uri_may_use_another_port_and_scheme_on_the_registered_host() -> None:
    worker = dataclasses.replace(WORKER, uri="https://10.0.0.2:8443/llama")
    assert reasons(dataclasses.replace(BEAT, workers=(worker,))) == []
    assert reasons(BEAT, "10.0.0.2:9200") == []  # host:port registrations too


def test_host_readings_are_bounded() -> None:
    for host, field in (
        (HostReading(2**60, 0, 0.0, 1), "info.host_ram_total_bytes"),
        (HostReading(GiB, 2 * GiB, 0.0, 1), "info.host_ram_available_bytes"),
        (HostReading(GiB, 0, 0.0, -1), "info.host_cpu_count"),
        (HostReading(GiB, 0, 1601.0, 16), "info.host_cpu_percent"),
        (HostReading(GiB, 0, float("nan"), 16), "info.host_cpu_percent"),
    ):
        assert reasons(dataclasses.replace(BEAT, host=host)) == [(field, Reason.OUT_OF_RANGE)]


def test_duplicates_and_counts_are_refused() -> None:
    twice = dataclasses.replace(BEAT, gpus=(GPU, GPU), workers=(WORKER, WORKER))
    assert reasons(twice) == [("gpus[1].id", Reason.DUPLICATE), ("workers[1].id", Reason.DUPLICATE)]
    many = dataclasses.replace(
        BEAT,
        gpus=tuple(dataclasses.replace(GPU, id=i) for i in range(LIMITS.gpus + 1)),
        workers=(WORKER,) * (LIMITS.workers + 1),
        cached_models=("m",) * (LIMITS.cached_models + 1),
    )
    # Too many: refused on the counts alone, without walking the entries.
    assert reasons(many) == [
        ("gpus", Reason.TOO_MANY),
        ("workers", Reason.TOO_MANY),
        ("info.cached_models", Reason.TOO_MANY),
    ]


def test_a_heartbeat_may_not_move_the_endpoint_to_another_host() -> None:
    assert reasons(dataclasses.replace(BEAT, endpoint="http://10.0.0.2:9300")) == []
    assert reasons(dataclasses.replace(BEAT, endpoint="http://10.0.0.9:9200")) == [
        ("info.endpoint", Reason.WRONG_HOST)
    ]


@pytest.mark.parametrize("host", ["2852039166", "0xa9fea9fe", "127.1", "0"])
def test_ipv4_shorthands_are_refused_like_the_addresses_they_resolve_to(host: str) -> None:
    """The resolver reads 2852039166 as 169.254.169.254 (a cloud's metadata service)."""
    assert [p.reason for p in check_registration("p", f"http://{host}:80")] == [Reason.BAD_URL]


def test_a_worker_with_too_many_gpu_ids_is_refused_before_they_are_walked() -> None:
    many = dataclasses.replace(WORKER, gpu_ids=tuple(range(100_000)))
    beat = dataclasses.replace(BEAT, workers=(many,))
    assert reasons(beat) == [("workers[0].gpu_ids", Reason.TOO_MANY)]


def test_a_heartbeat_endpoint_is_bounded_like_a_registered_one() -> None:
    long = dataclasses.replace(BEAT, endpoint="http://127.0.0.1/" + "a" * 3_000_000)
    assert reasons(long) == [("info.endpoint", Reason.TOO_LONG)]
