"""Declaring and checking options: the leaf that the job-file schema (``curate.config``) and the
policy parameters (``curate.select``) both build on, so neither imports the other's internals.
Imports nothing from curate but the error base."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from curate.errors import CurateError


class ConfigError(CurateError):
    """A job file problem, with a one-line message naming the key."""


REQUIRED = object()


@dataclass(frozen=True)
class Opt:
    types: tuple
    default: Any = None
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class ListOf:
    item: dict
    required: bool = True  # False: the key may be left out or empty


class FreeMap:
    """A mapping whose keys are not checked here (Beam options)."""


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check(value: Any, schema: Any, path: str) -> Any:
    if isinstance(schema, FreeMap):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value")
        return dict(value)
    if isinstance(schema, ListOf):
        if not schema.required and (value is None or value == []):
            return []
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path}: expected a non-empty list")
        return [_check(item, schema.item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(schema, dict):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'job file'}: expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in schema:
                where = f"{path}.{key}" if path else str(key)
                raise ConfigError(f"unknown key {where!r}{_suggest(str(key), schema)}")
        return {key: _check(value.get(key), sub, f"{path}.{key}" if path else key)
                for key, sub in schema.items()}
    opt: Opt = schema
    if value is None:
        if opt.default is REQUIRED:
            raise ConfigError(f"{path}: required key is missing")
        return opt.default
    if isinstance(value, bool) and bool not in opt.types:
        raise ConfigError(f"{path}: expected {'/'.join(t.__name__ for t in opt.types)}, got {value!r}")
    if not isinstance(value, opt.types):
        raise ConfigError(f"{path}: expected {'/'.join(t.__name__ for t in opt.types)}, "
                          f"got {type(value).__name__} {value!r}")
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(opt.choices)}")
    if opt.minimum is not None and value < opt.minimum:
        raise ConfigError(f"{path}: {value!r} is below the minimum {opt.minimum}")
    if opt.maximum is not None and value > opt.maximum:
        raise ConfigError(f"{path}: {value!r} is above the maximum {opt.maximum}")
    return value


def check_value(value: Any, schema: Any, path: str) -> Any:
    """Check one value against an ``Opt`` (or a nested schema); ConfigError names ``path``."""
    return _check(value, schema, path)
