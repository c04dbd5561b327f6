"""Significance of TCAV scores (Kim et al. 2018): the paper's t-test, the calibrated score and
CAV tests, and the Bonferroni correction, per (concept, class, layer).

Statistics (per concept, class and layer)
    Runs. N = ``random_runs``; random sets random_0 .. random_N. Run k (1..N) trains every
    concept against random_k, and a baseline CAV of random_{k-1} (a pseudo-concept) against
    random_k. Each CAV is trained on its own random two thirds of its positive images (the
    held-out split; with ``concept_subsample`` f < 1, two thirds of a random f-share). The
    baseline gives the random reference of the chart (``random_score_mean`` / ``_std``) and the
    reference sample of the paper's t-test; the calibrated tests do not need it.

    The paper's t-test (``p_ttest``; :func:`kim_ttest`). Kim et al. 2018, sec. 3.2: a
    two-sided two-sample t-test (``scipy.stats.ttest_ind``, equal variances, as tcav's code)
    of the concept's N TCAV scores (the sign counts of its CAVs against random_1 .. random_N)
    against the N random-vs-random scores (the baseline CAVs, random_(k-1) against random_k).
    H0: the concept's scores come from the same distribution as random directions' scores.
    ``p_ttest_bonferroni`` = min(1, m p_ttest), m = the number of rows (concepts x classes x
    layers), the correction the paper adds.

    Why calibrated tests beside the paper's. tcav runs that two-sample t-test of the concept's
    N sign counts against N random-vs-random ones (random_0 against random_1 .. random_N; here
    the chained pairs above). But the N concept
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

    Decision (``significance``). ``"ttest"`` (default, the paper's): ``significant`` when
    ``p_ttest_bonferroni`` (``p_ttest`` with ``bonferroni`` off) is below ``alpha`` (0.05) --
    read it with the caveat above: the runs share their images, so this test is optimistic.
    ``"calibrated"``: both calibrated p-values (``p_value``, ``cav_p_value``, multiplied by the
    number of rows, capped at 1, unless ``bonferroni`` is off) must be below ``alpha``.
    Requiring both is an intersection-union test (Berger 1982, Technometrics 24(4)):
    "the concept is absent from the layer, or present without effect on the class" is
    rejected at level alpha, with no correction for using two tests. ``"ttest-cav"``: the
    paper's t-test and the CAV test must both reject (the same intersection-union logic with
    the paper's score test): the test for pattern CAVs (``CAVConfig.direction``), whose
    sign counts are about 0 or 1 for any direction with a consistent offset, so that the
    t-test alone also rejects for a concept the layer cannot tell from random images (on the
    quickstart's ResNet-18 at layer3, 100 images a side, 20 runs: an object material the
    model ignores scored 0.21 +- 0.26 against random directions' 0.45 +- 0.45, p_ttest 0.02,
    its CAV's held-out accuracy 0.50). ``score_std`` etc. are
    population standard deviations over the runs (np.std, as tcav reports them).

    What the score test still assumes: the concept images are a random sample of the concept
    as collected (it generalizes over image sets drawn the same way, not over other ways of
    collecting them), and the concept folder shares the random folders' class mix (a concept
    folder full of one class has a CAV that points at that class: a real, but different,
    effect -- ``cnnexplain data synth `fmt` concepts`` balances classes); the runs' random
    sets and draws are independent; the additive picture behind r / (1 - r) (a CAV depends
    on its training images about linearly, through their average); probit scores about
    normal, for Student's t with N - 1 df. Measured on the synthetic world, it errs on the safe
    side: the score test alone rejected 0 of those 200 random sets at p < 0.05, and with
    class-balanced exports no object material (unrelated to every class) came out significant
    in 225 tests (4 settings: two and three classes, 40 to 80 images per set, 10 and 20 runs,
    5 exports each), where the references' test called 2 to 9 significant per setting. The
    price is power with small sets: a colour planted in 95% of the stars is significant in 5
    of 5 exports at 80 images x 10 runs, 3 of 5 at 60 x 20.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from scipy import stats as scipy_stats

from cnnexplain.metrics.stats import (
    TTest,
    bonferroni,
    fisher_exact_greater,
    probit_count_step,
    probit_sign_counts,
    subsample_ttest,
    twice_median,
)

if TYPE_CHECKING:
    from cnnexplain.config.tcav import TCAVConfig

TABLE_COLUMNS = ["concept", "class", "class_index", "layer", "score_mean", "score_std",
                 "magnitude", "i_plus", "i_minus", "intervention_inputs", "cav_accuracy",
                 "p_ttest", "p_ttest_bonferroni", "p_value", "cav_p_value", "significant",
                 "significance", "n_runs", "random_score_mean", "random_score_std",
                 "null_score", "ttest_statistic", "t_statistic", "df", "p_value_uncorrected",
                 "cav_p_value_uncorrected", "train_share", "magnitude_std", "i_plus_std",
                 "i_minus_std", "cav_accuracy_std", "sensitivity_mean", "n_class_inputs",
                 "n_intervention_inputs", "n_tests", "bonferroni"]


def _paper(table: pd.DataFrame, alpha: float, corrected: bool) -> pd.Series:
    return table["p_ttest_bonferroni" if corrected else "p_ttest"] < alpha


def _calibrated(table: pd.DataFrame, alpha: float, corrected: bool) -> pd.Series:
    return (table["p_value"] < alpha) & (table["cav_p_value"] < alpha)


def _paper_and_cav(table: pd.DataFrame, alpha: float, corrected: bool) -> pd.Series:
    return _paper(table, alpha, corrected) & (table["cav_p_value"] < alpha)


DECISIONS = {"ttest": _paper, "calibrated": _calibrated, "ttest-cav": _paper_and_cav}
"""How each ``significance`` decides the ``significant`` column from the corrected p-values
(module docstring, "Decision"): table, alpha, whether Bonferroni applies -> bool per row."""


def kim_ttest(concept_scores: Sequence[float], random_scores: Sequence[float]) -> TTest:
    """The TCAV paper's significance test (Kim et al. 2018, sec. 3.2; tcav's ``get_p_val``): a
    two-sided two-sample Student t-test with equal variances (``scipy.stats.ttest_ind``) of
    the concept's TCAV scores [N] (its CAVs against random_1 .. random_N) against the
    random-vs-random TCAV scores [M]. Returns ``TTest(t, p, df = N + M - 2)``: t > 0 when the
    concept's mean is higher; p = 1 where t is undefined (both samples constant and equal, or
    fewer than 2 values in all), 0 where both are constant and differ."""
    a = np.asarray(concept_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(random_scores, dtype=np.float64).reshape(-1)
    df = float(len(a) + len(b) - 2)
    if len(a) < 1 or len(b) < 1 or df < 1:
        return TTest(float("nan"), 1.0, df)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's "nearly identical" notice
        res = scipy_stats.ttest_ind(a, b)
    t, p = float(res.statistic), float(res.pvalue)
    return TTest(t, 1.0 if np.isnan(p) else min(1.0, p), df)


def summarize(runs: pd.DataFrame, concepts: Sequence[str], targets: Sequence[tuple[int, str]],
              layers: Sequence[str], config: TCAVConfig) -> pd.DataFrame:
    """One row per (concept, class, layer) from the per-CAV rows of :func:`run_tcav`: means and
    population stds over the runs, the paper's t-test (``p_ttest``, and ``p_ttest_bonferroni``
    always corrected over all rows) and the two calibrated tests of the module docstring
    (corrected unless ``config.bonferroni`` is False), and ``significant`` as
    ``config.significance`` decides (module docstring, "Decision").

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
                paper = kim_ttest(c["sign_count"].to_numpy(), base["sign_count"].to_numpy())
                rows.append({
                    "p_ttest": paper.pvalue, "ttest_statistic": paper.statistic,
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
                    "n_intervention_inputs": int(c["n_intervention_inputs"].iloc[0]),
                })
    table = pd.DataFrame(rows)
    n_tests = len(table)
    for col in ("p_value", "cav_p_value"):
        p = table[f"{col}_uncorrected"].to_numpy(dtype=np.float64)
        table[col] = bonferroni(p, n_tests) if config.bonferroni else p
    table["p_ttest_bonferroni"] = bonferroni(table["p_ttest"].to_numpy(np.float64), n_tests)
    alpha = float(config.alpha)
    table["significant"] = DECISIONS[config.significance](table, alpha, bool(config.bonferroni))
    table["significance"] = config.significance
    table["intervention_inputs"] = config.intervention_inputs
    table["n_tests"] = n_tests
    table["bonferroni"] = bool(config.bonferroni)
    return table[TABLE_COLUMNS]
