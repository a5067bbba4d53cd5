"""Reading configuration: YAML files (with `include:`), `a.b=c` overrides, and typed
coercion into the config dataclasses, each bad key or value named in one line. Torch-free."""
from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import fields
from pathlib import Path

import yaml

from trainer.errors import ConfigError


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is it a YAML file?") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    merged: dict = {}
    includes = data.pop("include", [])
    for inc in [includes] if isinstance(includes, str) else includes:
        deep_merge(merged, read_yaml((path.parent / inc).resolve()))
    deep_merge(merged, data)
    return merged


def yaml_problem(e: yaml.YAMLError) -> str:
    """'line L, column C: what' (1-based, as editors count) from a YAML parser error."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"malformed YAML at {where}{what}"


def deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v


def nest(dotted: str, value) -> dict:
    out: dict = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


# Keys that did nothing and were removed: the config.yaml of older runs still holds them.
RETIRED = ("data.num_workers",)


def apply_dict(obj, data: dict, prefix: str = "") -> set[str]:
    """Set fields of a (nested) dataclass from a dict, checking names and types; returns the
    dotted keys it set."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    attrs = {key_of(f): f.name for f in fields(obj)}  # config key -> attribute
    names = list(attrs)
    done: set[str] = set()
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full == "logging.tensorboard":  # replaced by logging.trackers
            on, rest = _coerce(full, value, bool), [t for t in obj.trackers if t != "tensorboard"]
            obj.trackers = ["tensorboard", *rest] if on else rest
            done.add("logging.trackers")
            continue
        if full in RETIRED:
            warnings.warn(f"config key {full!r} was removed (it did nothing); ignoring it", stacklevel=2)
            continue
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix + near[0]!r}?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        attr = attrs[key]
        current = getattr(obj, attr)
        if dataclasses.is_dataclass(current):
            done |= apply_dict(current, value, full + ".")
        else:
            setattr(obj, attr, _coerce(full, value, hints[attr]))
            done.add(full)
    return done


def key_of(f: dataclasses.Field) -> str:
    """A field's config key: its name, or `metadata["key"]` where the key is a Python keyword
    (`checkpoint.async` is the attribute `async_`)."""
    return f.metadata.get("key", f.name)


def to_dict(obj) -> dict:
    """A (nested) config dataclass as a dict keyed by config keys (what YAML files hold)."""
    return {key_of(f): to_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else _plain(v)
            for f in fields(obj)}


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _coerce(key: str, value, typ):
    origin = typing.get_origin(typ)
    if origin is dict:
        key_type, item_type = typing.get_args(typ)
        if value in ("", None):
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping, e.g. {{q: 16, v: 32}}")
        return {_coerce(key, k, key_type): _coerce(f"{key}.{k}", v, item_type) for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(key, v, item_type) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    return value
