"""Replacing pixels by a baseline and scoring the results in chunks: the shared machinery of
the removal metrics (:mod:`~cnnexplain.metrics.removal`, :mod:`~cnnexplain.metrics.irof`,
:mod:`~cnnexplain.metrics.infidelity`).

- :func:`resolve_baseline`: the baseline image ``[N, C, H, W]`` from a number, a tensor or a name.
- :func:`removal_scores`: ``score`` of every image with the pixels whose *key* is below each
  step's count replaced by the baseline, all ``N x K`` images in chunks of ``batch_size``.
"""

from __future__ import annotations

import numpy as np
import torch

from cnnexplain.metrics.faithfulness import ScoreFn, baseline_images


def as_maps(maps, images: torch.Tensor) -> torch.Tensor:
    """``maps`` (torch or numpy ``[N, H, W]``) as float32 on the images' device."""
    m = torch.as_tensor(np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps,
                                   dtype=np.float32))
    n, _, h, w = images.shape
    if m.shape != (n, h, w):
        raise ValueError(f"maps must be [N, H, W] = {(n, h, w)}, got {tuple(m.shape)}")
    return m.to(images.device)


def resolve_baseline(images: torch.Tensor, baseline, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """The baseline ``[N, C, H, W]`` that removed pixels take.

    ``baseline``: a number (every element; Quantus's numeric ``perturb_baseline``), a tensor
    broadcastable to the images, ``"black"`` / ``"white"`` (Quantus's names: each sample's
    minimum / maximum over all its elements, *not* 0 / 1), or a name of
    :func:`~cnnexplain.metrics.faithfulness.baseline_images` (``"mean"`` = 0 in model space,
    the normalisation's mean colour, which is *not* Quantus's ``"mean"``; ``"blur"``;
    ``"random"``, drawn from ``generator``)."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(images, float(baseline))
    if isinstance(baseline, torch.Tensor):
        return baseline.to(images).expand_as(images)
    if baseline in ("black", "white"):
        n = images.shape[0]
        flat = images.reshape(n, -1)
        v = flat.amin(1) if baseline == "black" else flat.amax(1)
        return v.view(n, 1, 1, 1).expand_as(images)
    if isinstance(baseline, str):
        return baseline_images(images, baseline, generator)
    raise ValueError(f"baseline must be a number, a tensor or a name, got {baseline!r}")


def removal_scores(score: ScoreFn, images: torch.Tensor, targets: torch.Tensor,
                   base: torch.Tensor, keys: torch.Tensor, counts, batch_size: int = 256
                   ) -> np.ndarray:
    """``[N, K]``: ``score`` of image ``n`` with every pixel ``p`` with
    ``keys[n, p] < counts[n, k]`` (all colour channels) replaced by ``base[n]``.

    ``keys`` ``[N, H*W]`` (a pixel's position in the removal order, or its unit's), ``counts``
    ``[K]`` or ``[N, K]``. The ``N * K`` images are built and scored in chunks of
    ``batch_size`` under ``torch.no_grad``."""
    n, c, h, w = images.shape
    dev = images.device
    keys = keys.to(dev)
    counts = torch.as_tensor(np.asarray(counts), device=dev).long()
    if counts.dim() == 1:
        counts = counts.expand(n, -1)
    steps = counts.shape[1]
    out = torch.empty(n * steps, dtype=torch.float64)
    total = n * steps
    with torch.no_grad():
        for start in range(0, total, batch_size):
            flat = torch.arange(start, min(total, start + batch_size), device=dev)
            img, k = flat // steps, flat % steps
            chosen = (keys[img] < counts[img, k][:, None]).view(-1, 1, h, w)
            pert = torch.where(chosen, base[img], images[img])
            out[start:start + len(flat)] = score(pert, targets.to(dev)[img]).double().cpu()
    return out.view(n, steps).numpy()


def ranks(values: torch.Tensor) -> torch.Tensor:
    """``[N, U]`` position of each unit in the stable descending order of ``values [N, U]``
    (0 = most relevant; ties keep the lower index first)."""
    order = torch.argsort(-values, dim=1, stable=True)
    r = torch.empty_like(order)
    r.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order)
               .contiguous())
    return r
