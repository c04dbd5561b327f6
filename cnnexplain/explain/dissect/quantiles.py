"""Per-unit top-quantile thresholds for Network Dissection, exact or with constant memory.

Network Dissection (Bau et al. 2017; seed ``001_67e86decce6b6927.txt`` section 7.1.2.1, seed
``000_d60c53f3ec4d0e03.txt`` "unit interpretability") thresholds every unit ``k`` at the level
``T_k`` that only the top ``q`` (default 0.005) of all its activations over the dataset exceed,
at feature resolution. The ground truth the reference code approximates with a sketch is
``np.percentile(a_k, 100 * (1 - q))`` over all images and positions
(../shared/reference/broden-and-dissection.md), i.e. numpy's default *linear* quantile:

    n = number of values of the unit, p = 1 - q
    v = (n - 1) * p                    (numpy's virtual index for method="linear")
    i0 = floor(v), g = v - i0
    T = lerp(x_(i0), x_(i0 + 1), g)    (x_(i) the i-th smallest value, 0-based)

Two ways to get it, both streaming (values arrive batch by batch) and mergeable (shards of the
data, e.g. torchrun ranks, are summarized separately and combined):

- :class:`TopCandidates` (``exact``): only ``x_(i0)`` and ``x_(i0 + 1)`` matter, and they are the
  ``m``-th and ``(m - 1)``-th largest values with ``m = n - i0`` (:func:`top_count`, about
  ``q * n + 1``). Keeping each unit's ``m`` largest values seen so far is exact, needs
  ``O(q * n)`` memory per unit, and merges by concatenation (the top ``m`` of a union are among
  the union of the parts' top ``m``). The result equals ``np.quantile(a_k, 1 - q)`` in
  float64 bit for bit (``np.percentile`` up to the rounding of ``100 * (1 - q) / 100``).
- :class:`RadixSketch` (``sketch``): constant memory (two ``[K, 4096]`` int64 histograms) and one
  extra pass. Every float32 value is mapped to its order-preserving 32-bit key
  (:func:`ordered_keys`); pass A counts values per unit by the key's top 12 bits, which
  locates the bucket holding ``x_(i0)`` exactly; pass B counts the values of that bucket by the
  next 12 bits. The target is the order statistic nearest the exact threshold,
  ``x_(j)`` with ``j = i0 + (1 if g >= 0.5 else 0)`` (:func:`sketch_rank`), and the result is
  the smallest float32 of its final 24-bit bucket ``B*``.

  **Error bound** (deterministic, tested): with ``c_k`` the exact number of unit ``k``'s values
  inside ``B*`` (reported as ``rank_error``), the binarizations ``a > T_sketch`` and ``a > T``
  differ on at most ``c_k`` of the unit's feature positions: every value between the two
  thresholds lies in ``B*`` (``T`` is within half an interpolation step of ``x_(j)``, and no
  value lies strictly between consecutive order statistics). Also ``T_sketch <= x_(j)`` and,
  since a 24-bit bucket spans at most ``2**8`` float32 ulps,
  ``x_(j) - T_sketch <= 2**-15 * |x_(j)|`` for normal floats. Histograms merge by addition,
  so distributed results are identical to one process. Values must be finite.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cnnexplain.errors import CnnexplainError

BUCKET_BITS = 12
"""Bits of the order-preserving key resolved per sketch pass (4096 buckets)."""
SKETCH_PASSES = 2
"""Passes of :class:`RadixSketch`; 2 x 12 = 24 key bits are resolved, 8 remain."""
_NBUCKETS = 1 << BUCKET_BITS
_SIGN = 1 << 31
_MASK32 = (1 << 32) - 1


# ---------------------------------------------------------------------------------------------
# The linear quantile, as numpy defines it
# ---------------------------------------------------------------------------------------------


def virtual_index(n: int, q: float) -> tuple[int, float]:
    """``(i0, g)`` of numpy's linear quantile at ``p = 1 - q`` over ``n`` values (module
    docstring): the threshold is ``x_(i0) + g * (x_(i0+1) - x_(i0))`` in ascending order."""
    if n < 1:
        raise ValueError("a quantile needs at least one value")
    p = 1.0 - float(q)
    v = min(max((n - 1) * p, 0.0), float(n - 1))
    i0 = int(math.floor(v))
    return i0, v - i0


def sketch_rank(n: int, q: float) -> int:
    """``j``: the ascending rank of the order statistic nearest the linear quantile (the one
    numpy's ``_lerp`` starts from: ``x_(i0)`` for ``g < 0.5``, ``x_(i0 + 1)`` otherwise)."""
    i0, g = virtual_index(n, q)
    return min(n - 1, i0 + (1 if g >= 0.5 else 0))


def top_count(n: int, q: float) -> int:
    """``m``: how many of the largest of ``n`` values determine the top-``q`` threshold
    (``m = n - i0``, about ``q * n + 1``)."""
    i0, _ = virtual_index(n, q)
    return n - i0


def _lerp(a: np.ndarray, b: np.ndarray, g: float) -> np.ndarray:
    """numpy's ``_lerp``: ``a + (b - a) * g``, computed from ``b`` when ``g >= 0.5``."""
    d = b - a
    return np.where(g >= 0.5, b - d * (1.0 - g), a + d * g)


def quantile_from_top(top_desc: np.ndarray, n: int, q: float) -> np.ndarray:
    """float64 ``[K]`` thresholds from each unit's largest values sorted descending
    (``top_desc`` ``[K, >= min(m, n)]``, ``m = top_count(n, q)``)."""
    i0, g = virtual_index(n, q)
    m = n - i0
    top = np.asarray(top_desc, dtype=np.float64)
    lo = top[:, m - 1]
    hi = top[:, m - 2] if m >= 2 else lo
    return _lerp(lo, hi, g)


def exact_thresholds(acts: np.ndarray | torch.Tensor, q: float) -> np.ndarray:
    """Reference: float64 ``[K]`` top-``q`` thresholds of in-memory activations ``[N, K, h, w]``
    (or ``[N, K]``) by a full sort; the same numbers :class:`TopCandidates` streams."""
    a = torch.as_tensor(acts)
    k = a.shape[1]
    flat = a.transpose(0, 1).reshape(k, -1)
    top = torch.sort(flat, dim=1, descending=True).values
    return quantile_from_top(top.double().cpu().numpy(), flat.shape[1], q)


def check_finite(values: torch.Tensor, what: str) -> None:
    """One-line error when activations hold NaN or infinity (no threshold is defined)."""
    if not bool(torch.isfinite(values).all()):
        raise CnnexplainError(f"{what} contains NaN or infinite activations, so no threshold "
                              "is defined", "check the model weights and the preprocessing "
                              "(`mean`/`std`)")


# ---------------------------------------------------------------------------------------------
# Exact: per-unit top-m candidates
# ---------------------------------------------------------------------------------------------


class TopCandidates:
    """Each unit's ``m`` largest values seen so far (exact top-quantile thresholds).

    ``update(values [K, n])`` appends a batch (any n); the buffer is cut back to the top ``m``
    (``torch.topk``) whenever it exceeds ``2 m + 8192`` values per unit, so memory is
    ``O(K * m)`` and the work per value is amortized O(log m). ``merge`` combines shards.
    """

    def __init__(self, units: int, m: int, device: torch.device | str = "cpu"):
        if m < 1:
            raise ValueError("m must be at least 1")
        self.units = int(units)
        self.m = int(m)
        self.device = torch.device(device)
        self._parts: list[torch.Tensor] = []
        self._size = 0
        self.seen = 0

    def update(self, values: torch.Tensor) -> None:
        """Add values ``[K, n]`` (float32 on any device)."""
        if values.dim() != 2 or values.shape[0] != self.units:
            raise ValueError(f"expected values [{self.units}, n], got {list(values.shape)}")
        v = values.detach().to(self.device, torch.float32)
        self._parts.append(v)
        self._size += v.shape[1]
        self.seen += v.shape[1]
        if self._size > 2 * self.m + 8192:
            self._compact()

    def _compact(self) -> None:
        if len(self._parts) == 1 and self._size <= self.m:
            return
        allv = torch.cat(self._parts, dim=1) if len(self._parts) > 1 else self._parts[0]
        keep = min(self.m, allv.shape[1])
        top = torch.topk(allv, keep, dim=1, largest=True, sorted=False).values
        self._parts = [top]
        self._size = top.shape[1]

    def candidates(self) -> torch.Tensor:
        """``[K, min(m, seen)]`` the top values, sorted descending."""
        if not self._parts:
            return torch.empty(self.units, 0, device=self.device)
        self._compact()
        return torch.sort(self._parts[0], dim=1, descending=True).values

    def merge(self, others: list[torch.Tensor]) -> None:
        """Fold in other shards' :meth:`candidates` (``[K, <= m]`` each; ``-inf`` padding is
        ignored since it never reaches the top ``m`` of a set holding ``m`` real values)."""
        for o in others:
            o = o.to(self.device, torch.float32)
            self._parts.append(o)
            self._size += o.shape[1]
        self._compact()

    def thresholds(self, n: int, q: float) -> np.ndarray:
        """float64 ``[K]``: the linear top-``q`` quantile over all ``n`` values of each unit
        (``n`` counts every shard's values)."""
        top = self.candidates()
        m = top_count(n, q)
        if top.shape[1] < m or not bool(torch.isfinite(top[:, m - 1]).all()):
            raise ValueError(f"{top.shape[1]} candidates per unit, {m} needed for n={n}")
        return quantile_from_top(top.double().cpu().numpy(), n, q)


# ---------------------------------------------------------------------------------------------
# Constant memory: a two-pass radix histogram over order-preserving float keys
# ---------------------------------------------------------------------------------------------


def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2**32) with ``a < b  <=>  key(a) < key(b)`` and ``a == b
    <=> key(a) == key(b)`` for finite values: -0.0 is first made +0.0 (``x + 0.0``), then the
    sign bit is flipped for positives and all bits for negatives."""
    v = values.to(torch.float32) + 0.0
    bits = v.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    return torch.where(bits >= _SIGN, _MASK32 - bits, bits + _SIGN)


def key_to_float(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ordered_keys` (int64 keys -> float64 values of the float32s)."""
    keys = np.asarray(keys, dtype=np.int64)
    bits = np.where(keys >= _SIGN, keys - _SIGN, _MASK32 - keys).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


class RadixSketch:
    """Constant-memory top-quantile thresholds with a deterministic error bound (module
    docstring). Use: for each pass ``p`` in ``range(SKETCH_PASSES)``: ``update(values)`` for
    every batch of the *same* data, then ``finish_pass()`` (after summing shards'
    :attr:`counts` with :meth:`merge`); then :meth:`thresholds` and :attr:`rank_error`.

    Memory: ``[K, 4096]`` int64 counts (16 MiB for 512 units), independent of the data size.
    """

    def __init__(self, units: int, n: int, q: float, device: torch.device | str = "cpu"):
        self.units = int(units)
        self.n = int(n)
        self.q = float(q)
        self.device = torch.device(device)
        self.level = 0
        self.target = sketch_rank(self.n, self.q)
        self._rank = torch.full((self.units,), self.target, dtype=torch.int64)
        self._prefix = torch.zeros(self.units, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros(self.units, _NBUCKETS, dtype=torch.int64, device=self.device)
        self.rank_error: np.ndarray | None = None
        self._unit_offset = (torch.arange(self.units, device=self.device) * _NBUCKETS)[:, None]

    @property
    def done(self) -> bool:
        return self.level >= SKETCH_PASSES

    def update(self, values: torch.Tensor) -> None:
        """Count values ``[K, n_batch]`` in this pass's histogram."""
        if self.done:
            raise RuntimeError("the sketch has finished all its passes")
        keys = ordered_keys(values.detach().to(self.device))
        shift_hi = 32 - BUCKET_BITS * self.level
        shift_lo = shift_hi - BUCKET_BITS
        bucket = (keys >> shift_lo) & (_NBUCKETS - 1)
        flat = bucket + self._unit_offset
        if self.level > 0:
            inside = (keys >> shift_hi) == self._prefix[:, None]
            flat = flat[inside]
        else:
            flat = flat.reshape(-1)
        self.counts += torch.bincount(flat.reshape(-1), minlength=self.units * _NBUCKETS
                                      ).view(self.units, _NBUCKETS)

    def merge(self, counts: torch.Tensor) -> None:
        """Add another shard's counts of the same pass (``[K, 4096]``)."""
        self.counts += counts.to(self.device)

    def finish_pass(self) -> None:
        """Descend into the bucket holding each unit's target order statistic."""
        counts = self.counts.cpu()
        cum = counts.cumsum(dim=1)
        bucket = torch.searchsorted(cum, self._rank[:, None], right=True).squeeze(1)
        if bool((bucket >= _NBUCKETS).any()):
            raise ValueError("the sketch saw fewer values than n; feed every value once per pass")
        below = torch.where(bucket > 0, cum.gather(1, (bucket - 1).clamp_min(0)[:, None])
                            .squeeze(1), torch.zeros_like(bucket))
        self._rank = self._rank - below
        inside = counts.gather(1, bucket[:, None]).squeeze(1)
        self._prefix = ((self._prefix.cpu() << BUCKET_BITS) | bucket).to(self.device)
        self.level += 1
        self.counts.zero_()
        if self.done:
            self.rank_error = inside.numpy().astype(np.int64)

    def thresholds(self) -> np.ndarray:
        """float64 ``[K]``: the smallest float32 of each unit's final bucket (``<= x_(j)``)."""
        if not self.done:
            raise RuntimeError("finish every pass before asking for thresholds")
        rest = 32 - BUCKET_BITS * SKETCH_PASSES
        return key_to_float(self._prefix.cpu().numpy() << rest)
