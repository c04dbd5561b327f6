"""TCAV: Testing with Concept Activation Vectors (Kim et al. 2018), with seed 000's
interventional scores and the significance test that makes a score meaningful.

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
    Held out: every image of the two sets the classifier was not trained on (the split's
    share and the images left out by subsampling or truncation) and, in :func:`run_tcav`, every
    image of the run's other random sets (random images it never saw: more held-out
    negatives); the CAV carries its confusion table there and its balanced accuracy
    (``cav_accuracy``: mean of the two sides' rates).

Sensitivity and scores (per CAV, over the class-c inputs X_c)
    S(x) = grad_a logit_c(tail(a(x))) . v -- the directional derivative of the class logit
    along the CAV (``layers.split_at``: the model cut at the layer; skip inputs of a ResNet
    block held fixed). tcav differentiates the loss and counts S < 0: the same thing.
    sign count  TCAV_Q = mean_x 1{S(x) > 0}
    magnitude   = sum_x |S(x)| 1{S(x) > 0} / sum_x |S(x)|  (captum's ``magnitude``: the share of
                the total sensitivity mass that is positive, in [0, 1]; 0 when every S is 0).
                The mean of S is also reported, as ``sensitivity_mean``.
    I+          = mean_x 1{p_c(tail(a + eps v)) > p_c(tail(a))}   (seed 000)
    I-          = mean_x 1{p_c(tail(a - eps v)) < p_c(tail(a))}
                p_c = softmax of the logits, compared as float64 log-probabilities (strict: an
                unchanged probability counts for neither). ``step_units="absolute"``: eps =
                ``step`` (default 1.0: seed 000 adds the unit CAV itself); ``"norm"``: eps =
                ``step * ||a(x)||`` per input (a step relative to the activation's size).

Statistics (per concept, class and layer)
    Runs. N = ``random_runs``; random sets random_0 .. random_N. Run k (1..N) trains every
    concept against random_k, and a baseline CAV of random_{k-1} (a pseudo-concept) against
    random_k. Each CAV is trained on its own random two thirds of its positive images (the
    held-out split; with ``concept_subsample`` f < 1, two thirds of a random f-share). The
    baseline gives the random reference of the chart (``random_score_mean`` / ``_std``); the
    tests below do not need it.

    Why not the references' test. tcav runs a two-sample t-test of the concept's N sign counts
    against N random-vs-random ones (random_0 against random_1 .. random_N). But the N concept
    runs reuse the same concept images and the N baseline runs reuse random_0: each group
    carries one "which images were picked" error that averaging over runs does not reduce,
    while the t-test divides the runs' variance by N -- so it is optimistic, and more so the
    more runs are made. Measured on the synthetic world (a smallcnn trained on stars and
    circles, ``features.10``, 80 images per set, 10 runs): random sets used as concepts came out
    significant at p < 0.05 in 64 of 200 trials, at p < 0.005 in 34.

    Score test (``p_value``; :func:`cnnexplain.metrics.stats.subsample_ttest`). H0: along the
    concept's direction the class responds as along a random direction. Swapping two
    exchangeable image sets negates the CAV (both solvers are symmetric in the labels, and the
    seeded draws are as random either way), so a random direction is as likely to point one
    way as the other and the expected sign count
    is ``null_score`` = (inputs with a nonzero gradient) / (2 * inputs), 0.5 in practice -- a
    known centre, so the test needs no noisy estimate of it from random runs. The runs' sign
    counts, k_r inputs with S > 0 out of the n inputs with a nonzero gradient, are put on the
    probit scale z_r = Phi^-1((k_r + 1/2) / (n + 1)) (null: 0;
    :func:`~cnnexplain.metrics.stats.probit_sign_counts` says why), and::

        t = mean(z) / sqrt(s_z^2 (r / (1 - r) + 1/N)),   df = N - 1,   two-sided

    with s_z^2 the runs' sample variance and r = n_train / pool (``train_share``) the share of
    the concept's images each CAV is trained on: 0.67 by default (the split), 0.67 f with
    subsampling. Because the runs are trained on different random shares of the concept set,
    their spread shows how much the score depends on which images were picked, and r / (1 - r)
    scales it up to the variance of the set's score over sets of the concept (the logic of
    half-sampling, McCarthy 1969: with r = 1/2 the factor is 1). The references' t-test has,
    in effect, no such term (only 1/N); with r = 0.67 the term is about 2, so that ten runs of
    one set weigh about as much as one set -- which they are. No s_z^2 below the variance of
    rounding one count (:func:`~cnnexplain.metrics.stats.probit_count_step`) is used, so that
    runs agreeing to the count do not give an infinite t.

    CAV test (``cav_p_value``; :func:`cnnexplain.metrics.stats.fisher_exact_greater`). H0: at
    the layer the concept's images are distributed like random images. Each run's CAV is
    applied to every held-out image (the concept's and its random set's that it was not
    trained on, and all of random_0 .. random_N but its own), and its confusion table gets a
    one-sided Fisher exact test -- exact, since the classifier never saw those images, and
    the many random negatives make it far more sensitive than the split's third alone. The
    runs' held-out predictions are not pooled (they would count the same concept images
    several times, the dependence problem again); their N p-values are merged into twice their
    median (:func:`~cnnexplain.metrics.stats.twice_median`), which is valid however they
    depend on each other and, unlike one run's p-value, does not hang on one lucky or unlucky
    split.

    Decision. Both p-values are multiplied by the number of rows (concepts x classes x layers,
    capped at 1) unless ``bonferroni`` is off; ``significant`` when both are below ``alpha``
    (0.05). Requiring both is an intersection-union test (Berger 1982, Technometrics 24(4)):
    "the concept is absent from the layer, or present without effect on the class" is
    rejected at level alpha, with no correction for using two tests. ``score_std`` etc. are
    population standard deviations over the runs (np.std, as tcav reports them).

    What the score test still assumes: the concept images are a random sample of the concept
    as collected (it generalizes over image sets drawn the same way, not over other ways of
    collecting them), and the concept folder shares the random folders' class mix (a concept
    folder full of one class has a CAV that points at that class: a real, but different,
    effect -- ``cnnexplain data synth --format concepts`` balances classes); the runs' random
    sets and draws are independent; the additive picture behind r / (1 - r) (a CAV depends
    on its training images about linearly, through their average); probit scores about
    normal, for Student's t with N - 1 df. Measured on the synthetic world, it errs on the safe
    side: the score test alone rejected 0 of those 200 random sets at p < 0.05, and with
    class-balanced exports no object material (unrelated to every class) came out significant
    in 225 tests (4 settings: two and three classes, 40 to 80 images per set, 10 and 20 runs,
    5 exports each), where the references' test called 2 to 9 significant per setting. The
    price is power with small sets: a colour planted in 95% of the stars is significant in 5
    of 5 exports at 80 images x 10 runs, 3 of 5 at 60 x 20.

Caching (:mod:`cnnexplain.cache`; the references key by concept name and layer only and serve
stale results, tcav.md): activations per (model weights, layer, image-set content, preprocessing)
through :func:`cnnexplain.activations.compute_activations`; CAVs (kind ``cav``) by the two
activation keys, the hyper-parameters, the subsample share and the CAV seed; class-logit
gradients (kind ``features``) by the class inputs' activation key, the class and the label
filter; the scores and CAV info of every CAV for one (layer, class) (kind ``tcav``) by the
gradient key, the CAV keys and the step. A changed image, weight or option changes the key, so
nothing stale is ever served. Keys are computed from fingerprints before anything is read, so a
warm run opens one score entry per (layer, class) and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset

from cnnexplain.activations import KIND as ACTIVATIONS
from cnnexplain.activations import activation_parts, compute_activations
from cnnexplain.cache import Cache
from cnnexplain.data.base import ImageDataset, make_loader
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError, close_matches
from cnnexplain.fingerprint import array_digest, digest_parts
from cnnexplain.metrics.stats import (
    TTest, bonferroni, fisher_exact_greater, probit_count_step, probit_sign_counts,
    subsample_ttest, twice_median)
from cnnexplain.models.layers import Split, get_module, split_at
from cnnexplain.progress import silent

LOSSES = ("hinge", "logistic")
STEP_UNITS = ("absolute", "norm")
SOLVER_VERSION = "pnewton-dual-1/lbfgs-1"  # part of every CAV key: bump when the solvers change
ProgressLike = Callable[..., ContextManager]

# ---------------------------------------------------------------------------------------------
# CAV training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CAVConfig:
    """Hyper-parameters of the CAV classifier (module docstring). Defaults are tcav's:
    SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3), hinge loss, 0.33 held out."""

    loss: str = "hinge"
    alpha: float = 0.01
    max_iter: int = 1000
    tol: float = 1e-3
    test_fraction: float = 0.33

    def validate(self) -> "CAVConfig":
        if self.loss not in LOSSES:
            raise UsageError(f"unknown CAV loss {self.loss!r}{close_matches(self.loss, LOSSES)}",
                             "pass --cav-loss hinge or logistic")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise UsageError(f"--cav-alpha must be a positive number, got {self.alpha}",
                             "pass e.g. --cav-alpha 0.01 (tcav's default)")
        if int(self.max_iter) < 1:
            raise UsageError(f"--cav-max-iter must be at least 1, got {self.max_iter}",
                             "pass e.g. --cav-max-iter 1000")
        if not (self.tol > 0 and math.isfinite(self.tol)):
            raise UsageError(f"--cav-tol must be a positive number, got {self.tol}",
                             "pass e.g. --cav-tol 1e-3")
        if not 0.0 < self.test_fraction < 1.0:
            raise UsageError(f"the CAV test fraction must be in (0, 1), got {self.test_fraction}",
                             "pass e.g. 0.33 (tcav's held-out share)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


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


def _solver_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def stratified_split(m: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions in [0, m) for ONE side of a CAV's data (both sides use it with
    their own draw): ``k = min(m - 1, max(1, round(test_fraction * m)))`` held out, drawn by
    ``np.random.default_rng(seed).permutation(m)``. Sorted int64 arrays."""
    if m < 2:
        raise CnnexplainError(f"a CAV needs at least 2 images per set, got {m}",
                              "add images to the concept and random sets")
    perm = np.random.default_rng(seed).permutation(m)
    k = min(m - 1, max(1, int(round(test_fraction * m))))
    return np.sort(perm[k:]), np.sort(perm[:k])


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


SOLVERS: dict[str, Callable] = {"hinge": _fit_hinge, "logistic": _fit_logistic}


def subsample_size(n: int, subsample: float) -> int:
    """Positive images a subsampled CAV draws from a set of ``n``: ``round(subsample * n)``,
    clipped to [2, n - 1] (at least two to split, at least one left out so that runs differ).
    CnnexplainError when ``n < 3``."""
    if n < 3:
        raise CnnexplainError(f"a concept set of {n} images is too small to train each CAV on "
                              "a random share of it", "add images to the concept folder (at "
                              "least 3; 20 or more for a meaningful test)")
    return int(min(n - 1, max(2, round(float(subsample) * n))))


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
    - the ``config.loss`` solver on the training rows on ``device``; v = w / ||w|| toward the
      concept;
    - held-out: every row of either set not trained on (the split's share, and the rows left
      out by subsampling or truncation) and every row of ``extra_negatives`` (arrays [n_i,
      ...] of further random images, never trained on: more held-out negatives), whose
      confusion counts and balanced accuracy the CAV carries (for
      :func:`cnnexplain.metrics.stats.fisher_exact_greater`)."""
    config.validate()
    if not 0.0 < float(subsample) <= 1.0:
        raise UsageError(f"the concept subsample must be in (0, 1], got {subsample}",
                         "pass e.g. --concept-subsample 0.5")
    device = torch.device(device)
    dtype = _solver_dtype(device)
    pos = torch.as_tensor(np.asarray(positive) if not isinstance(positive, torch.Tensor)
                          else positive)
    neg = torch.as_tensor(np.asarray(negative) if not isinstance(negative, torch.Tensor)
                          else negative)
    pos = pos.reshape(pos.shape[0], -1)
    neg = neg.reshape(neg.shape[0], -1)
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
    pos = pos.to(device=device, dtype=dtype)
    neg = neg.to(device=device, dtype=dtype)
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise CnnexplainError("the layer's activations hold NaN or inf values, so no CAV can be "
                              "trained", "check the model and its preprocessing (--mean/--std)")

    def rows(x, r):
        return x[torch.from_numpy(r).to(device)]

    x_train = torch.cat([rows(pos, train_p), rows(neg, tr_n)])
    y_train = torch.cat([torch.ones(len(train_p), dtype=dtype, device=device),
                         -torch.ones(len(tr_n), dtype=dtype, device=device)])
    w, b, iters, converged = SOLVERS[config.loss](x_train, y_train, float(config.alpha),
                                                  int(config.max_iter), float(config.tol))
    norm = float(torch.linalg.vector_norm(w))
    if not math.isfinite(norm) or norm <= 0.0:
        raise CnnexplainError("the CAV classifier found no direction (the concept and random "
                              "images give indistinguishable activations at this layer)",
                              "use other concept images or another --layer")

    def says_concept(x) -> np.ndarray:
        return (x @ w + b > 0).cpu().numpy()

    tp = int(says_concept(rows(pos, test_p)).sum())
    fp = int(says_concept(rows(neg, test_n)).sum())
    n_neg_test = len(test_n)
    for extra in extra_negatives:
        x = torch.as_tensor(np.asarray(extra) if not isinstance(extra, torch.Tensor) else extra)
        if x.shape[0] == 0:
            continue
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != pos.shape[1]:
            raise ValueError(f"activation widths differ: {x.shape[1]} vs {pos.shape[1]}")
        fp += int(says_concept(x.to(device=device, dtype=dtype)).sum())
        n_neg_test += int(x.shape[0])
    fn, tn = len(test_p) - tp, n_neg_test - fp
    rates = [tp / len(test_p)] if len(test_p) else []
    rates += [tn / n_neg_test] if n_neg_test else []
    train_pred = says_concept(x_train)
    return CAV(vector=(w / norm).float().cpu().numpy(), intercept=b / norm,
               accuracy=float(np.mean(rates)),
               train_accuracy=float((train_pred == (y_train > 0).cpu().numpy()).mean()),
               n_train=len(train_p), pool=pool, test_tp=tp, test_fn=fn, test_tn=tn,
               test_fp=fp, iterations=iters, converged=converged)


# ---------------------------------------------------------------------------------------------
# Sensitivities and scores
# ---------------------------------------------------------------------------------------------


def logit_gradients(tail: nn.Module, acts: torch.Tensor, extras: Sequence[torch.Tensor],
                    class_index: int, batch_size: int = 64) -> torch.Tensor:
    """d logit_c / d a for each input: acts [n, *layer_shape] (and the tail's extra inputs, each
    [n, ...]) -> float32 [n, D] on the CPU, D = prod(layer_shape). Computed in batches on the
    device of ``acts``."""
    out = []
    for s in range(0, acts.shape[0], batch_size):
        a = acts[s:s + batch_size].detach().clone().requires_grad_(True)
        ex = [e[s:s + batch_size].clone() for e in extras]
        with torch.enable_grad():
            logits = tail(a.clone(), *ex)  # clone: the tail may start with an in-place op
            _check_class(class_index, logits)
            (grad,) = torch.autograd.grad(logits[:, class_index].sum(), a)
        out.append(grad.reshape(grad.shape[0], -1).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, int(np.prod(acts.shape[1:]))))


def _check_class(class_index: int, logits: torch.Tensor) -> None:
    if not 0 <= class_index < logits.shape[1]:
        raise UsageError(f"target class {class_index} is out of range: the model has "
                         f"{logits.shape[1]} classes", f"pass --target 0..{logits.shape[1] - 1}")


def directional_derivatives(grads, vector) -> np.ndarray:
    """S = grads [n, D] . vector [D] -> float64 [n] (the sensitivity of each input)."""
    g = torch.as_tensor(grads).to(torch.float64)
    v = torch.as_tensor(np.asarray(vector)).to(torch.float64).reshape(-1)
    return (g.reshape(g.shape[0], -1) @ v).numpy()


def sign_count(sensitivities) -> float:
    """TCAV_Q: the fraction of inputs with S > 0 (strict)."""
    s = np.asarray(sensitivities, dtype=np.float64)
    return float((s > 0).mean()) if s.size else float("nan")


def magnitude(sensitivities) -> float:
    """captum's magnitude score: sum |S| 1{S > 0} / sum |S| (0 when every S is 0)."""
    s = np.asarray(sensitivities, dtype=np.float64)
    total = float(np.abs(s).sum())
    return float(s[s > 0].sum() / total) if total > 0 else 0.0


def class_log_probs(tail: nn.Module, acts: torch.Tensor, extras: Sequence[torch.Tensor],
                    class_index: int, batch_size: int = 64) -> torch.Tensor:
    """log p_c(tail(a)) as float64 [n] on the CPU (log-softmax of the float32 logits in float64,
    so that probabilities near 1 still compare)."""
    out = []
    with torch.no_grad():
        for s in range(0, acts.shape[0], batch_size):
            logits = tail(acts[s:s + batch_size].clone(), *[e[s:s + batch_size].clone()
                                                             for e in extras])
            _check_class(class_index, logits)
            out.append(torch.log_softmax(logits.double(), dim=1)[:, class_index].cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def interventional_scores(tail: nn.Module, acts: torch.Tensor, extras: Sequence[torch.Tensor],
                          vector, class_index: int, step: float = 1.0,
                          step_units: str = "absolute", base: torch.Tensor | None = None,
                          batch_size: int = 64) -> tuple[float, float]:
    """Seed 000's (I+, I-) for one CAV: the fractions of inputs whose class probability rises
    when eps v is added to the layer activation, and falls when it is subtracted (module
    docstring; eps = ``step``, or ``step * ||a||`` per input with ``step_units="norm"``).
    acts [n, *layer_shape]; vector [D]; ``base``: precomputed :func:`class_log_probs`."""
    if step_units not in STEP_UNITS:
        raise UsageError(f"unknown --step-units {step_units!r}", "pass absolute or norm")
    v = torch.as_tensor(np.asarray(vector), dtype=acts.dtype, device=acts.device)
    v = v.reshape(acts.shape[1:])
    if base is None:
        base = class_log_probs(tail, acts, extras, class_index, batch_size)
    if acts.shape[0] == 0:
        return float("nan"), float("nan")
    plus, minus = [], []
    with torch.no_grad():
        for s in range(0, acts.shape[0], batch_size):
            a = acts[s:s + batch_size]
            ex = [e[s:s + batch_size] for e in extras]
            eps = torch.full((a.shape[0],), float(step), dtype=a.dtype, device=a.device)
            if step_units == "norm":
                eps = eps * torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1)
            delta = eps.view(-1, *([1] * (a.dim() - 1))) * v
            plus.append(torch.log_softmax(tail(a + delta, *[e.clone() for e in ex]).double(),
                                          1)[:, class_index].cpu())
            minus.append(torch.log_softmax(tail(a - delta, *[e.clone() for e in ex]).double(),
                                           1)[:, class_index].cpu())
    up = torch.cat(plus) > base
    down = torch.cat(minus) < base
    return float(up.double().mean()), float(down.double().mean())


# ---------------------------------------------------------------------------------------------
# Image sets
# ---------------------------------------------------------------------------------------------


class SubsetDataset(ImageDataset):
    """Rows ``indices`` of another dataset, yielding only ``image``, ``label`` and ``index``
    (position in this subset). Fingerprint: the base's fingerprint and the rows."""

    def __init__(self, base: ImageDataset, indices: Sequence[int], name: str = ""):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.name = name
        self.class_names = list(getattr(base, "class_names", []))
        self.preprocessing = getattr(base, "preprocessing", Preprocessing())
        self.spec = f"{getattr(base, 'spec', '')}[{name or 'subset'}]"
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.base[int(self.indices[int(i)])]
        return {"image": item["image"], "label": item["label"],
                "index": torch.tensor(int(i), dtype=torch.int64)}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_parts("subset", self.base.fingerprint(),
                                             array_digest(self.indices))
        return self._fingerprint

    def describe(self) -> dict:
        d = super().describe()
        d.update({"base": self.base.describe() if hasattr(self.base, "describe") else None,
                  "rows": len(self.indices)})
        return d


def concept_coverage(dataset, numbers: Sequence[int], *, batch_size: int = 32,
                     workers: int = 0, progress: ProgressLike | None = None) -> np.ndarray:
    """float32 [N, len(numbers)]: per image, 1.0 where a concept is a whole-image label (scene,
    texture: ``image_labels``), else the fraction of mask pixels where any layer holds it
    (``masks``). For a Broden dataset (or the synthetic world with ``concepts=True``)."""
    numbers = [int(n) for n in numbers]
    out = np.zeros((len(dataset), len(numbers)), np.float32)
    progress = progress or silent()
    loader = make_loader(dataset, batch_size=batch_size, workers=workers)
    pos = 0
    with progress(total=len(dataset), description="concept coverage") as bar:
        for batch in loader:
            masks, labels = batch["masks"], batch["image_labels"]
            b = masks.shape[0]
            for j, n in enumerate(numbers):
                whole = (labels == n).any(dim=1) if labels.numel() else torch.zeros(b, dtype=bool)
                if masks.shape[1]:
                    pix = (masks == n).any(dim=1).flatten(1).float().mean(dim=1)
                else:
                    pix = torch.zeros(b)
                out[pos:pos + b, j] = torch.where(whole, torch.ones(b), pix).numpy()
            pos += b
            bar.advance(b)
    return out


@dataclass
class ConceptSets:
    """Concept and random image sets for :func:`run_tcav`: ``concepts`` name -> dataset;
    ``randoms`` [(name, dataset)], random_0 first (:func:`run_tcav` pairs random_{k-1} with
    random_k for the baseline and the concepts with random_1 ..); ``info`` what was chosen."""

    concepts: dict[str, ImageDataset]
    randoms: list[tuple[str, ImageDataset]]
    info: dict = field(default_factory=dict)


def broden_concept_sets(dataset, concepts: Sequence[str], *, random_sets: int,
                        per_set: int = 50, min_coverage: float = 0.005, seed: int = 0,
                        cache: Cache | None = None, batch_size: int = 32, workers: int = 0,
                        progress: ProgressLike | None = None) -> ConceptSets:
    """Concept sets from a Broden-format dataset (or the synthetic world with concepts).

    Positives of a concept: images where it is present -- a whole-image label (scene, texture)
    equals it, or it covers at least ``min_coverage`` of the mask pixels (and more than none);
    at most ``per_set`` of them, a seeded sample when there are more. Random sets
    ``random_0 .. random_{random_sets - 1}``: ``per_set`` images each (fewer only if the pool
    is smaller), drawn without replacement by ``np.random.default_rng([seed, 7919, i])`` from
    the images where none of the requested concepts is present. Coverages are cached (kind
    ``features``) per dataset content and concepts. Unknown concept -> UsageError with close
    matches."""
    if not concepts:
        raise UsageError("no concept given", "pass --concept NAME[,NAME...]")
    if not 0.0 <= float(min_coverage) <= 1.0:
        raise UsageError(f"--min-coverage must be in [0, 1], got {min_coverage}",
                         "pass e.g. --min-coverage 0.005")
    if int(per_set) < 2:
        raise UsageError(f"--images-per-set must be at least 2, got {per_set}",
                         "pass e.g. --images-per-set 50")
    numbers = [int(dataset.labels.number(c)) for c in concepts]
    cache = cache if cache is not None else Cache(enabled=False)
    parts = {"what": "tcav-concept-coverage", "dataset": dataset.fingerprint(),
             "numbers": numbers}

    def compute():
        cov = concept_coverage(dataset, numbers, batch_size=batch_size, workers=workers,
                               progress=progress)
        return ({"coverage": cov},
                {"description": "per-image coverage of concepts (1 for whole-image labels)",
                 "concepts": list(concepts), "numbers": numbers},
                {"coverage": {"description": "fraction of mask pixels holding the concept",
                              "shape": "N x concepts", "units": "fraction"}})

    entry, _ = cache.get_or_compute("features", parts, compute)
    coverage = np.asarray(entry["coverage"], dtype=np.float32)
    present = (coverage >= float(min_coverage)) & (coverage > 0)
    sets: dict[str, ImageDataset] = {}
    counts = {}
    for j, name in enumerate(concepts):
        rows = np.flatnonzero(present[:, j])
        if len(rows) < 2:
            raise CnnexplainError(f"concept {name!r} is present (coverage >= {min_coverage:g}) in "
                                  f"only {len(rows)} of {len(dataset)} images",
                                  "lower --min-coverage, use more images (--limit), or choose "
                                  "another concept")
        counts[name] = int(len(rows))
        if len(rows) > per_set:
            rng = np.random.default_rng([int(seed), 104729, numbers[j]])
            rows = np.sort(rng.choice(rows, size=int(per_set), replace=False))
        sets[name] = SubsetDataset(dataset, rows, name)
    pool = np.flatnonzero(~present.any(axis=1))
    if len(pool) < 2:
        raise CnnexplainError(f"only {len(pool)} of {len(dataset)} images lack every requested "
                              "concept, too few for random sets",
                              "use more images (--limit) or fewer concepts")
    randoms = []
    for i in range(int(random_sets)):
        rng = np.random.default_rng([int(seed), 7919, i])
        rows = np.sort(rng.choice(pool, size=min(int(per_set), len(pool)), replace=False))
        randoms.append((f"random_{i}", SubsetDataset(dataset, rows, f"random_{i}")))
    return ConceptSets(sets, randoms, {"source": "broden", "present": counts,
                                       "pool": int(len(pool)), "min_coverage": min_coverage})


def folder_concept_sets(root, concepts: Sequence[str], *, random_sets: int,
                        preprocessing: Preprocessing = Preprocessing(),
                        per_set: int | None = None) -> ConceptSets:
    """Concept sets from a TCAV concept root (``<root>/<concept>/``, ``<root>/random_<i>/``):
    the named concept folders and the first ``random_sets`` random folders in natural order
    (random_0, random_1, ..., random_10). ``per_set`` keeps the first N images of each folder
    (in file order: world order for ``cnnexplain data synth --format concepts`` exports, whose
    prefixes keep the class balance). Unknown concept -> UsageError with close
    matches; too few random folders -> UsageError."""
    from cnnexplain.data.datasets import concept_images, list_concept_folders

    if not concepts:
        raise UsageError("no concept given", "pass --concept NAME[,NAME...]")
    found = list_concept_folders(root)
    for c in concepts:
        if c not in found["concepts"]:
            choices = ", ".join(found["concepts"]) or "(none)"
            raise UsageError(f"no concept folder {c!r} in {root}"
                             f"{close_matches(c, found['concepts'])}",
                             f"choose from {choices}")
    randoms = sorted(found["randoms"], key=_natural_key)
    if len(randoms) < int(random_sets):
        raise UsageError(f"{root} has {len(randoms)} random folders, but {random_sets} are needed "
                         f"(--random-runs {int(random_sets) - 1} + 1: the baseline pairs "
                         "random_0 with random_1, random_1 with random_2, ...)",
                         f"pass --random-runs {max(len(randoms) - 1, 2)} or add random folders "
                         "(`cnnexplain data synth --format concepts --random-sets N`)")
    sets = {c: concept_images(root, c, preprocessing, per_set) for c in concepts}
    rand = [(r, concept_images(root, r, preprocessing, per_set))
            for r in randoms[: int(random_sets)]]
    return ConceptSets(sets, rand, {"source": "folders", "root": str(root)})


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TCAVConfig:
    """Options of :func:`run_tcav` (module docstring): ``random_runs`` N >= 2; ``cav``;
    ``concept_subsample`` f in (0, 1]: below 1, the share of its positive set each CAV draws at
    random (default 1: the first images, as tcav); ``step`` / ``step_units`` of I+ / I-;
    ``alpha`` significance level; ``bonferroni``; ``seed``."""

    random_runs: int = 10
    cav: CAVConfig = CAVConfig()
    concept_subsample: float = 1.0
    step: float = 1.0
    step_units: str = "absolute"
    alpha: float = 0.05
    bonferroni: bool = True
    seed: int = 0

    def validate(self) -> "TCAVConfig":
        if int(self.random_runs) < 2:
            raise UsageError(f"--random-runs must be at least 2, got {self.random_runs} (the "
                             "t-test needs two runs)", "pass e.g. --random-runs 10")
        self.cav.validate()
        if not 0.0 < float(self.concept_subsample) <= 1.0:
            raise UsageError(f"--concept-subsample must be in (0, 1], got "
                             f"{self.concept_subsample}", "pass e.g. --concept-subsample 0.5")
        if not (self.step > 0 and math.isfinite(self.step)):
            raise UsageError(f"--step must be a positive number, got {self.step}",
                             "pass e.g. --step 1.0")
        if self.step_units not in STEP_UNITS:
            raise UsageError(f"unknown --step-units {self.step_units!r}"
                             f"{close_matches(self.step_units, STEP_UNITS)}",
                             "pass --step-units absolute or norm")
        if not 0.0 < self.alpha < 1.0:
            raise UsageError(f"--alpha must be in (0, 1), got {self.alpha}",
                             "pass e.g. --alpha 0.05")
        return self


@dataclass
class TCAVResult:
    """``table``: one row per (concept, class, layer) (columns in :data:`TABLE_COLUMNS`);
    ``runs``: one row per (CAV, class) with its scores (``role`` "concept" or "baseline";
    columns in :data:`RUN_COLUMNS`); ``cavs``: info of every CAV; ``stats``: cache hits and
    misses; ``n_tests``: rows tested (the Bonferroni factor)."""

    table: pd.DataFrame
    runs: pd.DataFrame
    cavs: list[dict]
    stats: dict
    n_tests: int


TABLE_COLUMNS = ["concept", "class", "class_index", "layer", "score_mean", "score_std",
                 "magnitude", "i_plus", "i_minus", "cav_accuracy", "p_value", "cav_p_value",
                 "significant", "n_runs", "random_score_mean", "random_score_std", "null_score",
                 "t_statistic", "df", "p_value_uncorrected", "cav_p_value_uncorrected",
                 "train_share", "magnitude_std", "i_plus_std",
                 "i_minus_std", "cav_accuracy_std", "sensitivity_mean", "n_class_inputs",
                 "n_tests", "bonferroni"]
RUN_COLUMNS = ["concept", "negative", "role", "run", "class", "class_index", "layer",
               "sign_count", "n_positive", "magnitude", "i_plus", "i_minus",
               "sensitivity_mean", "cav_accuracy", "cav_n_train", "cav_pool", "cav_test_tp",
               "cav_test_fn", "cav_test_tn", "cav_test_fp", "cav_key", "n_class_inputs",
               "n_nonzero_gradients"]


def cav_seed(seed: int, positive_key: str, negative_key: str) -> int:
    """The seed of one CAV's held-out split: from the run seed and the two sets' activation keys
    (content, not names or order)."""
    return int(digest_parts("cav-seed", int(seed), positive_key, negative_key)[:15], 16)


def _class_inputs(split: Split, model: nn.Module, layer: str, inputs: ImageDataset, act_set,
                  rows: np.ndarray, preprocessing: Preprocessing, device, batch_size: int,
                  workers: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(a [n, *layer_shape], extras) of the class inputs on ``device``: from the cached
    activations when the tail needs nothing else, else by running the body on the images."""
    if split.n_extras == 0:
        a = torch.from_numpy(act_set.array(layer, rows)).to(device)
        return a, []
    outs: list[list[torch.Tensor]] = []
    loader = make_loader(Subset(inputs, rows.tolist()), batch_size=batch_size, workers=workers)
    with torch.no_grad():
        for batch in loader:
            res = split.body(preprocessing.normalize(batch["image"].to(device).float()))
            outs.append([r.detach() for r in res])
    cols = list(zip(*outs))
    return torch.cat(cols[0]), [torch.cat(c) for c in cols[1:]]


def check_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, Split]:
    """Validate ``layers`` before anything is computed or written: each exists and can be cut
    with :func:`~cnnexplain.models.layers.split_at` (traced, run once per forward pass).
    Returns layer -> Split (eval mode).

    A layer followed by an in-place operation (BatchNorm then ``ReLU(inplace=True)``, ResNet's
    ``out += identity``) is fine: recorded activations are copies
    (:func:`cnnexplain.models.layers.record`), the body returns the layer's output before the
    tail runs, and every call of a tail (gradients, I+ / I-) gets a copy of the activations
    and skip inputs, so an in-place first operation of the tail changes neither the stored
    activations nor an autograd leaf."""
    was_training = model.training
    model.eval()
    splits = {}
    try:
        for layer in dict.fromkeys(layers):
            get_module(model, layer)
            splits[layer] = split_at(model, layer).eval()
    finally:
        model.train(was_training)
    return splits


def run_tcav(model: nn.Module, layers: Sequence[str], concepts: Mapping[str, ImageDataset],
             randoms: Sequence[tuple[str, ImageDataset]], inputs: ImageDataset,
             targets: Sequence[tuple[int, str]], *, model_fingerprint: str,
             preprocessing: Preprocessing, config: TCAVConfig = TCAVConfig(),
             filter_by_label: bool = True, device: torch.device | str = "cpu",
             cache: Cache | None = None, progress: ProgressLike | None = None,
             batch_size: int = 64, workers: int = 0) -> TCAVResult:
    """TCAV for every (concept, target class, layer) (module docstring).

    ``model`` on ``device`` (eval mode); ``concepts``: name -> image set; ``randoms``: [(name,
    image set)], at least N + 1 = ``config.random_runs`` + 1 of them (extra ones are
    ignored): run k (1..N) trains each concept against ``randoms[k]`` and the baseline
    pseudo-concept ``randoms[k-1]`` against ``randoms[k]``; ``inputs``: the images whose
    sensitivities are counted -- with ``filter_by_label`` the class-c inputs are the images
    labelled c (labels as the dataset yields them), else every image serves every target;
    ``targets``: [(class index, name)]. Everything is cached in ``cache`` (None: a disabled
    cache). Every key is computed from content fingerprints first and entries are read only
    when needed: a warm run reads one score entry per (layer, class) and nothing else."""
    config.validate()
    device = torch.device(device)
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise UsageError("no layer given", "pass --layer NAME[,NAME...]")
    if not concepts:
        raise UsageError("no concept given", "pass --concept NAME[,NAME...]")
    if not targets:
        raise UsageError("no target class given", "pass --target CLASS (name or index)")
    n_runs = int(config.random_runs)
    if len(randoms) < n_runs + 1:
        raise UsageError(f"{len(randoms)} random sets given, --random-runs {n_runs} needs "
                         f"{n_runs + 1} (the baseline pairs random_0 with random_1, random_1 "
                         "with random_2, ...)",
                         f"pass --random-runs {max(len(randoms) - 1, 2)} or add random sets")
    clash = [c for c in concepts if c in {r for r, _ in randoms}]
    if clash:
        raise UsageError(f"concept {clash[0]!r} is also a random set", "rename the concept")
    if len(inputs) == 0:
        raise CnnexplainError("the class-input dataset has no images", "check --dataset/--split")
    splits = check_layers(model, layers)
    was_training = model.training
    cache = cache if cache is not None else Cache(enabled=False)
    progress = progress or silent()
    used = list(randoms[:n_runs + 1])
    names = [r for r, _ in used]
    # run k: every concept against random_k; the baseline's pseudo-concept random_{k-1}
    order = [(c, names[k]) for c in concepts for k in range(1, n_runs + 1)]
    baseline = [(names[k - 1], names[k]) for k in range(1, n_runs + 1)]
    order += baseline
    run_of = {pair: names.index(pair[1]) for pair in order}
    # held-out negatives of a CAV beyond its own: the random sets it was not trained on
    extras = {pair: [r for r in names if r not in pair] for pair in order}
    roles = {pair: "baseline" if pair in baseline else "concept" for pair in order}
    stats = {"cav_trained": 0, "cav_cached": 0, "scores_computed": 0, "scores_cached": 0,
             "gradients_computed": 0, "gradients_cached": 0, "activations_read": 0}
    run_rows: list[dict] = []
    cav_infos: dict[str, dict] = {}
    trained_keys: set[str] = set()
    model.eval()
    try:
        for layer in layers:
            ctx = _LayerContext(model, layer, splits[layer], {**concepts, **dict(used)}, inputs,
                                model_fingerprint, preprocessing, device, batch_size, workers,
                                cache, progress, stats)
            cav_parts = {pair: _cav_parts(ctx.key(pair[0]), ctx.key(pair[1]), layer, config,
                                          [ctx.key(r) for r in extras[pair]])
                         for pair in order}
            cav_keys = {pair: cache.key("cav", **parts) for pair, parts in cav_parts.items()}
            cavs: dict[tuple[str, str], CAV] = {}

            def get_cavs() -> dict[tuple[str, str], CAV]:
                """Every CAV of the layer, loaded or trained (only when some scores miss)."""
                if not cavs:
                    ctx.check_shapes()
                    try:
                        with progress(total=len(order), description=f"CAVs at {layer}") as bar:
                            for pair in order:
                                cav = _cav(cache, cav_parts[pair], ctx, pair, extras[pair],
                                           layer, config, device, trained_keys)
                                cav.concept, cav.negative, cav.layer = pair[0], pair[1], layer
                                cavs[pair] = cav
                                cav_infos.setdefault(cav.key, cav.info())
                                bar.advance(1)
                                bar.update(acc=cav.accuracy)
                    finally:
                        ctx.release_arrays()
                return cavs

            for class_index, class_name in targets:
                scores, infos, n_inputs, n_nonzero = _scores(
                    ctx, int(class_index), class_name, filter_by_label,
                    [cav_keys[p] for p in order], get_cavs, config)
                for pair, sc, info in zip(order, scores, infos):
                    key = cav_keys[pair]
                    cav_infos.setdefault(key, {"concept": pair[0], "negative": pair[1],
                                               "layer": layer, **info, "key": key})
                    run_rows.append({
                        "concept": pair[0], "negative": pair[1], "role": roles[pair],
                        "run": run_of[pair], "class": class_name,
                        "class_index": int(class_index), "layer": layer, **sc,
                        "cav_accuracy": info["accuracy"],
                        **{f"cav_{f}": info[f] for f in ("n_train", "pool", "test_tp",
                                                         "test_fn", "test_tn", "test_fp")},
                        "cav_key": key, "n_class_inputs": n_inputs,
                        "n_nonzero_gradients": n_nonzero})
    finally:
        model.train(was_training)
    stats["cav_cached"] = len(cav_infos) - len(trained_keys)
    stats["cav_trained"] = len(trained_keys)
    runs = pd.DataFrame(run_rows)
    table = summarize(runs, list(concepts), targets, layers, config)
    return TCAVResult(table=table, runs=runs[RUN_COLUMNS], cavs=list(cav_infos.values()),
                      stats=stats, n_tests=len(table))


class _LayerContext:
    """What one layer's computations share: the image sets, their activation keys (computed
    from fingerprints, no I/O) and the activations themselves (read or computed on demand)."""

    def __init__(self, model, layer, split, datasets: dict, inputs, model_fingerprint,
                 preprocessing, device, batch_size, workers, cache, progress, stats):
        self.model, self.layer, self.split = model, layer, split
        self.datasets = {**datasets, INPUTS: inputs}
        self.model_fingerprint = model_fingerprint
        self.preprocessing, self.device = preprocessing, device
        self.batch_size, self.workers = batch_size, workers
        self.cache, self.progress, self.stats = cache, progress, stats
        self._keys: dict[str, str] = {}
        self._sets: dict[str, object] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._shapes_checked = False

    def key(self, name: str) -> str:
        """The activation cache key of set ``name`` (as compute_activations derives it)."""
        if name not in self._keys:
            parts = activation_parts([self.layer], self.datasets[name],
                                     model_fingerprint=self.model_fingerprint,
                                     preprocessing=self.preprocessing, pool=None, float16=False)
            self._keys[name] = self.cache.key(ACTIVATIONS, **parts)
        return self._keys[name]

    def acts(self, name: str):
        """The ActivationSet of set ``name`` at the layer (cached, else computed)."""
        if name not in self._sets:
            self._sets[name] = compute_activations(
                self.model, [self.layer], self.datasets[name],
                model_fingerprint=self.model_fingerprint, preprocessing=self.preprocessing,
                device=self.device, batch_size=self.batch_size, cache=self.cache,
                progress=self.progress, workers=self.workers)
            self.stats["activations_read"] += 1
        return self._sets[name]

    def array(self, name: str) -> np.ndarray:
        """Set ``name``'s activations at the layer, float32 [n, *layer_shape], kept in memory
        until :meth:`release_arrays` (each random set is read by every CAV's held-out
        table)."""
        if name not in self._arrays:
            self._arrays[name] = self.acts(name).array(self.layer)
        return self._arrays[name]

    def release_arrays(self) -> None:
        self._arrays.clear()

    def check_shapes(self) -> None:
        """Every image set must give activations of one shape at the layer (else the CAVs and
        the class inputs live in different spaces)."""
        if self._shapes_checked:
            return
        want = tuple(self.acts(INPUTS).shape(self.layer)[1:])
        for name in self.datasets:
            got = tuple(self.acts(name).shape(self.layer)[1:])
            if got != want:
                raise CnnexplainError(
                    f"the images of {name!r} give activations of shape {list(got)} at layer "
                    f"{self.layer!r}, the class inputs {list(want)}: the image sizes differ",
                    "pass --resize N to bring every image to N x N")
        self._shapes_checked = True


INPUTS = "\x00class-inputs"  # the class inputs' name in a _LayerContext (no folder has it)


def _cav_parts(positive_key: str, negative_key: str, layer: str, config: TCAVConfig,
               extra_keys: Sequence[str]) -> dict:
    """Cache key parts of one CAV: the two activation keys (content of images, model and
    preprocessing), the layer, the hyper-parameters, the subsample share, the derived seed,
    the solver, and the activation keys of the further random sets its held-out table
    counts."""
    return {"positive": positive_key, "negative": negative_key, "layer": layer,
            "config": config.cav.to_dict(), "subsample": float(config.concept_subsample),
            "seed": cav_seed(config.seed, positive_key, negative_key),
            "truncate": "equal-first", "held_out": "all-unused", "solver": SOLVER_VERSION,
            "extra_negatives": list(extra_keys)}


def _cav(cache: Cache, parts: dict, ctx: _LayerContext, pair: tuple[str, str],
         extras: Sequence[str], layer: str, config: TCAVConfig, device,
         trained_keys: set) -> CAV:
    """The CAV of a (positive, negative) pair, its held-out table also counting the random
    sets ``extras``: from the cache (kind ``cav``) or trained and stored."""
    trained: list[CAV] = []

    def compute():
        pos_set = ctx.acts(pair[0])
        cav = train_cav(ctx.array(pair[0]), ctx.array(pair[1]), config.cav, parts["seed"],
                        device, subsample=config.concept_subsample,
                        extra_negatives=[ctx.array(r) for r in extras])
        trained.append(cav)
        attrs = {k: v for k, v in cav.info().items() if k not in ("key", "concept", "negative",
                                                                   "layer")}
        attrs.update(description="concept activation vector (cnnexplain.explain.tcav): unit "
                                 "normal of a linear concept-vs-random classifier on flattened "
                                 "activations, pointing toward the concept",
                     layer=layer, layer_shape=list(pos_set.shape(layer)[1:]))
        return ({"cav": cav.vector}, attrs,
                {"cav": {"description": "unit CAV toward the concept", "shape": "D (K*h*w)",
                         "units": "direction in activation space"}})

    entry, _ = cache.get_or_compute("cav", parts, compute)
    if trained:
        cav = trained[0]
        trained_keys.add(entry.key)
    else:
        a = entry.attrs
        cav = CAV(vector=np.asarray(entry["cav"], dtype=np.float32),
                  **{f: CAV_TYPES[f](a[f]) for f in CAV_FIELDS})
    cav.key = entry.key
    return cav


SCORE_FIELDS = ("sign_count", "n_positive", "magnitude", "i_plus", "i_minus",
                "sensitivity_mean")
CAV_TYPES: dict[str, type] = {"accuracy": float, "train_accuracy": float, "intercept": float,
                              "n_train": int, "pool": int, "test_tp": int, "test_fn": int,
                              "test_tn": int, "test_fp": int, "iterations": int,
                              "converged": bool}
CAV_FIELDS = tuple(CAV_TYPES)


def _scores(ctx: _LayerContext, class_index: int, class_name: str, filter_by_label: bool,
            cav_keys: list[str], get_cavs: Callable[[], dict], config: TCAVConfig
            ) -> tuple[list[dict], list[dict], int, int]:
    """Scores of every CAV for one (layer, class), and the CAVs' info: from the cache (kind
    ``tcav``), or computed from the (cached) class-logit gradients and tail evaluations.
    Returns (scores per CAV, CAV info per CAV, number of class inputs, number of them whose
    gradient is not zero)."""
    cache, layer, split, stats = ctx.cache, ctx.layer, ctx.split, ctx.stats
    select = {"class": int(class_index), "filter_by_label": bool(filter_by_label)}
    grad_parts = {"what": "tcav-class-gradients", "activations": ctx.key(INPUTS),
                  "layer": layer, "extras": split.n_extras, **select}
    parts = {"gradients": cache.key("features", **grad_parts), "cavs": list(cav_keys),
             "step": float(config.step), "step_units": config.step_units,
             "fields": list(SCORE_FIELDS), "cav_fields": list(CAV_FIELDS)}
    state: dict = {}

    def rows() -> np.ndarray:
        if "rows" not in state:
            acts = ctx.acts(INPUTS)
            state["rows"] = (np.flatnonzero(acts.labels == int(class_index)) if filter_by_label
                             else np.arange(len(acts)))
            if len(state["rows"]) == 0:
                spec = getattr(ctx.datasets[INPUTS], "spec", "") or "the class inputs"
                raise CnnexplainError(f"no images of class {class_name!r} (index {class_index}) "
                                      f"among the {len(acts)} inputs of {spec}",
                                      "raise --limit, pick another --split, or pass "
                                      "--class-images DIR")
        return state["rows"]

    def inputs_on_device():
        if "acts" not in state:
            state["acts"] = _class_inputs(split, ctx.model, layer, ctx.datasets[INPUTS],
                                          ctx.acts(INPUTS), rows(), ctx.preprocessing,
                                          ctx.device, ctx.batch_size, ctx.workers)
        return state["acts"]

    def grads_compute():
        a, extras = inputs_on_device()
        g = logit_gradients(split.tail, a, extras, class_index, ctx.batch_size)
        return ({"gradients": g.numpy()},
                {"description": "gradient of the class logit w.r.t. the flattened layer "
                                "activation, per class input (cnnexplain.explain.tcav)",
                 "layer": layer, "class": int(class_index)},
                {"gradients": {"description": "d logit_c / d a", "shape": "N_c x D",
                               "units": "logit per activation unit"}})

    def compute():
        ctx.check_shapes()
        entry, hit = cache.get_or_compute("features", grad_parts, grads_compute)
        stats["gradients_cached" if hit else "gradients_computed"] += 1
        grads = torch.from_numpy(np.asarray(entry["gradients"], dtype=np.float32))
        n_nonzero = int((grads.abs().amax(dim=1) > 0).sum()) if grads.numel() else 0
        cavs = get_cavs()
        by_key = {c.key: c for c in cavs.values()}
        a, extras = inputs_on_device()
        base = class_log_probs(split.tail, a, extras, class_index, ctx.batch_size)
        out = np.zeros((len(cav_keys), len(SCORE_FIELDS)), np.float64)
        info = np.zeros((len(cav_keys), len(CAV_FIELDS)), np.float64)
        with ctx.progress(total=len(cav_keys),
                          description=f"scores at {layer}, class {class_name}") as bar:
            for i, key in enumerate(cav_keys):
                cav = by_key[key]
                s = directional_derivatives(grads, cav.vector)
                ip, im = interventional_scores(split.tail, a, extras, cav.vector, class_index,
                                               config.step, config.step_units, base,
                                               ctx.batch_size)
                out[i] = (sign_count(s), float((s > 0).sum()), magnitude(s), ip, im,
                          float(s.mean()))
                info[i] = [float(getattr(cav, f)) for f in CAV_FIELDS]
                bar.advance(1)
        return ({"scores": out, "cav_info": info},
                {"description": "TCAV scores of each CAV for one class and layer",
                 "fields": list(SCORE_FIELDS), "cav_fields": list(CAV_FIELDS), "layer": layer,
                 "class": int(class_index), "n_class_inputs": int(len(rows())),
                 "n_nonzero_gradients": n_nonzero},
                {"scores": {"description": "per CAV: " + ", ".join(SCORE_FIELDS),
                            "shape": f"CAVs x {len(SCORE_FIELDS)}",
                            "units": "fractions; counts; logit per unit"},
                 "cav_info": {"description": "per CAV: " + ", ".join(CAV_FIELDS),
                              "shape": f"CAVs x {len(CAV_FIELDS)}", "units": "mixed"}})

    entry, hit = cache.get_or_compute("tcav", parts, compute)
    stats["scores_cached" if hit else "scores_computed"] += 1
    values = np.asarray(entry["scores"], dtype=np.float64)
    info = np.asarray(entry["cav_info"], dtype=np.float64)
    scores = [dict(zip(SCORE_FIELDS, map(float, row))) for row in values]
    for sc in scores:
        sc["n_positive"] = int(round(sc["n_positive"]))
    infos = [{f: float(v) if CAV_TYPES[f] is float else CAV_TYPES[f](round(v))
              for f, v in zip(CAV_FIELDS, row)} for row in info]
    return (scores, infos, int(entry.attrs["n_class_inputs"]),
            int(entry.attrs["n_nonzero_gradients"]))


def summarize(runs: pd.DataFrame, concepts: Sequence[str], targets: Sequence[tuple[int, str]],
              layers: Sequence[str], config: TCAVConfig) -> pd.DataFrame:
    """One row per (concept, class, layer) from the per-CAV rows of :func:`run_tcav`: means and
    population stds over the runs, the two tests of the module docstring, both
    Bonferroni-corrected over all rows (unless ``config.bonferroni`` is False), and
    ``significant`` = both corrected p-values below ``config.alpha``.

    ``runs`` needs the columns of :data:`RUN_COLUMNS`. The score test uses the concept's
    ``n_positive`` per run (on the probit scale, :func:`~cnnexplain.metrics.stats.
    probit_sign_counts`) and its CAVs' ``n_train / pool``; the CAV test the held-out confusion
    counts of every run's CAV."""
    rows = []
    for layer in layers:
        for class_index, class_name in targets:
            sel = runs[(runs["layer"] == layer) & (runs["class_index"] == int(class_index))]
            base = sel[sel["role"] == "baseline"].sort_values("run")
            for concept in concepts:
                c = sel[(sel["role"] == "concept") & (sel["concept"] == concept)].sort_values("run")
                n_inputs = int(c["n_class_inputs"].iloc[0])
                n_nonzero = int(c["n_nonzero_gradients"].iloc[0])
                share = float((c["cav_n_train"] / c["cav_pool"]).mean())
                if n_nonzero > 0:
                    k = c["n_positive"].to_numpy()
                    floor = probit_count_step(float(k.mean()), n_nonzero) ** 2 / 12.0
                    test = subsample_ttest(probit_sign_counts(k, n_nonzero), share, 0.0, floor)
                else:  # every gradient is zero: every direction scores 0, no evidence either way
                    test = TTest(float("nan"), 1.0, float(len(c) - 1))
                cav_ps = [fisher_exact_greater(*(int(r[f"cav_test_{k}"])
                                                 for k in ("tp", "fn", "tn", "fp")))
                          for _, r in c.iterrows()]
                rows.append({
                    "concept": concept, "class": class_name, "class_index": int(class_index),
                    "layer": layer,
                    "score_mean": float(c["sign_count"].mean()),
                    "score_std": float(c["sign_count"].std(ddof=0)),
                    "magnitude": float(c["magnitude"].mean()),
                    "i_plus": float(c["i_plus"].mean()), "i_minus": float(c["i_minus"].mean()),
                    "cav_accuracy": float(c["cav_accuracy"].mean()),
                    "p_value_uncorrected": test.pvalue, "t_statistic": test.statistic,
                    "df": test.df,
                    "cav_p_value_uncorrected": twice_median(cav_ps),
                    "train_share": share,
                    "n_runs": int(len(c)),
                    "random_score_mean": float(base["sign_count"].mean()),
                    "random_score_std": float(base["sign_count"].std(ddof=0)),
                    "null_score": 0.5 * n_nonzero / n_inputs,
                    "magnitude_std": float(c["magnitude"].std(ddof=0)),
                    "i_plus_std": float(c["i_plus"].std(ddof=0)),
                    "i_minus_std": float(c["i_minus"].std(ddof=0)),
                    "cav_accuracy_std": float(c["cav_accuracy"].std(ddof=0)),
                    "sensitivity_mean": float(c["sensitivity_mean"].mean()),
                    "n_class_inputs": n_inputs,
                })
    table = pd.DataFrame(rows)
    n_tests = len(table)
    for col in ("p_value", "cav_p_value"):
        p = table[f"{col}_uncorrected"].to_numpy(dtype=np.float64)
        table[col] = bonferroni(p, n_tests) if config.bonferroni else p
    alpha = float(config.alpha)
    table["significant"] = (table["p_value"] < alpha) & (table["cav_p_value"] < alpha)
    table["n_tests"] = n_tests
    table["bonferroni"] = bool(config.bonferroni)
    return table[TABLE_COLUMNS]


# ---------------------------------------------------------------------------------------------
# The bar chart
# ---------------------------------------------------------------------------------------------


def plot_tcav(table: pd.DataFrame, path, title: str = "TCAV") -> None:
    """The TCAV paper's bar chart (Kim et al. 2018, fig. 4): one panel per class, groups per
    layer, one bar per concept (mean sign count over runs, error bars one std); the random
    baseline (mean of the random-vs-random runs, +- one std shaded) marked per group;
    significant bars carry '*', the others are hatched and labelled 'n.s.'. Written atomically
    as PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.figure import Figure

    from cnnexplain.io import atomic_path

    classes = list(dict.fromkeys(table["class"]))
    layers = list(dict.fromkeys(table["layer"]))
    concepts = list(dict.fromkeys(table["concept"]))
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(len(concepts), 1)
    fig = Figure(figsize=(max(6.5, 2.8 + 0.6 * len(layers) * (len(concepts) + 1)),
                          0.6 + 2.9 * len(classes)), dpi=110)
    axes = fig.subplots(len(classes), 1, squeeze=False)[:, 0]
    for k, (ax, klass) in enumerate(zip(axes, classes)):
        for li, layer in enumerate(layers):
            sel = table[(table["class"] == klass) & (table["layer"] == layer)]
            if sel.empty:
                continue
            rmean = float(sel["random_score_mean"].iloc[0])
            rstd = float(sel["random_score_std"].iloc[0])
            x0, x1 = li - 0.45, li + 0.45
            ax.fill_between([x0, x1], max(0.0, rmean - rstd), min(1.0, rmean + rstd),
                            color="0.92", zorder=0,
                            label="random ± std" if (k, li) == (0, 0) else None)
            ax.plot([x0, x1], [rmean, rmean], color="0.25", linestyle="--", linewidth=1.3,
                    zorder=3, label="random baseline" if (k, li) == (0, 0) else None)
            for ci, concept in enumerate(concepts):
                row = sel[sel["concept"] == concept]
                if row.empty:
                    continue
                r = row.iloc[0]
                x = li - 0.4 + width * (ci + 0.5)
                sig = bool(r["significant"])
                ax.bar(x, r["score_mean"], width * 0.85, yerr=r["score_std"], capsize=3,
                       color=colors(ci % 10), alpha=1.0 if sig else 0.45,
                       hatch=None if sig else "//", edgecolor="black", linewidth=0.5, zorder=2,
                       error_kw={"elinewidth": 1.0, "zorder": 4},
                       label=concept if (k, li) == (0, 0) else None)
                top = min(1.03, float(r["score_mean"] + r["score_std"]) + 0.02)
                ax.text(x, top, "*" if sig else "n.s.", ha="center", va="bottom",
                        fontsize=12 if sig else 7, zorder=5)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers)
        ax.set_xlim(-0.55, len(layers) - 0.45)
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("TCAV score")
        ax.set_title(f"class {klass}", fontsize=10)
        if k == 0:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title + "\n* significant; hatched: not significant; error bars: std over runs",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
