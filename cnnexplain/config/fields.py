"""Option declarations: each option's type, default, bounds and help, written once.

A command's options are a dataclass whose fields are declared with :func:`option` (a value) or
:func:`group` (a nested dataclass of options). The command line (``cnnexplain.cli.declare``),
recipes and the library all read these declarations: a default or a bound exists in exactly one
line. Library errors name a field in backquotes (```epochs```, or ```epochs=10``` for a value to
pass); the CLI prints the flag instead (``epochs``, ``epochs 10``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cnnexplain.errors import UsageError, close_matches


@dataclass(frozen=True)
class Opt:
    """What a field declares besides its type and default.

    ``help``: one or two sentences; ``panel``: the help group; ``name``: the option's name where
    it differs from the field's (``json`` for ``json_output``), its flag is ``--`` + name with
    ``-`` for ``_``; ``short``: a one-letter alias; ``negatable``: a boolean with a ``no_``
    form; ``low`` / ``high``: bounds, exclusive where ``low_open`` / ``high_open``;
    ``choices``: the allowed strings; ``check``: ``value -> problem or None`` for what bounds
    cannot say (a triplet, a spec); ``example``: a good value for the fix of an error;
    ``envvar``: environment variable read when the option is not given; ``cli``: False for a
    field that a job fills in itself (recorded, never a flag); ``argument``: a positional
    argument; ``eager``: a flag that acts and exits at parse time (``list_methods``);
    ``show_default``: show the default in ``help``."""

    help: str
    panel: str | None = None
    name: str | None = None
    short: str | None = None
    negatable: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    example: Any = None
    envvar: str | None = None
    cli: bool = True
    argument: bool = False
    show_default: bool = True
    metavar: str | None = None

    def requirement(self) -> str:
        """The constraint in words: ``at least 1``, ``in (0, 1)``, ``one of a, b``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return (f"in {'(' if self.low_open else '['}{_num(lo)}, {_num(hi)}"
                    f"{')' if self.high_open else ']'}")
        if lo is not None:
            return f"{'greater than' if self.low_open else 'at least'} {_num(lo)}"
        if hi is not None:
            return f"{'less than' if self.high_open else 'at most'} {_num(hi)}"
        return ""


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def option(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, **declared):
    """A dataclass field that is an option (see :class:`Opt` for ``declared``)."""
    meta = {"option": Opt(**declared)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def group(cls: type, *, prefix: str = "", factory: Callable[[], Any] | None = None):
    """A dataclass field holding a nested dataclass of options. ``prefix`` is put before its
    fields' names on the command line (``cav_`` + ``loss`` -> ``cav_loss``)."""
    return field(default_factory=factory or cls, metadata={"group": cls, "prefix": prefix})


@dataclass(frozen=True)
class Declared:
    """One option as the command line sees it: ``name`` (flat, unique within a command),
    ``path`` (attribute names from the top options object to the field), its Python type, its
    default and its :class:`Opt`."""

    name: str
    path: tuple[str, ...]
    type: Any
    default: Any
    opt: Opt
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + (self.opt.name or self.name).replace("_", "-")

    @property
    def base(self) -> Any:
        """The type without Optional (``int | None`` -> ``int``)."""
        return strip_optional(self.type)

    @property
    def multiple(self) -> bool:
        return typing.get_origin(self.base) in (list, tuple) and not self.opt.argument


def strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
            and len(args) == 1:
        return args[0]
    return tp


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def declared(cls_or_obj: Any, prefix: str = "", path: tuple[str, ...] = (),
             defaults: Any = None) -> Iterator[Declared]:
    """Every option of an options dataclass, groups flattened, in declaration order.
    Defaults come from ``defaults`` (an instance, e.g. a group's default) where given."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            inner = getattr(defaults, f.name) if defaults is not None else _default_of(f)
            yield from declared(f.metadata["group"], prefix + f.metadata["prefix"],
                                path + (f.name,), inner)
        elif "option" in f.metadata:
            default = getattr(defaults, f.name) if defaults is not None else _default_of(f)
            required = f.default is MISSING and f.default_factory is MISSING  # type: ignore[misc]
            yield Declared(prefix + f.name, path + (f.name,), hints[f.name], default,
                           f.metadata["option"], required)


def flags(cls_or_obj: Any) -> dict[str, str]:
    """``{flat field name: `flag`}`` of every command-line option."""
    return {d.name: d.flag for d in declared(cls_or_obj) if d.opt.cli and not d.opt.argument}


def build(cls: type, values: dict[str, Any]) -> Any:
    """An options object from flat ``{name: value}`` (what the command line parsed); missing
    names keep their defaults, groups are built bottom-up."""
    hints = typing.get_type_hints(cls)
    return _build(cls, values, "", hints)


def _build(cls: type, values: dict, prefix: str, hints: dict) -> Any:
    kw = {}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            inner = f.metadata["group"]
            kw[f.name] = _build(inner, values, prefix + f.metadata["prefix"],
                                typing.get_type_hints(inner))
        elif prefix + f.name in values:
            kw[f.name] = values[prefix + f.name]
    return cls(**kw)


def flat(obj: Any) -> dict[str, Any]:
    """``{flat name: value}`` of an options object (run.json records this)."""
    out = {}
    for d in declared(obj):
        value = obj
        for attr in d.path:
            value = getattr(value, attr)
        out[d.name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Validation: the same for every option of every command
# ---------------------------------------------------------------------------------------------

def _problem(d: Declared, value: Any) -> str | None:
    """What is wrong with ``value`` for option ``d`` (None: nothing)."""
    opt = d.opt
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if opt.choices and isinstance(value, str) and value not in opt.choices:
        return None  # reported by check() with close matches
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = opt.low, opt.high
        bad = ((lo is not None and (value <= lo if opt.low_open else value < lo))
               or (hi is not None and (value >= hi if opt.high_open else value > hi)))
        if bad:
            return f"must be {opt.requirement()}, got {_num(value)}"
    if opt.check is not None:
        return opt.check(value)
    return None


def _example(d: Declared) -> str:
    ex = d.opt.example
    if ex is None:
        ex = d.default
    if ex is None or isinstance(ex, bool):
        return ""
    return f"pass e.g. `{d.name}={_num(ex) if isinstance(ex, float) else ex}`"


def check(obj: Any) -> Any:
    """Raise a one-line :class:`UsageError` naming the first option of ``obj`` whose value is
    out of its bounds, not finite, not one of its choices or refused by its ``check``; return
    ``obj``. Runs before anything is computed or written."""
    for d in declared(obj):
        value = obj
        for attr in d.path:
            value = getattr(value, attr)
        if d.opt.choices and value is not None and str(value) not in d.opt.choices:
            raise UsageError(f"unknown `{d.name}` {value!r}"
                             f"{close_matches(str(value), d.opt.choices)}",
                             f"choose one of: {', '.join(d.opt.choices)}")
        values = value if isinstance(value, (list, tuple)) and d.multiple else [value]
        for v in values:
            problem = _problem(d, v)
            if problem:
                raise UsageError(f"`{d.name}` {problem}", _example(d) or None)
    return obj


def check_field(cls: type, name: str, value: Any) -> Any:
    """Check one value against the declaration of field ``name`` of ``cls`` (for code that
    takes the value directly, e.g. a constructor); returns ``value``."""
    for d in declared(cls):
        if d.name == name:
            if d.opt.choices and str(value) not in d.opt.choices:
                raise UsageError(f"unknown `{name}` {value!r}"
                                 f"{close_matches(str(value), d.opt.choices)}",
                                 f"choose one of: {', '.join(d.opt.choices)}")
            problem = _problem(d, value)
            if problem:
                raise UsageError(f"`{name}` {problem}", _example(d) or None)
            return value
    raise KeyError(name)


def parse_triplet(value: Any) -> tuple[float, float, float] | None:
    """``"0.5,0.5,0.5"`` or a sequence of 3 numbers -> a tuple of 3 finite floats (None passes
    through); ValueError with the reason otherwise."""
    if value is None:
        return None
    parts = list(value) if isinstance(value, (list, tuple)) else \
        [p for p in str(value).replace(" ", "").split(",") if p]
    try:
        vals = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"must be 3 comma-separated numbers, got {value!r}") from None
    if len(vals) != 3:
        raise ValueError(f"must be 3 comma-separated numbers, got {value!r}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"must be 3 finite numbers, got {value!r}")
    return vals  # type: ignore[return-value]


def triplet_problem(positive: bool = False) -> Callable[[Any], str | None]:
    """A ``check`` for R,G,B options (``positive``: every value > 0, as a std)."""

    def problem(value: Any) -> str | None:
        try:
            vals = parse_triplet(value)
        except ValueError as exc:
            return str(exc)
        if positive and vals is not None and any(v <= 0 for v in vals):
            return f"values must be positive, got {list(vals)}"
        return None

    return problem


def path_type(tp: Any) -> bool:
    return strip_optional(tp) is Path
