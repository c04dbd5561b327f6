"""Network Dissection, the tallies: unit masks and the dataset-wide counts of each layer.

Pure tensor code, vectorized over units and concepts (Bau et al. 2017; the method and its
citation in :mod:`cnnexplain.explain.dissect.labels`). IoU and the labels computed from these
counts are in :mod:`cnnexplain.explain.dissect.labels`.

Unit masks
----------
``A_k(x)`` ``[h, w]`` is unit ``k``'s map for image ``x``; ``T_k`` its top-quantile threshold
(:mod:`cnnexplain.explain.dissect.quantiles`). ``S_k(x)`` is ``A_k(x)`` resized bilinearly to
the mask size ``[sh, sw]`` with ``align_corners=False`` (:func:`bilinear_matrix`): that is PIL's
bilinear ``resize`` (NetDissect-Lite's ``imresize(..., mode='F')``) and
``F.interpolate(mode="bilinear", align_corners=False)``; davidbau/dissect uses
``align_corners=True`` and the original NetDissect a receptive-field-aligned upsampling, so
their masks are shifted by up to half a feature cell.
Each mask pixel is a convex combination of the 2 x 2 feature values of its *quad*, so
``S_k(x)`` is evaluated only in the tiles of quads whose largest corner exceeds ``T_k`` (every
other pixel is off); the values there use PyTorch's ``upsample_bilinear2d`` formula
(:class:`QuadTable`; :func:`upsample_maps` gives whole maps).
``M_k(x) = S_k(x) > T_k`` (strict, as both reference implementations), compared in float32
against ``T_k`` rounded toward -infinity, which is exactly the float64 comparison.

Concepts and their masks
------------------------
A concept is a Broden label number ``c`` whose *primary category* (the category whose
``c_<cat>.csv`` gives it the largest coverage; ``BrodenDataset.category_of``) is one of the
dataset's categories. ``L_c(x)`` is the set of mask pixels where ``c`` appears in *any* layer of
any category's masks (a set: a label in two part layers at one pixel counts once; the reference
code would count it twice), or every pixel when ``c`` is a whole-image label (scene, texture)
of ``x``. Category ``g`` is *present* in ``x`` when some concept of primary category ``g`` has
``L_c(x)`` non-empty: the paper sums only over images with at least one labeled concept of
``c``'s category, which NetDissect's ``count_act_with_labelcat`` implements with the same
primary categories. (An index cell that lists a mask holding only unlabeled pixels does not
make its category present.)

Counts (all int64, exact), summed over the dataset
--------------------------------------------------
    truth[c]               = sum_x |L_c(x)|
    intersection[k, c]     = sum_x |M_k(x) & L_c(x)|
    activation[k]          = sum_x |M_k(x)|
    activation_original[k, g] = sum_{x: g present in x} |M_k(x)|
    activation_lite[k, g]  = sum_{x: M_k(x) touches a concept of category g} |M_k(x)|
                             (touches: a pixel of M_k(x) carries a label of primary category g,
                             or x has a whole-image label of g and M_k(x) is not empty)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

MAX_BLOCK_ELEMENTS = 1 << 24
"""Upsampled values materialized at once (64 MiB of float32): bounds tally memory."""


# ---------------------------------------------------------------------------------------------
# Upsampling
# ---------------------------------------------------------------------------------------------


def bilinear_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """``[n_out, n_in]`` 1-D bilinear resampling weights, ``align_corners=False`` (PyTorch's
    ``upsample_bilinear2d``; PIL's bilinear for upsampling): output ``i`` samples
    ``s = (i + 0.5) * n_in / n_out - 0.5`` clamped at 0, between ``floor(s)`` and the next
    input (clamped at ``n_in - 1``). A map ``A [n_in_h, n_in_w]`` resizes to ``R @ A @ C.T``."""
    i = np.arange(n_out, dtype=np.float64)
    s = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(s).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = s - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return torch.as_tensor(m, dtype=dtype, device=device)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int],
                  mats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of maps ``[..., h, w]`` to ``[..., sh, sw]``."""
    h, w = maps.shape[-2:]
    if mats is None:
        mats = (bilinear_matrix(h, size[0], maps.dtype, maps.device),
                bilinear_matrix(w, size[1], maps.dtype, maps.device))
    rows, cols = mats
    return torch.matmul(rows, torch.matmul(maps, cols.t()))


@dataclass(frozen=True)
class QuadTable:
    """One axis of the bilinear resampling ``n_in -> n_out`` (``align_corners=False``) cut into
    *tiles*: runs of output coordinates whose two source samples are the same pair
    ``(j, min(j + 1, n_in - 1))``, split into runs of at most ``ceil(n_out / n_in)`` so that
    every tile has about the same size. Per tile ``v``: ``source[v]`` = ``j``, ``start[v]`` its
    first output coordinate, ``weights[v]`` ``[Q, 2]`` the two bilinear weights of each of its
    coordinates (NaN past the tile's end, so that those values compare false)."""

    source: torch.Tensor
    start: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def build(cls, n_in: int, n_out: int, device=None) -> "QuadTable":
        i = np.arange(n_out, dtype=np.float64)
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
        j0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        lam = (src - j0).astype(np.float32)
        cap = max(1, -(-n_out // n_in))
        source, start = [], []
        for j in range(n_in):
            idx = np.flatnonzero(j0 == j)
            for s in range(0, idx.size, cap):
                source.append(j)
                start.append(int(idx[s]))
        weights = np.full((len(source), cap, 2), np.nan, np.float32)
        for v, (j, s) in enumerate(zip(source, start)):
            run = [t for t in range(s, min(s + cap, n_out)) if j0[t] == j]
            weights[v, :len(run), 0] = 1.0 - lam[run]
            weights[v, :len(run), 1] = lam[run]
        t = lambda a: torch.as_tensor(np.asarray(a), device=device)  # noqa: E731
        return cls(t(np.asarray(source, np.int64)), t(np.asarray(start, np.int64)), t(weights))


# ---------------------------------------------------------------------------------------------
# Tallies
# ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Dataset-wide counts of one layer (module docstring), int64 tensors.

    ``intersection`` ``[K, NL]``, ``truth`` ``[NL]``, ``activation`` ``[K]``,
    ``activation_original`` / ``activation_lite`` ``[K, G]``, ``category_images`` ``[G]``
    (images where each category is present), ``images`` ``[1]``.
    """

    intersection: torch.Tensor
    truth: torch.Tensor
    activation: torch.Tensor
    activation_original: torch.Tensor
    activation_lite: torch.Tensor
    category_images: torch.Tensor
    images: torch.Tensor

    @classmethod
    def zeros(cls, units: int, labels: int, categories: int,
              device: torch.device | str = "cpu") -> "Tally":
        z = lambda *s: torch.zeros(*s, dtype=torch.int64, device=device)  # noqa: E731
        return cls(z(units, labels), z(labels), z(units), z(units, categories),
                   z(units, categories), z(categories), z(1))

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def flat(self) -> torch.Tensor:
        """All counts as one int64 vector (for ``all_reduce``)."""
        return torch.cat([t.reshape(-1) for t in self.tensors()])

    def load_flat(self, flat: torch.Tensor) -> None:
        """Inverse of :meth:`flat` (in place)."""
        off = 0
        for t in self.tensors():
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t))
            off += n

    def add_(self, other: "Tally") -> "Tally":
        for a, b in zip(self.tensors(), other.tensors()):
            a += b.to(a.device)
        return self

    def numpy(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name).cpu().numpy() for f in fields(self)}


def _label_counts(pix: torch.Tensor, nl: int) -> torch.Tensor:
    """int64 ``[B, L, NL]``: pixels of each label number in each image and mask layer (one
    ``bincount`` pass; label 0 included)."""
    b, layers = pix.shape[:2]
    offsets = (torch.arange(b * layers, device=pix.device) * nl).view(b, layers, 1, 1)
    counts = torch.bincount((pix.long() + offsets).reshape(-1), minlength=b * layers * nl)
    if counts.numel() > b * layers * nl:
        raise ValueError("a mask holds a label number beyond the label table")
    return counts.view(b, layers, nl)


def _dedupe_labels(pix: torch.Tensor, sca: torch.Tensor, counts: torch.Tensor
                   ) -> torch.Tensor | None:
    """Set semantics for the pixel labels ``pix`` ``[B, L, sh, sw]``: zero a label repeated in
    a later layer at the same pixel, or equal to one of the image's whole-image labels ``sca``
    ``[B, M]``. Only layer pairs whose label sets overlap in the batch (from ``counts``, see
    :func:`_label_counts`) are compared. Returns the new ``pix``, or None if nothing repeats."""
    has = counts[:, :, 1:] > 0                                    # [B, L, NL-1]
    layer_has = has.any(dim=0).float()                            # [L, NL-1]
    overlap = (layer_has @ layer_has.t()) > 0                     # [L, L]
    drop = None
    for layer in range(1, pix.shape[1]):
        for prev in range(layer):
            if bool(overlap[layer, prev]):
                if drop is None:
                    drop = torch.zeros(pix.shape, dtype=torch.bool, device=pix.device)
                drop[:, layer] |= (pix[:, layer] == pix[:, prev]) & (pix[:, layer] > 0)
    image_has = counts.sum(dim=1) > 0                             # [B, NL]
    both = image_has.gather(1, sca.long()) & (sca > 0)            # whole-image label in pixels
    if bool(both.any()):
        for m in range(sca.shape[1]):
            s = sca[:, m].view(-1, 1, 1, 1)
            hit = (pix == s) & (s > 0)
            drop = hit if drop is None else drop | hit
    return None if drop is None else pix.masked_fill(drop, 0)


def float32_threshold(thresholds: torch.Tensor) -> torch.Tensor:
    """float32 ``t`` with ``x > t  <=>  x > T`` for every float32 ``x``: ``T`` (float64)
    rounded toward -infinity (no float32 lies strictly between ``t`` and ``T``)."""
    t64 = thresholds.to(torch.float64)
    t32 = t64.to(torch.float32)
    above = t32.to(torch.float64) > t64
    lower = torch.nextafter(t32, torch.full_like(t32, -math.inf))
    return torch.where(above, lower, t32)


def accumulate_tallies(acts: torch.Tensor, thresholds: torch.Tensor, masks: torch.Tensor,
                       image_labels: torch.Tensor, label_category: torch.Tensor,
                       tally: Tally, quads: tuple[QuadTable, QuadTable] | None = None
                       ) -> Tally:
    """Add one batch to ``tally`` (in place; returned).

    ``acts`` ``[B, K, h, w]`` float32 (one layer), ``thresholds`` ``[K]`` (float64; compared
    exactly via :func:`float32_threshold`), ``masks`` ``[B, L, sh, sw]`` int global label
    numbers (0 = unlabeled), ``image_labels`` ``[B, M]`` int whole-image labels (0 = none),
    ``label_category`` ``[NL]`` int64 (category index or -1,
    :class:`~cnnexplain.explain.dissect.labels.ConceptSpace`),
    ``quads``: the :class:`QuadTable` pair for ``(h -> sh, w -> sw)`` (built if None). Every
    tensor on one device; counts are exact int64.

    Only what can be on is upsampled: a mask pixel is a convex combination of the 2 x 2 feature
    values of its quad, so it can exceed ``T_k`` only in quads whose largest corner does. Those
    quads (about four per above-threshold feature value, i.e. ~``4 q K h w`` per image) are
    resampled with the bilinear formula ``wy0 (wx0 a00 + wx1 a01) + wy1 (wx0 a10 + wx1 a11)``
    (PyTorch's ``upsample_bilinear2d``), in blocks of :data:`MAX_BLOCK_ELEMENTS` values, which
    bounds memory; then ``O(L)`` work per pixel of a unit mask. No loop over units or concepts.
    """
    dev = acts.device
    acts = acts.to(torch.float32)
    bsz, k, h, w = acts.shape
    sh, sw = masks.shape[-2:]
    npix = sh * sw
    nl = label_category.shape[0]
    ncat = tally.activation_original.shape[1]
    qy, qx = quads if quads is not None else (QuadTable.build(h, sh, dev),
                                              QuadTable.build(w, sw, dev))
    lcat1 = label_category.to(dev, torch.int64) + 1                       # 0 = no category
    labelcat = torch.zeros(nl, ncat + 1, device=dev)
    labelcat[torch.arange(nl, device=dev), lcat1] = 1.0
    labelcat = labelcat[:, 1:]                                            # [NL, G] one-hot

    # labels: whole-image labels once per image, pixel labels as sets (_dedupe_labels)
    pix = masks.to(dev, torch.int32)
    sca = image_labels.to(dev, torch.int32).reshape(bsz, -1).clone()
    for m in range(1, sca.shape[1]):
        dup = (sca[:, m:m + 1] == sca[:, :m]).any(dim=1)
        sca[:, m] = torch.where(dup, torch.zeros_like(sca[:, m]), sca[:, m])
    if sca.numel() and int(sca.max()) >= nl:
        raise ValueError("a mask holds a label number beyond the label table")
    counts_lab = _label_counts(pix, nl)
    deduped = _dedupe_labels(pix, sca, counts_lab)
    if deduped is not None:
        pix = deduped
        counts_lab = _label_counts(pix, nl)

    # ground truth and category presence (per image)
    image_counts = counts_lab.sum(dim=1)                                  # [B, NL]
    image_counts[:, 0] = 0
    sca_counts = torch.bincount(sca.reshape(-1), minlength=nl)[:nl]
    sca_counts[0] = 0
    tally.truth += image_counts.sum(dim=0) + sca_counts * npix
    scat = torch.where(sca > 0, lcat1[sca.long()], torch.zeros_like(sca, dtype=torch.int64))
    scalar_cat = torch.zeros(bsz, ncat + 1, dtype=torch.int64, device=dev)
    scalar_cat.scatter_(1, scat, 1)
    scalar_cat = scalar_cat[:, 1:].bool()                                 # [B, G]
    present = ((image_counts > 0).float() @ labelcat > 0) | scalar_cat    # [B, G]
    tally.category_images += present.sum(dim=0)
    tally.images += bsz

    # firing (image, unit) pairs, then their quads whose largest corner exceeds T_k
    thr = float32_threshold(thresholds.to(dev))
    peak = acts.amax(dim=(2, 3))                                          # [B, K]
    pair_b, pair_k = torch.nonzero(peak > thr[None, :], as_tuple=True)
    n = pair_b.numel()
    padded = F.pad(acts[pair_b, pair_k][:, None], (0, 1, 0, 1), mode="replicate")[:, 0]
    corner_max = torch.maximum(torch.maximum(padded[:, :-1, :-1], padded[:, 1:, :-1]),
                               torch.maximum(padded[:, :-1, 1:], padded[:, 1:, 1:]))
    tile_max = corner_max[:, qy.source][:, :, qx.source]                  # [n, Vy, Vx]
    qa, qi, qj = torch.nonzero(tile_max > thr[pair_k][:, None, None], as_tuple=True)
    counts_pair = torch.zeros(n, dtype=torch.int64, device=dev)           # |M_k(x)| per pair
    touch = torch.zeros(n * (ncat + 1), dtype=torch.int64, device=dev)
    pix_rows = pix.permute(0, 2, 3, 1).reshape(bsz * npix, pix.shape[1]).long()  # [B*P, L]
    inter_flat = tally.intersection.view(-1)
    block = max(1, MAX_BLOCK_ELEMENTS // (qy.weights.shape[1] * qx.weights.shape[1]))
    for s in range(0, qa.numel(), block):
        a, vi, vj = qa[s:s + block], qi[s:s + block], qj[s:s + block]
        i, j = qy.source[vi], qx.source[vj]
        c00, c01 = padded[a, i, j], padded[a, i, j + 1]
        c10, c11 = padded[a, i + 1, j], padded[a, i + 1, j + 1]
        wy, wx = qy.weights[vi], qx.weights[vj]                           # [q, Qy, 2], [q, Qx, 2]
        wx0, wx1 = wx[:, None, :, 0], wx[:, None, :, 1]
        top = wx0 * c00[:, None, None] + wx1 * c01[:, None, None]         # [q, 1, Qx]
        bottom = wx0 * c10[:, None, None] + wx1 * c11[:, None, None]
        val = wy[:, :, 0, None] * top + wy[:, :, 1, None] * bottom        # [q, Qy, Qx]; NaN pads
        t, yl, xl = torch.nonzero(val > thr[pair_k[a]][:, None, None], as_tuple=True)
        pa = a[t]                                                         # pair of each pixel
        y = qy.start[vi[t]] + yl
        x = qx.start[vj[t]] + xl
        counts_pair += torch.bincount(pa, minlength=n)
        labs = pix_rows.index_select(0, pair_b[pa] * npix + y * sw + x)   # [nnz, L]
        kk = pair_k[pa][:, None]
        idx = torch.where(labs > 0, kk * nl + labs, torch.full_like(labs, k * nl))
        inter_flat += torch.bincount(idx.reshape(-1), minlength=k * nl + 1)[:k * nl]
        touch += torch.bincount((pa[:, None] * (ncat + 1) + lcat1[labs]).reshape(-1),
                                minlength=n * (ncat + 1))
    # Lite: does the mask touch a label of category g (a pixel label, or a whole-image label)?
    hit = touch.view(n, ncat + 1)[:, 1:] > 0
    hit |= scalar_cat[pair_b] & (counts_pair > 0)[:, None]
    tally.activation_lite.index_add_(0, pair_k, counts_pair[:, None] * hit)
    counts = torch.zeros(bsz, k, dtype=torch.int64, device=dev)
    counts[pair_b, pair_k] = counts_pair
    tally.activation += counts.sum(dim=0)
    tally.activation_original += (counts[:, :, None] * present[:, None, :]).sum(dim=0)
    # whole-image labels: |M_k & L_c| = |M_k|
    m = sca.shape[1]
    if m:
        idx = torch.arange(k, device=dev)[None, None, :] * nl + sca.long()[:, :, None]  # [B,M,K]
        src = counts[:, None, :].expand(bsz, m, k)
        valid = (sca > 0)[:, :, None].expand(bsz, m, k)
        inter_flat.index_add_(0, idx[valid], src[valid])
    return tally
