"""Robustness of saliency maps to small input perturbations: max- and average-sensitivity and
the local Lipschitz estimate.

Shapes: ``images`` ``[N, 3, H, W]`` (model-input space, on the model's device), ``maps``
``[N, H, W]`` (torch or numpy, the explanations of ``images``), ``targets`` ``[N]`` and an
explanation function ``explain(x [n, 3, H, W], t [n]) -> maps [n, H, W]`` (torch; it may use
gradients). Each metric re-explains ``samples`` perturbed copies of every image, so it costs
``samples`` explanations per image; the copies of all images and draws are explained in chunks
of ``batch_size``.

- Max- / average-sensitivity (Yeh, Hsieh, Suggala, Inouye, Ravikumar, "On the (In)fidelity and
  Sensitivity of Explanations", NeurIPS 2019; Quantus ``MaxSensitivity`` / ``AvgSensitivity``):
  ``x' = x + U(-r, r)`` on every element, ``ratio = ||a - a'||_2 / ||a||_2``; the max / mean over
  the draws. Lower is better.
- Local Lipschitz estimate (Alvarez-Melis & Jaakkola, "On the Robustness of Interpretability
  Methods", arXiv:1806.08049, 2018; Quantus ``LocalLipschitzEstimate``): ``x' = x + N(0, s^2)``,
  ``max ||a - a'||_2 / (||x - x'||_2 + 1e-10)``. Lower is better.

Both reduce the same per-draw distances, :func:`perturbation_distances`; a caller that wants both
on one set of perturbations computes the distances once and calls :func:`sensitivity_scores` and
:func:`lipschitz_scores` (the definitions live there only).

Differences from Quantus 0.6.0:
- ``samples`` defaults to 16, not 200 (cost); the paper estimates the sup / expectation by Monte
  Carlo too.
- Quantus explains one batch per draw; here the ``samples x N`` copies are stacked (draw-major,
  the order Quantus draws them) and explained in chunks, which gives the same maps for a
  per-sample explainer.
- Preprocessing: the maps are used as given, and ``explain``'s output too; to reproduce a
  Quantus setting with ``normalise`` / ``abs`` pass prepared maps and
  ``preprocess.prepared(explain, normalise, absolute)`` (per-sample normalisation; Quantus's
  default is batch-wide, see :mod:`cnnexplain.metrics.preprocess`). Quantus's defaults:
  sensitivity ``normalise=False, abs=False``; LLE ``normalise=True, abs=False``.
- Noise is drawn from a ``torch.Generator`` (on the CPU, all ``[S, N, 3, H, W]`` in one call,
  so the draws do not depend on ``batch_size``), not numpy's global RNG; pass ``noise`` to
  replay any draws (e.g. Quantus's: ``np.random.seed(k)`` then one ``uniform`` / ``normal`` of
  size ``(N, 3*H*W)`` per draw). Quantus adds float64 noise to the float32 images and feeds the float64 sum
  to the explainer; here ``x'`` is float32 (the images' dtype).
- ``return_nan_when_prediction_changes`` is not offered (Quantus's default is False).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

ExplainFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LIPSCHITZ_EPS = 1e-10
"""Quantus's ``lipschitz_constant`` stabiliser in the denominator."""


def uniform_noise(images: torch.Tensor, samples: int, radius: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``[samples, N, 3, H, W]`` of ``U(-radius, radius)`` (float32, drawn on the CPU in one
    call, returned on ``images``' device)."""
    u = torch.rand((samples, *images.shape), generator=generator, dtype=torch.float32)
    return ((2 * u - 1) * radius).to(images.device)


def gaussian_noise(images: torch.Tensor, samples: int, std: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``[samples, N, 3, H, W]`` of ``N(0, std^2)`` (as :func:`uniform_noise`)."""
    z = torch.randn((samples, *images.shape), generator=generator, dtype=torch.float32)
    return (z * std).to(images.device)


def _as_tensor(maps, like: torch.Tensor) -> torch.Tensor:
    if isinstance(maps, torch.Tensor):
        return maps.to(like.device, torch.float64)
    return torch.as_tensor(np.asarray(maps, dtype=np.float64), device=like.device)


def perturbation_distances(explain: ExplainFn, images: torch.Tensor, maps, targets: torch.Tensor,
                           noise: torch.Tensor, batch_size: int = 64
                           ) -> tuple[np.ndarray, np.ndarray]:
    """``(map_distance [S, N], input_distance [S, N])`` float64: for each draw ``s`` and image
    ``i``, ``||a_i - explain(x_i + noise[s, i])||_2`` and ``||noise[s, i]||_2`` (flattened).
    ``noise`` ``[S, N, 3, H, W]`` (e.g. :func:`uniform_noise`). The ``S x N`` perturbed images
    are explained in chunks of ``batch_size``, draw-major."""
    n = images.shape[0]
    if noise.dim() != images.dim() + 1 or noise.shape[1:] != images.shape:
        raise ValueError(f"noise must be [S, {', '.join(map(str, images.shape))}], "
                         f"got {list(noise.shape)}")
    s = noise.shape[0]
    a = _as_tensor(maps, images).reshape(n, -1)
    noise = noise.to(images.device)
    map_dist = torch.empty(s * n, dtype=torch.float64, device=images.device)
    total = s * n
    for start in range(0, total, batch_size):
        flat = torch.arange(start, min(total, start + batch_size), device=images.device)
        draw, img = flat // n, flat % n
        x = images[img] + noise[draw, img].to(images.dtype)
        new = explain(x, targets[img.to(targets.device)])
        new = new.detach().to(images.device, torch.float64).reshape(len(flat), -1)
        map_dist[flat] = torch.linalg.vector_norm(a[img] - new, dim=1)
    input_dist = torch.linalg.vector_norm(noise.reshape(s, n, -1).double(), dim=2)
    return map_dist.view(s, n).cpu().numpy(), input_dist.cpu().numpy()


def sensitivity_scores(maps, map_distance) -> tuple[np.ndarray, np.ndarray]:
    """``(max [N], avg [N])`` of ``map_distance[s, i] / ||a_i||_2`` over the draws ``s``
    (Yeh et al. 2019; NaN-ignoring max and mean as Quantus's ``nanmax`` / ``nanmean``; an
    all-zero map gives inf or NaN, as in Quantus)."""
    a = np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps,
                   dtype=np.float64)
    norm = np.linalg.norm(a.reshape(a.shape[0], -1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ratio = np.asarray(map_distance, dtype=np.float64) / norm[None, :]
        return np.nanmax(ratio, axis=0), np.nanmean(ratio, axis=0)


def lipschitz_scores(map_distance, input_distance) -> np.ndarray:
    """``[N]``: ``max_s map_distance[s, i] / (input_distance[s, i] + 1e-10)`` (Alvarez-Melis &
    Jaakkola 2018; Quantus ``lipschitz_constant`` with Euclidean norms, ``nanmax``)."""
    ratio = (np.asarray(map_distance, dtype=np.float64)
             / (np.asarray(input_distance, dtype=np.float64) + LIPSCHITZ_EPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(ratio, axis=0)


def sensitivity(explain: ExplainFn, images: torch.Tensor, maps, targets: torch.Tensor,
                samples: int = 16, radius: float = 0.2, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, batch_size: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(max_sensitivity [N], avg_sensitivity [N])`` (Yeh et al., NeurIPS 2019; Quantus
    ``MaxSensitivity`` / ``AvgSensitivity`` with ``lower_bound=radius``, ``nr_samples=samples``;
    Quantus's defaults: 200 draws, radius 0.2). ``noise`` ``[S, N, 3, H, W]`` replaces the
    ``samples`` draws of ``U(-radius, radius)`` from ``generator``. Costs ``samples``
    explanations per image. See the module docstring."""
    if noise is None:
        noise = uniform_noise(images, samples, radius, generator)
    dist, _ = perturbation_distances(explain, images, maps, targets, noise, batch_size)
    return sensitivity_scores(maps, dist)


def local_lipschitz_estimate(explain: ExplainFn, images: torch.Tensor, maps, targets: torch.Tensor,
                             samples: int = 16, std: float = 0.1,
                             noise: torch.Tensor | None = None,
                             generator: torch.Generator | None = None,
                             batch_size: int = 64) -> np.ndarray:
    """``[N]``: the local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018; Quantus
    ``LocalLipschitzEstimate`` with ``perturb_std=std``, ``nr_samples=samples``; Quantus's
    defaults: 200 draws, std 0.1, ``normalise=True``). ``noise`` ``[S, N, 3, H, W]`` replaces
    the draws of ``N(0, std^2)`` from ``generator``. Costs ``samples`` explanations per image."""
    if noise is None:
        noise = gaussian_noise(images, samples, std, generator)
    dist, dx = perturbation_distances(explain, images, maps, targets, noise, batch_size)
    return lipschitz_scores(dist, dx)
