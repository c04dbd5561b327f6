"""Feature visualization by optimization (Olah, Mordvintsev and Schubert 2017, "Feature
Visualization", Distill; Mordvintsev et al. 2015 for DeepDream's layer objective): images that
maximize (or minimize) a unit, next to the dataset images that do.

Modules: :mod:`.param` (decorrelated Fourier-space images, lucid's colour decorrelation,
sigmoid to [0, 1]), :mod:`.transforms` (batched, differentiable jitter / scale / rotation),
:mod:`.objectives` (the objective registry, diversity, penalties), :mod:`.optimize` (one
batched, seeded Adam loop for many units), :mod:`.examples` (top / bottom dataset examples
from cached activations, with the unit's map) and :mod:`.outputs` (PNGs, grid, HTML).
"""

from cnnexplain.explain.visualize.objectives import OBJECTIVES, Objective, get_objective
from cnnexplain.explain.visualize.optimize import Goal, Rendered, Settings, optimize
from cnnexplain.explain.visualize.param import PARAMETERIZATIONS
from cnnexplain.explain.visualize.transforms import TRANSFORMS

__all__ = ["OBJECTIVES", "Objective", "get_objective", "Goal", "Rendered", "Settings",
           "optimize", "PARAMETERIZATIONS", "TRANSFORMS"]
