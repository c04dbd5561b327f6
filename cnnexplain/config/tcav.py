"""``tcav``'s options: :class:`CAVConfig` (the CAV classifier), :class:`TCAVConfig` (scores and
significance; Kim et al. 2018 with the interventional I+ / I- scores of Liang's CDCNN report)
and the command's concept, class-input and run options."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cnnexplain.config.common import (DATA, MODEL, ComputeOptions, DataOptions, ModelOptions,
                                      FileOptions, PrepOptions, RunOptions)
from cnnexplain.config.fields import check, group, option
from cnnexplain.errors import UsageError

CONCEPTS = "Concepts"
TCAV_PANEL = "TCAV"
LOSSES = ("hinge", "logistic")
DIRECTIONS = ("classifier", "pattern")
STEP_UNITS = ("absolute", "norm")
INTERVENTION_INPUTS = ("all", "class")
SIGNIFICANCE = ("ttest", "calibrated", "ttest-cav")


@dataclass(frozen=True)
class CAVConfig:
    """Hyper-parameters of the CAV. ``direction``: what the CAV is (see
    :mod:`cnnexplain.explain.tcav.cav`); the classifier's defaults are tcav's:
    SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3), hinge loss, 0.33 held out."""

    direction: str = option("classifier", choices=DIRECTIONS, help="classifier (Kim et al. "
                            "2018: the unit normal of a linear concept-vs-random classifier, "
                            "trained with `cav_loss`) or pattern (Pahde et al. 2022: the "
                            "difference of the two sets' mean activations, the signal itself "
                            "rather than the classifier's filter; stable with few images at a "
                            "wide layer, where a classifier's normal mostly fits noise).",
                            panel=TCAV_PANEL)
    loss: str = option("hinge", choices=LOSSES, help="hinge (tcav's SGDClassifier default) or "
                       "logistic.", panel=TCAV_PANEL)
    alpha: float = option(0.01, low=0, low_open=True, help="L2 regularization alpha of the CAV "
                          "classifier.", panel=TCAV_PANEL)
    max_iter: int = option(1000, low=1, help="Solver iterations at most.", panel=TCAV_PANEL)
    tol: float = option(1e-3, low=0, low_open=True, help="Solver tolerance (hinge: relative "
                        "duality gap; logistic: gradient relative to its start).",
                        panel=TCAV_PANEL)
    test_fraction: float = option(0.33, low=0, high=1, low_open=True, high_open=True, cli=False,
                                  help="Held-out share of each CAV's images (tcav's 0.33).")

    def validate(self) -> "CAVConfig":
        return check(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TCAVConfig:
    """Options of :func:`~cnnexplain.explain.tcav.run.run_tcav`."""

    random_runs: int = option(10, low=2, help="N (>= 2): CAVs per concept, against "
                              "random_1..random_N, and N baseline CAVs, random_(k-1) against "
                              "random_k (needs N+1 random sets).", panel=TCAV_PANEL)
    cav: CAVConfig = group(CAVConfig, prefix="cav_")
    concept_subsample: float = option(1.0, low=0, high=1, low_open=True, help="Share of its "
                                      "positive images (the concept's; for the baseline, the "
                                      "pseudo-concept's) each CAV draws at random. 1: the first "
                                      "images, as tcav.", panel=TCAV_PANEL, example=0.5)
    step: float = option(1.0, low=0, low_open=True, help="Step eps of I+ / I- (the CAV has unit "
                         "norm).", panel=TCAV_PANEL)
    step_units: str = option("absolute", choices=STEP_UNITS, help="absolute (a +- eps v, as "
                             "the CDCNN report) or norm (a +- eps |a| v).", panel=TCAV_PANEL)
    intervention_inputs: str = option("all", choices=INTERVENTION_INPUTS, help="Inputs I+ / "
                                      "I- average over: all (every class-input image, of "
                                      "every class: the test set D of the I+ / I- "
                                      "definition) or class (only the target class's images, "
                                      "as the TCAV score).", panel=TCAV_PANEL)
    significance: str = option("ttest", choices=SIGNIFICANCE, help="Test that decides "
                               "the significant column: ttest (Kim et al. 2018: two-sided t-test of the "
                               "concept's scores against the random-vs-random scores) or "
                               "calibrated (the score test and the CAV test must both reject) "
                               "or ttest-cav (the t-test and the CAV test must both reject: "
                               "for `cav_direction` pattern). "
                               "Both p-values are reported either way.", panel=TCAV_PANEL)
    alpha: float = option(0.05, low=0, high=1, low_open=True, high_open=True, help="Significance "
                          "level of the deciding test (after the Bonferroni factor).",
                          panel=TCAV_PANEL)
    bonferroni: bool = option(True, negatable=True, help="Decide on p-values multiplied by the "
                              "number of tests (concepts x classes x layers, capped at 1).",
                              panel=TCAV_PANEL)
    seed: int = option(0, cli=False, help="The run's seed.")

    def validate(self) -> "TCAVConfig":
        return check(self)


@dataclass
class ConceptOptions:
    """Where concept and random image sets come from."""

    concepts_dir: Path | None = option(None, name="concepts", help="Concept root: "
                                       "<DIR>/<concept>/ and <DIR>/random_<i>/ image folders.",
                                       panel=CONCEPTS, show_default=False)
    broden: Path | None = option(None, help="A Broden-format directory (or the synthetic "
                                 "world's Broden export) to draw concept and random sets from.",
                                 panel=CONCEPTS, show_default=False)
    concept: list[str] | None = option(None, help="Concept name(s), comma-separated or "
                                       "repeated. Default with `concepts`: every concept "
                                       "folder.", panel=CONCEPTS, show_default=False)
    images_per_set: int | None = option(None, low=2, help="Images per concept / random set "
                                        "(folders: the first N; Broden: default 50, a seeded "
                                        "sample).", panel=CONCEPTS, show_default=False)
    min_coverage: float = option(0.005, low=0, high=1, help="Broden: share of an image's mask "
                                 "pixels a pixel concept must cover to count as present.",
                                 panel=CONCEPTS)

    def names(self) -> list[str]:
        return split_list(self.concept)


@dataclass
class TcavModel(ModelOptions):
    layer: str | None = option(None, help="Layer(s), comma-separated (e.g. layer3,layer4). "
                               "Default: the model's target layer.", panel=MODEL,
                               show_default=False)


@dataclass
class TcavData(DataOptions):
    """The class inputs: the target-class images of a split, or a folder of images."""

    split: str = option("test", help="Split of `dataset` whose target-class images are the "
                        "class inputs.", panel=DATA)
    class_images: Path | None = option(None, help="A folder of images to use as the class "
                                       "inputs of every target (instead of `dataset`).",
                                       panel=DATA, show_default=False)


@dataclass
class TcavOptions:
    """``cnnexplain tcav``."""

    model: TcavModel = group(TcavModel)
    concepts: ConceptOptions = group(ConceptOptions)
    target: list[str] | None = option(None, help="Class (name or index), repeatable or "
                                      "comma-separated.", panel=TCAV_PANEL, show_default=False)
    data: TcavData = group(TcavData)
    prep: PrepOptions = group(PrepOptions)
    files: FileOptions = group(FileOptions)
    tcav: TCAVConfig = group(TCAVConfig)
    run: RunOptions = group(RunOptions)
    compute: ComputeOptions = group(ComputeOptions)

    def targets(self) -> list[str]:
        return split_list(self.target)

    def validate(self) -> "TcavOptions":
        check(self)
        c = self.concepts
        if (c.concepts_dir is None) == (c.broden is None):
            raise UsageError("pass exactly one source of concept images",
                             "use `concepts_dir=DIR` (concept and random_<i> folders) or "
                             "`broden=PATH`")
        if c.broden is not None and not c.names():
            raise UsageError("`broden` needs the concepts to test", "pass `concept=NAME[,NAME...]`")
        if not self.targets():
            raise UsageError("no target class given", "pass `target=CLASS` (name or index)")
        return self


def split_list(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated values, in order, without duplicates."""
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in str(v).split(",") if p.strip())
    return list(dict.fromkeys(out))
