"""Transformation robustness (Olah et al. 2017, "Feature Visualization", Distill; Mordvintsev
et al. 2015's jitter): at every optimization step each image is seen jittered, scaled and
rotated by a random amount, so that the optimum cannot be a pattern that only works at one
exact pixel alignment.

lucid's ``standard_transforms`` at 128 px are pad 12 (grey), jitter 8, scale 0.90-1.10, rotate
-10..10 degrees, jitter 4. Fixed pixel amounts are too large for a 32 px image, so
:class:`Robustness` scales the jitters with the image side (side / 16 and side / 32 pixels,
lucid's 8 and 4 at 128 px) and applies everything in one differentiable resampling:
``F.affine_grid`` + ``F.grid_sample`` (bilinear), the area outside the image filled with grey
0.5 (lucid's grey padding), the output the size of the input. Jitters are whole pixels in both
directions (lucid crops; lucent shifts one way only).

Random draws are made up front, per image, from each image's own generator
(:meth:`Robustness.draw`): ``[N, steps, 4]`` uniforms, so the same seed gives the same images
and an image's transforms do not depend on the rest of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

FILL = 0.5
"""Value of the pixels a transform brings in from outside the image (grey)."""


@dataclass(frozen=True)
class Robustness:
    """Ranges of the random transforms: ``jitter`` (pixels, whole, either direction; the sum of
    two jitters of ``jitter`` and ``jitter // 2`` as lucid's 8 then 4), ``scale`` (factor range),
    ``degrees`` (rotation range, symmetric)."""

    jitter: int = 8
    scale: tuple[float, float] = (0.9, 1.1)
    degrees: float = 10.0

    @classmethod
    def standard(cls, side: int) -> "Robustness":
        """lucid's standard transforms scaled to a ``side``-pixel image (module docstring)."""
        return cls(jitter=max(1, round(side / 16)), scale=(0.9, 1.1), degrees=10.0)

    def draw(self, generators: Sequence[torch.Generator], steps: int) -> torch.Tensor:
        """float32 ``[N, steps, 4]`` uniforms in [0, 1), row i from ``generators[i]``."""
        return torch.stack([torch.rand(steps, 4, generator=g) for g in generators])

    def theta(self, u: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[N, 4]`` uniforms -> ``[N, 2, 3]`` affine matrices for ``F.affine_grid``
        (normalized coordinates, ``align_corners=False``): output point p samples the input at
        ``R(angle) p / s + t``."""
        return affine_theta(u, h, w, self.jitter, self.scale, self.degrees)

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> the same shape, image i transformed by ``u[i]``
        (``[N, 4]``, one step's draws)."""
        return resample(images, self.theta(u.to(images), images.shape[-2], images.shape[-1]))


def affine_theta(u: torch.Tensor, h: int, w: int, jitter: int, scale: tuple[float, float],
                 degrees: float) -> torch.Tensor:
    """Pure map of uniforms ``u`` ``[N, 4]`` (translation x, translation y, scale, angle) to
    ``[N, 2, 3]`` affine matrices (see :meth:`Robustness.theta`). Each translation is the sum
    of two whole-pixel jitters, of up to ``jitter`` and ``jitter // 2`` pixels."""
    j1, j2 = int(jitter), int(jitter) // 2
    span = 2 * j1 + 1
    # one uniform gives both jitters: its integer part the first, its fractional part the second
    def shift(v):
        a = torch.floor(v * span)
        b = torch.floor((v * span - a) * (2 * j2 + 1))
        return (a - j1) + (b - j2)

    tx, ty = shift(u[:, 0]), shift(u[:, 1])
    s = scale[0] + (scale[1] - scale[0]) * u[:, 2]
    angle = (2 * u[:, 3] - 1) * degrees * math.pi / 180
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.zeros(len(u), 2, 3, dtype=u.dtype, device=u.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    theta[:, 0, 2] = 2 * tx / w
    theta[:, 1, 2] = 2 * ty / h
    return theta


def resample(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` sampled (bilinear) on the grids of ``theta`` ``[N, 2, 3]``, with
    :data:`FILL` outside the image; differentiable in ``images``."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images - FILL, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + FILL


class Identity:
    """No transformation robustness (``transforms=none``): the images as they are."""

    jitter = 0

    def draw(self, generators: Sequence[torch.Generator], steps: int) -> torch.Tensor:
        return torch.zeros(len(generators), steps, 4)

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return images


TRANSFORMS = {
    "standard": Robustness.standard,
    "none": lambda side: Identity(),
}
"""name -> ``side -> transform`` (``standard``: lucid's, scaled to the image side)."""
