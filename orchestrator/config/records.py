"""Plain data (from YAML or JSON) into frozen dataclasses, with errors that name the field.

Used for context files and the service configuration. Types follow the dataclass
annotations: int, float, str, bool, optional values, tuples, string-keyed mappings
and nested dataclasses. Unknown keys are errors: a typo in a config file should
fail loudly, not be ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

from orchestrator.domain.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], data: Any, path: str, *, ignore: frozenset[str] = frozenset()) -> T:
    """An instance of dataclass `cls` from `data`; `ignore` lists keys to skip silently."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ignore:
            continue
        if key not in fields:
            raise ConfigError(
                f"{path}.{key}: unknown field (expected one of {', '.join(sorted(fields))})"
            )
        kwargs[key] = convert(hints[key], value, f"{path}.{key}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise ConfigError(f"{path}: missing required field {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return convert(options[0], value, path)
        for option in options:
            try:
                return convert(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_name(hint)}, got {_kind(value)}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {_kind(value)}")
        item = args[0] if args else Any
        return tuple(convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping, typing.Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_kind(value)}")
        item = args[1] if len(args) == 2 else Any
        return {str(k): convert(item, v, f"{path}[{k!r}]") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {_kind(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            digits = len(str(value))
            raise ConfigError(f"{path}: a number of {digits} digits is too large") from None
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{path}: expected int, got a boolean")
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {_kind(value)}")
    return value


def parse_yaml(text: str, name: str) -> Any:
    """YAML text to plain data; syntax errors point at name:line:column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None


def to_plain(obj: Any) -> Any:
    """The inverse of `build`: dataclasses, tuples and mappings as plain dicts and lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _kind(value: Any) -> str:
    return "a boolean" if isinstance(value, bool) else type(value).__name__


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)
