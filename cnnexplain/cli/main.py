"""``cnnexplain`` entry point: the Typer app, its subcommands, and the one-line error policy."""

from __future__ import annotations

import inspect
import os
import sys

import typer

from cnnexplain import __version__, interrupt
from cnnexplain.cli import _click as click
from cnnexplain.errors import CnnexplainError
from cnnexplain.cli.recipes import expand_recipe

app = typer.Typer(
    name="cnnexplain",
    help="Train CNNs whose late-layer channels are disentangled by class, measure that "
         "disentanglement, and explain any CNN with saliency maps, Network Dissection and TCAV.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"cnnexplain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """cnnexplain: interpretable CNNs from the command line."""


def reflow(text: str) -> str:
    """Help text as Rich should wrap it: the source's hard line breaks inside a paragraph are
    joined (Rich markup keeps them, so an 80-column terminal showed half-empty lines), except
    before a line starting with ``[bold]`` (a list item); paragraphs (blank lines) stay."""
    paragraphs = []
    for para in text.split("\n\n"):
        lines: list[str] = []
        for line in para.split("\n"):
            if lines and not line.startswith("[bold]"):
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _register() -> None:
    from cnnexplain.cli import commands  # noqa: F401  (registers subcommands on `app`)

    # the command list shows each command's first help paragraph on one line: its hard line
    # breaks (kept by Rich markup) would otherwise break the table's rows mid-sentence; the
    # command's own --help gets the same text reflowed to the terminal's width
    for info in app.registered_commands:
        text = info.help or inspect.getdoc(info.callback) or ""
        if info.short_help is None and text:
            info.short_help = " ".join(text.split("\n\n")[0].split())
        if text:
            info.help = reflow(text)


def _say(line: str) -> None:
    """One line on stderr (no wrapping, no traceback)."""
    red = sys.stderr.isatty()
    prefix = "\x1b[31merror:\x1b[0m " if red else "error: "
    sys.stderr.write(prefix + " ".join(str(line).split()) + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit 0 on success, 2 on usage errors, 1 on runtime failures, 130 on Ctrl-C."""
    _register()
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    code = 0
    origin: dict = {}
    try:
        args, origin = expand_recipe(command, args)
        with interrupt.installed():
            rv = command.main(args=args, prog_name="cnnexplain", standalone_mode=False)
        if isinstance(rv, int):
            code = rv
        if code == 130:  # Typer turns Ctrl-C into Exit(130), which click returns here
            _say("interrupted; nothing partial was written (results are written atomically)")
    except click.Exit as exc:
        code = exc.exit_code
        if isinstance(exc.__cause__, KeyboardInterrupt):  # Typer turns Ctrl-C into Exit(130)
            _say("interrupted; nothing partial was written (results are written atomically)")
            code = 130
    except click.Abort:
        _say("interrupted; nothing partial was written (results are written atomically)")
        code = 130
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "cnnexplain"
        message = exc.format_message().rstrip(".")
        param = getattr(exc, "param", None)
        if param is not None and getattr(param, "name", None) in origin:
            _say(f"recipe key {origin[param.name]!r}: {message}; fix the recipe "
                 f"(see `{cmd} --help` for the expected values)")
        else:
            _say(f"{message}; see `{cmd} --help`")
        code = 2
    except click.ClickException as exc:
        _say(exc.format_message())
        code = exc.exit_code
    except CnnexplainError as exc:
        keys = [origin[f] for f in getattr(exc, "fields", []) if f in origin]
        _say(f"recipe key {keys[0]!r}: {exc.line()}; fix the recipe" if keys else exc.line())
        code = exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted; nothing partial was written (results are written atomically)")
        code = 130
    except BrokenPipeError:
        code = 1
    except MemoryError:
        _say("out of memory; lower --batch-size or --limit, or use a machine with more memory")
        code = 1
    except Exception as exc:  # the last line of defence: still one line, no traceback
        if os.environ.get("CNNEXPLAIN_DEBUG"):
            raise
        _say(f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
             "re-run with CNNEXPLAIN_DEBUG=1 for the traceback and report it")
        code = 1
    sys.exit(code)
