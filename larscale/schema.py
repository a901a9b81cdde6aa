"""Strict YAML → dataclass loading: every error names the field by its path and says why.

One small mechanism serves the machine profile (larscale/machine.py) and the sweep spec (jobs/): the
dataclass *is* the schema. Field types drive the checks (int, float, bool, str, Literal choices, lists,
string-keyed dicts, nested dataclasses, ``X | None``); a field's ``metadata["check"]`` adds a value rule;
a field without a default is required; unknown keys are rejected with the closest known name.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class SchemaError(ValueError):
    """An invalid document. ``path`` is where (``network.inter_node.bandwidth_gbps``, ``sweep.nodes[2]``)."""

    def __init__(self, path: str, reason: str, source: str | None = None):
        self.path, self.reason, self.source = path, reason, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path or '<document>'}: {reason}")


def check(rule: Callable[[Any], str | None], **kwargs: Any) -> Any:
    """A dataclass field whose value must also pass ``rule`` (returns a reason string when it fails)."""
    metadata = {"check": rule}
    return dataclasses.field(metadata=metadata, **kwargs)


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value!r}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value!r}"


def fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value!r}"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """``value`` checked and converted to type ``tp``; SchemaError at ``path`` otherwise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(option, value, path)
            except SchemaError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise SchemaError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise SchemaError(path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SchemaError(path, f"expected a list, got {type(value).__name__} {value!r}")
        return [convert(item, v, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise SchemaError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {convert(key_tp, k, _join(path, str(k))): convert(item, v, _join(path, str(k)))
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(path, f"expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise SchemaError(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"schema.convert does not handle {tp!r} (at {path})")


def from_mapping(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise SchemaError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SchemaError(_join(path, str(key)), f"unknown field{hint}; known: {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        where = _join(path, name)
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SchemaError(where, "required field is missing")
            continue
        value = convert(hints[name], data[name], where)
        rule = field.metadata.get("check")
        if rule is not None and value is not None:
            reason = rule(value)
            if reason:
                raise SchemaError(where, reason)
        values[name] = value
    try:
        return cls(**values)
    except SchemaError as err:
        # __post_init__ cross-field checks report paths relative to the object: prefix ours.
        raise SchemaError(_join(path, err.path) if err.path else path, err.reason) from None


def to_mapping(obj: Any) -> Any:
    """A dataclass tree back to plain dicts/lists, omitting None values (round-trips through YAML)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, list):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


def load_yaml(path: Path) -> Any:
    """Parse a YAML file; syntax errors become a SchemaError naming the file and line."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SchemaError("", f"cannot read: {err.strerror}", str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SchemaError("", f"not valid YAML: {where}{getattr(err, 'problem', err)}", str(path)) from None
