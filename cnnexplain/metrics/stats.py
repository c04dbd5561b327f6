"""Significance testing for TCAV: a t-test that accounts for the concept set being one sample,
an exact test that a CAV separates its sets, and the Bonferroni correction.

TCAV (Kim et al. 2018, "Interpretability Beyond Feature Attribution: Quantitative Testing with
Concept Activation Vectors", sec. 3.5; seed ``000_d60c53f3ec4d0e03.txt``; the reference notes
in ../shared/reference/tcav.md) calls a concept significant for a class when the TCAV scores of
CAVs trained against several random sets differ from those of random-vs-random CAVs under a
two-sided t-test, with a Bonferroni correction over the tests performed. That t-test treats
the runs as independent, but every run of a concept reuses the same concept images, so the
runs share one "which images were picked" effect and the test is optimistic (in our
measurements on the synthetic world, a concept indistinguishable from random images came out
significant at p < 0.05 in about 30% of trials; see :mod:`cnnexplain.explain.tcav`).

:func:`subsample_ttest` is the replacement: each run trains its CAV on a random share ``f`` of
the concept images, and the spread of the runs then measures how much the score depends on
which images were picked (half-sampling, McCarthy 1969, "Pseudo-replication: half samples",
Rev. Int. Stat. Inst. 37(3)); scaled by f / (1 - f), it enters the test's variance undivided by
the number of runs. :func:`probit_sign_counts` puts sign counts on the scale where that works;
:func:`fisher_exact_greater` tests a CAV's held-out predictions (Fisher's exact test, Fisher
1922, J. R. Stat. Soc. 85(1)) and :func:`twice_median` merges those of several CAVs that share
images; :func:`bonferroni` corrects for the number of tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

from cnnexplain.errors import UsageError


@dataclass(frozen=True)
class TTest:
    """``statistic``: t (positive when the mean is above the centre; +-inf when the values are
    constant and differ from it; nan when they are constant and equal to it); ``pvalue``:
    two-sided p in [0, 1] (1.0 where t is nan: no evidence of a difference); ``df``: degrees
    of freedom."""

    statistic: float
    pvalue: float
    df: float


def probit_sign_counts(n_positive: Sequence[float], n_nonzero: int) -> np.ndarray:
    """Sign counts on the probit scale: ``z = Phi^-1((k + 1/2) / (n + 1))`` for ``k`` =
    ``n_positive`` [N] inputs with S > 0 out of ``n = n_nonzero`` inputs whose gradient is not
    zero (an input with a zero gradient has S = 0 along every direction). float64 [N].

    Why this scale: if the sensitivities S(x) = g(x) . v of the class inputs spread about
    their mean m_v with standard deviation s_v, the sign count is about Phi(m_v / s_v), so z
    estimates m_v / s_v, on which the set-to-set and run-to-run noise of the CAV direction acts
    additively; raw sign counts saturate at 0 and 1, where a set that happens to point far to
    one side gives runs that agree with each other and a spread that understates its variance.
    The half-count correction keeps z finite and makes it odd: k -> n - k gives z -> -z, so a
    direction and its negative average to 0."""
    k = np.asarray(n_positive, dtype=np.float64).reshape(-1)
    n = int(n_nonzero)
    if n < 1:
        raise ValueError("n_nonzero must be at least 1")
    if ((k < 0) | (k > n)).any():
        raise ValueError(f"sign counts must lie in [0, {n}]")
    return _scipy_stats.norm.ppf((k + 0.5) / (n + 1.0))


def probit_count_step(n_positive_mean: float, n_nonzero: int) -> float:
    """The probit-scale width of one count at a sign count's mean: z(k + 1) - z(k) with
    k = round(``n_positive_mean``) clipped to [0, n - 1] and z as in
    :func:`probit_sign_counts`. Runs that agree to the count are only known to agree within
    about this width, so :func:`subsample_ttest` takes ``step**2 / 12`` (a uniform rounding
    error of one count, Sheppard's correction) as the least variance of the runs."""
    n = int(n_nonzero)
    k = int(min(max(round(float(n_positive_mean)), 0), max(n - 1, 0)))
    lo, hi = probit_sign_counts([k, k + 1], n)
    return float(hi - lo)


def subsample_ttest(values: Sequence[float], subsample: float, center: float = 0.0,
                    min_variance: float = 0.0) -> TTest:
    """Two-sided test that the runs' mean differs from ``center``, with a variance that counts
    the images shared by every run. ``values`` [N] (N >= 2): one value per run, each from a
    CAV trained on an independent random share ``subsample`` = f in (0, 1) of one fixed
    concept set (and on its own random set)::

        V = s^2 (f / (1 - f) + 1/N),   t = (mean - center) / sqrt(V),   df = N - 1

    with s^2 the sample variance of the values (ddof=1), raised to ``min_variance`` if below it
    (values known only to some resolution, :func:`probit_count_step`); p = 2 sf(|t|; df).

    Why: a run's value carries the concept set's own sampling error, shared by all N runs and
    not reduced by averaging over them, plus the error of drawing a share of the set and of the
    run's random set and split, which averaging reduces. Drawing a share f of a set of n
    images adds a variance (1/(f n) - 1/n) sigma^2 about the set, while the set itself varies
    by sigma^2 / n about the concept's population (for an average over images, the first-order
    behaviour of the CAV): the shared variance is f / (1 - f) times the drawing variance, and
    s^2 over-estimates the drawing variance, since it also holds the other two. f = 1/2 (half
    samples, McCarthy 1969) gives V = s^2 (1 + 1/N): the spread of the runs stands for the
    spread of the set's score over sets. Student's t with N - 1 df assumes the values are
    about normal (see :func:`probit_sign_counts`).

    The plain t-test (V = s^2 / N) is what the TCAV references run in effect; it is
    optimistic by a factor that grows with N, because N runs of one concept set are not N
    samples of the concept."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(x)
    if n < 2:
        raise UsageError(f"a t-test needs at least 2 runs, got {n}", "pass `random_runs=2` or more")
    if not np.isfinite(x).all():
        raise ValueError("t-test inputs must be finite")
    f = float(subsample)
    if not 0.0 < f < 1.0:
        raise UsageError(f"the concept subsample must be in (0, 1), got {subsample}",
                         "pass e.g. `concept_subsample=0.5`")
    diff = float(x.mean()) - float(center)
    var = max(float(x.var(ddof=1)), float(min_variance)) * (f / (1.0 - f) + 1.0 / n)
    df = float(n - 1)
    if var <= 0.0:
        if diff == 0.0:
            return TTest(float("nan"), 1.0, df)
        return TTest(math.copysign(math.inf, diff), 0.0, df)
    t = diff / math.sqrt(var)
    return TTest(float(t), float(min(1.0, 2.0 * _scipy_stats.t.sf(abs(t), df))), df)


def fisher_exact_greater(tp: int, fn: int, tn: int, fp: int) -> float:
    """One-sided Fisher exact p-value that a classifier's predictions agree with the true labels
    more than by chance, from its confusion table on held-out data (``tp``/``fn``: positives
    predicted positive / negative; ``tn``/``fp``: negatives predicted negative / positive).

    Null hypothesis: the held-out positives and negatives come from one distribution, so that,
    the classifier being fixed by data it did not see, the labels are exchangeable given the
    predictions; tp then follows the hypergeometric law of drawing the ``tp + fn`` positives
    from all held-out images of which ``tp + fp`` are predicted positive, and
    p = P(X >= tp). Exact for any class sizes and any bias of the classifier (a biased one
    that predicts one side more often gains nothing), conservative through discreteness.
    Equals ``scipy.stats.fisher_exact([[tp, fn], [fp, tn]], alternative="greater")``."""
    tp, fn, tn, fp = (int(v) for v in (tp, fn, tn, fp))
    if min(tp, fn, tn, fp) < 0:
        raise ValueError("confusion counts must be >= 0")
    total, positives, predicted = tp + fn + tn + fp, tp + fn, tp + fp
    if total == 0:
        return 1.0
    return float(min(1.0, _scipy_stats.hypergeom.sf(tp - 1, total, predicted, positives)))


def twice_median(pvalues: Sequence[float]) -> float:
    """Merge p-values that may depend on each other in any way: ``min(1, 2 p_(m))`` with
    p_(m) the m-th smallest of the N values, m = ceil(N / 2) (the median; the lower one for
    even N). Valid whatever the dependence (Rueschendorf 1982; Vovk & Wang 2020, "Combining
    p-values via averaging", Biometrika 107(4)): 2 p_(m) <= a means at least N/2 of the values
    are <= a/2, and as each one is with probability <= a/2, Markov's inequality bounds the
    chance of that by (N a/2) / (N/2) = a. ``pvalues`` [N >= 1]."""
    p = np.sort(np.asarray(pvalues, dtype=np.float64).reshape(-1))
    if len(p) == 0:
        raise ValueError("no p-values to merge")
    return float(min(1.0, 2.0 * p[math.ceil(len(p) / 2) - 1]))


def bonferroni(pvalues: Sequence[float], n_tests: int | None = None) -> np.ndarray:
    """Bonferroni-corrected p-values: ``min(1, p * m)`` with ``m = n_tests`` (default: the
    number of p-values given, i.e. the tests performed). float64 [len(pvalues)]."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    m = len(p) if n_tests is None else int(n_tests)
    if m < len(p):
        raise ValueError(f"n_tests={m} is smaller than the {len(p)} p-values given")
    return np.minimum(1.0, p * max(m, 1))
