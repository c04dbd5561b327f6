"""Significance testing for TCAV: the two-sample t-test and the Bonferroni correction.

TCAV (Kim et al. 2018, "Interpretability Beyond Feature Attribution: Quantitative Testing with
Concept Activation Vectors", sec. 3.5; seed ``000_d60c53f3ec4d0e03.txt``; the reference notes
in ../shared/reference/tcav.md) calls a concept significant for a class when the TCAV scores of
CAVs trained against several random sets differ from the scores of random-vs-random CAVs under
a two-sided t-test, with a Bonferroni correction over the tests performed (the paper's; neither
tensorflow/tcav nor captum applies it).

:func:`ttest_ind` is Student's two-sample t-test with pooled variance -- the default of
``scipy.stats.ttest_ind`` (``equal_var=True``), which tensorflow/tcav calls -- with Welch's
variant as an option. Only the t distribution's tail comes from scipy (``scipy.stats.t.sf``).
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
    """``statistic``: t (positive when the first sample's mean is larger; +-inf when both
    samples are constant and their means differ; nan when both are constant and equal);
    ``pvalue``: two-sided p in [0, 1] (1.0 where t is nan: no evidence of a difference --
    scipy reports nan there); ``df``: degrees of freedom."""

    statistic: float
    pvalue: float
    df: float


def ttest_ind(a: Sequence[float], b: Sequence[float], equal_var: bool = True) -> TTest:
    """Two-sided two-sample t-test of ``a`` [n1] against ``b`` [n2] (each needs >= 2 values).

    ``equal_var=True`` (Student, pooled variance; scipy's default)::

        s_p^2 = ((n1 - 1) s1^2 + (n2 - 1) s2^2) / (n1 + n2 - 2)
        t = (mean(a) - mean(b)) / sqrt(s_p^2 (1/n1 + 1/n2)),   df = n1 + n2 - 2

    ``equal_var=False`` (Welch): ``t = (mean(a) - mean(b)) / sqrt(s1^2/n1 + s2^2/n2)`` with the
    Welch-Satterthwaite df. ``s^2`` are unbiased sample variances (ddof=1). p = 2 sf(|t|; df).
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    n1, n2 = len(x), len(y)
    if n1 < 2 or n2 < 2:
        raise UsageError(f"a t-test needs at least 2 scores per group, got {n1} and {n2}",
                         "pass --random-runs 2 or more")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("t-test inputs must be finite")
    m1, m2 = float(x.mean()), float(y.mean())
    v1, v2 = float(x.var(ddof=1)), float(y.var(ddof=1))
    diff = m1 - m2
    if equal_var:
        df = float(n1 + n2 - 2)
        pooled = ((n1 - 1) * v1 + (n2 - 1) * v2) / df
        denom2 = pooled * (1.0 / n1 + 1.0 / n2)
    else:
        q1, q2 = v1 / n1, v2 / n2
        denom2 = q1 + q2
        df = denom2 ** 2 / (q1 ** 2 / (n1 - 1) + q2 ** 2 / (n2 - 1)) if denom2 > 0 else \
            float(n1 + n2 - 2)
    if denom2 <= 0.0:  # both samples constant
        if diff == 0.0:
            return TTest(float("nan"), 1.0, df)
        return TTest(math.copysign(math.inf, diff), 0.0, df)
    t = diff / math.sqrt(denom2)
    p = float(min(1.0, 2.0 * _scipy_stats.t.sf(abs(t), df)))
    return TTest(float(t), p, float(df))


def bonferroni(pvalues: Sequence[float], n_tests: int | None = None) -> np.ndarray:
    """Bonferroni-corrected p-values: ``min(1, p * m)`` with ``m = n_tests`` (default: the
    number of p-values given, i.e. the tests performed). float64 [len(pvalues)]."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    m = len(p) if n_tests is None else int(n_tests)
    if m < len(p):
        raise ValueError(f"n_tests={m} is smaller than the {len(p)} p-values given")
    return np.minimum(1.0, p * max(m, 1))
