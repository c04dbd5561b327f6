"""Faithfulness correlation (Bhatt, Weller, Moura, "Evaluating and Aggregating Feature-based
Model Explanations", IJCAI 2020; Quantus ``FaithfulnessCorrelation``).

- :func:`faithfulness_correlation`: per image, the Pearson correlation over ``runs`` random
  subsets ``S`` between the summed attribution ``sum_{i in S} a_i`` and the score drop
  ``f(x) - f(x_S)`` when ``S`` is set to the baseline.
- :func:`random_subsets`: the subsets it draws from a ``torch.Generator``.
"""

from __future__ import annotations

import numpy as np
import torch

from cnnexplain.metrics.faithfulness import ScoreFn, pearson_rows
from cnnexplain.metrics.masking import as_maps, resolve_baseline


def random_subsets(n: int, runs: int, features: int, size: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``[n, runs, size]`` int64: for each image and run, ``size`` distinct indices in
    ``0..features-1``, uniformly (drawn on the CPU, image by image, so the draws do not depend
    on ``batch_size``)."""
    out = torch.empty(n, runs, size, dtype=torch.long)
    for i in range(n):
        out[i] = torch.rand(runs, features, generator=generator).argsort(dim=1)[:, :size]
    return out


def faithfulness_correlation(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                             runs: int = 100, subset_size: int | None = None, baseline=0.0,
                             subsets: torch.Tensor | np.ndarray | None = None,
                             elements: bool = False, generator: torch.Generator | None = None,
                             batch_size: int = 256) -> np.ndarray:
    """Faithfulness correlation ``[N]`` (higher is better; NaN where either series is
    constant).

    ``images`` ``[N, C, H, W]``, ``maps`` ``[N, H, W]``, ``targets`` ``[N]``; ``score`` as
    Quantus's default uses logits (:func:`~cnnexplain.metrics.faithfulness.logit_score`).
    Each of ``runs`` subsets holds ``subset_size`` *pixels* (all channels; default
    ``max(1, H W // 16)``; Quantus's default is 224 elements), drawn from ``generator``
    (:func:`random_subsets`) unless ``subsets`` ``[N, runs, subset_size]`` is given.

    ``elements=True`` makes ``subsets`` index the ``C H W`` channel elements instead (flat
    index ``c H W + p``; only channel ``c`` of pixel ``p`` is replaced and it contributes
    ``a_p``), which is exactly Quantus's convention: it broadcasts the map to C channels and
    draws ``np.random.choice(C H W, subset_size, replace=False)`` per image and run. Pixel
    subsets are the default because removing a pixel means removing its colour.
    Quantus defaults: ``nr_runs=100``, ``subset_size=224``, ``perturb_baseline="black"``
    (each image's minimum: ``baseline="black"``), Pearson correlation."""
    n, c, h, w = images.shape
    dev = images.device
    a = as_maps(maps, images).reshape(n, -1).double()
    features = c * h * w if elements else h * w
    if subsets is None:
        size = subset_size or max(1, h * w // 16)
        subsets = random_subsets(n, runs, features, size, generator)
    subsets = torch.as_tensor(np.asarray(subsets), dtype=torch.long).to(dev)
    runs, size = subsets.shape[1], subsets.shape[2]
    if int(subsets.max()) >= features or int(subsets.min()) < 0:
        raise ValueError(f"subsets must index 0..{features - 1}")
    pix = subsets % (h * w) if elements else subsets
    att = a.gather(1, pix.reshape(n, -1)).view(n, runs, size).sum(-1)  # [N, runs]
    base = resolve_baseline(images, baseline)
    t = targets.to(dev)
    with torch.no_grad():
        f0 = torch.cat([score(images[s:s + batch_size], t[s:s + batch_size]).double()
                        for s in range(0, n, batch_size)])
        drops = torch.empty(n * runs, dtype=torch.float64, device=dev)
        total = n * runs
        flat_subsets = subsets.reshape(total, size)
        for start in range(0, total, batch_size):
            rows = torch.arange(start, min(total, start + batch_size), device=dev)
            img = rows // runs
            mask = torch.zeros(len(rows), features, dtype=torch.bool, device=dev)
            mask.scatter_(1, flat_subsets[rows], True)
            mask = mask.view(-1, c if elements else 1, h, w)
            pert = torch.where(mask, base[img], images[img])
            drops[rows] = f0[img] - score(pert, t[img]).double()
    return pearson_rows(att.cpu().numpy(), drops.view(n, runs).cpu().numpy())
