"""Faithfulness of saliency maps to the model: deletion / insertion, max-point ablation, and
rank correlation with occlusion.

The functions take the images in model-input space ``[N, 3, H, W]``, the maps ``[N, H, W]``,
the targets ``[N]`` and a *score function* ``score(x [n, 3, H, W], targets [n]) -> [n]`` (a
closure over the model, see :func:`probability_score` and :func:`logit_score`), evaluated in
batches of ``batch_size`` perturbed images. Nothing is written anywhere.

- Deletion / insertion (seed ``002_d3d71848a193426f.txt``, "Local Faithfulness": sort pixels
  by importance, perturb them, measure the drop in the class probability; Petsiuk et al. 2018
  for the curves): pixels are ranked by the map (descending, stable); after removing (deletion)
  or revealing (insertion) the top ``k / steps`` fraction, ``k = 0..steps``, the target class's
  softmax probability is recorded. Removed pixels take the *baseline*: ``"random"`` (random
  values, seed 002's definition: uniform in [0, 1] per pixel and channel in pixel space, one
  seeded random image per input), ``"mean"`` (0 in model space, the normalization mean colour)
  or ``"blur"`` (a Gaussian blur of the image, sigma = side / 16); insertion starts from the
  baseline and uses ``"blur"`` by default, as in Petsiuk et al. Which class is scored is the
  caller's choice (seed 002 measures the *true* class). The AUC is the
  trapezoid rule over the removed fraction in [0, 1]: low is good for deletion, high for
  insertion.
- Ablation (seed ``003_0c687514e405e536.txt``, sec. 5.2): a ``patch x patch`` square around
  each map's maximum is replaced by the dataset mean image's pixels at the same position; the
  score is the drop of the target *logit*. The same with a uniformly random position (seeded)
  is the baseline.
- Occlusion rank correlation (seed 002, "Local Faithfulness via Occlusion", Selvaraju et al.
  2019): Spearman's rank correlation between each map and the occlusion map of the same image
  and class.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def probability_score(model) -> ScoreFn:
    """``score(x, t)`` = softmax probability of class ``t`` (no gradients)."""
    def score(x, t):
        with torch.no_grad():
            return torch.softmax(model(x), dim=1).gather(1, t.view(-1, 1)).squeeze(1)
    return score


def logit_score(model) -> ScoreFn:
    """``score(x, t)`` = logit of class ``t`` (no gradients)."""
    def score(x, t):
        with torch.no_grad():
            return model(x).gather(1, t.view(-1, 1)).squeeze(1)
    return score


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` (reflect padding, radius 3 sigma)."""
    radius = max(1, int(round(3 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    pad = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    out = images
    if pad < radius:  # tiny images: reflect padding cannot exceed the side, use replicate
        out = F.pad(out, (radius, radius, radius, radius), mode="replicate")
    else:
        out = F.pad(out, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


BASELINES = ("random", "mean", "blur")
"""The named perturbation baselines of :func:`baseline_images`."""


def baseline_images(images: torch.Tensor, kind: str, generator: torch.Generator | None = None,
                    to_model=None) -> torch.Tensor:
    """The perturbation baseline ``[N, 3, H, W]``: ``"random"`` (random values, seed 002's
    "replace them by random values": every pixel and channel uniform in [0, 1] in *pixel*
    space, mapped to model space by ``to_model``, e.g. the preprocessing's ``normalize``; drawn
    on the CPU from ``generator``, one image per input), ``"mean"`` (zeros in model space, the
    normalization mean colour) or ``"blur"`` (Gaussian blur, sigma = min(H, W) / 16)."""
    if kind == "mean":
        return torch.zeros_like(images)
    if kind == "blur":
        return gaussian_blur(images, max(0.5, min(images.shape[-2:]) / 16.0))
    if kind == "random":
        u = torch.rand(images.shape, generator=generator, dtype=torch.float32)
        u = to_model(u) if to_model is not None else u
        return u.to(images)
    raise ValueError(f"unknown baseline {kind!r} (use one of {', '.join(BASELINES)})")


def perturbation_curve(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                       mode: str = "deletion", steps: int = 20,
                       baseline: str | torch.Tensor | None = None,
                       batch_size: int = 64) -> np.ndarray:
    """Deletion or insertion curves ``[N, steps + 1]`` (scores after 0, 1/steps, ..., 1 of
    the pixels were removed / revealed, in map order). ``baseline``: a name of
    :func:`baseline_images` (``"random"`` needs the images given in a tensor: pass
    ``baseline_images(images, "random", generator, to_model)``) or that tensor ``[N, 3, H, W]``.
    See the module docstring."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    baseline = baseline if baseline is not None else ("mean" if mode == "deletion" else "blur")
    n, _, h, w = images.shape
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32)).reshape(n, h * w)
    order = torch.argsort(-m, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1).contiguous())  # rank of each pixel
    base = baseline if isinstance(baseline, torch.Tensor) else baseline_images(images, baseline)
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * (h * w) / steps).long()
    out = np.zeros((n, steps + 1))
    total = n * (steps + 1)
    for start in range(0, total, batch_size):
        flat = torch.arange(start, min(total, start + batch_size))
        img, k = flat // (steps + 1), flat % (steps + 1)
        chosen = (rank[img] < counts[k][:, None]).view(-1, 1, h, w).to(images)
        x, b = images[img.to(images.device)], base[img.to(images.device)]
        chosen = chosen.to(images.device)
        if mode == "deletion":
            pert = x * (1 - chosen) + b * chosen
        else:
            pert = b * (1 - chosen) + x * chosen
        out[img.numpy(), k.numpy()] = score(pert, targets[img.to(targets.device)]).double().cpu().numpy()
    return out


def curve_auc(curves) -> np.ndarray:
    """Trapezoid AUC ``[N]`` of curves ``[N, steps + 1]`` over the fraction in [0, 1]."""
    c = np.asarray(curves, dtype=np.float64)
    steps = c.shape[1] - 1
    return (c[:, 1:] + c[:, :-1]).sum(axis=1) / (2.0 * steps)


def patch_boxes(rows, cols, patch: int, height: int, width: int) -> np.ndarray:
    """``[N, 4]`` (r0, r1, c0, c1) of ``patch x patch`` squares centred on the points, shifted
    to stay inside the image."""
    p = min(int(patch), height, width)
    r0 = np.clip(np.asarray(rows) - p // 2, 0, height - p)
    c0 = np.clip(np.asarray(cols) - p // 2, 0, width - p)
    return np.stack([r0, r0 + p, c0, c0 + p], axis=1)


def ablate(images: torch.Tensor, mean_image: torch.Tensor, boxes) -> torch.Tensor:
    """Copy of ``images`` with each ``boxes[i]`` (r0, r1, c0, c1) set to ``mean_image`` there."""
    out = images.clone()
    for i, (r0, r1, c0, c1) in enumerate(np.asarray(boxes, dtype=np.int64)):
        out[i, :, r0:r1, c0:c1] = mean_image[:, r0:r1, c0:c1]
    return out


def ablation_drop(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                  mean_image: torch.Tensor, patch: int, generator: np.random.Generator | None = None,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(drop at the maximum [N], drop at a random position [N])``: target score of the
    image minus that of the image with the patch ablated (seed 003's ablation study)."""
    from cnnexplain.metrics.localization import max_points

    n, _, h, w = images.shape
    rows, cols = max_points(maps)
    gen = generator or np.random.default_rng(0)
    rand_rows = gen.integers(0, h, size=n)
    rand_cols = gen.integers(0, w, size=n)
    drops = []
    for r, c in ((rows, cols), (rand_rows, rand_cols)):
        boxes = patch_boxes(r, c, patch, h, w)
        d = np.zeros(n)
        for start in range(0, n, batch_size):
            sl = slice(start, min(n, start + batch_size))
            x = images[sl]
            t = targets[sl]
            before = score(x, t)
            after = score(ablate(x, mean_image.to(x), boxes[sl]), t)
            d[sl] = (before - after).double().cpu().numpy()
        drops.append(d)
    return drops[0], drops[1]


def rank_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks along axis 1 (ties share their mean rank, as scipy's rankdata)."""
    from scipy.stats import rankdata

    return rankdata(a, axis=1, method="average")


def spearman_rows(a, b) -> np.ndarray:
    """Spearman's rho ``[N]`` between rows of ``a`` and ``b`` (``[N, ...]``, flattened per
    row): Pearson correlation of average ranks, NaN where a row is constant."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    return pearson_rows(rank_rows(a), rank_rows(b))


def pearson_rows(a, b) -> np.ndarray:
    """Pearson correlation ``[N]`` between rows (flattened), NaN where a row is constant."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    num = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def occlusion_rank_correlation(maps, occlusion_maps) -> np.ndarray:
    """Spearman's rho ``[N]`` of each map with the occlusion map of the same image and class."""
    return spearman_rows(maps, occlusion_maps)
