"""Infidelity (Yeh, Hsieh, Suggala, Inouye, Ravikumar, "On the (In)fidelity and Sensitivity of
Explanations", NeurIPS 2019).

- :func:`infidelity`: Quantus ``Infidelity``'s deterministic variant: square blocks replaced
  by the baseline one after another in raster order (accumulating), score = mean over steps of
  ``(f(x) - f(x_k) - sum a (x - x_k))^2``, averaged over patch sizes.
- :func:`infidelity_gaussian`: the paper's expectation over random perturbations
  ``I ~ N(0, sigma^2)``: ``E[(I . a - (f(x) - f(x - I)))^2]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cnnexplain.metrics.faithfulness import ScoreFn
from cnnexplain.metrics.masking import as_maps, removal_scores, resolve_baseline


def infidelity(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
               patch_sizes=(4,), baseline=0.0, batch_size: int = 256) -> np.ndarray:
    """Infidelity ``[N]`` (lower is better), Quantus ``Infidelity(perturb_patch_sizes,
    perturb_baseline, loss_func="mse")`` with its default logits (pass
    :func:`~cnnexplain.metrics.faithfulness.logit_score`).

    For each ``s`` in ``patch_sizes`` the image is cut into ``s x s`` blocks from the top-left
    corner; step ``k = 1..B`` has the first ``k`` blocks in raster order set to ``baseline``
    in all channels, ``df_k = f(x) - f(x_k)``, ``da_k = sum_{c,h,w} a_hw (x - x_k)_chw``, and
    the score is ``mean_k (df_k - da_k)^2``. Quantus's default baseline is ``"black"`` (each
    image's minimum); its ``n_perturb_samples=10`` repeats are identical and are not repeated
    here. Deviation: when ``s`` does not divide H or W the last blocks are cut by the edge
    (Quantus raises an IndexError)."""
    n, c, h, w = images.shape
    a = as_maps(maps, images).reshape(n, -1).double()
    base = resolve_baseline(images, baseline)
    f0 = removal_scores(score, images, targets, base, torch.zeros(n, h * w, dtype=torch.long),
                        [0], batch_size)  # nothing removed
    contrib = a * (images - base).double().sum(1).reshape(n, -1)  # [N, H*W] per-pixel a (x - b)
    out = np.zeros(n)
    for s in patch_sizes:
        s = int(s)
        nbw = math.ceil(w / s)
        rows = torch.arange(h, device=images.device) // s
        cols = torch.arange(w, device=images.device) // s
        block = (rows[:, None] * nbw + cols[None, :]).reshape(-1)
        n_blocks = math.ceil(h / s) * nbw
        fk = removal_scores(score, images, targets, base, block.expand(n, -1),
                            np.arange(1, n_blocks + 1), batch_size)
        sums = torch.zeros(n, n_blocks, dtype=torch.float64, device=images.device)
        sums.scatter_add_(1, block.expand(n, -1), contrib)
        da = sums.cumsum(1).cpu().numpy()
        out += (((f0 - fk) - da) ** 2).mean(axis=1)
    return out / len(patch_sizes)


def infidelity_gaussian(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                        sigma: float = 0.1, samples: int = 32,
                        noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None,
                        batch_size: int = 256) -> np.ndarray:
    """The paper's infidelity ``[N]`` (Yeh et al. 2019, eq. 1, with ``I ~ N(0, sigma^2)`` on
    every element): ``mean_j (sum_{c,h,w} I_j a_hw - (f(x) - f(x - I_j)))^2`` over
    ``samples`` draws ``I_j`` (lower is better). ``noise`` ``[N, samples, C, H, W]`` gives
    the draws ``I`` themselves (already scaled); otherwise they come from ``generator`` (CPU), image by image. No optimal
    rescaling of the map (Yeh et al.'s code and captum's ``normalize=True`` rescale ``a`` by
    the least-squares factor first); not in Quantus."""
    n, c, h, w = images.shape
    dev = images.device
    a = as_maps(maps, images).double()
    t = targets.to(dev)
    with torch.no_grad():
        f0 = torch.cat([score(images[s:s + batch_size], t[s:s + batch_size]).double()
                        for s in range(0, n, batch_size)])
        out = np.zeros(n)
        per = max(1, batch_size // samples)
        for s in range(0, n, per):
            idx = torch.arange(s, min(n, s + per), device=dev)
            if noise is None:
                draws = sigma * torch.stack([torch.randn(samples, c, h, w, generator=generator)
                                             for _ in range(len(idx))]).to(images)
            else:
                draws = torch.as_tensor(noise[s:s + len(idx)]).to(images)
            pert = (images[idx, None] - draws).reshape(-1, c, h, w)
            fk = torch.cat([score(pert[q:q + batch_size],
                                  t[idx].repeat_interleave(samples)[q:q + batch_size]).double()
                            for q in range(0, len(pert), batch_size)]).view(len(idx), samples)
            ia = (draws.double() * a[idx, None, None]).sum(dim=(2, 3, 4))
            out[s:s + len(idx)] = ((ia - (f0[idx, None] - fk)) ** 2).mean(1).cpu().numpy()
    return out
