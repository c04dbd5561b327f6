"""Randomization metrics of saliency maps: the random-logit test, and the 1-D SSIM it uses.

- Random logit (Sixt, Granz, Landgraf, "When Explanations Lie: Why Many Modified BP Attributions
  Fail", ICML 2020; Quantus ``RandomLogit``): explain each image for a random *other* class
  ``y'`` (uniform over the ``num_classes - 1`` classes that are not the target) and measure the
  similarity of ``a`` and ``a' = explain(x, y')`` by SSIM. A class-sensitive explanation changes
  with the class, so lower is better.
- :func:`ssim_1d`: SSIM exactly as Quantus calls it (``quantus/functions/similarity_func.py::ssim``):
  scikit-image ``structural_similarity`` on the two *flattened* maps as 1-D signals, window 7
  (uniform), sample covariance, ``K1 = 0.01``, ``K2 = 0.03``, ``data_range = max - min`` of the
  pair together, mean of the SSIM map without the 3 border positions at each end. Vectorised
  over N in torch float64 (skimage is not a dependency).

Differences from Quantus 0.6.0:
- ``y'`` comes from ``other_targets`` or a ``torch.Generator``; Quantus calls
  ``np.random.seed(seed)`` (42) at the start of *every batch* and takes
  ``np.random.randint(0, num_classes - 1, B)``-th of the other classes in ascending order, so its
  ``y'`` depend on ``batch_size``. To replay Quantus, pass
  ``other_classes(targets, num_classes, indices=that randint draw)``.
- Quantus's default ``num_classes`` is 1000 (ImageNet); here it is required.
- SSIM is computed in float64; skimage computes in float32 when given float32 maps (Quantus's
  usual case), which differs by float32 rounding (about 1e-6).
- Preprocessing: maps and ``explain``'s output are used as given; Quantus's defaults are
  ``normalise=True, abs=False`` (batch-wide), i.e. ``prepare(maps, True, False)`` and
  ``preprocess.prepared(explain, True, False)`` here, per sample. SSIM depends on the scale of
  the maps through ``data_range`` and the constants, so the normalisation matters.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WINDOW = 7


def _rows64(a, device=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    t = t.detach().to(torch.float64)
    if device is not None:
        t = t.to(device)
    return t.reshape(t.shape[0], -1)


def ssim_1d(a, b, win_size: int = SSIM_WINDOW) -> np.ndarray:
    """``[N]``: SSIM of the flattened ``a[i]`` and ``b[i]`` (``[N, ...]``, torch or numpy) as
    skimage ``structural_similarity(a_i, b_i, win_size=None, data_range=max-min of both)`` on
    1-D arrays computes it (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004; the form Quantus
    uses). NaN when both maps are one constant (``data_range = 0``)."""
    x = _rows64(a)
    y = _rows64(b, x.device)
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {list(x.shape)} and {list(y.shape)}")
    if win_size % 2 != 1 or x.shape[1] < win_size:
        raise ValueError(f"win_size must be odd and at most the map size {x.shape[1]}, got {win_size}")
    both = torch.cat([x, y], dim=1)
    r = both.amax(dim=1, keepdim=True) - both.amin(dim=1, keepdim=True)
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    # skimage's uniform filter (mode "reflect") at the positions that survive its crop of
    # (win_size - 1) // 2 at each end: exactly the windows that lie inside the signal.
    wx, wy = x.unfold(1, win_size, 1), y.unfold(1, win_size, 1)
    ux, uy = wx.mean(-1), wy.mean(-1)
    uxx, uyy, uxy = (wx * wx).mean(-1), (wy * wy).mean(-1), (wx * wy).mean(-1)
    cov_norm = win_size / (win_size - 1)  # sample covariance (skimage's default)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=1).cpu().numpy()


def other_classes(targets: torch.Tensor, num_classes: int, generator: torch.Generator | None = None,
                  indices=None) -> torch.Tensor:
    """``[N]`` long: a class other than ``targets[i]``, uniform over the ``num_classes - 1``
    others: the ``indices[i]``-th (0-based, in ascending order) of the classes that are not
    ``targets[i]``; ``indices`` default to ``randint(0, num_classes - 1)`` from ``generator`` (on
    the CPU). Quantus's draw: ``np.random.seed(42); indices = np.random.randint(0, K - 1, B)``."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    t = targets.detach().cpu().long()
    if indices is None:
        idx = torch.randint(0, num_classes - 1, t.shape, generator=generator)
    else:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(t.shape)
    return (idx + (idx >= t).long()).to(targets.device)


def random_logit(explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 images: torch.Tensor, maps, targets: torch.Tensor, num_classes: int,
                 other_targets: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, batch_size: int = 64) -> np.ndarray:
    """``[N]``: ``ssim_1d(maps, explain(images, y'))`` with ``y' = other_targets`` (default
    :func:`other_classes` from ``generator``) (Sixt et al., ICML 2020; Quantus ``RandomLogit``
    with ``similarity_func=ssim``). ``images`` ``[N, 3, H, W]``, ``maps`` ``[N, H, W]``,
    ``explain(x [n, 3, H, W], t [n]) -> [n, H, W]`` run in chunks of ``batch_size``. Lower is
    better. Costs one explanation per image."""
    n = images.shape[0]
    if other_targets is None:
        other_targets = other_classes(targets, num_classes, generator)
    other_targets = other_targets.to(targets.device)
    if bool((other_targets == targets).any()):
        raise ValueError("other_targets must differ from targets")
    new = []
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        new.append(explain(images[sl], other_targets[sl]).detach().to(torch.float64))
    return ssim_1d(maps, torch.cat(new).reshape(n, -1).to(images.device))
