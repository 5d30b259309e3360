"""Strict checks of method options against the types their config dataclass declares.

A method's options are a dataclass; its field annotations are the contract. ``coerce_fields``
checks every value against its field's type before the method's own range checks run: a
``bool`` option takes only ``True``/``False`` (``"no"`` or ``0`` are errors, not truthy), an
``int`` option rejects bools and floats, a ``float`` option takes ints and floats (not bools),
``Literal[...]`` options take one of the listed values, ``Optional[...]`` adds None, and
``tuple[int, ...]`` takes a list or tuple whose items all check (a tuple is kept).
``parse_option_text`` reads a command-line ``KEY=VALUE`` value by the same types.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from typing import Any, Hashable, Iterable, Literal, Optional, Sequence, Union

from ..errors import InvalidOptionError, shown

_NONE_WORDS = ("none", "null")
_PLURALS = {bool: "bools", int: "integers", float: "numbers", str: "strings"}
_BOOL_WORDS = {"true": True, "false": False}


@functools.lru_cache(maxsize=None)
def _field_types(config_class: type) -> dict[str, Any]:
    """Field name -> declared type of a config dataclass (resolved once per class)."""
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_PLURALS.get(args[0], _describe(args[0]))}"
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "None"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def _checked(kind: Any, value: Any) -> tuple[bool, Any]:
    """(accepted, value converted to the field's type)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        for option in args:
            ok, converted = _checked(option, value)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return (value in args and not isinstance(value, bool)), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_checked(args[0], item) for item in value]
        return all(ok for ok, _ in items), tuple(converted for _, converted in items)
    if kind is type(None):
        return value is None, value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            return ok, float(value) if ok else value
        except OverflowError:  # an integer beyond any float: reported as not finite
            return True, math.inf
    if kind is str:
        return isinstance(value, str), value
    return isinstance(value, kind), value


def coerce_fields(config: Any) -> None:
    """Check every field of the dataclass ``config`` against its declared type, in place.

    Raises:
        InvalidOptionError: naming the first option whose value has the wrong type.
    """
    for name, kind in _field_types(type(config)).items():
        value = getattr(config, name)
        ok, converted = _checked(kind, value)
        if not ok:
            raise InvalidOptionError(f"{name} must be {_describe(kind)}, got {shown(value)}")
        problem = _range_problem(converted)
        if problem:
            raise InvalidOptionError(f"{name} must be {problem}, got {shown(value)}")
        setattr(config, name, converted)


#: the largest integer option: token, block, merge and point counts all stay far below it
MAX_INT = 2**31 - 1


def _range_problem(value: Any) -> str:
    """What a type-checked option value (or an item of a tuple) is out of range for, or ``""``:
    every number must be finite and every integer at most :data:`MAX_INT` in size."""
    if isinstance(value, tuple):
        return next(filter(None, map(_range_problem, value)), "")
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"an integer of at most {MAX_INT} in size"
    return ""


def parse_option_text(config_class: type, name: str, text: str) -> Any:
    """A command-line option value ``text`` read as the type of field ``name`` of ``config_class``.

    ``none``/``null`` is None, ``true``/``false`` (any case) are bools, numbers and JSON lists
    are read as JSON, anything else stays text; :func:`coerce_fields` then checks the type.

    Raises:
        InvalidOptionError: ``name`` is not an option of ``config_class``.
    """
    kinds = _field_types(config_class)
    if name not in kinds:
        valid = ", ".join(sorted(kinds)) or "none"
        raise InvalidOptionError(f"unknown option {name!r}; valid options: {valid}")
    lowered = text.strip().lower()
    if lowered in _NONE_WORDS:
        return None
    if lowered in _BOOL_WORDS:
        return _BOOL_WORDS[lowered]
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, too many digits, or nested too deep: kept as text
        return text
    return tuple(parsed) if isinstance(parsed, list) else parsed


def parse_options(config_class: type, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Command-line ``(KEY, VALUE)`` text pairs as options of ``config_class`` (see :func:`parse_option_text`);
    a key given twice is an error, not the last value silently winning."""
    repeated = first_repeated(name for name, _ in pairs)
    if repeated is not None:
        first, second = [text for name, text in pairs if name == repeated][:2]
        raise InvalidOptionError(f"option {repeated} given twice ({repeated}={shown(first)} and "
                                 f"{repeated}={shown(second)})")
    return {name: parse_option_text(config_class, name, text) for name, text in pairs}


def first_repeated(items: Iterable[Hashable]) -> Optional[Hashable]:
    """The first of ``items`` that comes a second time, or None when each comes once."""
    seen: set[Hashable] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None
