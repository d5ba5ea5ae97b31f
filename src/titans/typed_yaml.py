"""Typed YAML: dataclasses built from YAML (or dicts) with every key and value checked.

:func:`from_dict` builds a dataclass from a mapping: an unknown key is an error naming the full dotted key and the
nearest valid one, a wrong type names the key, the expected type and the value found, and a value a dataclass's
``__post_init__`` rejects through :func:`check` names its dotted key. :func:`apply_overrides` applies
``key.sub=value`` overrides. A leaf module: it imports nothing from titans.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = ["ConfigError", "apply_overrides", "check", "dump_yaml", "from_dict", "load_yaml", "to_dict"]


class ConfigError(ValueError):
    """An invalid configuration: unknown key, wrong type or out-of-range value."""


class _FieldError(ConfigError):
    """A value rejected by a section's ``__post_init__``; :func:`from_dict` adds the dotted prefix."""

    def __init__(self, key: str, problem: str, value: Any):
        super().__init__(f"'{key}' {problem}, got {value!r}")
        self.key, self.problem, self.value = key, problem, value


def check(ok: bool, key: str, problem: str, value: Any) -> None:
    """In a dataclass's ``__post_init__``: reject ``value`` of field ``key`` unless ``ok``."""
    if not ok:
        raise _FieldError(key, problem, value)


# ----------------------------------------------------------------------------------------------
# Dict <-> dataclass.


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(path: str, key: Any, valid: list[str]) -> ConfigError:
    full = _join(path, str(key))
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        hint = f"did you mean '{_join(path, close[0])}'?"
    else:
        hint = f"valid keys: {', '.join(valid) or 'none'}"
    return ConfigError(f"unknown key '{full}' ({hint})")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _wrong_type(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"wrong type for '{path}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


def from_dict(cls: type, data: Mapping, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, validating every key and value.

    ``path`` is the dotted prefix used in error messages. Missing keys take the field's default.
    Raises :class:`ConfigError` for unknown keys, missing required keys, wrong types and values
    rejected by the dataclass (its ``__post_init__``).
    """
    if not isinstance(data, Mapping):
        raise _wrong_type(path or "<config>", cls, data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key(path, key, list(fields))
    hints, kwargs = typing.get_type_hints(cls), {}
    for name, field in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'")
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        raise ConfigError(f"'{_join(path, exc.key)}' {exc.problem}, got {exc.value!r}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid '{path or cls.__name__}': {exc}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` and convert it (lists to tuples, ints to floats...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:  # Optional[X]: report X's own error
            raise errors[0]
        raise _wrong_type(path, tp, value)
    if origin is Literal:
        if value not in args or type(value) not in {type(a) for a in args}:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"invalid value for '{path}': expected one of {allowed}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"'{path}' must be a finite number, got {value!r}")
            return float(value)
        raise _wrong_type(path, tp, value)
    if tp in (int, bool, str):
        if type(value) is not tp:  # no bool-as-int, no int-as-str
            raise _wrong_type(path, tp, value)
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(path, tp, value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(
                    f"wrong length for '{path}': expected {len(args)} items, got {len(value)} ({value!r})"
                )
            items = [_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        else:
            item_type = args[0] if args else Any
            items = [_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(path, tp, value)
        key_type, value_type = args if args else (Any, Any)
        return {
            _convert(key_type, k, f"{path}.{k}"): _convert(value_type, v, f"{path}.{k}") for k, v in value.items()
        }
    raise TypeError(f"unsupported config field type {tp!r} at '{path}'")


def to_dict(obj: Any) -> Any:
    """A dataclass (recursively) as plain dicts, lists and scalars, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# YAML.


class _Refused(yaml.YAMLError):
    """YAML that is valid but not accepted in a config: a duplicate key or an alias."""


def _check_duplicate_keys(node: yaml.Node, path: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen:
                raise _Refused(f"duplicate key '{_join(path, key)}' (line {key_node.start_mark.line + 1})")
            seen.add(key)
            _check_duplicate_keys(value_node, _join(path, str(key)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{path}[{i}]")


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``1e-3`` as a float (YAML 1.2 rule; PyYAML reads a string) and refuses
    duplicate keys (PyYAML keeps the last silently) and aliases (no config needs them; they make alias bombs)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"YAML aliases are not allowed (*{event.anchor}, line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_document(self, node):
        _check_duplicate_keys(node)
        return super().construct_document(node)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {source}: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"invalid YAML in {source}: nested too deeply") from None


def load_yaml(path: str | Path, cls: type) -> Any:
    """Read a YAML file and build dataclass ``cls`` from it (see :func:`from_dict`)."""
    path = Path(path)
    data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        data = {}
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def dump_yaml(obj: Any) -> str:
    """A dataclass as YAML text, fields in order."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------------------------
# --set key.sub=value overrides.


def _is_open_mapping(tp: Any) -> bool:
    """Whether a field accepts arbitrary sub-keys (a dict or Any)."""
    return tp is Any or tp is dict or typing.get_origin(tp) is dict


def _section_type(tp: Any) -> Any:
    """The dataclass inside ``tp`` (``X`` or ``Optional[X]``), else ``tp``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(inner) == 1:
            return inner[0]
    return tp


def apply_overrides(data: Mapping, overrides: list[str], cls: type) -> dict:
    """Return a copy of ``data`` with ``key.sub=value`` overrides applied.

    The value is parsed as a YAML scalar or flow list/mapping (``lr=1e-3``, ``betas=[0.9,0.99]``).
    Keys are checked against dataclass ``cls``: an unknown key raises :class:`ConfigError` naming
    the nearest valid one. Types are validated when the result goes through :func:`from_dict`.
    """
    result = to_dict(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r}: expected key.sub=value")
        parts = key.split(".")
        if any(not p for p in parts):
            raise ConfigError(f"invalid override {item!r}: empty key component")
        _check_override_key(cls, parts)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = _parse_yaml(raw, f"override {item!r}")
    return result


def _check_override_key(cls: type, parts: list[str]) -> None:
    tp: Any = cls
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        if _is_open_mapping(tp):
            return
        tp = _section_type(tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"cannot set '{'.'.join(parts)}': '{path}' is not a section")
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        if part not in fields:
            raise _unknown_key(path, part, list(fields))
        tp = typing.get_type_hints(tp)[part]
