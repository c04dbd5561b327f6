"""MIS: the mutual-information score of seed 004 (and the CSG paper), exactly as the reference
codes compute it (../shared/reference/gated-training.md, "The MIS metric"):

    X [N, K]   pooled activations of the target layer (mean or sum over space)
    MI[c, k]   = sklearn.feature_selection.mutual_info_classif(X, y == c,
                     discrete_features=False, n_neighbors=3, random_state=0)[k]
    MIS        = mean_k max_c MI[c, k]                                  (nats)

``mutual_info_classif`` uses Ross's k-nearest-neighbour estimator of the mutual information
between a continuous and a discrete variable (B. C. Ross, PLoS ONE 9(2), 2014; sklearn's
``_compute_mi_cd``): for each sample i with label l(i) whose label occurs N_l > 1 times,
k_i = min(k, N_l - 1), d_i = distance to its k_i-th nearest neighbour among the samples with the
same label (just below it: ``nextafter(d_i, 0)``), m_i = number of samples of any (kept) label
within d_i (itself included); then

    MI = ψ(N) + <ψ(k_i)> - <ψ(N_l(i))> - <ψ(m_i)>,   clipped at 0,

over the N samples whose label occurs more than once. Before that, sklearn divides every
feature by its standard deviation (``scale(X, with_mean=False)``, constant features left
unscaled) and adds noise ``1e-10 * max(1, mean|x|) * N(0, 1)`` drawn with ``random_state``
(shape [N, K], the same draw for every class since it depends only on X).

With one-dimensional features the neighbour search reduces to sorting: this module sorts every
column once, takes each class's and its complement's sorted values with a boolean mask, finds the
k-th neighbour distance as the smallest of the k+1 windows of k+1 consecutive sorted values that
contain the point, and counts m_i as k (its own label: itself and its k-1 nearest; the k-th lies
just beyond the radius) plus the other label's values within the radius, found with two
``searchsorted`` calls; all vectorized over the K channels in float64 on any torch device. The scaling and the noise are computed with
NumPy exactly as sklearn does, so the result agrees with sklearn's to float rounding (a test
checks 0.01 nats, ties, constant features and tiny classes included).
"""

from __future__ import annotations

import numpy as np
import torch

N_NEIGHBORS = 3
RANDOM_STATE = 0


def sklearn_preprocess(features: np.ndarray, random_state: int | None = RANDOM_STATE) -> np.ndarray:
    """``X`` as ``mutual_info_classif(..., discrete_features=False)`` sees it: float64, divided by
    its per-column standard deviation (``np.nanstd``; columns with std < 10 eps left as they are)
    plus ``1e-10 * max(1, mean|X|) * standard_normal`` from ``np.random.RandomState``."""
    X = np.array(features, dtype=np.float64, copy=True)
    if X.ndim != 2:
        raise ValueError(f"features must be [N, K], got shape {list(X.shape)}")
    scale = np.nanstd(X, axis=0)
    scale[scale < 10 * np.finfo(scale.dtype).eps] = 1.0
    X /= scale
    rng = np.random.RandomState(random_state) if not isinstance(random_state, np.random.RandomState) \
        else random_state
    means = np.maximum(1, np.mean(np.abs(X), axis=0))
    X += 1e-10 * means * rng.standard_normal(size=X.shape)
    return X


def _knn_radius(sorted_vals: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each value to its ``k``-th nearest other value, for rows sorted ascending.

    ``sorted_vals`` [K, n] (n > k); returns [K, n]. The k nearest neighbours of a point in a
    sorted 1-D array are k+1 consecutive values containing it: the distance is the smallest,
    over the k+1 such windows, of the farther end of the window.
    """
    K, n = sorted_vals.shape
    inf = torch.full((K, k), float("inf"), dtype=sorted_vals.dtype, device=sorted_vals.device)
    padded = torch.cat([-inf, sorted_vals, inf], dim=1)  # position j of a row is j + k here
    best = None
    for i in range(k + 1):
        left = padded[:, k - i: k - i + n]            # value at j - i
        right = padded[:, 2 * k - i: 2 * k - i + n]   # value at j - i + k
        d = torch.maximum(sorted_vals - left, right - sorted_vals)
        best = d if best is None else torch.minimum(best, d)
    return best


def _counts_within(search: torch.Tensor, values: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Number of entries ``s`` of each sorted row of ``search`` [K, M] with ``|s - v| <= r`` for
    every ``v`` of ``values`` [K, n] and ``r`` of ``radius`` [K, n], as int64 [K, n].

    Two ``searchsorted`` calls on ``v ± r``. The rounding of ``v ± r`` could only misplace an
    entry within one rounding step of the boundary; the one entry that sits exactly there by
    construction, the k-th neighbour that defines ``r``, has the query's own label and is not
    in ``search`` (the other label's values), and after sklearn's noise no other value does.
    """
    hi = torch.searchsorted(search, values + radius, right=True)
    lo = torch.searchsorted(search, values - radius, right=False)
    return hi - lo


def mutual_information(features, labels, classes: int | None = None, *,
                       n_neighbors: int = N_NEIGHBORS, random_state: int | None = RANDOM_STATE,
                       device: torch.device | str = "cpu", preprocessed: bool = False
                       ) -> torch.Tensor:
    """``MI[c, k]`` (nats, float64 ``[C, K]`` on CPU) between every feature column and every
    one-vs-rest class indicator ``labels == c``, equal to
    ``mutual_info_classif(X, labels == c, discrete_features=False, n_neighbors=n_neighbors,
    random_state=random_state)`` for each ``c`` (see the module docstring).

    ``features``: [N, K] array or tensor; ``labels``: [N] integer class indices;
    ``classes``: number of classes (default ``max(labels) + 1``); ``device``: where the sorting
    and counting run; ``preprocessed``: the features already went through
    :func:`sklearn_preprocess` (skip it).
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    y = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    y = y.astype(np.int64).reshape(-1)
    X = np.asarray(features, dtype=np.float64) if preprocessed else \
        sklearn_preprocess(features, random_state)
    n, k_feat = X.shape
    if y.shape[0] != n:
        raise ValueError(f"{n} feature rows but {y.shape[0]} labels")
    if n_neighbors < 1:
        raise ValueError("n_neighbors must be at least 1")
    classes = int(classes if classes is not None else (int(y.max()) + 1 if n else 0))
    out = torch.zeros(classes, k_feat, dtype=torch.float64)
    if n == 0 or k_feat == 0 or classes == 0:
        return out
    dev = torch.device(device)
    xt = torch.from_numpy(np.ascontiguousarray(X.T)).to(dev)             # [K, N]
    sorted_all, order = torch.sort(xt, dim=1)
    yt = torch.from_numpy(y).to(dev)
    y_sorted = yt[order]                                                   # [K, N]
    digamma = torch.special.digamma
    table = digamma(torch.arange(n + 1, dtype=torch.float64, device=dev))  # ψ(0..N), ψ(0) = -inf

    def psi(v: float) -> float:
        return float(table[int(v)])

    for c in range(classes):
        inside = y_sorted == c
        n1 = int((y == c).sum())
        sizes = (n1, n - n1)
        # sorted values of each label group (kept only when its label occurs more than once)
        groups = [sorted_all[mask].reshape(k_feat, n_g) if n_g > 1 else None
                  for mask, n_g in ((inside, n1), (~inside, n - n1))]
        n_kept = sum(n_g for n_g, g in zip(sizes, groups) if g is not None)
        if n_kept == 0:
            continue
        psi_k = psi_label = 0.0
        psi_m = torch.zeros(k_feat, dtype=torch.float64, device=dev)
        for g_idx in (0, 1):
            vals, n_g = groups[g_idx], sizes[g_idx]
            if vals is None:
                continue
            k = min(n_neighbors, n_g - 1)
            radius = _knn_radius(vals, k)
            radius = torch.nextafter(radius, torch.zeros_like(radius))
            # m_i = points of any kept label within the radius. Of its own label exactly k lie
            # there (itself and its k-1 nearest: the k-th sits just beyond the radius), so only
            # the other label's sorted values are searched.
            other = groups[1 - g_idx]
            m = _counts_within(other, vals, radius) + k if other is not None else \
                torch.full(vals.shape, k, dtype=torch.long, device=dev)
            psi_m += table[m].sum(dim=1)
            psi_k += n_g * psi(k)
            psi_label += n_g * psi(n_g)
        mi = psi(n_kept) + psi_k / n_kept - psi_label / n_kept - psi_m / n_kept
        out[c] = mi.clamp_min(0).cpu()
    return out


def mis_from_mi(mi: torch.Tensor) -> float:
    """``MIS = mean_k max_c MI[c, k]`` (seed 004, "Evaluation Metric")."""
    if mi.numel() == 0:
        return 0.0
    return float(mi.max(dim=0).values.mean())


def mis(features, labels, classes: int | None = None, **kw) -> float:
    """MIS of pooled features ``[N, K]`` and labels ``[N]`` (see :func:`mutual_information`)."""
    return mis_from_mi(mutual_information(features, labels, classes, **kw))


def sklearn_mutual_information(features, labels, classes: int | None = None, *,
                               n_neighbors: int = N_NEIGHBORS,
                               random_state: int | None = RANDOM_STATE) -> np.ndarray:
    """The reference recipe itself (needs scikit-learn): ``MI[c] = mutual_info_classif(X,
    y == c, discrete_features=False, ...)`` for every class; ``[C, K]``. For tests and the
    benchmark only."""
    from sklearn.feature_selection import mutual_info_classif

    X = np.asarray(features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features)
    y = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    classes = int(classes if classes is not None else int(y.max()) + 1)
    return np.stack([mutual_info_classif(X, y == c, discrete_features=False,
                                         n_neighbors=n_neighbors, random_state=random_state)
                     for c in range(classes)])
