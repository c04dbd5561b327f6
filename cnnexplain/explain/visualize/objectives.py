"""What an image is optimized for: a registry of objectives (:data:`OBJECTIVES`), the
diversity term and the penalties (Olah et al. 2017, "Feature Visualization", Distill).

Every objective is a linear functional of a per-image feature vector, so one batch can hold
many units and the same code scores dataset images:

- ``pointwise(acts)`` ``[B, K, h, w]`` -> ``[B, K, h, w]`` (identity, or the square for
  DeepDream);
- the feature is its mean over the map ``[B, K]``, or its value at one position (x, y);
- the value is ``feature . w`` with one weight vector per image ``w`` ``[K]``: one-hot for a
  channel or a class, a unit vector for a direction, ``1 / K`` for a whole layer.

Objectives (lucid's names and conventions, ``optvis/objectives.py``):

- ``channel``: the mean of channel k over the layer's map (Olah et al. 2017);
- ``neuron``: channel k at one position (x = column, y = row; default the centre, lucid's
  bottom-right cell of the central 2x2 on even maps);
- ``layer``: the mean squared activation of the whole layer, Mordvintsev et al. 2015's
  DeepDream objective (lucid's ``deepdream``);
- ``direction``: the mean over positions of the dot product of the activation vector with a
  unit direction v in channel space (lucid's ``direction`` with ``cossim_pow=0``; lucent uses
  the cosine instead), Olah et al. 2017's "random directions";
- ``logit``: a class's pre-softmax logit (Olah et al. 2017 found logits give better images
  than probabilities, which can rise by suppressing other classes).

``sign`` +1 maximizes, -1 minimizes (the "negative" visualizations of Olah et al. 2017). The
diversity term (:func:`diversity`) is lucid's: the mean pairwise cosine similarity of the
images' Gram matrices at the layer, subtracted so that similar images are penalized;
:func:`total_variation` and :func:`l2_penalty` are the frequency and magnitude penalties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cnnexplain.errors import UsageError, close_matches


def spatial(acts: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` (a layer without a map, e.g. Linear) -> ``[B, K, 1, 1]``; ``[B, K, h, w]``
    unchanged."""
    if acts.dim() == 2:
        return acts[:, :, None, None]
    if acts.dim() != 4:
        raise UsageError(f"layer output of shape {list(acts.shape)} is neither B x K nor "
                         "B x K x h x w", "choose a convolutional or linear `layer`")
    return acts


def centre(h: int, w: int) -> tuple[int, int]:
    """The default neuron position ``(x, y)`` of an ``h x w`` map (lucid's)."""
    return w // 2, h // 2


@dataclass(frozen=True)
class Objective:
    """One objective: ``source`` ``layer`` (the layer's activations) or ``logits`` (the model's
    output); ``pointwise`` the function of the activations that is averaged; ``units``: what a
    unit is (``channel``, ``class``, ``direction`` or ``none`` for the whole layer);
    ``positional``: it reads one position (``neuron``)."""

    name: str
    citation: str
    description: str
    source: str
    units: str
    pointwise: Callable[[torch.Tensor], torch.Tensor]
    positional: bool = False

    @property
    def linear(self) -> bool:
        """The feature is the plain mean of the activations, so a dataset's mean-pooled
        activations give it exactly."""
        return self.pointwise is _identity and not self.positional

    def feature(self, acts: torch.Tensor, position: tuple[int, int] | None = None) -> torch.Tensor:
        """``[B, K]`` (or ``[B, K, h, w]``) activations -> ``[B, K]`` features: the mean of
        ``pointwise(acts)`` over the map, or its value at ``position`` ``(x, y)``."""
        if self.source == "logits":
            return acts
        a = self.pointwise(spatial(acts))
        if position is not None:
            x, y = position
            return a[:, :, y, x]
        return a.mean(dim=(2, 3))

    def maps(self, acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """``[B, h, w]``: ``pointwise(acts) . w`` at every position (the unit's map, drawn over
        dataset examples; ``weights`` ``[B, K]``); None for logits."""
        if self.source == "logits":
            return None
        return torch.einsum("bkhw,bk->bhw", self.pointwise(spatial(acts)), weights.to(acts))

    def value(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[B]``: image b's objective, ``features[b] . weights[b]`` (both ``[B, K]``)."""
        return (features * weights.to(features)).sum(dim=1)

    def values(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[B, U]``: every image against every unit (``weights`` ``[U, K]``)."""
        return features @ weights.to(features).t()


def _identity(a: torch.Tensor) -> torch.Tensor:
    return a


def _square(a: torch.Tensor) -> torch.Tensor:
    return a * a


FV = "Olah, Mordvintsev and Schubert 2017, Feature Visualization, Distill"
OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("channel", FV, "mean of channel k over the layer's map", "layer", "channel",
              _identity),
    Objective("neuron", FV, "channel k at one position (x, y) of the map", "layer", "channel",
              _identity, positional=True),
    Objective("layer", "Mordvintsev, Olah and Tyka 2015, Inceptionism (DeepDream)",
              "mean squared activation of the whole layer", "layer", "none", _square),
    Objective("direction", FV, "mean dot product of the activation vector with a unit "
              "direction in channel space", "layer", "direction", _identity),
    Objective("logit", FV, "a class's pre-softmax logit", "logits", "class", _identity),
]}
"""name -> objective (module docstring)."""


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UsageError(f"unknown `objective` {name!r}{close_matches(name, OBJECTIVES)}",
                         f"choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def one_hot(index: int, size: int) -> torch.Tensor:
    """float32 ``[size]`` with 1 at ``index``."""
    w = torch.zeros(size)
    w[int(index)] = 1.0
    return w


def gram_cosines(acts: torch.Tensor) -> torch.Tensor:
    """``[n, K, h, w]`` (or ``[n, K]``) activations of n images -> ``[n, n]``: the cosine
    similarity of their Gram matrices ``G = A A^T`` (``A``: ``K x hw``), Frobenius-normalized
    (lucid's ``diversity``)."""
    a = spatial(acts).flatten(2)
    g = torch.matmul(a, a.transpose(1, 2)).flatten(1)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return g @ g.t()


def diversity(acts: torch.Tensor) -> torch.Tensor:
    """Scalar ``S = (1 / n) sum_{a != b} cos(G_a, G_b)`` of a group of n images (``[n, K, h,
    w]``): large when they look alike to the layer. lucid returns ``S`` and optimizes
    ``objective - w * S``; Olah et al. 2017 write the term to maximize as ``-S``."""
    n = acts.shape[0]
    if n < 2:
        return acts.new_zeros(())
    c = gram_cosines(acts)
    return (c.sum() - c.diagonal().sum()) / n


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """``[N]``: mean absolute difference between neighbouring pixels (horizontal plus
    vertical) of ``[N, 3, H, W]`` images, a frequency penalty (Olah et al. 2017; Mahendran and
    Vedaldi 2015)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def l2_penalty(images: torch.Tensor) -> torch.Tensor:
    """``[N]``: mean squared distance of ``[N, 3, H, W]`` images from grey 0.5."""
    return ((images - 0.5) ** 2).flatten(1).mean(1)
