"""Config fields that carry their help text, and the one strict check every config runs.

Each user-facing field of a config dataclass is declared with :func:`option`; the help text lives
in ``field.metadata["help"]`` so that the CLI flags and the job-file fields are derived from the
dataclasses rather than copied by hand. :func:`check_fields` checks every field against its type:
a bool is only ``True``/``False`` (never the string ``"no"``), an int is never a bool, a float is
finite; each failure is one line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any

from scheduler.errors import ConfigError

_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    help: str,  # noqa: A002 - the name argparse and readers expect
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    positive: bool = False,
) -> Any:
    """A dataclass field with its help text and the checks :func:`check_fields` applies.

    ``minimum`` is inclusive; ``positive`` means ``> 0`` (for floats); ints with ``minimum=1``
    fail as "must be a positive integer".
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    meta |= {"minimum": minimum, "positive": positive}
    return dataclasses.field(default=default, metadata=meta)


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """``(scalar type, optional)`` of field ``name``: ``int | None`` gives ``(int, True)``;
    ``tuple[int, ...]`` gives ``(tuple, False)``."""
    hint = typing.get_type_hints(cls)[name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return (typing.get_origin(hint) or hint), optional


def user_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that users set (those declared with a help text)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass ``obj`` against its type and declared limits.

    Floats given as ints become floats, sequences given for tuple fields become tuples.
    """
    cls = type(obj)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        kind, optional = field_type(cls, f.name)
        if v is None and optional:
            continue
        fixed = _check_one(f.name, v, kind, f.metadata)
        if fixed is not v:
            object.__setattr__(obj, f.name, fixed)


def _check_one(name: str, v: Any, kind: type, meta: Any) -> Any:
    if kind is bool:
        if type(v) is not bool:
            raise ConfigError(f"{name} must be true or false, got {v!r}")
        return v
    if kind is int:
        if type(v) is not int:
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        if meta.get("minimum") == 1 and v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    elif kind is float:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if meta.get("positive") and not v > 0:
            raise ConfigError(f"{name} must be > 0, got {v!r}")
        v = float(v)
    elif kind is str:
        if not isinstance(v, str):
            raise ConfigError(f"{name} must be a string, got {v!r}")
        choices = meta.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{name}={v!r} is not valid; choose one of {', '.join(choices)}")
        return v
    elif kind is tuple:
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            raise ConfigError(f"{name} must be a list of integers, got {v!r}")
        if not all(type(x) is int for x in v):
            raise ConfigError(f"{name} must be a list of integers, got {v!r}")
        return tuple(v)
    minimum = meta.get("minimum")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {v!r}")
    return v


__all__ = ["option", "check_fields", "user_fields", "field_type"]
