"""How the metrics rank the methods, and how far they agree (pure pandas / scipy).

Metrics of saliency maps disagree with each other (Hedström et al. 2023, MetaQuantus; Tomsett
et al. 2020, "Sanity checks for saliency metrics"), so one metric alone proves little. Given a
table of scores (one row per method, one column per metric) and each metric's direction:

- :func:`method_ranks`: per metric, the rank of each method (1 = best; ties share their mean
  rank; a method without a score for a metric gets no rank for it);
- :func:`rank_agreement`: per pair of metrics, Kendall's tau-b of their rankings over the
  methods both ranked (1: the same order, -1: reversed, NaN: fewer than three methods in
  common or a metric that ties every method), the rank agreement that Tomsett et al. 2020
  report as inter-rater reliability.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def method_ranks(scores: pd.DataFrame, higher_is_better: dict[str, bool]) -> pd.DataFrame:
    """``scores`` [methods x metrics] -> ranks [methods x metrics] (1 = best, float, NaN where a
    score is missing), for the metrics named in ``higher_is_better``."""
    out = {}
    for metric, higher in higher_is_better.items():
        if metric not in scores.columns:
            continue
        col = pd.to_numeric(scores[metric], errors="coerce")
        col = col.where(np.isfinite(col))
        out[metric] = col.rank(ascending=not higher, method="average", na_option="keep")
    return pd.DataFrame(out, index=scores.index)


def rank_agreement(ranks: pd.DataFrame, min_methods: int = 3) -> pd.DataFrame:
    """Kendall's tau-b [metrics x metrics] between the columns of ``ranks`` (over the methods
    both ranked; NaN below ``min_methods`` or where one ranking is constant)."""
    from scipy.stats import kendalltau

    names = list(ranks.columns)
    tau = pd.DataFrame(np.nan, index=names, columns=names, dtype=float)
    for i, a in enumerate(names):
        for b in names[i:]:
            both = pd.DataFrame({"a": ranks[a], "b": ranks[b]}).dropna()
            a_, b_ = both["a"], both["b"]
            if len(both) < min_methods or a_.nunique() < 2 or b_.nunique() < 2:
                continue
            t = float(kendalltau(a_, b_).statistic)
            tau.loc[a, b] = tau.loc[b, a] = t
    return tau
