"""Options of the commands that show what exists: ``backbones``, ``layers``, ``cache info`` and
``cache clear``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnexplain.config.common import STEM_CHOICES, STEM_HELP
from cnnexplain.config.fields import option

JSON_HELP = "Print a machine-readable JSON summary to stdout, nothing else."


@dataclass
class BackbonesOptions:
    json_output: bool = option(False, name="json", help=JSON_HELP)


@dataclass
class LayersOptions:
    backbone: str = option(help="Backbone name.")
    size: int = option(64, low=8, help="Input side for the shape probe.")
    num_classes: int | None = option(None, low=1, help="Classes of the head (default 10).",
                                     show_default=False)
    insert_conv: int | None = option(None, low=1, help="Show the model with an inserted N-filter "
                                     "conv.", show_default=False)
    stem: str = option("auto", choices=STEM_CHOICES, help=STEM_HELP)
    json_output: bool = option(False, name="json", help=JSON_HELP)


@dataclass
class CacheOptions:
    kind: str | None = option(None, help="Only entries of this kind (activations, gate, "
                              "saliency, dissection, cav, ...).", show_default=False)
    cache_dir: Path | None = option(None, envvar="CNNEXPLAIN_CACHE", help="HDF5 cache "
                                    "directory. Default: ~/.cache/cnnexplain.",
                                    show_default=False)
    json_output: bool = option(False, name="json", help=JSON_HELP)
