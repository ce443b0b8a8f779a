"""Config sections as dataclasses, checked on load.

A section is a dataclass whose fields are the options (``bool``, ``int``, ``float``, ``str``,
``Path``, each possibly ``| None``, or a nested section); ``bounded`` gives a number its range.
Loading a YAML mapping checks every value and names each wrong one with what it takes and what it
found (``server.tcp_port: expected an integer 0-65535, got "abc"``); keys the section does not
have are returned, for a warning (typos), not refused.
"""

from __future__ import annotations

import json
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, cast, get_args, get_origin, get_type_hints

T = TypeVar("T")

_RANGE = "kalandra.range"
_NOT_AN_OPTION = "kalandra.not_an_option"


class OptionErrors(ValueError):
    """Every wrong value of a load, one ``path: what`` per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, slots=True)
class Range:
    low: float | None = None
    high: float | None = None
    above: bool = False  # low itself excluded (a rate or a timeout of 0 cannot work)

    def __contains__(self, value: float) -> bool:
        # Written so that NaN is outside every range.
        if self.low is not None and not (value > self.low if self.above else value >= self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f" {self.low:g}-{self.high:g}"
        if self.low is not None:
            return f" {'>' if self.above else '>='} {self.low:g}"
        return "" if self.high is None else f" <= {self.high:g}"


def bounded(
    default: Any, *, low: float | None = None, high: float | None = None, above: bool = False
) -> Any:
    """A numeric option's default and range (``above``: low itself excluded)."""
    return field(default=default, metadata={_RANGE: Range(low, high, above)})


def not_an_option(default: Any) -> Any:
    """A field the program sets, not the file (its key in the file is unknown)."""
    return field(default=default, metadata={_NOT_AN_OPTION: True})


def load_section(cls: type[T], data: Any, where: str) -> tuple[T, list[str]]:
    """The section built from ``data`` (null: all defaults) and the dotted paths of the keys it
    does not know. Raises OptionErrors naming every wrong value."""
    problems: list[str] = []
    unknown: list[str] = []
    section = _build(cls, data, where, problems, unknown)
    if problems:
        raise OptionErrors(problems)
    return section, unknown


def _build(cls: type[T], data: Any, where: str, problems: list[str], unknown: list[str]) -> T:
    before = len(problems)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {_shown(data)}")
        return cast(T, None)  # never used: the load fails
    hints = get_type_hints(cls)
    options = {
        option.name: option
        for option in fields(cast(Any, cls))
        if option.init and not option.metadata.get(_NOT_AN_OPTION)
    }
    values: dict[str, Any] = {}
    for key, value in data.items():  # in the file's order, so problems are too
        path = f"{where}.{key}"
        option = options.get(key)
        if option is None:
            unknown.append(path)
            continue
        hint = hints[option.name]
        if isinstance(hint, type) and is_dataclass(hint):
            values[option.name] = _build(hint, value, path, problems, unknown)
            continue
        bounds = option.metadata.get(_RANGE)
        checked = _check(hint, bounds, value)
        if checked is _WRONG:
            problems.append(f"{path}: expected {_expected(hint, bounds)}, got {_shown(value)}")
        else:
            values[option.name] = checked
    for name, option in options.items():
        if name not in data and option.default is MISSING and option.default_factory is MISSING:
            problems.append(f"{where}.{name}: missing; expected {_expected(hints[name], None)}")
    if len(problems) > before:
        return cast(T, None)  # never used: the load fails
    return cls(**values)


_WRONG: Any = object()


def _split(hint: Any) -> tuple[Any, bool]:
    """(the type, whether null is allowed) of ``X`` or ``X | None``."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _check(hint: Any, bounds: Range | None, value: Any) -> Any:
    kind, nullable = _split(hint)
    if value is None:
        return None if nullable else _WRONG
    if kind is bool:
        return value if isinstance(value, bool) else _WRONG
    if isinstance(value, bool):  # YAML true/false: never a number
        return _WRONG
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e6 in YAML is a float
        if not isinstance(value, int):
            return _WRONG
    elif kind is float:
        if not isinstance(value, int | float):
            return _WRONG
        value = float(value)
    elif kind is str:
        return value if isinstance(value, str) else _WRONG
    elif kind is Path:
        return Path(value) if isinstance(value, str) else _WRONG
    else:
        raise TypeError(f"no check for options of type {kind!r}")
    return value if bounds is None or value in bounds else _WRONG


def _expected(hint: Any, bounds: Range | None) -> str:
    kind, nullable = _split(hint)
    what = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path (a string)",
    }
    text = what.get(kind, getattr(kind, "__name__", str(kind))) + (str(bounds) if bounds else "")
    return f"{text} or null" if nullable else text


def _shown(value: Any) -> str:
    """The value found, as YAML would spell it (short: a long string is cut)."""
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:37] + "...", ensure_ascii=False)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"
