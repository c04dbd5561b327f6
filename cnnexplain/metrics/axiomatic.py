"""Axiomatic properties of saliency maps: completeness (conservation).

- Completeness (Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks", ICML 2017;
  Shrikumar, Greenside, Kundaje, ICML 2017 "summation-to-delta"; Quantus ``Completeness``): the
  map should sum to the change of the target logit between the input and a reference,
  ``sum(a) = f(x) - f_ref``. :func:`completeness` returns the relative and absolute errors;
  :func:`is_complete` turns them into a bool with a tolerance.

The reference ``f_ref`` is explicit:
- ``reference="baseline"``: ``f_ref = f(x_baseline)`` for the given ``baseline_images`` (Integrated
  Gradients, DeepLIFT: ``sum a = f(x) - f(x')``).
- ``reference="zero"``: ``f_ref = 0``, the identity of the LRP family, which conserves the
  logit itself (``sum a = f(x)``, up to the relevance absorbed by biases and stabilisers).
- a tensor / array ``[N]`` of reference outputs.

Differences from Quantus 0.6.0 (``axiomatic/completeness.py``): Quantus returns
``sum(a) == f(x) - f(x_b)``, an exact float equality that is almost always False, and its
``x_b`` sets only the *first* ``H*W`` flattened input elements (channel 0 of a ``[C, H, W]``
image, for a per-pixel map) to the baseline, with baseline "black" = ``min(x)``; here the whole
``baseline_images`` ``[N, 3, H, W]`` is the reference input, and :func:`is_complete` compares
with a tolerance (``rtol=0, atol=0`` is Quantus's exact test, evaluated in float64 rather than
Quantus's float32). Quantus normalises the map first (``normalise=True`` default), which alone
breaks the identity; here maps are used as given, and should be *raw*.
"""

from __future__ import annotations

import numpy as np
import torch

from cnnexplain.metrics.faithfulness import ScoreFn


def _scores(score: ScoreFn, images: torch.Tensor, targets: torch.Tensor,
            batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            sl = slice(start, min(images.shape[0], start + batch_size))
            out.append(score(images[sl], targets[sl]).detach().to(torch.float64).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def completeness(score: ScoreFn, images: torch.Tensor, maps, targets: torch.Tensor,
                 baseline_images: torch.Tensor | None = None, reference="baseline",
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(relative_error [N], absolute_error [N])`` float64 with
    ``absolute = |sum(a) - (f(x) - f_ref)|`` and ``relative = absolute / |f(x) - f_ref|`` (NaN
    where ``f(x) = f_ref``). ``score`` is the target *logit* (``faithfulness.logit_score``);
    ``reference``: ``"baseline"`` (``f_ref = score(baseline_images)``), ``"zero"`` (``f_ref = 0``,
    LRP's conservation) or reference outputs ``[N]``. See the module docstring."""
    fx = _scores(score, images, targets, batch_size)
    n = fx.shape[0]
    if isinstance(reference, str):
        if reference == "baseline":
            if baseline_images is None:
                raise ValueError('reference="baseline" needs baseline_images')
            ref = _scores(score, baseline_images.to(images), targets, batch_size)
        elif reference == "zero":
            ref = torch.zeros(n, dtype=torch.float64)
        else:
            raise ValueError(f'reference must be "baseline", "zero" or outputs [N], got {reference!r}')
    else:
        ref = torch.as_tensor(np.asarray(reference.detach().cpu() if isinstance(reference, torch.Tensor)
                                         else reference, dtype=np.float64)).reshape(n)
    a = maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps
    total = np.asarray(a, dtype=np.float64).reshape(n, -1).sum(axis=1)
    delta = (fx - ref).numpy()
    absolute = np.abs(total - delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(delta != 0, absolute / np.abs(np.where(delta != 0, delta, 1.0)), np.nan)
    return relative, absolute


def is_complete(relative_error, absolute_error, rtol: float = 1e-3, atol: float = 0.0) -> np.ndarray:
    """bool ``[N]``: ``absolute <= atol`` or ``relative <= rtol`` (NaN relative errors count as
    not complete unless ``absolute <= atol``). ``rtol = atol = 0`` is Quantus's exact equality."""
    rel = np.asarray(relative_error, dtype=np.float64)
    ab = np.asarray(absolute_error, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (ab <= atol) | (rel <= rtol)
