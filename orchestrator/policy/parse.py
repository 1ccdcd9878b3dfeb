"""YAML policies: parse, check against the JSON Schema, then check fields, scopes and values.

Pure. Every error names the file, line and column it is about and says what was
expected: `policy.yaml:12:9: rule 'batch-first': unknown field 'job.prioity'
(expected one of job.created_at, ...)`.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from orchestrator.domain.context import WORKER_APIS
from orchestrator.domain.errors import ErrorCode, OrchestratorError

STRING, NUMBER, BOOL = "string", "number", "bool"

# Fields a condition may test, by scope (runtime-spec section 3), with their type.
FIELDS: dict[str, dict[str, str]] = {
    "job": {
        "id": STRING, "tenant_id": STRING, "session_id": STRING, "priority": STRING,
        "model_ref": STRING, "prompt_hash": STRING, "max_tokens": NUMBER, "seed": NUMBER,
        "temperature": NUMBER, "created_at": NUMBER, "queued_at": NUMBER,
        "retry_count": NUMBER, "wait_time_ms": NUMBER, "estimated_vram_bytes": NUMBER,
        "estimated_duration_ms": NUMBER, "prompt_tokens": NUMBER, "prompt_blocks": NUMBER,
    },
    "model": {
        "model_ref": STRING, "family": STRING, "size": STRING, "quantization": STRING,
        "vram_required_bytes": NUMBER, "context_length": NUMBER,
        "supports_determinism": BOOL, "supports_streaming": BOOL, "file_size_bytes": NUMBER,
        "min_compute_capability": STRING,
    },
    "tenant": {
        "id": STRING, "name": STRING, "concurrent_jobs": NUMBER, "vram_used_bytes": NUMBER,
        "tokens_used_today": NUMBER, "quota_max_concurrent_jobs": NUMBER,
        "quota_vram_bytes": NUMBER, "quota_tokens_daily": NUMBER, "quota_exceeded": BOOL,
    },
    "worker": {
        "id": STRING, "status": STRING, "model_ref": STRING, "vram_bytes": NUMBER,
        "uri": STRING, "current_job_id": STRING, "job_started_at": NUMBER,
        "jobs_completed": NUMBER, "avg_tokens_per_sec": NUMBER, "uptime_ms": NUMBER,
        "started_at_ms": NUMBER, "last_used_at_ms": NUMBER, "pool_id": STRING,
        "slots_total": NUMBER, "slots_busy": NUMBER, "api": STRING,
    },
    "pool": {
        "id": STRING, "endpoint": STRING, "status": STRING, "last_heartbeat_ms": NUMBER,
        "heartbeat_age_ms": NUMBER, "vram_utilization": NUMBER, "host_ram_total_bytes": NUMBER,
        "host_ram_available_bytes": NUMBER, "host_cpu_percent": NUMBER,
        "host_cpu_count": NUMBER,
    },
    "gpu": {
        "id": NUMBER, "device_name": STRING, "compute_capability": STRING,
        "vram_total_bytes": NUMBER, "vram_allocated_bytes": NUMBER,
        "vram_free_bytes": NUMBER, "utilization_percent": NUMBER,
        "temperature_celsius": NUMBER, "power_draw_watts": NUMBER, "supports_fp16": BOOL,
        "supports_int8": BOOL, "supports_tensor_cores": BOOL,
    },
    "metrics": {
        name: NUMBER
        for name in (
            "queue_depth", "queue_depth_interactive", "queue_depth_batch", "avg_wait_time_ms",
            "total_workers", "ready_workers", "busy_workers", "failed_workers", "total_pools",
            "healthy_pools", "degraded_pools", "offline_pools", "total_gpus",
            "total_vram_bytes", "allocated_vram_bytes", "free_vram_bytes",
            "avg_gpu_utilization", "jobs_completed_last_minute", "avg_tokens_per_sec",
        )
    },
}  # fmt: skip

# Values a field may take, where the runtime spec fixes them.
ENUMS = {
    "job.priority": ("interactive", "batch"),
    "worker.status": ("ready", "busy", "starting", "failed"),
    "worker.api": WORKER_APIS,
    "pool.status": ("healthy", "degraded", "offline"),
}

OPERATORS = {
    STRING: ("eq", "ne", "in", "not_in", "exists", "contains", "starts_with"),
    NUMBER: ("eq", "ne", "in", "not_in", "exists", "gt", "gte", "lt", "lte"),
    BOOL: ("eq", "ne", "exists"),
}

# Which scopes each action can see: the job it acts for (its catalog model, its tenant),
# the worker it would use (and that worker's pool and first GPU), the pool and GPU
# it would start on, and the metrics, which every action sees.
ACTION_SCOPES = {
    "dispatch": ("job", "model", "tenant", "worker", "pool", "gpu", "metrics"),
    "wait": ("job", "model", "tenant", "metrics"),
    "evict": ("worker", "pool", "gpu", "metrics"),
    "start_worker": ("job", "model", "tenant", "pool", "gpu", "metrics"),
    "use": ("job", "model", "tenant", "metrics"),
}
JOB_SIDE = frozenset({"job", "model", "tenant"})
PLACE_SIDE = frozenset({"worker", "pool", "gpu"})

SELECTIONS = (
    "least-loaded", "most-vram-free", "round-robin", "ready", "prefix-affinity", "session-affinity",
)  # fmt: skip
SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


class PolicyError(OrchestratorError):
    """A policy that does not compile: where, and what was expected."""

    code = ErrorCode.INVALID_ARGUMENT

    def __init__(self, source: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{source}:{line}:{column}: {message}")
        self.source, self.line, self.column, self.detail = source, line, column, message


@dataclass(frozen=True)
class Test:
    field: str  # "job.seed"
    op: str  # eq, ne, in, not_in, exists, gt, gte, lt, lte, contains, starts_with
    value: Any

    @property
    def scope(self) -> str:
        return self.field.split(".", 1)[0]


@dataclass(frozen=True)
class Condition:
    kind: str  # always, all, any, not, test
    children: tuple[Condition, ...] = ()
    test: Test | None = None

    def scopes(self) -> frozenset[str]:
        if self.test is not None:
            return frozenset({self.test.scope})
        out: frozenset[str] = frozenset()
        for child in self.children:
            out |= child.scopes()
        return out


ALWAYS = Condition("always")


@dataclass(frozen=True)
class Action:
    kind: str  # dispatch, wait, evict, start_worker, use
    selection: str = "least-loaded"
    duration_ms: int | None = None
    policy: str = "lru"
    worker_id: str = ""
    model: str = ""
    pool_id: str = ""


@dataclass(frozen=True)
class Rule:
    name: str
    priority: int
    condition: Condition
    action: Action
    line: int

    @property
    def job_scoped(self) -> bool:
        """Evaluated for each queued job (dispatch always is)."""
        return (
            self.action.kind == "dispatch"
            or bool(self.condition.scopes() & JOB_SIDE)
            or (self.action.kind == "start_worker" and not self.action.model)
        )


@dataclass(frozen=True)
class Policy:
    name: str
    version: str
    description: str
    rules: tuple[Rule, ...]  # in evaluation order: priority, then file order
    source_name: str
    sha256: str


@cache
def schema() -> dict[str, Any]:
    text = resources.files("schedulers").joinpath("scheduler-schema.yaml").read_text()
    loaded: dict[str, Any] = yaml.safe_load(text)
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def parse_policy(text: str, source_name: str = "policy.yaml") -> Policy:
    """A checked policy, or PolicyError pointing at the first problem."""
    try:
        node = yaml.compose(text)
        if node is None:
            raise PolicyError(source_name, 1, 1, "empty policy: expected a 'scheduler:' mapping")
        marks: dict[tuple[Any, ...], tuple[int, int]] = {}
        _index(node, (), marks, set(), source_name)
        # Built from the composed node: a tag such as `!x` fails here, not in a second parse.
        data = yaml.SafeLoader("").construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source_name, line, column, f"invalid YAML: {problem}") from None
    located = _Locator(source_name, marks)
    _check_schema(data, located)
    return _build(data, located, hashlib.sha256(text.encode()).hexdigest())


MAX_POLICY_NODES = 100_000  # with aliases expanded: a "billion laughs" stops here


def _index(
    node: yaml.Node,
    path: tuple[Any, ...],
    marks: dict[tuple[Any, ...], tuple[int, int]],
    open_nodes: set[int],
    source_name: str,
) -> None:
    where = _mark(node)
    if id(node) in open_nodes:
        raise PolicyError(source_name, *where, "invalid YAML: an alias refers to itself")
    if len(marks) > MAX_POLICY_NODES:
        raise PolicyError(
            source_name, *where, f"policy too large: over {MAX_POLICY_NODES} nodes once aliases "
            "are expanded"
        )  # fmt: skip
    marks[path] = where
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise PolicyError(source_name, *_mark(key), "a mapping key must be a plain name")
            marks[(*path, ("key", key.value))] = _mark(key)
            name = key.value
            _index(value, (*path, name), marks, open_nodes, source_name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*path, i), marks, open_nodes, source_name)
    open_nodes.discard(id(node))


def _mark(node: yaml.Node) -> tuple[int, int]:
    """Where a node starts, 1-based (line, column)."""
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Locator:
    def __init__(self, source: str, marks: dict[tuple[Any, ...], tuple[int, int]]) -> None:
        self.source, self.marks = source, marks

    def error(self, path: tuple[Any, ...], message: str, *, key: str | None = None) -> PolicyError:
        where = self.marks.get((*path, ("key", key))) if key is not None else None
        probe = path
        while where is None:
            where = self.marks.get(probe)
            if not probe:
                break
            probe = probe[:-1]
        line, column = where or (1, 1)
        return PolicyError(self.source, line, column, message)


def _describe_path(path: tuple[Any, ...], data: Any) -> str:
    """'rule 'x'' for anything under scheduler.rules[i], else the dotted path."""
    if len(path) >= 3 and path[:2] == ("scheduler", "rules") and isinstance(path[2], int):
        try:
            name = data["scheduler"]["rules"][path[2]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            name = None
        return f"rule {name!r}" if name else f"rule #{path[2] + 1}"
    return ".".join(str(p) for p in path) or "the policy"


ACTIONS = ("dispatch", "wait", "evict", "start_worker", "use")


def _precheck(data: Any, located: _Locator) -> None:
    """The mistakes the schema's own messages explain badly: say them plainly."""
    if isinstance(data, dict):
        for key in data:
            if key != "scheduler":
                raise located.error((), f"unexpected key {key!r} (expected scheduler)", key=key)
    spec = data.get("scheduler") if isinstance(data, dict) else None
    rules = spec.get("rules") if isinstance(spec, dict) else None
    for i, raw in enumerate(rules if isinstance(rules, list) else []):
        action = raw.get("action") if isinstance(raw, dict) else None
        if isinstance(action, dict) and len(action) == 1:
            kind = next(iter(action))
            if kind not in ACTIONS:
                path = ("scheduler", "rules", i, "action")
                raise located.error(
                    path, f"{_describe_path(path, data)}: unknown action {kind!r} "
                    f"(expected one of {', '.join(ACTIONS)})", key=kind,
                )  # fmt: skip


def _check_schema(data: Any, located: _Locator) -> None:
    _precheck(data, located)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), str(e.path)))
    if not errors:
        return
    error = _deepest(jsonschema.exceptions.best_match(errors))
    path = tuple(error.absolute_path)
    where = _describe_path(path, data)
    message = _explain(error, path)
    key = None
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        extra = _unexpected_keys(error)
        key = extra[0] if extra else None
    elif error.validator == "required" and path:
        # A missing key is reported at the key that should have held it.
        path, key = path[:-1], str(path[-1])
    raise located.error(path, f"{where}: {message}", key=key)


def _deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """For a oneOf that failed, the alternative that came closest."""
    while error.context:
        error = max(error.context, key=lambda e: (len(e.absolute_path), -len(e.context or ())))
        if error.validator not in ("oneOf", "anyOf"):
            break
    return error


def _schema_of(error: jsonschema.ValidationError) -> dict[str, Any]:
    return dict(error.schema) if isinstance(error.schema, dict) else {}


def _unexpected_keys(error: jsonschema.ValidationError) -> list[str]:
    part = _schema_of(error)
    allowed = set(part.get("properties", {}))
    patterns = [re.compile(p) for p in part.get("patternProperties", {})]
    keys: list[str] = list(error.instance)  # type: ignore[arg-type]
    return [k for k in keys if k not in allowed and not any(p.search(k) for p in patterns)]


def _explain(error: jsonschema.ValidationError, path: tuple[Any, ...]) -> str:
    field = str(path[-1]) if path else "the policy"
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        return f"missing '{missing[0] if missing else error.message}'"
    if error.validator == "additionalProperties":
        extra = _unexpected_keys(error)
        allowed = sorted(_schema_of(error).get("properties", {}))
        hint = f"expected one of {', '.join(allowed)}" if allowed else "no other keys"
        if "patternProperties" in _schema_of(error):
            hint = "expected a field like job.priority, or all/any/not"
        return f"unexpected key {extra[0]!r} ({hint})" if extra else error.message
    if error.validator == "enum":
        values = [str(v) for v in list(error.validator_value)]  # type: ignore[arg-type]
        message = f"{field} is {error.instance!r}, expected one of {', '.join(values)}"
        # A near miss ("prefix_affinity", "least_loaded") is most often a typo: name it.
        close = difflib.get_close_matches(str(error.instance), values, n=1, cutoff=0.75)
        return message + (f" (did you mean {close[0]!r}?)" if close else "")
    if error.validator == "const":
        return f"{field} is {error.instance!r}, expected {error.validator_value!r}"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{field} should be {expected}, got {type(error.instance).__name__}"
    if error.validator == "minItems":
        return f"{field} needs at least {error.validator_value} item(s)"
    if error.validator in ("minimum", "maximum"):
        return f"{field} is {error.instance}, must be within 0..3600000"
    if error.validator == "minProperties":
        return f"{field} is empty"
    return str(error.message)


def _quantity(field: str, value: Any, path: tuple[Any, ...], located: _Locator, where: str) -> Any:
    """Numbers stay numbers; "16GiB" on *_bytes fields and "5s" on *_ms fields convert."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower().replace(" ", "")
    units = (
        SIZE_UNITS
        if field.endswith("_bytes")
        else DURATION_UNITS
        if field.endswith("_ms")
        else None
    )
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", text)
    if units is None or match is None or match.group(2) not in units:
        kind = "a size like 16GiB" if field.endswith("_bytes") else "a duration like 5s"
        expected = kind if units is not None else "a number"
        raise located.error(path, f"{where}: {field} compares with {value!r}, expected {expected}")
    return int(float(match.group(1)) * units[match.group(2)])


def _test(
    field: str,
    raw: Any,
    path: tuple[Any, ...],
    located: _Locator,
    where: str,
    scopes: tuple[str, ...],
    action: str,
) -> Condition:
    scope, _, name = field.partition(".")
    if scope not in scopes:
        allowed = ", ".join(s for s in scopes)
        raise located.error(
            path[:-1], f"{where}: action {action} cannot use {scope} fields ({field}); "
            f"it can use {allowed} fields", key=field,
        )  # fmt: skip
    kind = FIELDS[scope].get(name)
    if kind is None:
        options = ", ".join(f"{scope}.{n}" for n in sorted(FIELDS[scope]))
        raise located.error(
            path[:-1], f"{where}: unknown field {field!r} (expected one of {options})", key=field
        )
    tests = raw if isinstance(raw, dict) else {"eq": raw}
    out = []
    for op, value in tests.items():
        op_path = (*path, op) if isinstance(raw, dict) else path
        if op not in OPERATORS[kind]:
            raise located.error(
                op_path, f"{where}: {field} is a {kind}; operator {op!r} does not apply "
                f"(expected one of {', '.join(OPERATORS[kind])})",
            )  # fmt: skip
        checked = _value(field, kind, op, value, op_path, located, where)
        out.append(Condition("test", test=Test(field, op, checked)))
    return out[0] if len(out) == 1 else Condition("all", tuple(out))


def _value(
    field: str, kind: str, op: str, value: Any, path: tuple[Any, ...], located: _Locator, where: str
) -> Any:
    if op == "exists":
        return value
    values = value if op in ("in", "not_in") else [value]
    checked = []
    for raw in values:
        item = raw
        if kind == NUMBER:
            item = _quantity(field, raw, path, located, where)
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise located.error(path, f"{where}: {field} is a number, got {item!r}")
        elif kind == BOOL and not isinstance(item, bool):
            raise located.error(path, f"{where}: {field} is true or false, got {item!r}")
        elif kind == STRING:
            if not isinstance(item, str):
                raise located.error(path, f"{where}: {field} is a string, got {item!r}")
            allowed = ENUMS.get(field)
            if allowed and op not in ("contains", "starts_with") and item not in allowed:
                raise located.error(
                    path, f"{where}: {field} is {item!r}, expected one of {', '.join(allowed)}"
                )
        checked.append(item)
    return tuple(checked) if op in ("in", "not_in") else checked[0]


def _condition(
    raw: Any,
    path: tuple[Any, ...],
    located: _Locator,
    where: str,
    scopes: tuple[str, ...],
    action: str,
) -> Condition:
    if raw == "always":
        return ALWAYS
    parts: list[Condition] = []
    for key, value in raw.items():
        sub = (*path, key)
        if key in ("all", "any"):
            children = tuple(
                _condition(item, (*sub, i), located, where, scopes, action)
                for i, item in enumerate(value)
            )
            node = Condition(key, children)
            _check_mixing(node, sub, located, where)
            parts.append(node)
        elif key == "not":
            node = Condition("not", (_condition(value, sub, located, where, scopes, action),))
            _check_mixing(node, sub, located, where)
            parts.append(node)
        else:
            parts.append(_test(key, value, sub, located, where, scopes, action))
    return parts[0] if len(parts) == 1 else Condition("all", tuple(parts))


def _check_mixing(node: Condition, path: tuple[Any, ...], located: _Locator, where: str) -> None:
    # Within any/not, job fields and worker fields cannot meet: the job side is
    # decided per job and the worker side per candidate worker.
    if node.kind == "all":
        return
    scopes = node.scopes()
    if scopes & JOB_SIDE and scopes & PLACE_SIDE:
        raise located.error(
            path, f"{where}: '{node.kind}' mixes job/model fields with worker/pool/gpu fields; "
            "keep them in separate conditions joined by all",
        )  # fmt: skip


def _action(raw: dict[str, Any]) -> Action:
    kind = next(iter(raw))
    body = raw[kind] or {}
    if kind == "use":
        return Action("use")
    if kind == "dispatch":
        return Action("dispatch", selection=body.get("worker_selection", "least-loaded"))
    if kind == "wait":
        return Action("wait", duration_ms=body.get("duration_ms"))
    if kind == "evict":
        return Action(
            "evict", policy=body.get("policy", "lru"), worker_id=body.get("worker_id", "")
        )
    # Without a model, start_worker acts for each matching queued job's model.
    model = body.get("model", "")
    return Action("start_worker", model=model, pool_id=body.get("pool_id", ""))


def _build(data: dict[str, Any], located: _Locator, sha256: str) -> Policy:
    spec = data["scheduler"]
    rules = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(spec["rules"]):
        path = ("scheduler", "rules", i)
        where = f"rule {raw['name']!r}"
        if raw["name"] in seen:
            raise located.error(
                (*path, "name"),
                f"{where}: the name is already used by rule #{seen[raw['name']] + 1}",
            )
        seen[raw["name"]] = i
        action_kind = next(iter(raw["action"]))
        scopes = ACTION_SCOPES[action_kind]
        condition = _condition(
            raw["condition"], (*path, "condition"), located, where, scopes, action_kind
        )
        action = _action(raw["action"])
        line = located.marks.get(path, (1, 1))[0]
        rules.append(Rule(raw["name"], raw.get("priority", 0), condition, action, line))
    ordered = tuple(sorted(rules, key=lambda r: -r.priority))  # stable: file order on ties
    return Policy(
        name=spec["name"],
        version=str(spec.get("version", "")),
        description=spec.get("description", ""),
        rules=ordered,
        source_name=located.source,
        sha256=sha256,
    )
