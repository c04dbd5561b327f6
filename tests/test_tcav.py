"""TCAV building blocks: directional derivatives against autograd (also at a layer followed by an
in-place op), the CAV solver against scikit-learn's exact optima, its sign convention,
subsampling and held-out table, the scores, the significance tests against scipy, reproducibility
and caching of the pipeline, Broden concept sets, and the CLI's one-line errors. (The known answer
and the calibration on a trained model are in test_tcav_known_answer.py.)"""

from __future__ import annotations

import hashlib

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats as scipy_stats
from torch import nn

from clihelp import assert_one_line_error, run_inproc, snapshot
from data_fixtures import _one_thread, broden_export  # noqa: F401

from cnnexplain.cache.store import Cache
from cnnexplain.data.base import ImageDataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import SyntheticDataset, WorldConfig
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.explain import tcav as T
from cnnexplain.fingerprint import module_digest
from cnnexplain.metrics.stats import (
    bonferroni, fisher_exact_greater, probit_count_step, probit_sign_counts, subsample_ttest,
    twice_median)
from cnnexplain.models.layers import split_at
from cnnexplain.models.smallcnn import SmallCNN

PREP = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


# ---------------------------------------------------------------------------------------------
# Directional derivatives, scores
# ---------------------------------------------------------------------------------------------


def tiny_model(seed: int = 0, classes: int = 3) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(classes, width=4).eval()


class SkipNet(nn.Module):
    """conv -> relu -> conv2 (+ skip) -> relu -> pool -> fc: cutting at conv2 needs the skip."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        h = self.relu2(self.conv2(h) + h)
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("make,layer", [(tiny_model, "features.6"), (SkipNet, "conv2")])
def test_directional_derivative_matches_autograd(make, layer):
    torch.manual_seed(1)
    model = make().eval()
    x = torch.randn(5, 3, 16, 16)
    split = split_at(model, layer)
    a, *extras = split.body(x)
    if layer == "conv2":
        assert extras, "the skip input must be an extra of the tail"
    v = torch.randn(a[0].numel())
    v = v / v.norm()
    grads = T.logit_gradients(split.tail, a, extras, class_index=2, batch_size=2)
    s = T.directional_derivatives(grads, v.numpy())
    # reference: d/dt logit_2(tail(a + t v)) at t = 0, per input, by autograd on t
    for i in range(5):
        t = torch.zeros((), requires_grad=True)
        ai = a[i:i + 1].detach() + t * v.view(a.shape[1:])
        logit = split.tail(ai, *[e[i:i + 1].detach() for e in extras])[0, 2]
        (dt,) = torch.autograd.grad(logit, t)
        np.testing.assert_allclose(s[i], float(dt), rtol=1e-4, atol=1e-6)
    # and the tail really is the model after the layer
    torch.testing.assert_close(split.tail(a, *extras), model(x))


def test_a_layer_followed_by_an_in_place_op_is_measured_before_it():
    """features.9 is a BatchNorm followed by ReLU(inplace=True): the recorded (cached)
    activations must be the BatchNorm's output, not the ReLU's, and the gradients those of the
    model with respect to that output."""
    from cnnexplain.activations import compute_activations

    model = tiny_model()
    torch.manual_seed(3)
    images = torch.rand(6, 3, 16, 16)
    layer = "features.9"
    split = T.check_layers(model, [layer])[layer]
    a, *extras = split.body(PREP.normalize(images))
    assert not extras and bool((a < 0).any())  # the BN output has negatives: not yet ReLU'd

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"image": images[i], "label": torch.tensor(0), "index": torch.tensor(i)}

        def fingerprint(self):
            return "six-random-images"

    acts = compute_activations(model, [layer], Images(), model_fingerprint="m",
                               preprocessing=PREP, cache=Cache(enabled=False)).array(layer)
    np.testing.assert_allclose(acts, a.detach().numpy(), rtol=1e-6, atol=1e-6)
    # reference gradient: the full model, with the BN output swapped for a leaf by a hook
    leaf = a.detach().clone().requires_grad_(True)
    handle = model.features[9].register_forward_hook(lambda m, i, o: leaf.clone())
    try:
        logits = model(PREP.normalize(images))
    finally:
        handle.remove()
    (want,) = torch.autograd.grad(logits[:, 1].sum(), leaf)
    grads = T.logit_gradients(split.tail, a, extras, class_index=1, batch_size=4)
    np.testing.assert_allclose(grads.numpy(), want.reshape(6, -1).numpy(), rtol=1e-5, atol=1e-7)
    assert torch.equal(split.body(PREP.normalize(images))[0], a)  # the tail changed nothing


def test_sign_count_and_magnitude_definitions():
    s = np.array([2.0, -1.0, 0.0, 3.0, -4.0])
    assert T.sign_count(s) == pytest.approx(2 / 5)  # strict: S = 0 does not count
    # captum: sum |S| [S > 0] / sum |S|
    assert T.magnitude(s) == pytest.approx(5.0 / 10.0)
    assert T.magnitude(np.zeros(4)) == 0.0
    assert T.magnitude(np.array([1.0, 2.0])) == 1.0
    assert T.sign_count(np.array([-1.0, -2.0])) == 0.0


class LinearTail(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.fc.weight.data = weight

    def forward(self, a):
        return self.fc(a.flatten(1))


def test_interventional_scores_follow_the_probability():
    # two classes; logit_0 - logit_1 = a . (w0 - w1): adding v = w0 - w1 raises p_0 everywhere
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tail = LinearTail(w)
    a = torch.randn(7, 3)
    v = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    assert T.interventional_scores(tail, a, [], v, 0) == (1.0, 1.0)
    assert T.interventional_scores(tail, a, [], -v, 0) == (0.0, 0.0)
    # a direction that leaves the logits unchanged moves no probability (strict comparisons)
    assert T.interventional_scores(tail, a, [], np.array([0.0, 0.0, 1.0]), 0) == (0.0, 0.0)
    # I+ is the probability-based twin of the sign count for a linear tail
    grads = T.logit_gradients(tail, a, [], 0)
    assert T.sign_count(T.directional_derivatives(grads, v)) == 1.0


def test_interventional_scores_step_units():
    # p_0 rises for small steps but, past the maximum of a bump, falls: eps matters
    class Bump(nn.Module):
        def forward(self, a):
            z = a.flatten(1)[:, :1]
            return torch.cat([-(z - 1.0) ** 2, torch.zeros_like(z)], dim=1)

    a = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    v = np.array([1.0, 0.0])
    # eps = 1: 0 -> 1 rises, 0.5 -> 1.5 stays at the same height (not strictly higher)
    assert T.interventional_scores(Bump(), a, [], v, 0, step=1.0) == (0.5, 1.0)
    # eps = 3: 0 -> 3 and 0.5 -> 3.5 both fall
    assert T.interventional_scores(Bump(), a, [], v, 0, step=3.0)[0] == 0.0
    # norm units: eps = 0.5 * |a|: 0 stays (eps 0), 0.5 -> 0.75 rises
    assert T.interventional_scores(Bump(), a, [], v, 0, step=0.5, step_units="norm") == (0.5, 0.5)
    with pytest.raises(UsageError):
        T.interventional_scores(Bump(), a, [], v, 0, step_units="percent")


# ---------------------------------------------------------------------------------------------
# CAV training
# ---------------------------------------------------------------------------------------------


def blobs(n=60, d=40, shift=1.5, seed=0):
    rng = np.random.default_rng(seed)
    direction = np.zeros(d)
    direction[3] = 1.0
    pos = rng.normal(size=(n, d)) + shift * direction
    neg = rng.normal(size=(n, d)) - shift * direction
    return pos.astype(np.float32), neg.astype(np.float32), direction


@pytest.mark.parametrize("loss", ["hinge", "logistic"])
def test_cav_points_toward_the_concept(loss):
    pos, neg, direction = blobs(n=80, d=10)
    cav = T.train_cav(pos, neg, T.CAVConfig(loss=loss), seed=0)
    assert np.linalg.norm(cav.vector) == pytest.approx(1.0, abs=1e-5)
    assert float(cav.vector @ direction) > 0.8
    assert int(np.argmax(np.abs(cav.vector))) == 3
    assert cav.accuracy > 0.85 and cav.converged
    flipped = T.train_cav(neg, pos, T.CAVConfig(loss=loss), seed=0)
    assert float(flipped.vector @ direction) < -0.8
    # orientation is by label, not by order in the data: concept activations are +1
    assert float((pos @ cav.vector).mean() + cav.intercept) > 0 > float(
        (neg @ cav.vector).mean() + cav.intercept)


def _train_rows(pos, neg, seed, config=T.CAVConfig(), subsample=1.0):
    """(x, y, positive rows, negative rows) of the rows train_cav trains on: the same seeded
    subsample, equal truncation and stratified split, re-derived independently."""
    ss = np.random.SeedSequence(seed).spawn(3)
    if subsample < 1:
        m = min(T.subsample_size(len(pos), subsample), len(neg))
        rows = np.sort(np.random.default_rng(ss[2]).choice(len(pos), size=m, replace=False))
    else:
        m = min(len(pos), len(neg))
        rows = np.arange(m)
    tr_p, _ = T.stratified_split(m, config.test_fraction, int(ss[0].generate_state(1)[0]))
    tr_n, _ = T.stratified_split(m, config.test_fraction, int(ss[1].generate_state(1)[0]))
    x = np.concatenate([pos[rows[tr_p]], neg[tr_n]]).astype(np.float64)
    y = np.r_[np.ones(len(tr_p)), -np.ones(len(tr_n))]
    return x, y, rows[tr_p], tr_n


def _svm_optimum(x, y, alpha):
    """The exact optimum of alpha/2 |w|^2 + mean hinge: LinearSVC with C = 1 / (n alpha) (its
    intercept is a constant feature too, so it is given the same scale s). Unit w, b / |w|."""
    from sklearn.svm import LinearSVC

    s = float(np.sqrt((x ** 2).sum(1).mean()))
    svc = LinearSVC(C=1.0 / (len(y) * alpha), loss="hinge", dual=True, tol=1e-10,
                    max_iter=1_000_000, intercept_scaling=s).fit(x, y)
    norm = np.linalg.norm(svc.coef_[0])
    return svc.coef_[0] / norm, svc.intercept_[0] / norm


def test_pattern_cav_is_the_mean_difference_of_the_training_rows():
    """Pahde et al. 2022's pattern CAV: the unit mean difference of the rows trained on (the
    same seeded split as the classifier's), the nearest-mean intercept, and it follows the
    signal where a classifier's filter turns away from it: a distractor dimension that is
    noise shared by both sets (correlated with the signal dimension) bends the filter, not the
    pattern."""
    pos, neg, direction = blobs(n=80, d=10)
    config = T.CAVConfig(direction="pattern")
    cav = T.train_cav(pos, neg, config, seed=3)
    x, y, _, _ = _train_rows(pos, neg, 3, config)
    diff = x[y > 0].mean(0) - x[y < 0].mean(0)
    np.testing.assert_allclose(cav.vector, diff / np.linalg.norm(diff), atol=1e-6)
    mid = (x[y > 0].mean(0) + x[y < 0].mean(0)) / 2
    assert cav.intercept == pytest.approx(-float(diff @ mid) / np.linalg.norm(diff), abs=1e-6)
    assert cav.accuracy > 0.85 and cav.converged and cav.iterations == 0
    assert float(T.train_cav(neg, pos, config, seed=3).vector @ direction) < -0.8
    # signal s on dim 0 plus a shared distractor d: dim 0 = s + d, dim 1 = d
    rng = np.random.default_rng(0)
    n = 2000
    d = rng.normal(size=(2 * n,)) * 2.0
    s_ = np.r_[np.ones(n), np.zeros(n)] + 0.3 * rng.normal(size=2 * n)
    a = np.stack([s_ + d, d], 1).astype(np.float32)
    pattern = T.train_cav(a[:n], a[n:], config, seed=0).vector
    filt = T.train_cav(a[:n], a[n:], T.CAVConfig(loss="logistic"), seed=0).vector
    assert abs(pattern[1]) < 0.2 < abs(filt[1])  # the filter cancels d; the pattern is s


@pytest.mark.parametrize("subsample", [1.0, 0.5])
def test_hinge_cav_is_the_exact_optimum_of_the_svm_objective(subsample):
    """sklearn as the oracle, on the rows train_cav should train on: with subsample 0.5 this
    also checks that the subsample is the seeded draw it claims to be."""
    pos, neg, _ = blobs(n=50, d=30, shift=0.6, seed=3)  # overlapping: margin errors exist
    config = T.CAVConfig(tol=1e-7, max_iter=100000)
    cav = T.train_cav(pos, neg, config, seed=5, subsample=subsample)
    x, y, _, _ = _train_rows(pos, neg, 5, config, subsample)
    w, b = _svm_optimum(x, y, config.alpha)
    assert float(w @ cav.vector) > 0.9999
    assert cav.intercept == pytest.approx(b, abs=2e-3)


def test_logistic_cav_is_the_exact_optimum():
    from sklearn.linear_model import LogisticRegression

    pos, neg, _ = blobs(n=50, d=30, shift=0.6, seed=4)
    config = T.CAVConfig(loss="logistic", tol=1e-8, max_iter=5000)
    cav = T.train_cav(pos, neg, config, seed=2)
    x, y, _, _ = _train_rows(pos, neg, 2, config)
    lr = LogisticRegression(C=1.0 / (len(y) * config.alpha), tol=1e-10, max_iter=100000).fit(x, y)
    w = lr.coef_[0] / np.linalg.norm(lr.coef_[0])
    assert float(w @ cav.vector) > 0.9999


@pytest.mark.parametrize("solver", sorted(T.SOLVERS))
def test_solvers_are_symmetric_in_the_labels(solver):
    """Swapping the two sets negates w and b: the reason a random direction's expected sign
    count is 1/2 (the score test's known centre)."""
    pos, neg, _ = blobs(n=20, d=12, shift=0.4, seed=7)
    x = torch.from_numpy(np.concatenate([pos, neg]).astype(np.float64))
    y = torch.cat([torch.ones(20), -torch.ones(20)]).double()
    w, b, _, _ = T.SOLVERS[solver](x, y, 0.01, 5000, 1e-10)
    w2, b2, _, _ = T.SOLVERS[solver](x, -y, 0.01, 5000, 1e-10)
    torch.testing.assert_close(w2, -w, rtol=1e-6, atol=1e-8)
    assert b2 == pytest.approx(-b, rel=1e-6, abs=1e-8)


def test_cav_split_is_stratified_seeded_and_truncated():
    tr, te = T.stratified_split(30, 0.33, seed=1)
    assert len(te) == 10 and len(tr) == 20 and not set(tr) & set(te)
    again = T.stratified_split(30, 0.33, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((tr, te), again))
    assert not np.array_equal(te, T.stratified_split(30, 0.33, seed=2)[1])
    pos, neg, _ = blobs(n=40)
    cav = T.train_cav(pos, neg[:25], seed=0)  # equal-size truncation to 25 per side
    assert (cav.n_train, cav.pool) == (17, 25)
    # held out: the 8 split-off of each side, and the 15 positives the truncation left out
    assert (cav.test_tp + cav.test_fn, cav.test_tn + cav.test_fp) == (40 - 17, 25 - 17)
    with pytest.raises(CnnexplainError, match="at least 2 images"):
        T.train_cav(pos[:1], neg, seed=0)
    with pytest.raises(CnnexplainError, match="no direction"):
        T.train_cav(np.ones((6, 4)), np.ones((6, 4)), seed=0)
    with pytest.raises(UsageError, match="unknown `loss` 'svm'"):
        T.train_cav(pos, neg, T.CAVConfig(loss="svm"))
    with pytest.raises(UsageError, match="concept subsample must be in"):
        T.train_cav(pos, neg, subsample=0.0)
    with pytest.raises(CnnexplainError, match="too small"):
        T.train_cav(pos[:2], neg, subsample=0.5)


def test_held_out_rows_are_decided_as_in_float64_without_a_float64_copy():
    """Held-out float32 rows are scored in float32; rows within the product's worst-case
    rounding error of the boundary are rescored in float64, so every decision is float64's:
    here rows planted at |score| ~ 1e-9 (far inside float32's error) and rows far from it."""
    rng = np.random.default_rng(3)
    d = 4096
    w = torch.from_numpy(rng.normal(size=d))
    b = 0.25
    far = rng.normal(size=(200, d)).astype(np.float32)
    near = rng.normal(size=(200, d))
    wn = w.numpy()
    # project each near row onto the hyperplane w . x + b = 0, then nudge it by +-1e-9
    near = near - ((near @ wn + b) / (wn @ wn))[:, None] * wn[None, :]
    near = near + (rng.choice([-1.0, 1.0], size=200) * 1e-9 / np.linalg.norm(wn))[:, None] * wn
    near = near.astype(np.float32)  # float32 rows: their float64 scores are what counts
    x = np.concatenate([far, near])
    want = (x.astype(np.float64) @ wn + b) > 0
    got = T.cav._says_concept(x, w, b)
    np.testing.assert_array_equal(got, want)
    # the float32 product alone gets some near rows wrong: the fallback is what decides them
    fast = (x @ wn.astype(np.float32)).astype(np.float64) + b > 0
    assert (fast != want).any()
    # a tensor input gives the same; a NaN or inf row is an error, not a decision
    np.testing.assert_array_equal(T.cav._says_concept(torch.from_numpy(x), w, b), want)
    for bad in (np.nan, np.inf):
        broken = x.copy()
        broken[5, 7] = bad
        with pytest.raises(CnnexplainError, match="NaN or inf"):
            T.cav._says_concept(broken, w, b)
    pos, neg, _ = blobs(n=20)
    pos = pos.copy()
    pos[0, 0] = np.nan
    with pytest.raises(CnnexplainError, match="NaN or inf"):
        T.train_cav(pos, neg, seed=0)


def test_subsampled_cav_held_out_table():
    """A subsampled CAV draws another share of the positives for each seed; its held-out table
    covers every image it was not trained on, and its accuracy is the balanced one."""
    pos, neg, direction = blobs(n=60, d=20, shift=0.35, seed=11)
    neg = neg[:50]
    cavs = {seed: T.train_cav(pos, neg, seed=seed, subsample=0.5) for seed in (1, 2)}
    rows = {seed: _train_rows(pos, neg, seed, subsample=0.5)[2] for seed in (1, 2)}
    assert not np.array_equal(rows[1], rows[2])
    for seed, cav in cavs.items():
        _, _, train_p, train_n = _train_rows(pos, neg, seed, subsample=0.5)
        assert cav.pool == 60 and cav.n_train == len(train_p) == 30 - 10
        assert cav.train_share == pytest.approx(20 / 60)
        held_p = np.setdiff1d(np.arange(60), train_p)
        held_n = np.setdiff1d(np.arange(50), train_n)
        v = cav.vector.astype(np.float64)
        tp = int((pos[held_p] @ v + cav.intercept > 0).sum())
        fp = int((neg[held_n] @ v + cav.intercept > 0).sum())
        assert (cav.test_tp, cav.test_fn) == (tp, len(held_p) - tp)
        assert (cav.test_tn, cav.test_fp) == (len(held_n) - fp, fp)
        assert cav.accuracy == pytest.approx((tp / len(held_p) + 1 - fp / len(held_n)) / 2)
        assert 0.5 < cav.accuracy < 1.0  # overlapping blobs: informative, not perfect
    # further random images count as held-out negatives only: same CAV, bigger table
    more = neg[:30] - 0.2
    extra = T.train_cav(pos, neg, seed=1, subsample=0.5, extra_negatives=[more, more[:0]])
    np.testing.assert_array_equal(extra.vector, cavs[1].vector)
    v = extra.vector.astype(np.float64)
    fp_more = int((more @ v + extra.intercept > 0).sum())
    assert (extra.test_tp, extra.test_fn) == (cavs[1].test_tp, cavs[1].test_fn)
    assert extra.test_fp == cavs[1].test_fp + fp_more
    assert extra.test_tn + extra.test_fp == cavs[1].test_tn + cavs[1].test_fp + 30


# ---------------------------------------------------------------------------------------------
# Statistics (scipy as the oracle)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_subsample_ttest_against_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3 * seed, 1.0, size=int(rng.integers(2, 15)))
    n = len(x)
    ref = scipy_stats.ttest_1samp(x, 0.1)
    # a vanishing share: the plain one-sample t-test
    plain = subsample_ttest(x, 1e-15, center=0.1)
    assert plain.statistic == pytest.approx(float(ref.statistic), rel=1e-9)
    assert plain.pvalue == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert plain.df == n - 1
    # share f: the variance grows by (f / (1 - f) + 1/n) / (1/n)
    for f in (0.5, 0.675):
        ours = subsample_ttest(x, f, center=0.1)
        expected_t = float(ref.statistic) / np.sqrt(n * f / (1 - f) + 1)
        assert ours.statistic == pytest.approx(expected_t, rel=1e-9)
        assert ours.pvalue == pytest.approx(2 * scipy_stats.t.sf(abs(expected_t), n - 1),
                                            rel=1e-9)
        assert ours.pvalue > plain.pvalue or plain.pvalue == 1.0


def test_subsample_ttest_edge_cases():
    assert subsample_ttest([1.0, 1.0, 1.0], 0.5).statistic == np.inf
    assert subsample_ttest([1.0, 1.0, 1.0], 0.5).pvalue == 0.0
    assert subsample_ttest([-2.0, -2.0], 0.5).statistic == -np.inf
    tied = subsample_ttest([0.5, 0.5, 0.5], 0.5, center=0.5)
    assert np.isnan(tied.statistic) and tied.pvalue == 1.0
    # the floor: runs that agree exactly still have the variance of one count's rounding
    floored = subsample_ttest([1.0, 1.0, 1.0], 0.5, min_variance=0.09)
    assert floored.statistic == pytest.approx(1.0 / np.sqrt(0.09 * (1 + 1 / 3)))
    assert subsample_ttest([0.0, 2.0], 0.5, min_variance=0.09).statistic == pytest.approx(
        subsample_ttest([0.0, 2.0], 0.5).statistic)  # above the floor: unchanged
    with pytest.raises(UsageError, match="`random_runs=2`"):
        subsample_ttest([1.0], 0.5)
    with pytest.raises(UsageError, match="`concept_subsample=0.5`"):
        subsample_ttest([1.0, 2.0], 1.0)


def test_probit_sign_counts():
    z = probit_sign_counts([0, 3, 5, 7, 10], 10)
    np.testing.assert_allclose(z, scipy_stats.norm.ppf(np.array([0.5, 3.5, 5.5, 7.5, 10.5]) / 11))
    np.testing.assert_allclose(z, -z[::-1])  # odd: k -> n - k gives -z, so 0 is the null
    assert z[2] == pytest.approx(0.0) and np.isfinite(z).all()
    assert probit_count_step(10, 10) == pytest.approx(z[4] - probit_sign_counts([9], 10)[0])
    assert probit_count_step(0.2, 10) == pytest.approx(probit_sign_counts([1], 10)[0] - z[0])
    with pytest.raises(ValueError):
        probit_sign_counts([11], 10)


@pytest.mark.parametrize("table", [(5, 1, 4, 2), (0, 6, 6, 0), (3, 3, 3, 3), (7, 0, 0, 2),
                                   (12, 14, 20, 6), (0, 0, 3, 1)])
def test_fisher_exact_matches_scipy(table):
    tp, fn, tn, fp = table
    ref = scipy_stats.fisher_exact([[tp, fn], [fp, tn]], alternative="greater")[1]
    assert fisher_exact_greater(tp, fn, tn, fp) == pytest.approx(float(ref), rel=1e-12)


def test_fisher_exact_is_valid_for_a_biased_classifier():
    """Under its null (labels exchangeable given the predictions) a classifier that calls 90%
    of everything positive must not look better than chance: p-values stay uniform-or-larger
    even with unequal sides. (A binomial test of the accuracy against 1/2 would not be.)"""
    rng = np.random.default_rng(0)
    ps, accs = [], []
    for _ in range(2000):
        pred_p, pred_n = rng.random(30) < 0.9, rng.random(10) < 0.9
        tp, fp = int(pred_p.sum()), int(pred_n.sum())
        ps.append(fisher_exact_greater(tp, 30 - tp, 10 - fp, fp))
        accs.append((tp + 10 - fp) / 40)
    ps = np.asarray(ps)
    assert (ps < 0.05).mean() <= 0.05 and (ps < 0.2).mean() <= 0.2
    assert np.mean(accs) > 0.65  # the plain accuracy of such a classifier is well above 1/2


def test_twice_median_is_valid_under_dependence():
    assert twice_median([0.01, 0.2, 0.03]) == pytest.approx(0.06)
    assert twice_median([0.01, 0.2, 0.03, 0.5]) == pytest.approx(0.06)  # lower median
    assert twice_median([0.4, 0.9]) == 0.8 and twice_median([0.7]) == 1.0
    # strongly dependent p-values (a shared part and a private part), uniform each: the merged
    # p-value may be conservative but never below its level
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(20000, 1))
    z = 0.8 * shared + 0.6 * rng.normal(size=(20000, 9))
    merged = np.array([twice_median(row) for row in scipy_stats.norm.sf(z)])
    for level in (0.01, 0.05, 0.2):
        assert (merged <= level).mean() <= level
    with pytest.raises(ValueError):
        twice_median([])


def test_bonferroni():
    p = np.array([0.001, 0.02, 0.3, 0.9])
    np.testing.assert_allclose(bonferroni(p), [0.004, 0.08, 1.0, 1.0])
    np.testing.assert_allclose(bonferroni(p, n_tests=10), [0.01, 0.2, 1.0, 1.0])
    with pytest.raises(ValueError):
        bonferroni(p, n_tests=2)


def _run_row(concept, role, run, layer, n_positive, cav_counts, n_train=20, pool=100):
    tp, fn, tn, fp = cav_counts
    return dict(concept=concept, negative=f"random_{run}", role=role, run=run,
                **{"class": "k"}, class_index=0, layer=layer, sign_count=n_positive / 10,
                n_positive=n_positive, magnitude=0.8, i_plus=0.7, i_minus=0.6,
                sensitivity_mean=1.0, cav_accuracy=(tp / (tp + fn) + tn / (tn + fp)) / 2,
                cav_n_train=n_train, cav_pool=pool, cav_test_tp=tp, cav_test_fn=fn,
                cav_test_tn=tn, cav_test_fp=fp, cav_key="x", n_class_inputs=10,
                n_nonzero_gradients=10, n_intervention_inputs=30)


def test_summary_statistics_and_correction():
    """Per row: the score test on the probit sign counts with the concept's train share, the
    CAV test on twice the median of the runs' Fisher p-values, both Bonferroni-corrected;
    with ``significance="calibrated"`` significant only when both are."""
    counts = {"strong": [10, 10, 10, 9], "weak": [10, 10, 10, 9], "absent": [6, 2, 5, 9]}
    tables = {"strong": [(30, 10, 35, 5), (5, 35, 6, 34), (31, 9, 36, 4), (28, 12, 33, 7)],
              "weak": [(21, 19, 22, 18), (36, 4, 37, 3), (19, 21, 20, 20), (22, 18, 19, 21)],
              "absent": [(36, 4, 38, 2)] * 4}
    rows = []
    for layer in ("l1", "l2"):
        for run in range(1, 5):
            for concept in counts:
                rows.append(_run_row(concept, "concept", run, layer, counts[concept][run - 1],
                                     tables[concept][run - 1]))
            rows.append(_run_row(f"random_{run - 1}", "baseline", run, layer,
                                 [2, 6, 4, 8][run - 1], (20, 20, 20, 20)))
    runs = pd.DataFrame(rows)
    config = T.TCAVConfig(random_runs=4, significance="calibrated")
    table = T.summarize(runs, list(counts), [(0, "k")], ["l1", "l2"], config)
    assert list(table.columns) == T.TABLE_COLUMNS
    assert len(table) == 6 and (table["n_tests"] == 6).all()
    by = table[table["layer"] == "l1"].set_index("concept")
    z = scipy_stats.norm.ppf((np.array(counts["strong"]) + 0.5) / 11)
    share = 20 / 100
    t = z.mean() / np.sqrt(z.var(ddof=1) * (share / (1 - share) + 1 / 4))
    raw = 2 * scipy_stats.t.sf(abs(t), 3)
    assert by.loc["strong", "p_value_uncorrected"] == pytest.approx(raw, rel=1e-9)
    assert by.loc["strong", "p_value"] == pytest.approx(min(1.0, 6 * raw), rel=1e-9)
    assert by.loc["strong", "train_share"] == pytest.approx(share)
    fisher = sorted(scipy_stats.fisher_exact([[tp, fn], [fp, tn]], alternative="greater")[1]
                    for tp, fn, tn, fp in tables["strong"])
    cav_raw = 2 * fisher[1]  # twice the (lower) median of the 4 runs: one bad run is outvoted
    assert by.loc["strong", "cav_p_value_uncorrected"] == pytest.approx(cav_raw, rel=1e-9)
    assert by.loc["strong", "cav_p_value"] == pytest.approx(min(1.0, 6 * cav_raw), rel=1e-9)
    assert by.loc["strong", "score_mean"] == pytest.approx(39 / 40)
    assert by.loc["strong", "score_std"] == pytest.approx(np.std([1.0, 1.0, 1.0, 0.9]))
    assert by.loc["strong", "random_score_mean"] == pytest.approx(0.5)
    assert by.loc["strong", "null_score"] == 0.5 and by.loc["strong", "df"] == 3
    # both tests must reject: "weak" has the same scores but CAVs at chance (one lucky run)
    assert by.loc["weak", "p_value"] == by.loc["strong", "p_value"]
    assert by.loc["weak", "cav_p_value"] > 0.05
    # "absent" has a perfect CAV but scores that straddle the null
    assert by.loc["absent", "cav_p_value"] < 1e-10 and by.loc["absent", "p_value"] > 0.05
    assert 6 * raw < 0.05 and 6 * cav_raw < 0.05
    assert by["significant"].to_dict() == {"strong": True, "weak": False, "absent": False}
    # the Bonferroni factor matters: at alpha 0.01 only the uncorrected p passes
    assert raw < 0.01 < 6 * raw
    strict = T.TCAVConfig(random_runs=4, alpha=0.01, significance="calibrated")
    assert not T.summarize(runs, list(counts), [(0, "k")], ["l1", "l2"],
                           strict)["significant"].any()
    off = T.summarize(runs, list(counts), [(0, "k")], ["l1", "l2"],
                      T.TCAVConfig(random_runs=4, bonferroni=False, alpha=0.01,
                                   significance="calibrated"))
    off = off[off["concept"] == "strong"]
    assert off["p_value"].to_numpy() == pytest.approx([raw, raw], rel=1e-9)
    assert off["significant"].all()
    # ttest-cav: the paper's t-test and the CAV test must both reject
    both = T.summarize(runs, list(counts), [(0, "k")], ["l1", "l2"],
                       T.TCAVConfig(random_runs=4, significance="ttest-cav"))
    paper = both["p_ttest_bonferroni"] < 0.05
    assert (both["significant"] == (paper & (both["cav_p_value"] < 0.05))).all()
    b1 = both[both["layer"] == "l1"].set_index("concept")
    assert b1.loc["weak", "p_ttest"] == b1.loc["strong", "p_ttest"]  # same scores ...
    assert not b1.loc["weak", "significant"]  # ... but a CAV at chance
    assert b1.loc["strong", "significant"] == bool(b1.loc["strong", "p_ttest_bonferroni"] < 0.05)
    assert (both["significance"] == "ttest-cav").all()
    with pytest.raises(UsageError, match="`random_runs` must be at least 2"):
        T.TCAVConfig(random_runs=1).validate()
    with pytest.raises(UsageError, match="`concept_subsample` must be in"):
        T.TCAVConfig(concept_subsample=1.5).validate()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kim_ttest_is_scipys_two_sample_ttest(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.3, 1, 10), rng.uniform(0, 0.8, 10)
    got = T.kim_ttest(a, b)
    want = scipy_stats.ttest_ind(a, b)  # equal variances, two-sided: tcav's get_p_val
    assert got.statistic == pytest.approx(float(want.statistic), rel=1e-12)
    assert got.pvalue == pytest.approx(float(want.pvalue), rel=1e-12)
    assert got.df == 18


def test_kim_ttest_edge_cases():
    same = T.kim_ttest([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # undefined: no evidence
    assert np.isnan(same.statistic) and same.pvalue == 1.0
    apart = T.kim_ttest([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])  # constant and different
    assert apart.statistic == np.inf and apart.pvalue == 0.0
    assert T.kim_ttest([0.7], [0.2]).pvalue == 1.0  # df 0
    assert T.kim_ttest([], [0.2, 0.3]).pvalue == 1.0


def _significance_runs() -> pd.DataFrame:
    """Two layers x three concepts x 5 runs, with a baseline whose sign counts vary."""
    counts = {"high": [10, 9, 10, 9, 10], "mid": [7, 5, 8, 4, 6], "low": [3, 6, 2, 7, 5]}
    rows = []
    for layer in ("l1", "l2"):
        for run in range(1, 6):
            for concept, k in counts.items():
                rows.append(_run_row(concept, "concept", run, layer, k[run - 1],
                                     (30, 10, 35, 5)))
            rows.append(_run_row(f"random_{run - 1}", "baseline", run, layer,
                                 [4, 6, 5, 3, 7][run - 1], (20, 20, 20, 20)))
    return pd.DataFrame(rows)


def test_paper_ttest_decides_by_default_with_an_exact_bonferroni_factor():
    runs = _significance_runs()
    concepts, targets, layers = ["high", "mid", "low"], [(0, "k")], ["l1", "l2"]
    table = T.summarize(runs, concepts, targets, layers, T.TCAVConfig(random_runs=5))
    assert list(table.columns) == T.TABLE_COLUMNS
    assert (table["significance"] == "ttest").all() and (table["n_tests"] == 6).all()
    base = np.array([4, 6, 5, 3, 7]) / 10
    by = table[table["layer"] == "l1"].set_index("concept")
    for concept, k in {"high": [10, 9, 10, 9, 10], "mid": [7, 5, 8, 4, 6]}.items():
        want = scipy_stats.ttest_ind(np.array(k) / 10, base)
        assert by.loc[concept, "p_ttest"] == pytest.approx(float(want.pvalue), rel=1e-12)
        assert by.loc[concept, "ttest_statistic"] == pytest.approx(float(want.statistic),
                                                                   rel=1e-12)
    # Bonferroni over the m = 6 (concept, class, layer) tests, exactly min(1, m p)
    for p, q in zip(table["p_ttest"], table["p_ttest_bonferroni"]):
        assert q == min(1.0, p * 6)
    # the corrected p decides: "high" passes, "mid" (0.6 against 0.5) does not
    assert by.loc["high", "p_ttest_bonferroni"] < 0.05 and by.loc["high", "significant"]
    assert not by.loc["mid", "significant"] and not by.loc["low", "significant"]
    # without the correction the uncorrected p decides; the calibrated columns are unchanged
    alpha = 3 * float(by.loc["high", "p_ttest"])  # between p and 6 p
    plain = T.summarize(runs, concepts, targets, layers,
                        T.TCAVConfig(random_runs=5, bonferroni=False, alpha=alpha))
    strict = T.summarize(runs, concepts, targets, layers,
                         T.TCAVConfig(random_runs=5, alpha=alpha))
    high = (plain["concept"] == "high").to_numpy()
    assert plain.loc[high, "significant"].all() and not strict.loc[high, "significant"].any()
    np.testing.assert_array_equal(plain["p_ttest_bonferroni"], table["p_ttest_bonferroni"])
    calibrated = T.summarize(runs, concepts, targets, layers,
                             T.TCAVConfig(random_runs=5, significance="calibrated"))
    np.testing.assert_array_equal(calibrated["p_ttest"], table["p_ttest"])
    np.testing.assert_array_equal(calibrated["significant"],
                                  (calibrated["p_value"] < 0.05)
                                  & (calibrated["cav_p_value"] < 0.05))
    assert (calibrated["significance"] == "calibrated").all()


def test_significance_and_intervention_options_are_checked():
    with pytest.raises(UsageError, match="`significance`"):
        T.TCAVConfig(significance="ttest-bonferroni").validate()
    with pytest.raises(UsageError, match="`intervention_inputs`"):
        T.TCAVConfig(intervention_inputs="every").validate()
    assert T.TCAVConfig().significance == "ttest"
    assert T.TCAVConfig().intervention_inputs == "all"


# Planted activations: a layer (an identity 1x1 convolution, so activations are the normalized
# pixels) whose class-0 logit rises with the mean of the red channel, plus a quadratic term whose
# gradient changes sign from input to input (so random directions score about 0.5).


class _Images(ImageDataset):
    """Images [n, 3, H, W] in [0, 1] with labels (-1: none), kept in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images = images.float()
        self.labels = torch.full((len(images),), -1) if labels is None else labels.long()
        self.preprocessing, self.class_names = PREP, ["a", "b"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}

    def fingerprint(self):
        return hashlib.sha256(self.images.numpy().tobytes()
                              + self.labels.numpy().tobytes()).hexdigest()


class _Planted(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.features.bias.zero_()
        self.register_buffer("proj", torch.randn(192, 8) / 192 ** 0.5)

    def forward(self, x):
        h = self.features(x)
        logit = 4.0 * h[:, 0].mean(dim=(1, 2)) + 0.2 * ((h.flatten(1) @ self.proj) ** 2).sum(1)
        return torch.stack([logit, torch.zeros_like(logit)], 1)


def _noise(g: torch.Generator, n: int, red: float = 0.0) -> torch.Tensor:
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[:, 0] = (x[:, 0] + red).clamp(0, 1)
    return x


def _planted_run(seed: int, runs: int = 10, inputs=None, **config) -> T.TCAVResult:
    g = torch.Generator().manual_seed(seed)
    model = _Planted().eval()
    concepts = {"red": _Images(_noise(g, 10, 0.3)), "noise": _Images(_noise(g, 10))}
    randoms = [(f"random_{i}", _Images(_noise(g, 10))) for i in range(runs + 1)]
    default_inputs = _Images(_noise(g, 20), torch.arange(20) % 2)
    res = T.run_tcav(model, ["features"], concepts, randoms, inputs or default_inputs,
                     [(0, "a")], model_fingerprint=module_digest(model), preprocessing=PREP,
                     config=T.TCAVConfig(random_runs=runs, seed=seed, **config))
    return res


def test_paper_ttest_finds_a_planted_concept_and_rarely_a_random_one():
    """The red CAV is aligned with the class gradient: significant (Bonferroni over the 2
    tests) in every repeat; a "concept" of random images: not significant at 0.05 in most
    (measured: 1 of 8)."""
    red, noise = [], []
    for seed in range(8):
        table = _planted_run(seed).table.set_index("concept")
        assert table.loc["red", "score_mean"] > 0.95
        red.append(table.loc["red", "p_ttest_bonferroni"])
        noise.append(table.loc["noise", "p_ttest_bonferroni"])
        assert table.loc["red", "significant"] == (red[-1] < 0.05)
        assert table.loc["noise", "significant"] == (noise[-1] < 0.05)
    assert max(red) < 0.05
    assert sum(p < 0.05 for p in noise) <= 2, noise


def test_intervention_inputs_all_is_the_whole_input_set_and_class_its_class_part():
    """I+ / I- over every input (default) = the two classes' parts weighted by their sizes;
    ``class`` averages over the target class's inputs only, and the table says which."""
    g = torch.Generator().manual_seed(7)
    images, labels = _noise(g, 20), torch.arange(20) % 2
    full = _Images(images, labels)
    part_a = _Images(images[labels == 0], labels[labels == 0])
    part_b = _Images(images[labels == 1], torch.zeros(10))  # relabelled: the "class" of a
    every = _planted_run(3, runs=3, inputs=full)
    only = _planted_run(3, runs=3, inputs=full, intervention_inputs="class")
    a = _planted_run(3, runs=3, inputs=part_a, intervention_inputs="class").runs
    b = _planted_run(3, runs=3, inputs=part_b, intervention_inputs="class").runs
    assert (every.table["intervention_inputs"] == "all").all()
    assert (every.table["n_intervention_inputs"] == 20).all()
    assert (only.table["intervention_inputs"] == "class").all()
    assert (only.table["n_intervention_inputs"] == 10).all()
    assert (every.table["n_class_inputs"] == 10).all()  # the TCAV score: class inputs only
    for col in ("i_plus", "i_minus"):
        np.testing.assert_allclose(only.runs[col], a[col], rtol=0, atol=1e-12)
        np.testing.assert_allclose(every.runs[col], (a[col] + b[col]) / 2, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(every.runs["sign_count"], only.runs["sign_count"])
    assert not np.allclose(every.runs["i_plus"], only.runs["i_plus"])


# ---------------------------------------------------------------------------------------------
# The pipeline: reproducibility, caching
# ---------------------------------------------------------------------------------------------


def write_sets(root: Path, n_random: int = 4, per: int = 6, res: int = 16) -> Path:
    """Concept folders with random-noise PNGs ('blobby' for concept 'bright': brighter images)."""
    rng = np.random.default_rng(0)
    for name in ["bright", "dark"] + [f"random_{i}" for i in range(n_random)]:
        d = root / name
        d.mkdir(parents=True)
        for j in range(per):
            img = rng.integers(0, 256, (res, res, 3))
            if name == "bright":
                img = np.clip(img + 90, 0, 255)
            if name == "dark":
                img = img // 3
            Image.fromarray(img.astype(np.uint8)).save(d / f"{j}.png")
    return root


def pipeline(model, root: Path, cache: Cache, seed: int = 0, runs: int = 3, layers=("features.6",),
             subsample: float = 1.0):
    sets = T.folder_concept_sets(root, ["bright", "dark"], random_sets=runs + 1, preprocessing=PREP)
    inputs = SyntheticDataset(WorldConfig(num_images=12, resolution=16, classes=("star", "circle",
                                                                                   "square")),
                              "train", PREP)
    return T.run_tcav(model, list(layers), sets.concepts, sets.randoms, inputs,
                      [(0, "star"), (2, "square")], model_fingerprint=module_digest(model),
                      preprocessing=PREP,
                      config=T.TCAVConfig(random_runs=runs, seed=seed, concept_subsample=subsample),
                      cache=cache, batch_size=5)


@pytest.fixture(scope="module")
def sets_root(tmp_path_factory):
    return write_sets(tmp_path_factory.mktemp("sets") / "concepts")


def test_pipeline_rows_and_reproducibility(sets_root, tmp_path):
    model = tiny_model()
    first = pipeline(model, sets_root, Cache(tmp_path / "c1"))
    table = first.table
    assert len(table) == 4 and first.n_tests == 4  # 2 concepts x 2 classes x 1 layer
    assert set(table["concept"]) == {"bright", "dark"} and set(table["class"]) == {"star", "square"}
    assert table[["score_mean", "magnitude", "i_plus", "i_minus", "cav_accuracy"]].apply(
        lambda c: c.between(0, 1)).all().all()
    assert (table["n_runs"] == 3).all() and (table["n_class_inputs"] == 4).all()
    assert len(first.runs) == (2 + 1) * 3 * 2  # (concepts + baseline) x runs x classes
    assert list(first.runs.columns) == T.RUN_COLUMNS
    assert first.stats["cav_trained"] == 9 and first.stats["cav_cached"] == 0
    # run k: the concepts against random_k; the baseline pairs random_(k-1) with random_k
    runs = first.runs[first.runs["class"] == "star"]
    base = runs[runs["role"] == "baseline"].sort_values("run")
    assert list(zip(base["concept"], base["negative"])) == [
        ("random_0", "random_1"), ("random_1", "random_2"), ("random_2", "random_3")]
    dark = runs[runs["concept"] == "dark"].sort_values("run")
    assert list(dark["negative"]) == ["random_1", "random_2", "random_3"]
    # every CAV trained on a random 4 of the 6 concept images (the split), the 2 others held out
    assert (runs["cav_pool"] == 6).all() and (runs["cav_n_train"] == 4).all()
    assert ((runs["cav_test_tp"] + runs["cav_test_fn"]) == 2).all()
    # held-out negatives: the 2 of its own random set, and all 6 of each of the run's other
    # random sets (random_0..random_3 but the CAV's own one or two)
    negatives = runs["cav_test_tn"] + runs["cav_test_fp"]
    assert (negatives[runs["role"] == "concept"] == 2 + 3 * 6).all()
    assert (negatives[runs["role"] == "baseline"] == 2 + 2 * 6).all()
    assert table["train_share"].to_numpy() == pytest.approx([4 / 6] * 4)
    # --concept-subsample 0.5: each CAV draws 3 of the 6, trains on 2; other CAVs, other keys
    half = pipeline(model, sets_root, Cache(tmp_path / "c1"), subsample=0.5)
    assert half.stats["cav_trained"] == 9
    assert (half.runs["cav_pool"] == 6).all() and (half.runs["cav_n_train"] == 2).all()
    assert half.table["train_share"].to_numpy() == pytest.approx([2 / 6] * 4)
    assert (runs["n_positive"] == (runs["sign_count"] * 4).round()).all()
    # same seed, fresh cache: identical numbers
    again = pipeline(model, sets_root, Cache(tmp_path / "c2"))
    pd.testing.assert_frame_equal(first.table, again.table, check_exact=True)
    pd.testing.assert_frame_equal(first.runs, again.runs, check_exact=True)
    # another seed: other held-out splits, so other CAVs (and keys)
    other = pipeline(model, sets_root, Cache(tmp_path / "c3"), seed=1)
    assert {c["key"] for c in other.cavs}.isdisjoint({c["key"] for c in first.cavs})
    cache = Cache(tmp_path / "c1")
    v0 = np.asarray(cache.load("cav", first.cavs[0]["key"])["cav"])
    v1 = np.asarray(Cache(tmp_path / "c3").load("cav", other.cavs[0]["key"])["cav"])
    assert not np.allclose(v0, v1)


def test_warm_cache_serves_everything_and_a_changed_image_is_never_stale(sets_root, tmp_path):
    model = tiny_model()
    cache_dir = tmp_path / "cache"
    first = pipeline(model, sets_root, Cache(cache_dir))
    warm = pipeline(model, sets_root, Cache(cache_dir))
    # keys come from fingerprints: a warm run reads one score entry per (layer, class), no
    # activations, CAVs or gradients
    assert warm.stats == {"cav_trained": 0, "cav_cached": 9, "scores_computed": 0,
                          "scores_cached": 2, "gradients_computed": 0, "gradients_cached": 0,
                          "activations_read": 0}
    assert [c["key"] for c in warm.cavs] == [c["key"] for c in first.cavs]
    pd.testing.assert_frame_equal(first.table, warm.table, check_exact=True)
    # change one image of one concept: only that concept's CAVs are trained again
    changed = tmp_path / "changed"
    import shutil

    shutil.copytree(sets_root, changed)
    img = changed / "dark" / "0.png"
    arr = np.asarray(Image.open(img)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(img)
    third = pipeline(model, changed, Cache(cache_dir))
    assert third.stats["cav_trained"] == 3 and third.stats["cav_cached"] == 6
    assert third.stats["scores_computed"] == 2  # the CAV set changed for both classes
    # a changed weight changes every key
    model2 = tiny_model()
    with torch.no_grad():
        model2.fc.bias[0] += 1.0
    fourth = pipeline(model2, sets_root, Cache(cache_dir))
    assert fourth.stats["cav_cached"] == 0 and fourth.stats["gradients_computed"] == 2


def test_pipeline_with_a_skip_input_and_usage_errors(sets_root, tmp_path):
    torch.manual_seed(0)
    model = SkipNet().eval()
    res = pipeline(model, sets_root, Cache(tmp_path / "c"), layers=("conv2",))
    assert len(res.table) == 4
    model = tiny_model()
    # features.9 is a BatchNorm followed by ReLU(inplace=True): measured before the ReLU
    res = pipeline(model, sets_root, Cache(tmp_path / "c"), layers=("features.9",))
    assert len(res.table) == 4 and res.table["score_mean"].between(0, 1).all()
    with pytest.raises(UsageError, match="random folders"):
        pipeline(model, sets_root, Cache(tmp_path / "c"), runs=4)
    with pytest.raises(UsageError, match="did you mean 'bright'"):
        T.folder_concept_sets(sets_root, ["brigth"], random_sets=2)
    with pytest.raises(UsageError, match="out of range"):
        sets = T.folder_concept_sets(sets_root, ["bright"], random_sets=3, preprocessing=PREP)
        T.run_tcav(model, ["features.6"], sets.concepts, sets.randoms, sets.concepts["bright"],
                   [(7, "seven")], model_fingerprint="m", preprocessing=PREP,
                   config=T.TCAVConfig(random_runs=2), filter_by_label=False,
                   cache=Cache(tmp_path / "c"))


def test_plot_is_written(tmp_path, sets_root):
    res = pipeline(tiny_model(), sets_root, Cache(tmp_path / "c"))
    T.plot_tcav(res.table, tmp_path / "tcav.png")
    with Image.open(tmp_path / "tcav.png") as im:
        assert im.format == "PNG" and im.width > 300


# ---------------------------------------------------------------------------------------------
# Broden concept sets
# ---------------------------------------------------------------------------------------------


def test_broden_concept_sets(broden_export, tmp_path):
    from cnnexplain.data.broden import BrodenDataset

    _, root = broden_export
    ds = BrodenDataset(root)
    cache = Cache(tmp_path / "cache")
    sets = T.broden_concept_sets(ds, ["grey-c", "plain"], random_sets=3, per_set=5,
                                 min_coverage=0.01, seed=0, cache=cache)
    numbers = {c: ds.labels.number(c) for c in ("grey-c", "plain")}
    positives = set()
    for name, subset in sets.concepts.items():
        assert 2 <= len(subset) <= 5
        for i in subset.indices:
            item = ds[int(i)]
            n = numbers[name]
            cov = float((item["masks"] == n).any(0).float().mean())
            assert (item["image_labels"] == n).any() or cov >= 0.01
            positives.add(int(i))
    assert [r for r, _ in sets.randoms] == ["random_0", "random_1", "random_2"]
    for _, subset in sets.randoms:
        assert len(subset) >= 2 and not positives & set(subset.indices.tolist())
    again = T.broden_concept_sets(ds, ["grey-c", "plain"], random_sets=3, per_set=5,
                                  min_coverage=0.01, seed=0, cache=cache)
    assert all(np.array_equal(a.indices, b.indices)
               for (_, a), (_, b) in zip(sets.randoms, again.randoms))
    assert sets.concepts["plain"].fingerprint() == again.concepts["plain"].fingerprint()
    item = sets.concepts["plain"][0]
    assert set(item) == {"image", "label", "index"}
    with pytest.raises(UsageError, match="did you mean"):
        T.broden_concept_sets(ds, ["stripped"], random_sets=3, cache=cache)


# ---------------------------------------------------------------------------------------------
# CLI errors: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,words", [
    (["--random-runs", "1"], ("--random-runs must be at least 2",)),
    (["--target", "strar"], ("unknown --target 'strar'", "star")),
    (["--target", "9"], ("out of range",)),
    (["--concept", "brigth"], ("brigth", "bright")),
    (["--broden", "x"], ("exactly one source",)),
    (["--step-units", "pct"], ("--step-units",)),
    (["--significance", "t-test"], ("--significance", "ttest")),
    (["--intervention-inputs", "every"], ("--intervention-inputs", "all")),
    (["--layer", "featurs.6"], ("featurs.6", "does not exist")),
    (["--concept-subsample", "0"], ("--concept-subsample must be in (0, 1]",)),
])
def test_cli_usage_errors_leave_nothing_behind(sets_root, tmp_path, extra, words):
    argv = ["tcav", "--backbone", "smallcnn", "--concepts", sets_root, "--dataset",
            "synthetic:n=6,res=16,classes=star+circle", "--split", "train",
            "--random-runs", "2", "--out", tmp_path / "out"]
    if "--target" not in extra:
        argv += ["--target", "star"]
    before = snapshot(tmp_path)
    r = run_inproc(*argv, *extra, env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(r, 2, *words)
    assert snapshot(tmp_path) == before


def test_cli_broden_bad_layer_writes_nothing(broden_export, tmp_path):
    """The Broden coverage scan is cached, so the layers are checked before it runs."""
    _, root = broden_export
    before = snapshot(tmp_path)
    r = run_inproc("tcav", "--backbone", "smallcnn", "--broden", root, "--concept", "plain",
                   "--dataset", "synthetic:n=6,res=32", "--split", "train", "--target", "star",
                   "--random-runs", "2", "--layer", "features.99", "--out", tmp_path / "out",
                   env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(r, 2, "features.99", "does not exist")
    assert snapshot(tmp_path) == before
    r = run_inproc("tcav", "--backbone", "smallcnn", "--broden", root, "--concept", "stripped",
                   "--dataset", "synthetic:n=6,res=32", "--split", "train", "--target", "star",
                   "--random-runs", "2", "--out", tmp_path / "out",
                   env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(r, 2, "unknown concept 'stripped'", "striped")
    assert snapshot(tmp_path) == before


def test_report_says_which_test_decided_and_which_inputs_i_plus_used():
    from cnnexplain.report.build import _tcav_note

    frame = pd.DataFrame({"significance": ["ttest", "ttest"],
                          "intervention_inputs": ["all", "all"]})
    note = _tcav_note(frame)
    assert "t-test (Kim et al. 2018)" in note and "every class-input image" in note
    note = _tcav_note(frame.assign(significance="calibrated", intervention_inputs="class"))
    assert "calibrated score test and CAV test" in note and "images only" in note
    assert _tcav_note(pd.DataFrame({"concept": ["x"]})) == ""  # an older table: no claim


def test_a_layer_that_feeds_only_pooling_and_the_head_is_said_to_mean_nothing(sets_root, tmp_path):
    """At SmallCNN's `features` (then global average pooling and a linear head) the class
    logit's gradient is w_c / (h w) for every input, so every CAV scores 0 or 1 for all inputs
    whatever the concept: the run says so; at an inner layer it does not."""
    argv = ["tcav", "--backbone", "smallcnn", "--concepts", sets_root, "--dataset",
            "synthetic:n=6,res=16,classes=star+circle", "--split", "train", "--target", "star",
            "--random-runs", "2"]
    env = {"CNNEXPLAIN_CACHE": str(tmp_path / "cache")}
    flat = run_inproc(*argv, "--layer", "features", "--out", tmp_path / "a", env=env)
    assert flat.code == 0, flat.err
    assert "same for every input" in flat.err and "earlier --layer" in flat.err
    runs = pd.read_csv(tmp_path / "a" / "tcav" / "runs.csv")
    assert (runs["gradient_spread"] < 1e-5).all()
    inner = run_inproc(*argv, "--layer", "features.6", "--out", tmp_path / "b", env=env)
    assert inner.code == 0, inner.err
    assert "same for every input" not in inner.err
    assert (pd.read_csv(tmp_path / "b" / "tcav" / "runs.csv")["gradient_spread"] > 1e-3).all()
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert T.gradient_spread(g[:1].expand(5, 7)) == 0.0 and T.gradient_spread(g) > 0.1
