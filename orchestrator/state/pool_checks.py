"""What a remote pool may report: pure checks of a Register and of a heartbeat.

PoolService takes its input from other hosts, and that input becomes every cycle's
context and the URIs the core sends prompts to (issue 14). Nothing reaches the
cluster state unchecked: ids are short and plain, numbers lie within what hardware
has (so that no sum of them overflows the context's int64 fields), counts are
bounded, and every worker serves on the host its pool registered, so a pool cannot
point the core at another machine. Each refusal is a `Problem` that names the
request's field (as the protobuf message spells it) and a machine-readable reason.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

from orchestrator.config.settings import MAX_WORKER_SLOTS
from orchestrator.domain.context import WORKER_APIS, WORKER_STATUSES
from orchestrator.state.remote_pools import Heartbeat

_ID = re.compile(r"[A-Za-z0-9._:-]+")
_HOST_NAME = re.compile(r"[A-Za-z0-9.-]{1,253}")  # a DNS name or an IPv4 address
_SCHEMES = ("http", "https")
T = TypeVar("T")


class Reason(StrEnum):
    REQUIRED = "required"
    TOO_LONG = "too_long"
    BAD_CHARACTERS = "bad_characters"
    OUT_OF_RANGE = "out_of_range"
    TOO_MANY = "too_many"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"  # not one of the values the field may take
    BAD_URL = "bad_url"
    WRONG_HOST = "wrong_host"  # a URL on another host than the pool registered


@dataclass(frozen=True, slots=True)
class Problem:
    field: str  # "workers[3].uri"
    reason: Reason
    message: str  # what is wrong, without the field


@dataclass(frozen=True, slots=True)
class ReportLimits:
    """Bounds on what one pool reports. Generous for real hardware; what they exclude
    is what would break the core (overflowing sums, unbounded memory per heartbeat)."""

    # Pool ids are shorter than worker ids: the core names a remote pool's new
    # workers "<pool id>-w<n>-<hex>", and those must pass as worker ids.
    pool_id_chars: int = 64
    id_chars: int = 128
    text_chars: int = 256  # device names, compute capabilities
    model_ref_chars: int = 512
    url_chars: int = 2048
    gpus: int = 64
    workers: int = 1024
    cached_models: int = 1024
    gpu_id: int = 2**31 - 1
    vram_bytes: int = 2**50  # per GPU and per worker: 1 PiB
    ram_bytes: int = 2**52  # per host: 4 PiB
    cpu_count: int = 65_536
    time_ms: int = 2**53  # started_at_ms: still exact as a Lua number
    celsius: tuple[float, float] = (-273.0, 1000.0)
    watts: float = 100_000.0
    worker_slots: int = MAX_WORKER_SLOTS


LIMITS = ReportLimits()


def endpoint_host(endpoint: str) -> str | None:
    """The host of a pool endpoint, `http(s)://host[:port][/path]` or `host:port`:
    lower-cased, without IPv6 brackets. None when `endpoint` is not one."""
    has_scheme = "://" in endpoint
    parts = _split(endpoint if has_scheme else "//" + endpoint)
    if parts is None:
        return None
    if has_scheme and parts.scheme not in _SCHEMES:
        return None
    if not has_scheme and (parts.port is None or parts.path):
        return None
    return parts.hostname


def check_registration(
    pool_id: str, endpoint: str, limits: ReportLimits = LIMITS
) -> tuple[Problem, ...]:
    checks = _Checks(limits)
    checks.identifier("pool_id", pool_id, limits.pool_id_chars)
    if not endpoint:
        checks.add("endpoint", Reason.REQUIRED, "required: the pool's http(s)://host[:port]")
    elif len(endpoint) > limits.url_chars:
        checks.add("endpoint", Reason.TOO_LONG, f"longer than {limits.url_chars} characters")
    elif endpoint_host(endpoint) is None:
        checks.add(
            "endpoint",
            Reason.BAD_URL,
            f"{endpoint[:80]!r} is not http(s)://host[:port] or host:port",
        )
    return tuple(checks.problems)


def check_heartbeat(
    beat: Heartbeat, registered_endpoint: str, limits: ReportLimits = LIMITS
) -> tuple[Problem, ...]:
    """Everything wrong with `beat` from a pool registered at `registered_endpoint`."""
    checks = _Checks(limits)
    # Counts first: a report too large is refused without walking it.
    for name, items, most in (
        ("gpus", beat.gpus, limits.gpus),
        ("workers", beat.workers, limits.workers),
        ("info.cached_models", beat.cached_models, limits.cached_models),
    ):
        if len(items) > most:
            checks.add(name, Reason.TOO_MANY, f"{len(items)} reported, at most {most} allowed")
    for i, worker in enumerate(beat.workers):
        if len(worker.gpu_ids) > limits.gpus:
            checks.add(f"workers[{i}].gpu_ids", Reason.TOO_MANY, f"more than {limits.gpus}")
    if len(beat.endpoint) > limits.url_chars:
        checks.add("info.endpoint", Reason.TOO_LONG, f"longer than {limits.url_chars} characters")
    if checks.problems:
        return tuple(checks.problems)

    host = endpoint_host(registered_endpoint)
    if beat.endpoint and endpoint_host(beat.endpoint) != host:
        checks.add(
            "info.endpoint", Reason.WRONG_HOST,
            "not on the registered endpoint's host; Register again to move the pool",
        )  # fmt: skip
    reading = beat.host
    checks.integer("info.host_ram_total_bytes", reading.ram_total, 0, limits.ram_bytes)
    checks.integer("info.host_ram_available_bytes", reading.ram_available, 0, reading.ram_total)
    checks.integer("info.host_cpu_count", reading.cpu_count, 0, limits.cpu_count)
    checks.number("info.host_cpu_percent", reading.cpu_percent, 0.0,
                  100.0 * max(1, reading.cpu_count))  # fmt: skip
    for i, ref in enumerate(beat.cached_models):
        checks.text(f"info.cached_models[{i}]", ref, limits.model_ref_chars)

    gpu_ids: set[int] = set()
    for i, gpu in enumerate(beat.gpus):
        at = f"gpus[{i}]"
        checks.integer(f"{at}.id", gpu.id, 0, limits.gpu_id)
        checks.unique(f"{at}.id", gpu.id, gpu_ids)
        checks.text(f"{at}.device_name", gpu.device_name, limits.text_chars)
        checks.text(f"{at}.compute_capability", gpu.compute_capability, limits.text_chars)
        checks.integer(f"{at}.vram_total_bytes", gpu.vram_total_bytes, 0, limits.vram_bytes)
        total = gpu.vram_total_bytes
        # Allocated may exceed the total: a pool told to start more than fits reports
        # that truthfully (the soak found one refused for good, its jobs stranded).
        checks.integer(f"{at}.vram_allocated_bytes", gpu.vram_allocated_bytes, 0, limits.vram_bytes)
        checks.integer(f"{at}.vram_free_bytes", gpu.vram_free_bytes, 0, total)
        checks.number(f"{at}.utilization_percent", gpu.utilization_percent, 0.0, 100.0)
        checks.number(f"{at}.temperature_celsius", gpu.temperature_celsius, *limits.celsius)
        checks.number(f"{at}.power_draw_watts", gpu.power_draw_watts, 0.0, limits.watts)

    worker_ids: set[str] = set()
    for i, worker in enumerate(beat.workers):
        at = f"workers[{i}]"
        checks.identifier(f"{at}.id", worker.id, limits.id_chars)
        checks.unique(f"{at}.id", worker.id, worker_ids)
        checks.text(f"{at}.model_ref", worker.model_ref, limits.model_ref_chars, required=True)
        if worker.status not in WORKER_STATUSES:
            allowed = ", ".join(WORKER_STATUSES)
            checks.add(f"{at}.status", Reason.UNKNOWN, f"{worker.status[:40]!r} is not {allowed}")
        for gpu_id in worker.gpu_ids:
            checks.integer(f"{at}.gpu_ids", gpu_id, 0, limits.gpu_id)
        checks.integer(f"{at}.vram_bytes", worker.vram_bytes, 0, limits.vram_bytes)
        checks.integer(f"{at}.started_at_ms", worker.started_at_ms, 0, limits.time_ms)
        checks.integer(f"{at}.slots_total", worker.slots, 1, limits.worker_slots)
        if worker.api not in WORKER_APIS:
            allowed = ", ".join(WORKER_APIS)
            checks.add(f"{at}.api", Reason.UNKNOWN, f"{worker.api[:40]!r} is not {allowed}")
        checks.worker_uri(f"{at}.uri", worker.uri, host)
    return tuple(checks.problems)


def _split(url: str) -> SplitResult | None:
    """`url` split, when it is a plain URL: printable, no credentials, query or
    fragment, a valid port, and a host that is a DNS name or an IP address a pool can
    have (not unspecified, link-local or multicast: 169.254.169.254 is a cloud's
    metadata service, 0.0.0.0 the core's own host)."""
    if not url.isprintable() or any(c.isspace() for c in url):
        return None  # urlsplit silently drops tabs and newlines: refuse them instead
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return None
    if parts.username is not None or parts.query or parts.fragment:
        return None
    host = parts.hostname
    if not host:
        return None
    if ":" not in host and not _HOST_NAME.fullmatch(host):
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if ":" in host or _ipv4_shorthand(host):
            return None  # IPv6 must parse; "2852039166" resolves to 169.254.169.254
        return parts  # a DNS name
    if address.is_unspecified or address.is_link_local or address.is_multicast:
        return None
    return parts


def _ipv4_shorthand(host: str) -> bool:
    """A name that the resolver reads as an IPv4 address although it is not written as
    one (`2852039166`, `0xa9fea9fe`, `127.1`): it would dodge the address checks."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


@dataclass
class _Checks:
    limits: ReportLimits
    problems: list[Problem] = field(default_factory=list)

    def add(self, at: str, reason: Reason, message: str) -> None:
        self.problems.append(Problem(at, reason, message))

    def integer(self, at: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            self.add(at, Reason.OUT_OF_RANGE, f"{value} is outside {low}..{high}")

    def number(self, at: str, value: float, low: float, high: float) -> None:
        if not (math.isfinite(value) and low <= value <= high):
            self.add(at, Reason.OUT_OF_RANGE, f"{value} is outside {low:g}..{high:g}")

    def text(self, at: str, value: str, most: int, *, required: bool = False) -> None:
        if required and not value:
            self.add(at, Reason.REQUIRED, "required")
        elif len(value) > most:
            self.add(at, Reason.TOO_LONG, f"longer than {most} characters")
        elif not value.isprintable():
            self.add(at, Reason.BAD_CHARACTERS, "holds control characters")

    def identifier(self, at: str, value: str, most: int) -> None:
        if not value:
            self.add(at, Reason.REQUIRED, "required")
        elif len(value) > most:
            self.add(at, Reason.TOO_LONG, f"longer than {most} characters")
        elif not _ID.fullmatch(value):
            self.add(at, Reason.BAD_CHARACTERS,
                     f"{value!r}: only letters, digits and . _ : - are allowed")  # fmt: skip

    def unique(self, at: str, value: T, seen: set[T]) -> None:
        if value in seen:
            self.add(at, Reason.DUPLICATE, f"{value!r} is reported twice")
        seen.add(value)

    def worker_uri(self, at: str, uri: str, host: str | None) -> None:
        if not uri:
            self.add(at, Reason.REQUIRED, "required: where the worker serves")
            return
        if len(uri) > self.limits.url_chars:
            self.add(at, Reason.TOO_LONG, f"longer than {self.limits.url_chars} characters")
            return
        parts = _split(uri)
        if parts is None or parts.scheme not in _SCHEMES:
            self.add(at, Reason.BAD_URL, f"{uri[:80]!r} is not an http(s)://host[:port] URL")
        elif parts.hostname != host:
            self.add(at, Reason.WRONG_HOST,
                     f"{uri[:80]!r} is not on the pool's registered host {host!r}")  # fmt: skip
