"""ROAD, remove and debias (Rong, Leemann, Nguyen, Fiedler, Haghighi, Kasneci, "A Consistent
and Efficient Evaluation Strategy for Attribution Methods", ICML 2022; Quantus ``ROAD``).

- :func:`noisy_linear_imputation`: removed pixels become the weighted mean of their 8
  neighbours (1/6 side, 1/12 diagonal), solved jointly for all removed pixels, plus noise;
  batched preconditioned conjugate gradients in torch (float64) on the images' device.
- :func:`road`: accuracy and target-probability curves after imputing the ``p`` % most (MoRF)
  and least (LeRF) relevant pixels, for every ``p`` in ``percentages``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnexplain.metrics.masking import as_maps, ranks

NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
"""The 3 x 3 stencil of the imputation (reference ``NoisyLinearImputer``)."""


def _neighbour_sum(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the 8 neighbours of every pixel of ``v [..., H, W]`` (outside the image
    counts as absent)."""
    shape = v.shape
    out = F.conv2d(v.reshape(-1, 1, *shape[-2:]), kernel, padding=1)
    return out.view(shape)


def noisy_linear_imputation(images: torch.Tensor, removed, noise: float = 0.01,
                            draws: torch.Tensor | None = None,
                            generator: torch.Generator | None = None, rtol: float = 1e-10,
                            max_iter: int | None = None) -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` with the pixels where ``removed`` ``[N, H, W]`` (bool) is
    true imputed (Rong et al. 2022; Quantus ``functions.perturb_func.noisy_linear_imputation``
    = reference ``road/imputations.py::NoisyLinearImputer``).

    Each removed pixel ``i`` satisfies ``s_i v_i = sum_{j in N(i)} w_ij u_j`` with ``u_j`` the
    known value or the unknown ``v_j``, ``w`` = 1/6 for side and 1/12 for diagonal neighbours
    and ``s_i`` the sum of the weights of the neighbours inside the image; the same symmetric
    positive definite system for every channel. It is solved by Jacobi-preconditioned conjugate
    gradients for all images and channels at once, to a residual of ``rtol`` relative to the
    right-hand side (Quantus: one scipy ``spsolve`` per image on the CPU). Then ``noise *
    draws`` is added at the removed pixels: ``draws`` ``[N, C, H, W]`` standard normal
    (Quantus: ``np.random.randn(C, k)`` in the order of the removed indices), otherwise drawn
    from ``generator`` on the CPU. A fully removed image has no solution and keeps 0 + noise."""
    n, c, h, w = images.shape
    dev = images.device
    r = torch.as_tensor(removed, device=dev).bool().view(n, 1, h, w).double()
    x = images.double()
    kernel = torch.tensor(NEIGHBOUR_WEIGHTS, dtype=torch.float64, device=dev).view(1, 1, 3, 3)
    s = _neighbour_sum(torch.ones(1, 1, h, w, dtype=torch.float64, device=dev), kernel)

    def apply(v):
        return r * (s * v - _neighbour_sum(r * v, kernel))

    b = r * _neighbour_sum(x * (1 - r), kernel)
    v = torch.zeros_like(b)
    res = b.clone()
    z = res / s
    p = z.clone()
    rz = (res * z).sum((2, 3), keepdim=True)
    bnorm = b.pow(2).sum((2, 3), keepdim=True).sqrt()
    limit = max_iter if max_iter is not None else 20 * (h + w) + 100
    for _ in range(limit):
        active = res.pow(2).sum((2, 3), keepdim=True).sqrt() > rtol * bnorm
        if not bool(active.any()):
            break
        ap = apply(p)
        pap = (p * ap).sum((2, 3), keepdim=True)
        alpha = torch.where(active & (pap > 0), rz / torch.where(pap > 0, pap, 1.0), 0.0)
        v = v + alpha * p
        res = res - alpha * ap
        z = res / s
        rz_new = (res * z).sum((2, 3), keepdim=True)
        beta = torch.where(active & (rz > 0), rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta * p
        rz = rz_new
    if noise:
        if draws is None:
            draws = torch.stack([torch.randn(c, h, w, generator=generator) for _ in range(n)])
        v = v + noise * torch.as_tensor(draws).to(dev).double()
    return (x * (1 - r) + r * v).to(images.dtype)


DEFAULT_PERCENTAGES = tuple(range(10, 100, 10))
"""ROAD's default removal percentages here, 10..90 step 10 (Quantus: 1..99 step 2)."""


@dataclass(frozen=True)
class ROADCurves:
    """Per-sample ROAD curves ``[N, P]`` at ``percentages`` ``[P]``: ``accuracy_*`` =
    ``1[argmax f(x_p) == y]``, ``probability_*`` = softmax probability of ``y``, after the
    ``p`` % most (``morf``) or least (``lerf``) relevant pixels were imputed."""

    percentages: np.ndarray
    accuracy_morf: np.ndarray
    accuracy_lerf: np.ndarray
    probability_morf: np.ndarray
    probability_lerf: np.ndarray

    @property
    def area_morf(self) -> np.ndarray:
        """``[N]`` mean of ``probability_morf`` over the percentages (the normalised area by
        the rectangle rule for evenly spaced percentages; lower is better)."""
        return self.probability_morf.mean(axis=1)

    @property
    def area_lerf(self) -> np.ndarray:
        """``[N]`` mean of ``probability_lerf`` over the percentages (higher is better)."""
        return self.probability_lerf.mean(axis=1)

    @property
    def gap(self) -> np.ndarray:
        """``[N]`` ``area_lerf - area_morf`` (higher is better; ROAD's MoRF/LeRF consistency in
        one number, the analogue of the symmetric relevance gain)."""
        return self.area_lerf - self.area_morf


def road(model, images: torch.Tensor, maps, targets: torch.Tensor,
         percentages=DEFAULT_PERCENTAGES, noise: float = 0.01,
         generator: torch.Generator | None = None, draws: torch.Tensor | None = None,
         batch_size: int = 256, rtol: float = 1e-10) -> ROADCurves:
    """ROAD curves in both orders (Rong, Leemann et al., ICML 2022).

    ``model(x [n, C, H, W]) -> logits [n, K]``; ``images`` ``[N, C, H, W]``, ``maps``
    ``[N, H, W]``, ``targets`` ``[N]`` (the labels: accuracy is agreement with ``targets``, as
    in Quantus). For each ``p`` the ``int(H W p / 100)`` highest-ranked pixels (MoRF; stable
    descending order of the map) or lowest-ranked (LeRF, the reverse order) are replaced by
    :func:`noisy_linear_imputation` (``noise``; ``draws`` ``[N, 2, P, C, H, W]`` for
    (MoRF, LeRF) x percentages, else from ``generator``). All ``2 N P`` imputations and
    forward passes run in chunks of ``batch_size``.

    Differences from Quantus ``ROAD(percentages, noise)``: it removes MoRF only, returns
    ``{p: mean accuracy}`` of the first batch only, ranks C H W broadcast elements (which
    crashes for C > 1 in 0.6.0: pixel indices are looked up in the per-channel arrays) and
    uses 1..99 step 2 by default; here pixels are ranked (equal to Quantus for C = 1) and the
    default is :data:`DEFAULT_PERCENTAGES`."""
    n, c, h, w = images.shape
    dev = images.device
    pct = np.asarray(list(percentages), dtype=np.float64)
    ks = [int(h * w * float(p) / 100) for p in pct]
    rank = ranks(as_maps(maps, images).reshape(n, -1))  # [N, H*W], 0 = most relevant
    t = targets.to(dev)
    acc = np.zeros((2, len(pct), n))
    prob = np.zeros((2, len(pct), n))
    items = [(o, j, i) for o in range(2) for j in range(len(pct)) for i in range(n)]
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            o = torch.tensor([it[0] for it in chunk], device=dev)
            kk = torch.tensor([ks[it[1]] for it in chunk], device=dev)
            img = torch.tensor([it[2] for it in chunk], device=dev)
            key = torch.where(o[:, None] == 0, rank[img], (h * w - 1) - rank[img])
            removed = (key < kk[:, None]).view(-1, h, w)
            d = None
            if noise:
                if draws is not None:
                    d = torch.stack([torch.as_tensor(draws[i, oo, j]) for oo, j, i in chunk])
                else:
                    d = torch.stack([torch.randn(c, h, w, generator=generator) for _ in chunk])
            x = noisy_linear_imputation(images[img], removed, noise, d, rtol=rtol)
            logits = model(x)
            hit = (logits.argmax(1) == t[img]).double().cpu().numpy()
            pr = torch.softmax(logits.double(), 1).gather(1, t[img].view(-1, 1)).squeeze(1)
            pr = pr.cpu().numpy()
            for q, (oo, j, i) in enumerate(chunk):
                acc[oo, j, i] = hit[q]
                prob[oo, j, i] = pr[q]
    return ROADCurves(pct, acc[0].T.copy(), acc[1].T.copy(), prob[0].T.copy(), prob[1].T.copy())
