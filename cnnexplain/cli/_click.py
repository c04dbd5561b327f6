"""The click exception classes of whatever click Typer runs on (Typer >= 0.2x vendors its own
copy as ``typer._click``; older Typer uses the ``click`` package)."""

try:  # typer with vendored click
    from typer._click.core import Abort, Exit
    from typer._click.exceptions import BadParameter, ClickException, UsageError
except ImportError:  # pragma: no cover - typer on top of the click package
    from click.exceptions import Abort, BadParameter, ClickException, Exit, UsageError

__all__ = ["Abort", "BadParameter", "ClickException", "Exit", "UsageError"]
