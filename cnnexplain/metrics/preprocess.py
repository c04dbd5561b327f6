"""Preprocessing of saliency maps before a metric: per-sample normalisation and absolute value.

- :func:`prepare`: divide each map by its maximum absolute value, then take ``abs``; the order
  Quantus 0.6.0 uses (``normalise_func`` first, then ``np.abs``; ``metrics/base.py``).
- :func:`prepared`: wrap an explanation function so that its maps get the same preprocessing
  (metrics that re-explain perturbed inputs must treat the new maps like the given ones).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def prepare(maps, normalise: bool, absolute: bool):
    """``maps`` ``[N, ...]`` (torch or numpy; the same type and dtype come back), each sample
    divided by its own ``max |a|`` when ``normalise``, then ``|a|`` when ``absolute``.

    Deviation from Quantus: Quantus's default ``normalise_by_max`` divides by the maximum over
    the *whole batch*, so a sample's map depends on the others and on ``batch_size``; this is
    Quantus with ``normalise_func_kwargs={"normalise_axes": [1, 2, 3]}``. A map that is all
    zero is returned unchanged (Quantus per-sample would give 0/0 = NaN; batch-wide it skips
    only an all-zero batch)."""
    if isinstance(maps, torch.Tensor):
        out = maps
        if normalise:
            n = out.shape[0]
            top = out.reshape(n, -1).abs().amax(dim=1) if out.numel() else out.new_ones(n)
            top = torch.where(top == 0, torch.ones_like(top), top)
            out = out / top.view(n, *([1] * (out.dim() - 1)))
        return out.abs() if absolute else out
    out = np.asarray(maps)
    if normalise:
        n = out.shape[0]
        top = np.abs(out.reshape(n, -1)).max(axis=1) if out.size else np.ones(n, out.dtype)
        top = np.where(top == 0, np.ones_like(top), top)
        out = out / top.reshape(n, *([1] * (out.ndim - 1)))
    return np.abs(out) if absolute else out


def prepared(explain: Callable, normalise: bool, absolute: bool) -> Callable:
    """``explain(x, t) -> maps`` followed by :func:`prepare` (``normalise``, ``absolute``)."""
    if not normalise and not absolute:
        return explain

    def wrapped(x, t):
        return prepare(explain(x, t), normalise, absolute)
    return wrapped
