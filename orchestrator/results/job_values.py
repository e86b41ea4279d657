"""JobConfig values: type checks, normalisation and parsing of `--set`/`--cross` text.

Every value a search space returns or a flag gives is checked against the type of
its JobConfig field here, so a bad value is named before anything is scheduled.
"""
from __future__ import annotations

import numbers
import typing
from typing import Any, Optional, Sequence

from orchestrator.results.schema import job_field_types

def literal_choices(tp: Any) -> Optional[tuple]:
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def type_name(tp: Any, optional: bool) -> str:
    choices = literal_choices(tp)
    base = ("one of " + ", ".join(repr(c) for c in choices)) if choices else getattr(tp, "__name__", str(tp))
    return base + (" or None" if optional else "")


def check_value(name: str, value: Any) -> Optional[str]:
    """None when `value` suits JobConfig field `name`, else why not."""
    types_ = job_field_types()
    if name not in types_:
        return f"{name!r} is not a JobConfig field"
    tp, optional = types_[name]
    if value is None:
        return None if optional else f"{name} cannot be None"
    choices = literal_choices(tp)
    if choices is not None:
        return None if value in choices else f"{name}={value!r} is not {type_name(tp, optional)}"
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        ok = True
    return None if ok else f"{name}={value!r} ({type(value).__name__}) should be {type_name(tp, optional)}"


def normalize_value(name: str, value: Any) -> Any:
    """Plain Python values (numpy scalars from categorical choices become int/float)."""
    tp, _ = job_field_types()[name]
    if value is None:
        return None
    if tp is float and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_value(name: str, text: str, flag: str = "--set") -> Any:
    """Parse `text` as the type of JobConfig field `name` (for --set key=value)."""
    types_ = job_field_types()
    if name not in types_:
        raise ValueError(f"{flag}: {name!r} is not a JobConfig field; fields: {', '.join(sorted(types_))}")
    tp, optional = types_[name]
    if optional and text.strip().lower() in ("none", "null"):
        return None
    choices = literal_choices(tp)
    if choices is not None:
        for c in choices:
            if str(c) == text:
                return c
        raise ValueError(f"{flag}: {name}={text!r} is not {type_name(tp, optional)}")
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise ValueError(f"{flag}: {name}={text!r} should be {type_name(tp, optional)}") from None
    return text


def parse_assignments(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag}: expected key=value, got {item!r}")
        if key in out:
            raise ValueError(f"{flag}: {key} given twice")
        out[key] = parse_value(key, text, flag)
    return out
