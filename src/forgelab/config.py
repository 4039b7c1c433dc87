"""Typed, composable YAML configs.

A config file is YAML whose keys are checked against a dataclass schema (one per config
kind). A file may say ``extends: base.yaml`` (or a list) to start from other files; later
files and ``--set a.b=c`` overrides win. Unknown keys and wrong types fail before any work,
naming the key, the file it came from and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem, with the key and the file it came from in the message."""


class RunError(RuntimeError):
    """A run that stopped for a reason its message says in full (a full disk, a busy run dir):
    the scripts print it as one line instead of a traceback."""


def field(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:  # noqa: A002
    """dataclasses.field with a one-line meaning shown by ``scripts/config.py keys``."""
    if isinstance(default, (list, dict)):
        value = default
        kw["default_factory"] = lambda: json.loads(json.dumps(value))
    elif dataclasses.is_dataclass(default) and isinstance(default, type):
        kw["default_factory"] = default
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(metadata={"help": help}, **kw)


# ----------------------------------------------------------------------------- loading

def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: str, origins: dict, prefix: str = "") -> None:
    """Deep-merge src into dst (dicts merge, everything else replaces); record key origins."""
    for k, v in src.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, origin, origins, key + ".")
        else:
            dst[k] = json.loads(json.dumps(v)) if isinstance(v, (dict, list)) else v
            _mark(v, key, origin, origins)


def _mark(v: Any, key: str, origin: str, origins: dict) -> None:
    origins[key] = origin
    if isinstance(v, dict):
        for k, sub in v.items():
            _mark(sub, f"{key}.{k}", origin, origins)


def _load_layers(path: Path, origins: dict, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'extends'")
    raw = _read_yaml(path)
    parents = raw.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents:
        _merge(merged, _load_layers(path.parent / parent, origins, seen + (path,)), "", {})
    _merge(merged, raw, str(path), origins)
    return merged


def parse_set(item: str) -> tuple[list[str], Any]:
    """Parse one ``a.b=c`` override; the value is read as YAML (so 3 is int, true is bool)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def load(schema: type, paths: str | Path | list | None = None, overrides: list[str] | None = None):
    """Compose config files (in order) and ``--set`` overrides into a validated schema object."""
    origins: dict[str, str] = {}
    merged: dict = {}
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        _merge(merged, _load_layers(Path(p), origins), str(p), {})
    for item in overrides or []:
        keys, value = parse_set(item)
        node = merged
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(keys[:-1])} is not a section")
        node[keys[-1]] = value
        _mark(value, ".".join(keys), "--set", origins)
    return build(schema, merged, origins)


# ----------------------------------------------------------------------------- validation

def _where(key: str, origins: dict) -> str:
    src = origins.get(key)
    return f" (from {src})" if src else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, origins: dict) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, origins)
            except ConfigError:
                continue  # the next member of the union may take it; the error names them all
        raise ConfigError(f"key '{key}'{_where(key, origins)}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
            # YAML 1.1 reads on/off/yes/no as booleans: `fused: off` means the choice "off"
            for word in (("on", "yes", "true") if value else ("off", "no", "false")):
                if word in choices:
                    return word
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"key '{key}'{_where(key, origins)}: {value!r} is not one of "
                              f"{list(get_args(tp))}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}'{_where(key, origins)}: expected a mapping, got {value!r}")
        return build(tp, value, origins, prefix=key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"key '{key}'{_where(key, origins)}: expected a list, got {value!r}")
        (item_t,) = get_args(tp) or (Any,)
        return [_coerce(item_t, v, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}'{_where(key, origins)}: expected a mapping, got {value!r}")
        _, val_t = get_args(tp) or (str, Any)
        return {str(k): _coerce(val_t, v, f"{key}.{k}", origins) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"key '{key}': unsupported schema type {tp!r}")
    raise ConfigError(f"key '{key}'{_where(key, origins)}: expected {_type_name(tp)}, "
                      f"got {type(value).__name__} {value!r}")


def build(schema: type, data: dict, origins: dict | None = None, prefix: str = ""):
    """Validate a plain dict against a dataclass schema and build it."""
    origins = origins or {}
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else \
                f"; valid keys here: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown key '{key}'{_where(key, origins)}{hint}")
        kwargs[k] = _coerce(hints[k], v, key, origins)
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"missing required key '{prefix}{name}'")
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            # plain list/dict defaults (e.g. a list of section mappings) get the same typing
            value = f.default_factory()  # type: ignore[misc]
            if isinstance(value, (list, dict)):
                kwargs[name] = _coerce(hints[name], value, prefix + name, origins)
    obj = schema(**kwargs)
    check = getattr(obj, "validate", None)
    if check:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{e}{' in ' + prefix.rstrip('.') if prefix else ''}") from None
    return obj


# ----------------------------------------------------------------------------- output

def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def config_hash(obj: Any) -> str:
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows of (key, type, default, meaning) for every key of a schema, nested included."""
    rows = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        key = prefix + f.name
        help_ = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", help_))
            rows.extend(describe(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = to_dict(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), json.dumps(default, default=str), help_))
        inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        for a in inner:
            rows.extend(describe(a, key + "[]."))
    return rows
