"""Concept activation vectors: the linear concept-vs-random classifier behind TCAV (Kim et al.
2018) and its exact solvers.

Sources: seed ``000_d60c53f3ec4d0e03.txt`` (section "概念激活向量测试 (TCAV)": a linear classifier
on a layer's flattened features f(x) in R^{CHW} separates a concept's images from others, its
normalized weights are the concept's vector v_k; I+ / I- count the class-c inputs whose class
probability g_c rises when v_k is added to f(x) / falls when it is subtracted) and the reference
notes ../shared/reference/tcav.md (what tensorflow/tcav and captum do).

Definitions (a = the layer's output for one input, flattened to D = K*h*w values, C order):

CAV
    A linear classifier on flattened activations: concept images (label +1) against one random
    set (label -1), the two sets truncated to the same size (the first min(n_pos, n_neg) images
    of each, as tcav does; with ``concept_subsample`` f < 1, a random f-share of the positive
    set, without replacement, instead of its first images), a stratified held-out split
    (``test_fraction`` 0.33 of each side, at least one image) drawn, and the classifier trained
    on the rest. Every draw uses a seed derived from the run seed and the two sets' content
    keys: the same sets give the same CAV whatever the order of concepts. Objective
    (scikit-learn's SGDClassifier, which tcav uses, with alpha = 0.01)::

        min_{w,b}  alpha/2 ||w||^2 + 1/n sum_i loss(y_i (w . a_i + b))
        hinge: max(0, 1 - m)        logistic: log(1 + exp(-m))

    Unlike SGD it is solved to convergence, deterministically, in torch on the run's device:
    hinge through its dual (box-constrained QP in the n training points, kernel a_i . a_j,
    projected Newton; stops at a relative duality gap <= ``tol`` or after ``max_iter``
    iterations, typically 5-30), logistic with full-batch L-BFGS (stops when the largest
    gradient entry falls below ``tol`` times its value at w = 0, or after ``max_iter``
    iterations). With hinge the intercept is the weight of a constant feature
    s = sqrt(mean ||a_i||^2), so it carries the penalty alpha b^2 / (2 s^2) (negligible;
    SGDClassifier leaves it unpenalized).
    The CAV is v = w / ||w||: unit norm, pointing TOWARD the concept (w . a + b > 0 means
    "concept"; tcav labels the concept 0 and flips sklearn's coefficient to the same effect).
Pattern CAV (``direction="pattern"``; Pahde et al. 2022, "Navigating Neural Space: Revisiting
    Concept Activation Vectors to Mitigate the Influence of Distractors", after Haufe et al.
    2014's filters and patterns)
    v = (mu_+ - mu_-) / ||mu_+ - mu_-||, the means of the training rows of each side (with
    balanced sides, the covariance of the activations with the concept label, Pahde et al.'s
    pattern, up to its scale); b = -v . (mu_+ + mu_-) / 2 (the nearest-mean classifier the
    held-out accuracy scores). A classifier's normal is a *filter*: at a layer of D >> n
    dimensions it turns to whatever separates the few training images, distractors included,
    and its directional derivatives need not follow the concept; the pattern is the signal that
    distinguishes the sets. On the quickstart's ResNet-18 (layer3, D = 16,384), for a colour the
    model uses for its class, 20 runs: the classifier's CAV scored 0.70 +- 0.39 (not
    significant) on the picnn model, the pattern 0.99 +- 0.02 (README, "TCAV").

    Held out: every image of the two sets the classifier was not trained on (the split's
    share and the images left out by subsampling or truncation) and, in :func:`run_tcav`, every
    image of the run's other random sets (random images it never saw: more held-out
    negatives); the CAV carries its confusion table there and its balanced accuracy
    (``cav_accuracy``: mean of the two sides' rates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from cnnexplain.config.tcav import CAVConfig
from cnnexplain.errors import CnnexplainError, UsageError

SOLVER_VERSION = "pnewton-dual-1/lbfgs-1"  # part of every CAV key: bump when the solvers change


@dataclass
class CAV:
    """A trained concept activation vector.

    ``vector``: float32 [D], unit norm, pointing toward the concept; ``intercept``: b / ||w||
    (so ``vector . a + intercept > 0`` classifies a as the concept); ``accuracy``: balanced
    accuracy (mean of the two sides' accuracies) on the held-out images, i.e. every image of
    the two sets (and any further random images given) the classifier was not trained on;
    ``train_accuracy``; ``n_train``: images per side trained on; ``pool``: the positive images
    the training ones were drawn from uniformly (the whole positive set when subsampled, else
    the first min(n_p, n_n));
    ``test_tp`` / ``test_fn``: held-out positives classified positive / negative;
    ``test_tn`` / ``test_fp``: held-out negatives classified negative / positive;
    ``iterations`` / ``converged``: the solver's; ``key``: its cache key (None if not cached).
    """

    vector: np.ndarray
    intercept: float
    accuracy: float
    train_accuracy: float
    n_train: int
    pool: int
    test_tp: int
    test_fn: int
    test_tn: int
    test_fp: int
    iterations: int
    converged: bool
    concept: str = ""
    negative: str = ""
    layer: str = ""
    key: str | None = None

    @property
    def train_share(self) -> float:
        """n_train / pool: the share of its pool of positive images the CAV was trained on."""
        return self.n_train / self.pool

    def info(self) -> dict:
        return {"concept": self.concept, "negative": self.negative, "layer": self.layer,
                **{f: getattr(self, f) for f in CAV_FIELDS}, "key": self.key}


CAV_TYPES: dict[str, type] = {"accuracy": float, "train_accuracy": float, "intercept": float,
                              "n_train": int, "pool": int, "test_tp": int, "test_fn": int,
                              "test_tn": int, "test_fp": int, "iterations": int,
                              "converged": bool}
CAV_FIELDS = tuple(CAV_TYPES)


def _solver_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def stratified_split(m: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions in [0, m) for ONE side of a CAV's data (both sides use it with
    their own draw): ``k = min(m - 1, max(1, round(test_fraction * m)))`` held out, drawn by
    ``np.random.default_rng(seed).permutation(m)``. Sorted int64 arrays."""
    if m < 2:
        raise CnnexplainError(f"a CAV needs at least 2 images per set, got {m}",
                              "add images to the concept and random sets")
    from cnnexplain.data.datasets import holdout

    return holdout(m, test_fraction, seed)


def _fit_hinge(x: torch.Tensor, y: torch.Tensor, alpha: float, max_iter: int, tol: float
               ) -> tuple[torch.Tensor, float, int, bool]:
    """L2-regularized hinge loss through the dual (module docstring).

    x [n, D], y [n] in {-1, +1} (solver dtype). Primal alpha/2 ||w||^2 + mean hinge is the SVM
    1/2 ||w||^2 + C sum xi with C = 1 / (n alpha); its dual is the box-constrained QP
    min_{0 <= u <= C} 1/2 u^T Q u - sum u, Q = (y y^T) * (K + s^2), K = x x^T. Solved by
    projected Newton (Bertsekas 1982): Newton steps on the variables not held at a bound,
    damped (Levenberg) when the line search along the projection arc fails, so that the step
    tends to a projected gradient step (K is singular when n exceeds its rank); stops when
    the duality gap is <= ``tol`` times the primal objective. Returns
    (w [D], b, iterations, converged) with w = x^T (u * y), b = s^2 sum(u * y)."""
    n = x.shape[0]
    c_box = 1.0 / (n * alpha)
    kernel = x @ x.T
    s2 = float(kernel.diagonal().mean().clamp_min(1e-12))
    kb = kernel + s2
    q = (y[:, None] * y[None, :]) * kb
    scale = float(q.diagonal().mean())
    mu = 1e-9 * scale  # Levenberg damping: Q_FF is singular when n exceeds the rank of K
    u = torch.zeros(n, dtype=x.dtype, device=x.device)
    converged, it = False, 0
    for it in range(1, int(max_iter) + 1):
        qu = q @ u
        grad = qu - 1.0
        quad = float(torch.dot(u, qu))
        dual = float(u.sum()) - 0.5 * quad
        margins = y * (kb @ (u * y))
        primal = 0.5 * quad + c_box * float((1.0 - margins).clamp_min(0.0).sum())
        if primal - dual <= tol * max(abs(primal), 1e-12):
            converged = True
            break
        eps = min(1e-6 * c_box, float(torch.linalg.vector_norm(u - (u - grad).clamp(0.0, c_box))))
        held = ((u <= eps) & (grad > 0)) | ((u >= c_box - eps) & (grad < 0))
        free = ~held
        f0 = 0.5 * quad - float(u.sum())
        while True:
            step = -grad.clone()
            if bool(free.any()):
                qf = q[free][:, free]
                eye = torch.eye(qf.shape[0], dtype=x.dtype, device=x.device)
                step[free] = -torch.linalg.solve(qf + mu * eye, grad[free])
            step[held] = 0.0
            new, a = None, 1.0
            while a > 1e-4:
                cand = (u + a * step).clamp(0.0, c_box)
                moved = cand - u
                f1 = 0.5 * float(torch.dot(cand, q @ cand)) - float(cand.sum())
                if float(moved.abs().max()) > 0 and f1 <= f0 + 1e-4 * float(torch.dot(grad, moved)):
                    new = cand
                    break
                a *= 0.5
            if new is not None:
                mu = max(mu / 2.0, 1e-9 * scale)
                break
            mu *= 4.0  # towards a (scaled) projected gradient step, which always descends
            if mu > 1e12 * scale:
                break
        if new is None:
            break
        u = new
    beta = u * y
    return x.T @ beta, s2 * float(beta.sum()), it, converged


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, alpha: float, max_iter: int, tol: float
                  ) -> tuple[torch.Tensor, float, int, bool]:
    """L2-regularized logistic regression (intercept unpenalized), full-batch L-BFGS.
    x [n, D], y [n] in {-1, +1}. Returns (w [D], b, iterations, converged)."""
    w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(1, dtype=x.dtype, device=x.device, requires_grad=True)

    def objective():
        margin = y * (x @ w + b)
        return torch.nn.functional.softplus(-margin).mean() + 0.5 * alpha * torch.dot(w, w)

    loss = objective()
    g0 = torch.autograd.grad(loss, [w, b])
    gmax0 = max(float(g.abs().max()) for g in g0)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(max_iter), history_size=20,
                            tolerance_grad=tol * max(gmax0, 1e-12), tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)
    state = opt.state[opt._params[0]]
    iters = int(state.get("n_iter", 0))
    gmax = max(float(p.grad.abs().max()) for p in (w, b))
    return w.detach(), float(b.detach()), iters, gmax <= tol * max(gmax0, 1e-12)


def _fit_pattern(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.0, max_iter: int = 0,
                 tol: float = 0.0) -> tuple[torch.Tensor, float, int, bool]:
    """Pattern CAV (module docstring): x [n, D], y [n] in {-1, +1} -> (w = mu_+ - mu_- [D],
    b = -w . (mu_+ + mu_-) / 2, 0 iterations, converged). The classifier's hyper-parameters
    are accepted and unused."""
    mu_p, mu_n = x[y > 0].mean(0), x[y < 0].mean(0)
    w = mu_p - mu_n
    return w, -0.5 * float(torch.dot(w, mu_p + mu_n)), 0, True


SOLVERS: dict[str, Callable] = {"hinge": _fit_hinge, "logistic": _fit_logistic}
"""The classifier's solvers, by ``CAVConfig.loss``."""


def cav_solver(config: CAVConfig) -> Callable:
    """The fit of ``config``: the pattern, or the classifier solver of its loss."""
    return _fit_pattern if config.direction == "pattern" else SOLVERS[config.loss]


def subsample_size(n: int, subsample: float) -> int:
    """Positive images a subsampled CAV draws from a set of ``n``: ``round(subsample * n)``,
    clipped to [2, n - 1] (at least two to split, at least one left out so that runs differ).
    CnnexplainError when ``n < 3``."""
    if n < 3:
        raise CnnexplainError(f"a concept set of {n} images is too small to train each CAV on "
                              "a random share of it", "add images to the concept folder (at "
                              "least 3; 20 or more for a meaningful test)")
    return int(min(n - 1, max(2, round(float(subsample) * n))))


def _flat_rows(x):
    """Activations [n, ...] as [n, D] without a copy: a tensor stays a tensor, anything else
    becomes a NumPy array (whose rows NumPy gathers faster than torch for a few dozen)."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


def _take(x, rows: np.ndarray) -> torch.Tensor:
    """Rows ``rows`` of ``x`` [n, D] (array or tensor) as a tensor."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(rows).to(x.device)]
    return torch.from_numpy(np.ascontiguousarray(x[rows]))


def _not_finite() -> CnnexplainError:
    return CnnexplainError("the layer's activations hold NaN or inf values, so no CAV can be "
                           "trained", "check the model and its preprocessing (`mean`/`std`)")


def _says_concept(x, w: torch.Tensor, b: float) -> np.ndarray:
    """bool [n]: ``x [n, D] . w + b > 0`` (x an array or tensor), decided as in w's (solver)
    dtype without copying x to it: the scores are computed in x's dtype where it is narrower, and the rows whose score
    lies within the worst-case rounding error of that product (Higham 2002, thm 3.5:
    |error| <= (D + 2) u ||x|| ||w||, u the unit roundoff, doubled for the norms' own rounding)
    of the boundary, or is not finite, are recomputed in w's dtype. CnnexplainError when a row
    holds NaN or inf (its score is then not finite: 0 * inf is NaN)."""
    x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).to(w.device)
    if not x.dtype.is_floating_point or torch.finfo(x.dtype).eps <= torch.finfo(w.dtype).eps:
        s = x.to(w.dtype) @ w + b
    else:
        s = (x @ w.to(x.dtype)).to(w.dtype) + b
        u = torch.finfo(x.dtype).eps / 2
        bound = 2.0 * (x.shape[1] + 2) * u * float(torch.linalg.vector_norm(w)) * \
            torch.linalg.vector_norm(x, dim=1).to(w.dtype)
        unsure = ~torch.isfinite(s) | ~torch.isfinite(bound) | (s.abs() <= bound)
        if bool(unsure.any()):
            s[unsure] = x[unsure].to(w.dtype) @ w + b
    if not bool(torch.isfinite(s).all()):
        raise _not_finite()
    return (s > 0).cpu().numpy()


def train_cav(positive, negative, config: CAVConfig = CAVConfig(), seed: int = 0,
              device: torch.device | str = "cpu", subsample: float = 1.0,
              extra_negatives: Sequence = ()) -> CAV:
    """Train one CAV: ``positive`` [n_p, ...] concept activations against ``negative`` [n_n,
    ...] random-set activations (arrays or tensors, flattened per row), per the module
    docstring, with everything random drawn from ``seed``:

    - ``subsample`` < 1: m = min(:func:`subsample_size` (n_p, subsample), n_n) positive rows
      drawn uniformly without replacement (so each run of a concept sees another share of
      it); 1: the first m = min(n_p, n_n) rows (tcav's equal-size truncation). The negatives
      are the first m rows;
    - a stratified held-out split of the m rows of each side (:func:`stratified_split`);
    - the ``config.direction`` fit (the pattern, or the ``config.loss`` classifier) on the
      training rows on ``device``; v = w / ||w|| toward the
      concept;
    - held-out: every row of either set not trained on (the split's share, and the rows left
      out by subsampling or truncation) and every row of ``extra_negatives`` (arrays [n_i,
      ...] of further random images, never trained on: more held-out negatives), whose
      confusion counts and balanced accuracy the CAV carries (for
      :func:`cnnexplain.metrics.stats.fisher_exact_greater`)."""
    config.validate()
    if not 0.0 < float(subsample) <= 1.0:
        raise UsageError(f"the concept subsample must be in (0, 1], got {subsample}",
                         "pass e.g. `concept_subsample` 0.5")
    device = torch.device(device)
    dtype = _solver_dtype(device)
    pos, neg = _flat_rows(positive), _flat_rows(negative)
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"activation widths differ: {pos.shape[1]} vs {neg.shape[1]}")
    n_p, n_n = int(pos.shape[0]), int(neg.shape[0])
    # children 0 and 1 seed the two sides' splits (as before subsampling existed), 2 the draw
    ss = np.random.SeedSequence(int(seed) & (2 ** 63 - 1)).spawn(3)
    if float(subsample) < 1.0:
        m = min(subsample_size(n_p, subsample), n_n)
        rows_p = np.sort(np.random.default_rng(ss[2]).choice(n_p, size=m, replace=False))
        pool = n_p
    else:
        m = min(n_p, n_n)
        rows_p = np.arange(m)
        pool = m
    tr_p, _ = stratified_split(m, config.test_fraction, int(ss[0].generate_state(1)[0]))
    tr_n, _ = stratified_split(m, config.test_fraction, int(ss[1].generate_state(1)[0]))
    train_p = rows_p[tr_p]
    test_p = np.setdiff1d(np.arange(n_p), train_p)
    test_n = np.setdiff1d(np.arange(n_n), tr_n)
    # only the training rows are copied to the solver's dtype; held-out rows are classified
    # where they lie (:func:`_says_concept`)
    x_train = torch.cat([_take(pos, train_p), _take(neg, tr_n)]).to(device=device, dtype=dtype)
    if not math.isfinite(float(x_train.sum())):  # a NaN or inf anywhere makes the sum so
        raise _not_finite()
    y_train = torch.cat([torch.ones(len(train_p), dtype=dtype, device=device),
                         -torch.ones(len(tr_n), dtype=dtype, device=device)])
    w, b, iters, converged = cav_solver(config)(x_train, y_train, float(config.alpha),
                                                  int(config.max_iter), float(config.tol))
    norm = float(torch.linalg.vector_norm(w))
    if not math.isfinite(norm) or norm <= 0.0:
        raise CnnexplainError("the CAV classifier found no direction (the concept and random "
                              "images give indistinguishable activations at this layer)",
                              "use other concept images or another `layer`")

    tp = int(_says_concept(_take(pos, test_p), w, b).sum())
    fp = int(_says_concept(_take(neg, test_n), w, b).sum())
    n_neg_test = len(test_n)
    for extra in extra_negatives:
        x = _flat_rows(extra)
        if x.shape[0] == 0:
            continue
        if x.shape[1] != pos.shape[1]:
            raise ValueError(f"activation widths differ: {x.shape[1]} vs {pos.shape[1]}")
        fp += int(_says_concept(x, w, b).sum())
        n_neg_test += int(x.shape[0])
    fn, tn = len(test_p) - tp, n_neg_test - fp
    rates = [tp / len(test_p)] if len(test_p) else []
    rates += [tn / n_neg_test] if n_neg_test else []
    train_pred = (x_train @ w + b > 0).cpu().numpy()
    return CAV(vector=(w / norm).float().cpu().numpy(), intercept=b / norm,
               accuracy=float(np.mean(rates)),
               train_accuracy=float((train_pred == (y_train > 0).cpu().numpy()).mean()),
               n_train=len(train_p), pool=pool, test_tp=tp, test_fn=fn, test_tn=tn,
               test_fp=fp, iterations=iters, converged=converged)
