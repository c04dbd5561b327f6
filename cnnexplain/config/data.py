"""``data synth`` and ``data inspect``'s options."""

from __future__ import annotations

from dataclasses import dataclass

from cnnexplain.config.common import FileOptions, RunOptions
from cnnexplain.config.fields import check, group, option
from cnnexplain.errors import UsageError

EXPORT_FORMATS = ("broden", "imagefolder", "concepts")
"""What ``data synth`` writes (:data:`cnnexplain.data.export.EXPORT_FORMATS`)."""


@dataclass
class SynthOptions:
    """``cnnexplain data synth``."""

    fmt: str = option("broden", name="format", choices=EXPORT_FORMATS, help="broden, "
                      "imagefolder or concepts.")
    world: str = option("synthetic", help="World spec, e.g. synthetic:correlate=red-c@star=0.9 "
                        "(grammar: see README).")
    num_images: int | None = option(None, low=1, help="Images (train split for imagefolder).",
                                    show_default=False)
    resolution: int | None = option(None, low=16, help="Image side in pixels (Broden masks are "
                                    "half of it).", show_default=False)
    concepts: str | None = option(None, help="concepts format: comma-separated concept names, "
                                  "e.g. red-c,striped,star-tip.", show_default=False)
    per_concept: int = option(50, low=1, help="concepts format: images per concept folder.")
    random_sets: int = option(5, low=1, help="concepts format: number of random_<i> folders.")
    min_coverage: float = option(0.005, low=0, high=1, help="concepts format: minimum image "
                                 "fraction a pixel concept must cover.")
    concept_scope: str = option("image", choices=("image", "object"), help="concepts format: "
                                "where a colour or material concept must be: image (anywhere, "
                                "`min_coverage` of the pixels, backgrounds included) or object "
                                "(the main object's colour or material: the attribute a "
                                "correlate=CONCEPT@CLASS plants). Other concepts: image.")
    balance_classes: bool = option(True, negatable=True, help="concepts format: fill each "
                                   "concept folder with the random folders' class mix; "
                                   "`balance_classes=false` takes the first images carrying the "
                                   "concept, whatever their class (needed for concepts only "
                                   "some classes carry, e.g. star-tip).")
    overwrite: bool = option(False, help="Replace an existing non-empty `out`.")
    seed: int = option(0, help="Seed of the world (0: the spec's).")
    run: RunOptions = group(RunOptions)

    def concept_names(self) -> list[str]:
        return [c.strip() for c in (self.concepts or "").split(",") if c.strip()]

    def validate(self) -> "SynthOptions":
        check(self)
        if self.run.out is None:
            raise UsageError("data synth needs `out=DIR`", "pass the directory to write the "
                             "world to")
        if self.fmt == "concepts" and not self.concept_names():
            raise UsageError("the concepts format needs `concepts=NAME[,NAME...]`",
                             "pass e.g. `concepts=red-c,striped`")
        if self.fmt != "concepts" and self.concepts:
            raise UsageError("`concepts` only applies to the concepts format", "leave it out")
        if self.fmt != "concepts" and not self.balance_classes:
            raise UsageError("`balance_classes=false` only applies to the concepts format",
                             "leave it out")
        return self


@dataclass
class InspectOptions:
    """``cnnexplain data inspect``."""

    target: str = option(argument=True, help="A dataset spec (synthetic:..., cifar10:ROOT, ...) "
                         "or a directory.", metavar="TARGET")
    json_output: bool = option(False, name="json", help="Print a machine-readable JSON summary "
                               "to stdout, nothing else.")
    files: FileOptions = group(FileOptions)
