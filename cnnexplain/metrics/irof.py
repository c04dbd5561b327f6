"""IROF, iterative removal of features (Rieger & Hansen, "IROF: a low resource evaluation
metric for explanation methods", arXiv:2003.08747, 2020; Quantus ``IROF``).

- :func:`irof`: area over the curve ``r_k = f(x_k) / f(x)`` as superpixels are removed in
  descending order of their mean attribution.
- :func:`irof_curves`: the curves ``r_k`` themselves.
- :func:`default_segments`: cnnexplain's SLIC superpixels of each image.
"""

from __future__ import annotations

import numpy as np
import torch

from cnnexplain.metrics.faithfulness import ScoreFn
from cnnexplain.metrics.masking import as_maps, ranks, removal_scores, resolve_baseline


def default_segments(images: torch.Tensor, n_segments: int = 100) -> torch.Tensor:
    """``[N, H, W]`` int64 superpixels of each image by
    :func:`cnnexplain.explain.saliency.perturbation.slic` (on the image min-max scaled to
    [0, 1]). Not skimage's SLIC (which Quantus runs on the model-space image, in CIELAB, with
    enforced connectivity), so the segments differ from Quantus's."""
    from cnnexplain.explain.saliency.perturbation import slic

    out = []
    for x in images.detach().float().cpu():
        lo, hi = x.min(), x.max()
        out.append(slic((x - lo) / (hi - lo) if hi > lo else x * 0, n_segments))
    return torch.stack(out)


def _relabel(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels [N, H*W] numbered 0..S_n-1 in ascending order of the given ids, S [N])``."""
    labels, counts = [], []
    for s in segments.reshape(len(segments), -1):
        uniq, inv = torch.unique(s, return_inverse=True)
        labels.append(inv)
        counts.append(len(uniq))
    return torch.stack(labels), torch.tensor(counts)


def irof_curves(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                segments=None, baseline=0.0, n_segments: int = 100, batch_size: int = 256
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(r [N, S_max], S [N])``: ``r[n, k-1] = f(x_k) / f(x)`` after removing the ``k``
    superpixels of highest mean attribution (``k = 1..S_n``; NaN beyond ``S_n``), and the
    number of superpixels ``S_n`` of each image. See :func:`irof`."""
    n, _, h, w = images.shape
    dev = images.device
    a = as_maps(maps, images).reshape(n, -1).double()
    seg = default_segments(images, n_segments) if segments is None else \
        torch.as_tensor(np.asarray(segments.cpu() if isinstance(segments, torch.Tensor) else segments))
    if tuple(seg.shape) != (n, h, w):
        raise ValueError(f"segments must be [N, H, W] = {(n, h, w)}, got {tuple(seg.shape)}")
    labels, count = _relabel(seg.long())
    labels, count = labels.to(dev), count.to(dev)
    s_max = int(count.max())
    sums = torch.zeros(n, s_max, dtype=torch.float64, device=dev).scatter_add_(1, labels, a)
    sizes = torch.zeros(n, s_max, dtype=torch.float64, device=dev).scatter_add_(
        1, labels, torch.ones_like(a))
    means = torch.where(sizes > 0, sums / sizes.clamp(min=1), torch.full_like(sums, -torch.inf))
    keys = ranks(means).gather(1, labels)
    steps = torch.arange(1, s_max + 1, device=dev)
    counts = torch.minimum(steps[None, :], count[:, None])
    base = resolve_baseline(images, baseline)
    f = removal_scores(score, images, targets, base, keys,
                       torch.cat([torch.zeros(n, 1, dtype=torch.long, device=dev), counts], 1),
                       batch_size)
    r = f[:, 1:] / f[:, :1]
    count = count.cpu().numpy()
    r[np.arange(s_max)[None, :] >= count[:, None]] = np.nan
    return r, count


def irof(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor, segments=None,
         baseline=0.0, n_segments: int = 100, pad_curves: bool = False, batch_size: int = 256
         ) -> np.ndarray:
    """IROF ``[N]`` = ``S_n - trapz(r_1..r_{S_n})`` (higher is better; not divided by
    ``S_n``, as in Quantus).

    ``images`` ``[N, C, H, W]``, ``maps`` ``[N, H, W]``, ``targets`` ``[N]``; ``score`` the
    target probability as Quantus's default softmax
    (:func:`~cnnexplain.metrics.faithfulness.probability_score`). ``segments`` ``[N, H, W]``
    int (any ids; default :func:`default_segments` with ``n_segments``); a segment's relevance
    is the mean of the map over it; segments are removed cumulatively (all channels) in
    stable descending order and take ``baseline``.

    Quantus conventions: ``IROF(perturb_baseline=b)`` computes the segments itself with
    ``skimage.segmentation.slic(x.transpose(1, 2, 0).astype(float), start_label=0)``; pass
    those to reproduce it. It zero-pads every curve to the longest in its batch, so a sample
    with fewer segments than another in the same batch loses ``r_last / 2``; ``pad_curves=True``
    reproduces that over the ``N`` images given (= Quantus with ``batch_size >= N``); the
    default leaves each sample independent of the others (= Quantus with ``batch_size=1``).
    Quantus's default baseline ``"mean"`` is one scalar over the whole partly perturbed batch,
    recomputed at every step; here the default is 0 (model space: the mean colour)."""
    r, count = irof_curves(score, images, maps, targets, segments, baseline, n_segments,
                           batch_size)
    filled = np.nan_to_num(r, nan=0.0)
    out = np.empty(len(r))
    for i, s in enumerate(count):
        c = filled[i] if pad_curves else filled[i, :s]
        out[i] = s - 0.5 * (c[1:] + c[:-1]).sum()  # trapezoid rule, dx = 1
    return out
