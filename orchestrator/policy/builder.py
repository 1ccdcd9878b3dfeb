"""The web UI's rule builder model, and its two-way mapping to YAML policies. Pure.

The builder edits a policy as a list of rules, each with a list of tests (all of
which must hold; none means `always`) and one action. That covers the policies
people write by clicking; YAML that needs more (`any`, `not`, several operators on
one field) is still edited as YAML, and `from_yaml` says why the builder can't.
"""

from __future__ import annotations

from typing import Any

import yaml

from orchestrator.policy.compile import CACHE_WEIGHT, LOAD_WEIGHT
from orchestrator.policy.parse import (
    ACTIONS,
    ENUMS,
    FIELDS,
    OPERATORS,
    SELECTIONS,
    parse_policy,
)

# The worker selection menu's tooltips. Every selection takes a worker of the job's
# model with a free slot that the rule's worker, pool and GPU conditions allow.
SELECTION_HELP = {
    "least-loaded": "smallest share of slots busy, then least utilized GPUs",
    "most-vram-free": "most free VRAM on its GPUs",
    "round-robin": "each in turn",
    "ready": "the first ready worker",
    "prefix-affinity": f"best {CACHE_WEIGHT} x share of the prompt already in its cache "
    f"- {LOAD_WEIGHT} x share of its slots busy",
    "session-affinity": "the worker the job's session last ran on, else least-loaded",
}


def vocabulary() -> dict[str, Any]:
    """What the builder's menus offer: exactly what the compiler accepts."""
    return {
        "fields": {scope: dict(sorted(names.items())) for scope, names in FIELDS.items()},
        "enums": {field: list(values) for field, values in ENUMS.items()},
        "operators": {kind: list(ops) for kind, ops in OPERATORS.items()},
        "selections": list(SELECTIONS),
        "selection_help": {name: SELECTION_HELP[name] for name in SELECTIONS},
        "actions": list(ACTIONS),
        "evict_policies": ["lru", "lfu"],
    }


def _value_spec(test: dict[str, Any]) -> Any:
    op, value = test.get("op", "eq"), test.get("value")
    if op == "eq" and not isinstance(value, dict | list):
        return value
    return {op: value}


def _condition(tests: list[dict[str, Any]]) -> Any:
    clauses = [{t["field"]: _value_spec(t)} for t in tests]
    if not clauses:
        return "always"
    return clauses[0] if len(clauses) == 1 else {"all": clauses}


def _action(action: dict[str, Any]) -> dict[str, Any]:
    kind = action.get("type", "dispatch")
    params = {k: v for k, v in action.items() if k != "type" and v not in (None, "", False)}
    if kind == "use":
        return {"use": "platform-scheduler"}
    if kind == "dispatch" and params.get("model_match"):
        params["model_match"] = "required"
    if kind in ("dispatch", "wait", "start_worker") and not params:
        return {kind: None}
    return {kind: params}


def to_yaml(policy: dict[str, Any]) -> str:
    """The builder's policy as YAML, in the spec's key order."""
    header: dict[str, Any] = {"name": policy.get("name") or "policy"}
    if policy.get("version"):
        header["version"] = str(policy["version"])
    if policy.get("description"):
        header["description"] = policy["description"]
    rules = []
    for rule in policy.get("rules", []):
        out: dict[str, Any] = {
            "name": rule.get("name") or "rule",
            "condition": _condition(rule.get("tests", [])),
            "action": _action(rule.get("action", {})),
        }
        if rule.get("priority") is not None and rule.get("priority") != "":
            out["priority"] = rule["priority"]
        rules.append(out)
    header["rules"] = rules
    return yaml.safe_dump({"scheduler": header}, sort_keys=False, allow_unicode=True)


def _tests(condition: Any, where: str) -> list[dict[str, Any]]:
    if condition == "always":
        return []
    clauses = (
        condition["all"]
        if isinstance(condition, dict) and list(condition) == ["all"]
        else [condition]
    )
    tests = []
    for clause in clauses:
        # A mapping of several fields is an implicit `all`, as in the templates.
        if not isinstance(clause, dict) or set(clause) & {"all", "any", "not"}:
            raise ValueError(f"{where}: nested all/any/not conditions")
        for field, spec in clause.items():
            if isinstance(spec, dict):
                if len(spec) != 1:
                    raise ValueError(f"{where}: several operators on {field}")
                ((op, value),) = spec.items()
                tests.append({"field": field, "op": op, "value": value})
            else:
                tests.append({"field": field, "op": "eq", "value": spec})
    return tests


def _action_from(raw: dict[str, Any]) -> dict[str, Any]:
    ((kind, params),) = raw.items()
    if kind == "use":
        return {"type": "use"}
    out: dict[str, Any] = {"type": kind, **(params or {})}
    if kind == "dispatch":
        out["model_match"] = out.get("model_match") == "required"
    return out


def from_yaml(text: str, name: str = "policy.yaml") -> tuple[dict[str, Any] | None, str]:
    """(the builder's policy, "") or (None, why the builder cannot show it).

    Raises PolicyError when the YAML is not a valid policy at all.
    """
    parse_policy(text, name)  # the compiler's own checks, with line and column
    data = yaml.safe_load(text)["scheduler"]
    rules = []
    for index, rule in enumerate(data.get("rules", [])):
        where = f"rule {rule.get('name') or index + 1!r}"
        try:
            tests = _tests(rule.get("condition", "always"), where)
        except ValueError as exc:
            return None, f"{exc}: edit this policy as YAML"
        rules.append({
            "name": rule.get("name", ""),
            "priority": rule.get("priority"),
            "tests": tests,
            "action": _action_from(rule["action"]),
        })  # fmt: skip
    policy = {
        "name": data.get("name", ""),
        "version": str(data["version"]) if data.get("version") is not None else "",
        "description": data.get("description", ""),
        "rules": rules,
    }
    return policy, ""


def rule_at_line(text: str, line: int) -> int | None:
    """The index of the rule whose YAML holds `line` (1-based), for inline errors."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if not isinstance(root, yaml.MappingNode):
        return None
    for key, value in root.value:
        if key.value != "scheduler" or not isinstance(value, yaml.MappingNode):
            continue
        for rkey, rules in value.value:
            if rkey.value == "rules" and isinstance(rules, yaml.SequenceNode):
                starts = [node.start_mark.line + 1 for node in rules.value]
                before = [i for i, start in enumerate(starts) if start <= line]
                return before[-1] if before else None
    return None
