"""Typer commands generated from option dataclasses (``cnnexplain.config``), so that every
option's type, default, bounds and help are declared once; and library errors, which name
fields in backquotes, printed with the flags instead."""

from __future__ import annotations

import inspect
import re
import typing
from typing import Annotated, Any, Callable, List, Optional

import typer

from cnnexplain.config.fields import Declared, build, declared
from cnnexplain.errors import CnnexplainError


def _annotation(d: Declared) -> Any:
    base = d.base
    if d.opt.argument:
        if typing.get_origin(base) in (list, tuple):
            return List[typing.get_args(base)[0]]  # noqa: UP006 - typer wants typing.List
        return base
    if d.multiple:
        (inner,) = typing.get_args(base)[:1] or (str,)
        return Optional[List[inner]]  # noqa: UP006,UP007
    if base is not d.type:
        return Optional[base]  # noqa: UP007
    return base


def _help(d: Declared, fields: dict[str, Declared]) -> str:
    text = render(d.opt.help, fields)
    need = d.opt.requirement() if not d.opt.choices else ""
    if need and not text.rstrip().endswith("]"):
        text = f"{text} \\[{need}]"
    return text


def parameter(d: Declared, fields: dict[str, Declared]) -> inspect.Parameter:
    """The Typer parameter of one declared option (its help names the command's other options
    in backquotes, written as flags here)."""
    if d.opt.argument:
        info = typer.Argument(help=render(d.opt.help, fields), show_default=False, metavar=d.opt.metavar)
        return inspect.Parameter(d.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 annotation=Annotated[_annotation(d), info])
    required = d.required
    names = [d.flag + (f"/--no-{d.flag[2:]}" if d.opt.negatable else "")]
    if d.opt.short:
        names.append("-" + d.opt.short)
    info = typer.Option(*names, help=_help(d, fields), rich_help_panel=d.opt.panel,
                        show_default=d.opt.show_default, envvar=d.opt.envvar,
                        metavar=d.opt.metavar)
    default = list(d.default) if d.multiple and d.default else d.default
    if d.multiple and not default:
        default = None
    if required:
        default = inspect.Parameter.empty
    return inspect.Parameter(d.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[_annotation(d), info])


def command(app: typer.Typer, name: str, options: type, handler: Callable[[Any], Any], *,
            help: str, extra: list[inspect.Parameter] | None = None,
            eager: dict[str, Callable[[dict], Any]] | None = None):
    """Register ``name`` on ``app``: its parameters are the command-line options declared by
    ``options`` (plus ``extra`` parameters that are not options of the job, e.g. eager
    ``--help-methods`` flags). The callback builds the options object and calls
    ``handler(options)``; a library error is re-raised with field names written as flags.
    ``eager``: ``{parameter name: action(values)}`` run instead of the handler when that flag
    is given (``--list-methods``)."""
    decls = [d for d in declared(options) if d.opt.cli]
    flagmap: dict = {d.name: d for d in decls}
    for p in extra or []:  # eager flags (--help-methods) can be named in help texts too
        flagmap.setdefault(p.name, _Eager(p.name, "--" + p.name.replace("_", "-")))
    params = [parameter(d, flagmap) for d in decls]
    params.sort(key=lambda p: p.kind)  # positional arguments first
    params += extra or []
    help = render(help, flagmap)

    def callback(**values):
        for key, action in (eager or {}).items():
            if values.get(key):
                return action(values)
        kwargs = {k: v for k, v in values.items() if k in flagmap and k not in (eager or {})}
        try:
            return handler(build(options, kwargs))
        except CnnexplainError as exc:
            rendered = type(exc)(render(exc.problem, flagmap),
                                 render(exc.fix, flagmap) if exc.fix else None)
            rendered.fields = named_fields(exc.problem, flagmap)  # type: ignore[attr-defined]
            raise rendered from None

    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__name__ = name.replace("-", "_")
    callback.__doc__ = help
    app.command(name, help=help)(callback)
    return callback


class _Eager:
    """A flag that is not an option of the job, for :func:`render`."""

    def __init__(self, name: str, flag: str):
        self.name, self.flag, self.base = name, flag, bool
        self.opt = type("Opt", (), {"negatable": False})()


_FIELD = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def render(text: str | None, fields: dict[str, Declared]) -> str:
    """``"`epochs` must be at least 1; pass e.g. `epochs=10`"`` -> ``"--epochs must be at
    least 1; pass e.g. --epochs 10"`` for the fields in ``fields`` (others are left as they
    are)."""
    if not text:
        return text or ""

    def one(m: re.Match) -> str:
        d = fields.get(m.group(1))
        if d is None:
            return m.group(0)
        value = m.group(2)
        if value is None:
            return d.flag
        if d.base is bool:
            if value.strip().lower() in ("true", "1", "yes"):
                return d.flag
            return f"--no-{d.flag[2:]}" if d.opt.negatable else f"without {d.flag}"
        return f"{d.flag} {value}"

    return _FIELD.sub(one, text)


def named_fields(text: str | None, fields: dict[str, Declared]) -> list[str]:
    """The fields of ``fields`` that ``text`` names in backquotes, in order."""
    return [m.group(1) for m in _FIELD.finditer(text or "") if m.group(1) in fields]


def eager_flag(name: str, flag: str, help: str, panel: str | None = None) -> inspect.Parameter:
    """A boolean flag that is not an option of the job (``--list-methods``)."""
    info = typer.Option(flag, help=help, rich_help_panel=panel)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False,
                             annotation=Annotated[bool, info])


def printer(text: str) -> Callable[[dict], None]:
    """An eager action that prints ``text`` (Rich markup) and exits 0."""

    def show(_values: dict) -> None:
        from rich.console import Console

        from cnnexplain.cli.main import reflow

        Console(soft_wrap=False).print(reflow(text))

    return show

