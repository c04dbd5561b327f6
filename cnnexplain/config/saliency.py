"""``saliency``'s options: the methods' hyper-parameters (:class:`MethodOptions`), the
evaluation's (:class:`EvalOptions`), the inputs and the command."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from cnnexplain.config.common import (DATA, ComputeOptions, DataOptions, ModelOptions,
                                      FileOptions, PrepOptions, RunOptions)
from cnnexplain.config.fields import check, group, option
from cnnexplain.errors import UsageError

SAL = "Saliency"
MOPT = "Method options"
EVAL = "Evaluation"

IG_METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid",
              "gausslegendre")


@dataclass(frozen=True)
class MethodOptions:
    """Hyper-parameters of the methods (each method lists the ones it uses in
    ``option_names``; only those enter its cache key)."""

    smoothgrad_base: str = option("gradient", help="Gradient method SmoothGrad averages.",
                                  panel=MOPT)
    smoothgrad_samples: int = option(16, low=1, help="Noisy copies per image.", panel=MOPT)
    smoothgrad_sigma: float = option(0.15, low=0, high=10, help="Noise std as a fraction of "
                                     "each image's input range max(x) - min(x) (Smilkov et al. "
                                     "2017 recommend 0.1-0.2).", panel=MOPT)
    ig_steps: int = option(32, low=1, help="Integrated-gradients path points.", panel=MOPT)
    ig_method: str = option("gausslegendre", choices=IG_METHODS, help="Quadrature of "
                            "integrated gradients (captum's names; gausslegendre is captum's "
                            "default, riemann_right zennit's).", panel=MOPT)
    occlusion_window: int | None = option(None, low=1, help="Occluder side in pixels (default "
                                          "side // 8, at least 2).", panel=MOPT,
                                          show_default=False, example=8)
    occlusion_stride: int | None = option(None, low=1, help="Occluder stride (default half the "
                                          "window).", panel=MOPT, show_default=False, example=4)
    lime_samples: int = option(256, low=2, help="LIME perturbed samples.", panel=MOPT)
    lime_segments: int = option(50, low=2, help="LIME SLIC superpixels.", panel=MOPT)
    lime_kernel_width: float = option(0.25, low=0, low_open=True, help="Width of LIME's "
                                      "exponential kernel on cosine distance (LIME's 0.25).",
                                      panel=MOPT)
    lrp_epsilon: float = option(1e-6, low=0, low_open=True, help="Epsilon of the LRP epsilon "
                                "rule (zennit's stabilizer default).", panel=MOPT)
    gate_threshold: float | None = option(None, low=0, high=1, high_open=True, help="gated-cam "
                                          "cluster threshold (default: the checkpoint's).",
                                          panel=MOPT, show_default=False, example=0.5)
    internal_batch_size: int = option(64, low=1, help="Most perturbed images per model pass for "
                                      "SmoothGrad, integrated gradients, occlusion and LIME "
                                      "(bounds memory); on a CPU also at most 8 images of "
                                      "224 x 224 pixels a pass, the fastest there.", panel=MOPT)

    def validate(self) -> "MethodOptions":
        """Raise a one-line UsageError for the first bad value; return self."""
        return check(self)

    def subset(self, names) -> dict:
        """The values of ``names`` (for cache keys and maps.h5 attributes)."""
        return {n: getattr(self, n) for n in names}

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class EvalOptions:
    """How the maps are scored (``seed``: random positions and weights, the run's seed)."""

    ablation_patch: int | None = option(None, low=1, help="Side of the ablated square "
                                        "(default max(3, side // 8)).", panel=EVAL,
                                        show_default=False, example=4)
    deletion_steps: int = option(20, low=1, help="Steps of the deletion / insertion curves.",
                                 panel=EVAL)
    deletion_baseline: str = option("random", choices=("random", "mean", "blur"),
                                    help="What deleted pixels become: random values (uniform "
                                    "pixels, the definition of Samek et al. 2016 as the HKUST "
                                    "XAI lectures give it), the mean colour, or a blur.",
                                    panel=EVAL)
    deletion_class: str = option("label", choices=("label", "target"), help="Whose probability "
                                 "the deletion curve follows: the true class (Samek et al. "
                                 "2016) or the explained target class.", panel=EVAL)
    localization_criterion: str = option("ilsvrc", choices=("ilsvrc", "iou"), help="ilsvrc: a "
                                         "misclassified image is a localization error too "
                                         "(Russakovsky et al. 2015); iou: only IoU < 0.5 counts, "
                                         "over the pairs whose class is in the image.",
                                         panel=EVAL)
    removal_baseline: str = option("mean", choices=("mean", "random", "blur", "black",
                                                    "white"),
                                   help="What removed pixels become in faithfulness-"
                                   "correlation, region-perturbation, pixel-flipping, irof and "
                                   "infidelity: the mean colour (0 in model space, Quantus's "
                                   "perturb_baseline=0.0), random pixels, a blur, or Quantus's "
                                   "black / white (each image's min / max).", panel=EVAL)
    faithfulness_runs: int = option(100, low=2, help="Random subsets per image of "
                                    "faithfulness-correlation (Quantus: 100).", panel=EVAL)
    faithfulness_subset: int | None = option(None, low=1, help="Pixels per subset (default "
                                             "H W / 16; Quantus: 224 elements).", panel=EVAL,
                                             show_default=False, example=64)
    region_patch: int | None = option(None, low=1, help="Block side of region-perturbation "
                                      "(default side // 16; Quantus: 8).", panel=EVAL,
                                      show_default=False, example=4)
    regions: int = option(100, low=1, help="Blocks removed by region-perturbation (Samek et "
                          "al.'s and Quantus's 100; at most all blocks).", panel=EVAL)
    flip_steps: int = option(64, low=1, help="Steps of pixel-flipping and the symmetric "
                             "relevance gain (Quantus: one channel element per step).",
                             panel=EVAL)
    road_step: int = option(10, low=1, high=50, help="ROAD's percentages: road_step, 2 "
                            "road_step, ... below 100 (Quantus: 1, 3, ..., 99).", panel=EVAL)
    road_noise: float = option(0.01, low=0, help="Noise of ROAD's linear imputation "
                               "(Rong et al.'s 0.01).", panel=EVAL)
    irof_segments: int = option(100, low=2, help="SLIC superpixels of irof (Quantus: 100).",
                                panel=EVAL)
    infidelity_patch: int | None = option(None, low=1, help="Block side of infidelity "
                                          "(default side // 8; Quantus: 4).", panel=EVAL,
                                          show_default=False, example=4)
    robustness_samples: int = option(16, low=1, help="Noisy inputs per image for max- / "
                                     "avg-sensitivity and the local Lipschitz estimate (each "
                                     "costs one explanation; Quantus's default is 200).",
                                     panel=EVAL)
    sensitivity_radius: float = option(0.2, low=0, low_open=True, help="Radius of the uniform "
                                       "noise of the sensitivity metrics (model-input units).",
                                       panel=EVAL)
    lipschitz_std: float = option(0.1, low=0, low_open=True, help="Standard deviation of the "
                                  "local Lipschitz estimate's Gaussian noise.", panel=EVAL)
    completeness_reference: str = option("baseline", choices=("baseline", "zero"),
                                         help="completeness: compare sum(map) with f(x) - f(0) "
                                         "(the zero, mean-colour image: integrated gradients' "
                                         "baseline) or with f(x) (LRP's conservation).",
                                         panel=EVAL)
    sanity_steps: int = option(5, low=1, help="Groups of layers randomized in turn, top down.",
                               panel=EVAL)
    sanity_limit: int = option(16, low=1, help="Pairs the sanity check recomputes.", panel=EVAL)
    seed: int = option(0, cli=False, help="The run's seed.")

    def validate(self) -> "EvalOptions":
        return check(self)


@dataclass
class SaliencyData(DataOptions):
    """The inputs: a dataset split (default), image files, or a preprocessed .npy array."""

    split: str = option("val", help="train, val or test (val is carved from train with `seed` "
                        "where the dataset has none).", panel=DATA)
    batch_size: int = option(16, low=1, help="Images per batch.", panel=DATA)
    images: list[str] | None = option(None, help="Image files or a directory (repeat or "
                                      "comma-separate).", panel=DATA, show_default=False)
    inputs: Path | None = option(None, help="A .npy float array N x 3 x H x W, already "
                                 "preprocessed.", panel=DATA, show_default=False)

    def image_items(self) -> list[str]:
        return [p for item in (self.images or []) for p in str(item).split(",") if p.strip()]

    def sources(self) -> list[str]:
        """The input options given (at most one is allowed)."""
        return [name for name, given in (("dataset", self.dataset is not None),
                                         ("images", bool(self.image_items())),
                                         ("inputs", self.inputs is not None)) if given]


@dataclass
class SaliencyOptions:
    """``cnnexplain saliency``."""

    model: ModelOptions = group(ModelOptions)
    data: SaliencyData = group(SaliencyData)
    prep: PrepOptions = group(PrepOptions)
    files: FileOptions = group(FileOptions)
    methods: str = option("gradient,gradcam", help="Comma-separated methods, or all (every one "
                          "that applies; see `list_methods`).", panel=SAL)
    target: str = option("pred", help="pred (top class), label, a class index, or topk:K (K "
                         "pairs per image).", panel=SAL)
    overlays: int = option(8, low=0, help="Pairs to draw as PNG overlays per method (0: none, "
                           "no grid).", panel=SAL)
    method_options: MethodOptions = group(MethodOptions)
    evaluate: bool = option(False, help="Score the maps (needs ground truth).", panel=EVAL)
    metrics: str = option("default", help="Comma-separated metrics (see `list_metrics`), "
                          "default (every metric that costs at most two explanations per "
                          "image), or all.", panel=EVAL)
    eval_options: EvalOptions = group(EvalOptions)
    run: RunOptions = group(RunOptions)
    compute: ComputeOptions = group(ComputeOptions)

    def validate(self) -> "SaliencyOptions":
        check(self)
        sources = self.data.sources()
        if len(sources) > 1:
            raise UsageError(f"{' and '.join(f'`{s}`' for s in sources)} exclude each other",
                             "pass one input source: `dataset`, `images` or `inputs`")
        if self.evaluate and sources and sources[0] != "dataset":
            raise UsageError(f"`evaluate` needs ground-truth boxes or masks, and `{sources[0]}` "
                             "has none", "evaluate on `dataset=synthetic[...]` (masks and "
                             "boxes), or drop `evaluate=true`")
        return self
