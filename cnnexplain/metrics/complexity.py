"""Complexity of saliency maps: sparseness (Gini index) and complexity (entropy).

Shapes: ``maps`` ``[N, ...]`` (torch or numpy; every element of a sample counts, so a
``[N, H, W]`` map is one value per pixel and a ``[N, C, H, W]`` map one per channel element);
returns float64 numpy ``[N]``, computed in float64 on the maps' device.

- Sparseness (Chalasani, Chen, Chowdhury, Wu, Jha, "Concise Explanations of Neural Networks
  using Adversarial Training", ICML 2020; Quantus ``Sparseness``): the Gini index of the map,
  ``v = sort_ascending(a + 1e-7)``, ``G = sum_i (2i - n - 1) v_i / (n sum v)``, ``i = 1..n``.
  0 for a constant map, ``(n - 1) / n`` for a one-hot map (the maximum; the 1e-7 shift lowers it
  by about ``n * 1e-7``). Higher = sparser.
- Complexity (Bhatt, Weller, Moura, "Evaluating and Aggregating Feature-based Model
  Explanations", IJCAI 2020; Quantus ``Complexity``): the entropy of ``p = a / sum |a|``,
  ``-sum p ln(p + 1e-12)``. Lower = simpler.

Both want non-negative maps: Quantus's defaults are ``abs=True, normalise=True``, i.e.
``preprocess.prepare(maps, True, True)`` (per sample here; Quantus's default normalises batch-wide,
which does not change these two scale-free scores beyond the epsilons). Negative values are used
as given (Quantus does the same; the entropy is then NaN where ``p + 1e-12 < 0``). Unlike Quantus
the caller's array is not modified in place.
"""

from __future__ import annotations

import numpy as np
import torch

GINI_EPS = 1e-7
"""Quantus's shift of the map before the Gini index (keeps ``sum v > 0`` for all-zero maps)."""
ENTROPY_EPS = 1e-12
"""Quantus's stabiliser inside the logarithm."""


def _flat64(maps) -> torch.Tensor:
    m = maps if isinstance(maps, torch.Tensor) else torch.as_tensor(np.asarray(maps))
    return m.detach().to(torch.float64).reshape(m.shape[0], -1)


def sparseness(maps) -> np.ndarray:
    """``[N]``: the Gini index of each map (Chalasani et al., ICML 2020; Quantus ``Sparseness``
    with the maps as given). See the module docstring."""
    v = torch.sort(_flat64(maps) + GINI_EPS, dim=1).values
    n = v.shape[1]
    i = torch.arange(1, n + 1, dtype=torch.float64, device=v.device)
    g = ((2 * i - n - 1) * v).sum(dim=1) / (n * v.sum(dim=1))
    return g.cpu().numpy()


def complexity(maps) -> np.ndarray:
    """``[N]``: the entropy of each map's distribution ``a / sum |a|`` (Bhatt et al., IJCAI
    2020; Quantus ``Complexity`` with the maps as given). An all-zero map gives NaN (0/0, as in
    Quantus)."""
    a = _flat64(maps)
    p = a / a.abs().sum(dim=1, keepdim=True)
    return (-(p * torch.log(p + ENTROPY_EPS)).sum(dim=1)).cpu().numpy()
