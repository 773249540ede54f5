"""What a setting accepts, and the one check of a value against it: the configuration's validation
mechanism, a leaf below every module that declares a section.

A section (:class:`Section`) is a frozen dataclass whose fields declare what they accept in their
annotations: the type, ``Literal[...]`` for a set of values, ``Annotated[T, Range(...)]`` /
``Pattern(...)`` for bounds. Making one checks every field (so ``replace`` re-checks), then the
relations between fields; every problem reads ``section.key must ..., got ...``. ``config.py``
assembles the sections (``[frontend]`` from :mod:`devrecd.features`, ``[audio]`` from
:mod:`devrecd.audio.settings`, the rest its own) and loads them; the checks are the same wherever a
section is made (a file, the environment, the command line, code, an artifact).
"""

from __future__ import annotations

import functools
import math
import re
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Annotated, Any, ClassVar, Literal

from devrecd.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a number (or of every number in a tuple): ``ge``/``gt`` below, ``le``/``lt`` above."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: float) -> str:
        # inf and nan pass no bound a reader means (a hop of inf seconds fails every file later)
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if ok:
            return ""
        low, high = (self.ge, "[") if self.ge is not None else (self.gt, "("), (self.le, "]") if self.le is not None else (self.lt, ")")
        if low[0] is not None and high[0] is not None:
            return f"must be in {low[1]}{_num(low[0])}, {_num(high[0])}{high[1]}, got {value!r}"
        bound = f"{'>=' if low[1] == '[' else '>'} {_num(low[0])}" if low[0] is not None else \
            f"{'<=' if high[1] == ']' else '<'} {_num(high[0])}"
        return f"must be {bound}, got {value!r}"


@dataclass(frozen=True)
class Pattern:
    """A string that matches ``regex`` in full; ``text`` says what that means to a reader."""

    regex: str
    text: str

    def problem(self, value: str) -> str:
        return "" if re.fullmatch(self.regex, value) else f"must be {self.text}, got {value!r}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_1 = Range(ge=1)
FRACTION = Range(ge=0, le=1)
DBFS = Range(le=0)
NOT_EMPTY = Pattern(r"(?s)\s*\S.*", "a non-empty string")

PositiveFloat = Annotated[float, POSITIVE]
NonNegFloat = Annotated[float, NON_NEGATIVE]
NonNegInt = Annotated[int, NON_NEGATIVE]
Count = Annotated[int, AT_LEAST_1]
Fraction = Annotated[float, FRACTION]
Dbfs = Annotated[float, DBFS]


@dataclass(frozen=True)
class Section:
    """A section checks every field against its annotation when made (so ``replace`` re-checks),
    then the relations between fields (:meth:`relations`)."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = field_hints(type(self))
        problems = [p for f in fields(self) if (p := constraint_problem(f"{self.section}.{f.name}",
                                                                        getattr(self, f.name), hints[f.name]))]
        if not problems:
            problems = self.relations()
        if problems:
            raise ConfigError("; ".join(problems))

    def relations(self) -> list[str]:
        """Problems that involve more than one field (each names its keys)."""
        return []


@functools.cache  # evaluating the string annotations is the costly part of making a section
def field_hints(cls: type) -> dict[str, Any]:
    """Field name -> annotation with its ``Annotated`` constraints (for every dataclass field)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in fields(cls)}


def coerce(name: str, value: Any, hint: Any, source: str = "") -> Any:
    """Check ``value`` against a field's type, converting only where lossless (int -> float)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return coerce(name, value, typing.get_args(hint)[0], source)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:  # the type here; which values are allowed is constraint_problem's
        if isinstance(value, str):
            return value
    elif origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(f"{name}[{i}]", v, args[0], source) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(coerce(f"{name}[{i}]", v, a, source) for i, (v, a) in enumerate(zip(value, args)))
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return coerce(name, value, arg, source)
            except ConfigError:
                continue
    elif is_dataclass(hint):
        pass
    where = f" (from {source})" if source else ""
    raise ConfigError(f"{name}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}{where}")


def constraint_problem(name: str, value: Any, hint: Any) -> str:
    """What is wrong with a value of the right type (set of values, bounds, pattern); "" if nothing."""
    base, marks = hint, ()
    if typing.get_origin(hint) is Annotated:
        base, *rest = typing.get_args(hint)
        marks = tuple(rest)
    if typing.get_origin(base) is Literal and value not in typing.get_args(base):
        return f"{name} must be one of {', '.join(map(str, typing.get_args(base)))}, got {value!r}"
    if typing.get_origin(base) is tuple and isinstance(value, tuple):
        args = typing.get_args(base)
        item_hints = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        for i, (v, h) in enumerate(zip(value, item_hints)):
            if problem := constraint_problem(f"{name}[{i}]", v, typing.Annotated[(h, *marks)] if marks else h):
                return problem
        return ""
    for mark in marks:
        if problem := mark.problem(value):
            return f"{name} {problem}"
    return ""


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _type_name(typing.get_args(hint)[0])
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values"
    return getattr(hint, "__name__", str(hint))


def snr_range_problem(name: str, value: Any) -> str:
    """What is wrong with an SNR range ``[low, high]`` (two finite numbers of dB, ``low <= high``), named
    ``name``; "" if nothing. One check for every place a range is read: the configuration's
    ``backend.validated_snr_db`` and a model contract's ``validated_snr_db``."""
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers:
        return f"{name} must be [low, high]: two SNRs in dB, got {list(value) if isinstance(value, tuple) else value!r}"
    low, high = (float(v) for v in value)
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{name} must be two finite SNRs in dB, got {list(value)!r}"
    if low > high:
        return f"{name} must be [low, high] with low <= high, got {list(value)!r}"
    return ""


def read_snr_range(name: str, value: Any) -> tuple[float, float] | None:
    """An SNR range as an artifact stores it: None when absent (or null), else ``(low, high)``;
    ValueError with :func:`snr_range_problem`'s reason when it is not a valid range."""
    if value is None:
        return None
    problem = snr_range_problem(name, value)
    if problem:
        raise ValueError(problem)
    return float(value[0]), float(value[1])
