"""Removal curves in both orders: region perturbation with AOPC, pixel flipping, and the
symmetric relevance gain.

- :func:`region_perturbation` (Samek, Binder, Montavon, Lapuschkin, Müller, "Evaluating the
  visualization of what a deep neural network has learned", IEEE TNNLS 28(11), 2017;
  Quantus ``RegionPerturbation``): ``patch x patch`` blocks ranked by summed attribution.
- :func:`pixel_flipping` (Bach et al., "On pixel-wise explanations for non-linear classifier
  decisions by layer-wise relevance propagation", PLoS ONE 10(7), 2015; Quantus
  ``PixelFlipping``): pixels ranked by attribution, ``pixels_per_step`` at a time.
- :func:`symmetric_relevance_gain` (Blücher, Vielhaben, Strodthoff, "Decoupling Pixel Flipping
  and Occlusion Strategy for Consistent XAI Benchmarks", TMLR 2024; Quantus PR #374
  ``SymmetricRelevanceGain``, not in a release): mean over steps of LeRF minus MoRF.

Both orders come from one ranking: MoRF (most relevant first) is the *stable* descending order
of the units' relevance, LeRF (least relevant first) its reverse (PR #374's MIF / LIF). Removed
units accumulate; a removed pixel takes the baseline in all its colour channels, which equals
Quantus with the map broadcast to the C channels and ``features_in_step`` a multiple of C.
Every curve starts with the unperturbed image (k = 0). All ``N x (2L + 1)`` images are scored
in chunks of ``batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cnnexplain.metrics.faithfulness import ScoreFn
from cnnexplain.metrics.masking import as_maps, ranks, removal_scores, resolve_baseline


@dataclass(frozen=True)
class RemovalCurves:
    """Scores ``f_y(x_k)`` ``[N, L + 1]`` after removing the ``k`` most (``morf``) or least
    (``lerf``) relevant units, ``k = 0..L`` (column 0 is the unperturbed image)."""

    morf: np.ndarray
    lerf: np.ndarray

    @property
    def drop_morf(self) -> np.ndarray:
        """``f(x) - f(x_k)`` ``[N, L + 1]`` in MoRF order (Quantus RegionPerturbation's curve
        is ``drop_morf[:, 1:]``)."""
        return self.morf[:, :1] - self.morf

    @property
    def drop_lerf(self) -> np.ndarray:
        """``f(x) - f(x_k)`` ``[N, L + 1]`` in LeRF order."""
        return self.lerf[:, :1] - self.lerf

    @property
    def aopc_morf(self) -> np.ndarray:
        """Samek's AOPC ``[N]`` = ``sum_{k=0..L} (f(x) - f(x_k)) / (L + 1)``, MoRF (higher is
        better)."""
        return self.drop_morf.sum(axis=1) / self.morf.shape[1]

    @property
    def aopc_lerf(self) -> np.ndarray:
        """AOPC ``[N]`` in LeRF order (lower is better)."""
        return self.drop_lerf.sum(axis=1) / self.lerf.shape[1]

    @property
    def srg(self) -> np.ndarray:
        """Symmetric relevance gain ``[N]`` = mean over ``k >= 1`` of ``LeRF_k - MoRF_k``
        (higher is better; ``= (aopc_morf - aopc_lerf) (L + 1) / L``)."""
        return (self.lerf[:, 1:] - self.morf[:, 1:]).mean(axis=1)


def _unperturbed(score: ScoreFn, images, targets, batch_size) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            out.append(score(images[s:s + batch_size],
                             targets.to(images.device)[s:s + batch_size]).double().cpu())
    return torch.cat(out).numpy()


def _curves(score, images, targets, base, unit_of_pixel, unit_values, counts, batch_size
            ) -> RemovalCurves:
    """Both orders: pixel ``p`` of image ``n`` is removed at step ``k`` when its unit's position
    in the order is below ``counts[k]`` (``counts`` for ``k = 1..L``)."""
    n_units = unit_values.shape[1]
    r = ranks(unit_values)  # [N, U], 0 = most relevant
    key_morf = r.gather(1, unit_of_pixel)
    key_lerf = (n_units - 1) - key_morf
    f0 = _unperturbed(score, images, targets, batch_size)[:, None]
    morf = removal_scores(score, images, targets, base, key_morf, counts, batch_size)
    lerf = removal_scores(score, images, targets, base, key_lerf, counts, batch_size)
    return RemovalCurves(np.concatenate([f0, morf], 1), np.concatenate([f0, lerf], 1))


def _padding(size: int, patch: int) -> int:
    """Quantus's leading padding (``utils.get_padding_size``): the block grid is centred."""
    mod = size % patch
    return 0 if mod == 0 else (patch - mod) // 2


def block_ids(height: int, width: int, patch: int, device=None) -> tuple[torch.Tensor, int]:
    """``([H*W] block index of every pixel in raster order of blocks, number of blocks)``:
    non-overlapping ``patch x patch`` blocks on a grid centred as Quantus pads it (border
    blocks are cut by the image edge)."""
    ph, pw = _padding(height, patch), _padding(width, patch)
    nbh, nbw = math.ceil(height / patch), math.ceil(width / patch)
    rows = (torch.arange(height, device=device) + ph) // patch
    cols = (torch.arange(width, device=device) + pw) // patch
    return (rows[:, None] * nbw + cols[None, :]).reshape(-1), nbh * nbw


def region_perturbation(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                        patch_size: int | None = None, regions: int | None = 100,
                        baseline=0.0, batch_size: int = 256) -> RemovalCurves:
    """Region perturbation curves ``[N, L + 1]`` in MoRF and LeRF order (Samek et al., IEEE
    TNNLS 2017; :attr:`RemovalCurves.aopc_morf` is the paper's AOPC).

    ``images`` ``[N, C, H, W]``, ``maps`` ``[N, H, W]``, ``targets`` ``[N]``. Blocks of
    ``patch_size`` (default ``max(1, min(H, W) // 16)``, a 16 x 16 grid; Quantus's default
    is 8) are ranked by their summed attribution and replaced by ``baseline`` one after
    another, ``L = min(regions, number of blocks)`` steps (``regions=None``: all; Quantus's
    default is 100). Quantus ``RegionPerturbation(patch_size, order="morf" | "lerf",
    regions_evaluation, perturb_baseline)`` returns ``drop_morf[:, 1:]`` / ``drop_lerf[:, 1:]``
    (with softmax by default: pass :func:`~cnnexplain.metrics.faithfulness.probability_score`).

    Deviations from Quantus: the sort is stable (Quantus's ``np.argsort`` is not, which only
    matters for tied blocks); LeRF is the reverse of MoRF (Quantus sorts ascending: the same
    without ties). From the paper: the default baseline is a constant (Samek et al. fill
    regions with uniform random values: pass ``baseline="random"``)."""
    n, _, h, w = images.shape
    p = patch_size or max(1, min(h, w) // 16)
    a = as_maps(maps, images).reshape(n, -1).double()
    unit, n_blocks = block_ids(h, w, p, images.device)
    sums = torch.zeros(n, n_blocks, dtype=torch.float64, device=images.device)
    sums.scatter_add_(1, unit.expand(n, -1), a)
    steps = n_blocks if regions is None else min(int(regions), n_blocks)
    base = resolve_baseline(images, baseline)
    return _curves(score, images, targets, base, unit.expand(n, -1), sums,
                   np.arange(1, steps + 1), batch_size)


def pixel_flipping(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                   pixels_per_step: int | None = None, baseline=0.0, batch_size: int = 256
                   ) -> RemovalCurves:
    """Pixel-flipping curves ``[N, L + 1]`` in MoRF and LeRF order (Bach et al., PLoS ONE
    2015), ``L = ceil(H W / pixels_per_step)``.

    ``pixels_per_step`` defaults to ``ceil(H W / 64)`` (64 steps); Quantus flips one
    *channel element* per step (``features_in_step=1``). Quantus ``PixelFlipping(
    features_in_step=C * pixels_per_step, perturb_baseline)`` (softmax by default) returns
    ``morf[:, 1:]`` (it has no k = 0 point and no LeRF). The sort is stable (Quantus's
    ``np.argsort(-a)`` is not; the C tied copies of a pixel are adjacent either way)."""
    n, _, h, w = images.shape
    a = as_maps(maps, images).reshape(n, -1).double()
    pps = pixels_per_step or max(1, math.ceil(h * w / 64))
    steps = math.ceil(h * w / pps)
    counts = np.minimum(np.arange(1, steps + 1) * pps, h * w)
    unit = torch.arange(h * w, device=images.device).expand(n, -1)
    return _curves(score, images, targets, resolve_baseline(images, baseline), unit, a, counts,
                   batch_size)


def symmetric_relevance_gain(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                             pixels_per_step: int | None = None, baseline=0.0,
                             batch_size: int = 256) -> np.ndarray:
    """SRG ``[N]`` (Blücher, Vielhaben, Strodthoff, TMLR 2024): mean over ``k >= 1`` of
    ``f(x_k^LeRF) - f(x_k^MoRF)`` on the :func:`pixel_flipping` curves (higher is better).

    Quantus PR #374 ``SymmetricRelevanceGain(features_in_step=C * pixels_per_step,
    perturb_baseline)`` (softmax by default; per-element steps by default, 1)."""
    return pixel_flipping(score, images, maps, targets, pixels_per_step, baseline, batch_size).srg
