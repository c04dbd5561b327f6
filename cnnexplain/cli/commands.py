"""Registers every working subcommand on the app (a subcommand is listed only when it works)."""

from cnnexplain.cli import info  # noqa: F401
from cnnexplain.cli import data  # noqa: F401
from cnnexplain.cli import cache_cmd  # noqa: F401
from cnnexplain.cli import report  # noqa: F401
from cnnexplain.cli import train, evaluate  # noqa: F401
from cnnexplain.cli import saliency  # noqa: F401
from cnnexplain.cli import dissect  # noqa: F401
from cnnexplain.cli import tcav  # noqa: F401
from cnnexplain.cli import visualize  # noqa: F401
