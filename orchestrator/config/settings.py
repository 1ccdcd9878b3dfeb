"""The service configuration: one YAML file, documented in deploy/config/README.md.

`load_config(None)` returns the embedded default (orchestrator/config/default_config.yaml),
which is what `make run` uses. The catalog and the tenants may live in their own
files (`catalog_file`, `tenants_file`), relative to the config file; they are read
at start and again on reload (SIGHUP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from orchestrator.config.records import build, convert, parse_yaml
from orchestrator.domain.context import (
    WORKER_APIS,
    Catalog,
    CatalogModel,
    Config,
    EvictionConfig,
    QueueConfig,
    RetryConfig,
    Tenant,
    TimeoutConfig,
)
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.jobs import SubmitLimits, TenantLimits
from orchestrator.domain.prefix import (
    BLOCK_TOKENS,
    MAX_BLOCK_TOKENS,
    MAX_SESSIONS,
    MIN_BLOCK_TOKENS,
)

DEPLOYMENT_MODES = ("home", "lab", "platform")
# How sandbox workers start: forked from the pre-imported fork server (milliseconds),
# or exec'd as a fresh interpreter (~300 ms of CPU, but its own address-space layout).
SPAWN_METHODS = ("fork-server", "exec")
# Slots of one worker: vLLM's default max_num_seqs is 256; more is a typo.
MAX_WORKER_SLOTS = 1024


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def listen_host(address: str) -> str:
    """The host part of a HOST:PORT listen address (IPv6 brackets removed)."""
    return address.rpartition(":")[0].strip("[]")


@dataclass(frozen=True)
class ListenConfig:
    grpc: str = "127.0.0.1:50051"
    http: str = "127.0.0.1:8080"
    # Host names (no port) the HTTP API answers to besides the loopback names and the
    # listen address itself: a request naming any other Host is refused, so a web page
    # that rebinds its own DNS name to this address cannot talk to the admin API.
    allowed_hosts: tuple[str, ...] = ()
    # gRPC server reflection (schema only, no data). None: on, except in platform mode.
    reflection: bool | None = None


@dataclass(frozen=True)
class TlsConfig:
    """TLS for both listeners (PEM files). With `client_ca_file`, clients must present
    a certificate signed by that CA (mutual TLS), and a certificate's common name can
    stand for an identity (`auth.keys[].cert_cn`)."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls.client_ca_file (mutual TLS) needs tls.cert_file and key_file")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class ApiKey:
    """One credential and the identity it stands for (SECURITY.md). A key is stored
    only as the SHA-256 of its token (`orchestratord auth new-key` prints both); with
    mutual TLS, `cert_cn` names the client certificate that stands for the same
    identity."""

    name: str
    role: str
    sha256: str = ""
    tenant: str | None = None  # role tenant: its tenant id
    pools: tuple[str, ...] = ()  # role pool: the pool ids it speaks for
    cert_cn: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """Credentials. `keys_file` (a YAML file with a `keys:` list) is re-read when it
    changes and on SIGHUP, so keys rotate without a restart: add the new key, move the
    clients over, remove the old one."""

    keys: tuple[ApiKey, ...] = ()
    keys_file: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.keys or self.keys_file)


@dataclass(frozen=True)
class BreakerConfig:
    threshold: int = 5
    base_backoff_s: float = 1.0
    max_backoff_s: float = 60.0


@dataclass(frozen=True)
class TenantSandboxConfig:
    """How tenant schedulers' workers start (platform mode). `systemd`: as instances of
    `unit` (deploy/systemd/orchestrator-sandbox@.service), each under its own dynamic
    user, serving in `socket_dir`; `subprocess`: as the core's own children."""

    launcher: str = "subprocess"
    unit: str = "orchestrator-sandbox@{instance}.service"
    socket_dir: str = "/run/orchestratord/sandbox"
    systemctl: tuple[str, ...] = ("systemctl",)

    def __post_init__(self) -> None:
        if self.launcher not in ("subprocess", "systemd"):
            raise ValueError("launcher must be 'subprocess' or 'systemd'")
        if "{instance}" not in self.unit:
            raise ValueError("unit must contain {instance}")


@dataclass(frozen=True)
class SchedulerConfig:
    file: str | None = None  # a Lua or YAML scheduler; None: the platform scheduler
    language: str = "luajit"  # the Lua runtime: luajit or lua54
    hot_reload: bool = True  # home/lab: redeploy the file when it changes (validated first)
    # Home/lab: when the circuit breaker trips for a version deployed within this
    # window and an earlier one exists, switch back to it. 0 disables.
    auto_rollback_window_s: float = 600.0
    deadline_ms: int = 50
    tick_ms: int = 250
    spares: int = 1
    seccomp: bool = True
    # How sandbox workers start: "fork-server" forks them from one pre-imported process
    # (a few ms); "exec" starts each as a new interpreter (~300 ms of CPU, but every
    # worker gets its own address-space layout).
    spawn: str = "fork-server"
    # A user scheduler slow to answer gets the platform scheduler started beside it, so
    # that a fallback is ready at the deadline: this long, plus the platform's recent
    # call latency, before the deadline. null: no hedge.
    hedge_margin_ms: int | None = 10
    breaker: BreakerConfig = BreakerConfig()
    tenant_sandbox: TenantSandboxConfig = TenantSandboxConfig()

    def __post_init__(self) -> None:
        if self.spawn not in SPAWN_METHODS:
            raise ValueError(f"spawn must be one of {list(SPAWN_METHODS)}, not {self.spawn!r}")
        if self.hedge_margin_ms is not None and self.hedge_margin_ms < 0:
            raise ValueError(f"hedge_margin_ms must be 0 or more, not {self.hedge_margin_ms}")


@dataclass(frozen=True)
class DeclaredGpu:
    """A GPU named in the config, used when NVML cannot be read (marked measured=false)."""

    id: int
    device_name: str = "Declared GPU"
    vram_total_bytes: int = 24 * 1024**3
    compute_capability: str = "8.0"
    supports_fp16: bool = True
    supports_int8: bool = True
    supports_tensor_cores: bool = True


@dataclass(frozen=True)
class WorkerLaunchConfig:
    """How the local pool starts an inference worker process.

    `command` is a template; placeholders: {python}, {host}, {port}, {model_ref},
    {model_file}, {gpu_id}, {worker_id}, {tokens_per_sec}, {slots}. The default starts
    the development worker; llama.cpp's llama-server plugs in as
    ["llama-server", "-m", "{model_file}", "--host", "{host}", "--port", "{port}",
    "--parallel", "{slots}"], vLLM as ["vllm", "serve", "{model_file}",
    "--served-model-name", "{model_ref}", "--host", "{host}", "--port", "{port}",
    "--max-num-seqs", "{slots}"] with `api: openai`, SGLang likewise with
    `--served-model-name {model_ref}`. The `openai` dialect sends the job's catalog
    model_ref as the request's `model`, and vLLM answers 404 for any name but the
    ones it serves (by default the model's path); llama-server's and TGI's OpenAI
    routes ignore `model`, so they need no such flag.

    `api` is the dialect the core speaks to the worker (WORKER_APIS): `llamacpp` is
    `POST /completion`, `openai` is `/v1/completions` and `/v1/chat/completions`.
    `slots` is how many jobs one worker runs at once; with `slots_from_server`, a
    llama-server's own `total_slots` (from `GET /props`) replaces it once it is ready.
    """

    command: tuple[str, ...] = (
        "{python}", "-m", "orchestrator.pools.devworker", "--host", "{host}", "--port", "{port}",
        "--model", "{model_ref}", "--tokens-per-sec", "{tokens_per_sec}", "--slots", "{slots}",
    )  # fmt: skip
    api: str = "llamacpp"
    slots: int = 1
    slots_from_server: bool = False
    host: str = "127.0.0.1"
    port_range: tuple[int, ...] = (18100, 18999)
    startup_timeout_ms: int = 30_000
    tokens_per_sec: float = 200.0  # for the development worker
    model_files: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.api not in WORKER_APIS:
            raise ValueError(f"api must be one of {list(WORKER_APIS)}, not {self.api!r}")
        if not 1 <= self.slots <= MAX_WORKER_SLOTS:
            raise ValueError(f"slots must be within 1..{MAX_WORKER_SLOTS}, not {self.slots}")


@dataclass(frozen=True)
class LocalPoolConfig:
    enabled: bool = True
    id: str = "local"
    endpoint: str = ""
    gpus: tuple[DeclaredGpu, ...] = ()
    use_nvml: bool = True
    worker: WorkerLaunchConfig = WorkerLaunchConfig()


@dataclass(frozen=True)
class PoolsConfig:
    heartbeat_ms: int = 500
    degraded_after_ms: int = 1500
    offline_after_ms: int = 5000
    # A remote pool silent this long is removed, and its running jobs are retried: the
    # cluster never keeps a pool, nor the scheduler a worker, that is gone for good.
    expire_after_ms: int = 60_000
    # Remote pools registered at once; each costs memory and work in every cycle.
    max_pools: int = 256

    def __post_init__(self) -> None:
        if self.expire_after_ms <= self.offline_after_ms:
            raise ValueError(
                f"expire_after_ms ({self.expire_after_ms}) must exceed offline_after_ms "
                f"({self.offline_after_ms}): a pool is offline before it is removed"
            )
        if self.max_pools < 0:
            raise ValueError(f"max_pools must be 0 or more, not {self.max_pools}")


@dataclass(frozen=True)
class DecisionLogConfig:
    """Every cycle's context and decision in state_dir/decisions, for replay."""

    enabled: bool = True
    max_file_mb: float = 32.0  # then a new file starts (with a full snapshot)
    keep_files: int = 4  # older files are deleted


@dataclass(frozen=True)
class PrefixCacheConfig:
    """The core's index of prompt blocks held by workers (docs/ARCHITECTURE.md D29)."""

    block_tokens: int = BLOCK_TOKENS  # tokens per block: Mooncake's traces use 512
    max_sessions: int = MAX_SESSIONS  # sessions whose last worker is remembered

    def __post_init__(self) -> None:
        if not MIN_BLOCK_TOKENS <= self.block_tokens <= MAX_BLOCK_TOKENS:
            raise ValueError(
                f"block_tokens must be between {MIN_BLOCK_TOKENS} and {MAX_BLOCK_TOKENS}"
            )
        if not 0 <= self.max_sessions <= 10 * MAX_SESSIONS:
            raise ValueError(f"max_sessions must be between 0 and {10 * MAX_SESSIONS}")


@dataclass(frozen=True)
class ServiceConfig:
    deployment_mode: str = "lab"
    mode: str = "agentic"
    state_dir: str = ".orchestratord"
    durability: str = "full"  # SQLite synchronous: "full" survives power loss, "normal" a crash
    listen: ListenConfig = ListenConfig()
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    # Bounded, unlike the domain's default (-1, as in the runtime spec's examples):
    # every queued job is held in memory until it is dispatched.
    queue: QueueConfig = QueueConfig(capacity=100_000)
    timeout: TimeoutConfig = TimeoutConfig()
    retry: RetryConfig = RetryConfig()
    eviction: EvictionConfig = EvictionConfig()
    limits: SubmitLimits = SubmitLimits()
    local_pool: LocalPoolConfig = LocalPoolConfig()
    pools: PoolsConfig = PoolsConfig()
    decision_log: DecisionLogConfig = DecisionLogConfig()
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig()
    catalog: Mapping[str, Any] = field(default_factory=dict)
    catalog_file: str | None = None
    tenants: Mapping[str, Any] = field(default_factory=dict)
    tenants_file: str | None = None
    # Platform mode: tenant id -> that tenant's own scheduler (Lua or YAML), run in its
    # own sandbox on a view of the cluster holding only its jobs (docs/ARCHITECTURE.md, D15).
    tenant_schedulers: Mapping[str, str] = field(default_factory=dict)
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    # Where relative paths (scheduler file, catalog_file, state_dir) are resolved.
    base_dir: str = "."

    def __post_init__(self) -> None:
        if self.deployment_mode not in DEPLOYMENT_MODES:
            raise ValueError(f"deployment_mode must be one of {DEPLOYMENT_MODES}")
        if self.durability not in ("full", "normal"):
            raise ValueError("durability must be 'full' or 'normal'")
        for name, address in (("grpc", self.listen.grpc), ("http", self.listen.http)):
            if listen_host(address) in LOOPBACK_HOSTS:
                continue
            if not (self.tls.enabled and self.auth.configured):
                raise ValueError(
                    f"listen.{name} {address!r} is not a loopback address: set tls.cert_file "
                    "and tls.key_file, and auth.keys or auth.keys_file, so that nothing "
                    "reaches the network unencrypted or unauthenticated (SECURITY.md)"
                )
        if self.platform_mode and not self.auth.configured:
            raise ValueError(
                "deployment_mode platform serves several tenants: set auth.keys or "
                "auth.keys_file, so that each caller's tenant comes from its credential "
                "(SECURITY.md)"
            )
        if self.tenant_schedulers and self.deployment_mode != "platform":
            raise ValueError("tenant_schedulers: only in platform mode (deployment_mode)")

    @property
    def platform_mode(self) -> bool:
        return self.deployment_mode == "platform"

    @property
    def reflection(self) -> bool:
        if self.listen.reflection is None:
            return not self.platform_mode
        return self.listen.reflection

    def path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def context_config(self) -> Config:
        """ctx.config (runtime-spec 3.6)."""
        return Config(
            mode=self.mode,
            deployment_mode=self.deployment_mode,
            queue=self.queue,
            timeout=self.timeout,
            retry=self.retry,
            eviction=self.eviction,
        )


def load_config(path: Path | None) -> ServiceConfig:
    """The config at `path`, or the embedded default."""
    if path is None:
        text = resources.files("orchestrator.config").joinpath("default_config.yaml").read_text()
        name, base = "default_config.yaml", Path.cwd()
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        name, base = str(path), path.resolve().parent
    data = parse_yaml(text, name) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}: expected a mapping at the top level")
    return build(ServiceConfig, {**data, "base_dir": str(data.get("base_dir", base))}, name)


def load_catalog(config: ServiceConfig) -> Catalog:
    """The model catalog: `catalog` inline, or `catalog_file`."""
    data: Any = config.catalog
    name = "config.catalog"
    if config.catalog_file:
        path = config.path(config.catalog_file)
        data, name = _readparse_yaml(path), str(path)
    data = data or {}
    models = {
        ref: build(CatalogModel, {"model_ref": ref, **(model or {})}, f"{name}.models[{ref!r}]")
        for ref, model in (data.get("models") or {}).items()
    }
    aliases = convert(dict[str, str], data.get("aliases") or {}, f"{name}.aliases")
    for alias, target in aliases.items():
        if target not in models:
            raise ConfigError(f"{name}.aliases[{alias!r}]: {target!r} is not in the catalog")
    return Catalog(models=models, aliases=aliases)


@dataclass(frozen=True)
class TenantQuota:
    """A tenant as configured: its name and quotas (usage is live state), and its
    overrides of `limits.per_tenant`. Those bound its submits in the service and are
    not part of ctx.tenants: schedulers see only what `tenant()` returns."""

    name: str = ""
    quota_vram_bytes: int | None = None
    quota_max_concurrent_jobs: int | None = None
    quota_tokens_daily: int | None = None
    limits: TenantLimits = TenantLimits()

    def tenant(self, tenant_id: str) -> Tenant:
        """The tenant as ctx.tenants shows it, before any usage."""
        return Tenant(
            id=tenant_id,
            name=self.name,
            quota_vram_bytes=self.quota_vram_bytes,
            quota_max_concurrent_jobs=self.quota_max_concurrent_jobs,
            quota_tokens_daily=self.quota_tokens_daily,
        )


def split_tenants(
    tenants: Mapping[str, TenantQuota],
) -> tuple[dict[str, Tenant], dict[str, TenantLimits]]:
    """What ctx.tenants shows (the cluster state's) and the submit limits the service
    keeps to itself (admission's), by tenant id."""
    return (
        {tenant_id: quota.tenant(tenant_id) for tenant_id, quota in tenants.items()},
        {tenant_id: quota.limits for tenant_id, quota in tenants.items()},
    )


def load_tenants(config: ServiceConfig) -> dict[str, TenantQuota]:
    """Tenants, their quotas and limits, by id: `tenants` inline, or `tenants_file`."""
    data: Any = config.tenants
    name = "config.tenants"
    if config.tenants_file:
        path = config.path(config.tenants_file)
        data, name = _readparse_yaml(path), str(path)
    return {
        str(tenant_id): build(TenantQuota, raw or {}, f"{name}[{tenant_id!r}]")
        for tenant_id, raw in (data or {}).items()
    }


def _readparse_yaml(path: Path) -> Any:
    try:
        return parse_yaml(path.read_text(), str(path))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
