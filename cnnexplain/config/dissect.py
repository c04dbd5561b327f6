"""``dissect``'s options: :class:`DissectConfig` (one dissection, Bau et al. 2017) and the
command's data and run options."""

from __future__ import annotations

from dataclasses import dataclass

from cnnexplain.config.common import (DATA, MODEL, ComputeOptions, FileOptions, ModelOptions,
                                      PrepOptions, RunOptions)
from cnnexplain.config.fields import check, group, option
from cnnexplain.errors import UsageError

DISSECT = "Dissection"
IOU_MODES = ("original", "lite")
"""original: the paper's IoU denominator; lite: NetDissect-Lite's (see
:data:`cnnexplain.explain.dissect.labels.IOU_MODES`)."""
QUANTILE_MODES = ("exact", "sketch")
MAX_EXACT_BYTES = 4 << 30
"""Largest exact-mode candidate buffer (all layers) before ``quantile_mode`` sketch is
required."""


@dataclass(frozen=True)
class DissectConfig:
    """Options of one dissection."""

    quantile: float = option(0.005, low=0, high=1, low_open=True, high_open=True,
                             help="Top quantile of each unit's activations that are 'on' (the "
                             "paper's 0.005).", panel=DISSECT)
    iou_threshold: float = option(0.04, low=0, high=1, high_open=True, help="A unit is a "
                                  "detector when its best IoU exceeds this (the paper's 0.04).",
                                  panel=DISSECT)
    iou_mode: str = option("original", choices=IOU_MODES, help="original (the paper's "
                           "denominator) or lite (NetDissect-Lite's).", panel=DISSECT)
    quantile_mode: str = option("exact", choices=QUANTILE_MODES, help="exact (memory ~ quantile "
                                "x images x h x w per unit) or sketch (constant memory, bounded "
                                "error).", panel=DISSECT)
    top_images: int = option(8, low=0, help="Top images per unit in the report strips (0: "
                             "none).", panel=DISSECT)
    batch_size: int = option(32, low=1, help="Images per batch.", panel=DATA)
    workers: int = option(0, low=0, help="DataLoader worker processes.", panel=DATA)
    recompute: bool = option(False, help="Run the forward pass again for the tally instead of "
                             "storing the layer maps (no disk; slower).", panel=DISSECT)
    negative: bool = option(False, help="Also label every unit by its lowest activations (the "
                            "bottom `quantile`, mask: activation below it), from the same maps; "
                            "written beside the positive outputs.", panel=DISSECT)
    rotate: int | None = option(None, low=0, help="Also dissect each layer after a random "
                                "orthogonal rotation of its channels seeded by this number, and "
                                "compare its unique concepts with the unrotated layer's (Bau et "
                                "al. 2017).", panel=DISSECT, show_default=False, metavar="SEED",
                                check=lambda v: f"must be less than 2**64 (a torch seed), got "
                                f"{v}" if v >= 2**64 else None)
    max_exact_bytes: int = option(MAX_EXACT_BYTES, low=1, cli=False, help="Largest exact-mode "
                                  "buffer.")

    def validate(self) -> "DissectConfig":
        """One-line UsageErrors for every bad value (before any computation)."""
        return check(self)


@dataclass
class DissectModel(ModelOptions):
    layer: str | None = option(None, help="Layer(s) to dissect, comma-separated (e.g. "
                               "layer3,layer4); all in one forward pass. Default: the model's "
                               "target layer.", panel=MODEL, show_default=False)


@dataclass
class DissectData:
    """A Broden-format dataset."""

    broden: str | None = option(None, help="Root of a Broden-format dataset (index.csv, "
                                "label.csv, images/).", panel=DATA, show_default=False)
    dataset: str | None = option(None, help="Alternative to `broden`: broden:ROOT.", panel=DATA,
                                 show_default=False)
    split: str = option("all", help="Broden split: all, train or val.", panel=DATA)
    categories: str | None = option(None, help="Broden categories to use, comma-separated (e.g. "
                                    "object,part; default: all). Images without any of them are "
                                    "dropped.", panel=DATA, show_default=False)
    limit: int | None = option(None, low=1, help="Use only the first N images.", panel=DATA,
                               show_default=False)

    def root(self) -> str:
        """The Broden root ``broden`` or ``dataset=broden:ROOT`` names."""
        if self.broden and self.dataset:
            raise UsageError("`broden` and `dataset` name the data twice",
                             "pass only `broden=PATH` (or `dataset=broden:PATH`)")
        if self.dataset:
            prefix, _, rest = self.dataset.partition(":")
            if prefix != "broden" or not rest:
                raise UsageError(f"dissect needs a Broden dataset, got `dataset={self.dataset!r}`",
                                 "pass `broden=PATH` or `dataset=broden:PATH`")
            return rest
        if not self.broden:
            raise UsageError("no Broden dataset given", "pass `broden=PATH` (a Broden-format "
                             "directory; `cnnexplain data synth` writes one in the Broden format)")
        return self.broden

    def category_list(self) -> list[str] | None:
        if self.categories is None:
            return None
        items = [t.strip() for t in str(self.categories).split(",") if t.strip()]
        return items or None


@dataclass
class DissectOptions:
    """``cnnexplain dissect``."""

    model: DissectModel = group(DissectModel)
    data: DissectData = group(DissectData)
    prep: PrepOptions = group(PrepOptions)
    files: FileOptions = group(FileOptions)
    config: DissectConfig = group(DissectConfig)
    run: RunOptions = group(RunOptions)
    compute: ComputeOptions = group(ComputeOptions)

    def validate(self) -> "DissectOptions":
        check(self)
        self.data.root()
        return self
