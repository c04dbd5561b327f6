"""TCAV building blocks: directional derivatives against autograd, the CAV solver against
scikit-learn's exact optima and its sign convention, the scores, the t-test and Bonferroni
against scipy, reproducibility and caching of the pipeline, Broden concept sets, and the CLI's
one-line errors. (The known answer on a trained model is in test_tcav_known_answer.py.)"""

from __future__ import annotations

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

from cnnexplain.cache import Cache
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import SyntheticDataset, WorldConfig
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.explain import tcav as T
from cnnexplain.fingerprint import module_digest
from cnnexplain.metrics.stats import bonferroni, ttest_ind
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


def _train_rows(pos, neg, seed, config=T.CAVConfig()):
    """The training rows train_cav uses (same equal truncation and seeded split)."""
    m = min(len(pos), len(neg))
    ss = np.random.SeedSequence(seed).spawn(2)
    tr_p, _ = T.stratified_split(m, config.test_fraction, int(ss[0].generate_state(1)[0]))
    tr_n, _ = T.stratified_split(m, config.test_fraction, int(ss[1].generate_state(1)[0]))
    x = np.concatenate([pos[:m][tr_p], neg[:m][tr_n]]).astype(np.float64)
    y = np.r_[np.ones(len(tr_p)), -np.ones(len(tr_n))]
    return x, y


def test_hinge_cav_is_the_exact_optimum_of_the_svm_objective():
    """alpha/2 |w|^2 + mean hinge == LinearSVC with C = 1 / (n alpha) (sklearn as the oracle;
    its intercept is a constant feature too, so it is given the same scale s)."""
    from sklearn.svm import LinearSVC

    pos, neg, _ = blobs(n=50, d=30, shift=0.6, seed=3)  # overlapping: margin errors exist
    config = T.CAVConfig(tol=1e-7, max_iter=100000)
    cav = T.train_cav(pos, neg, config, seed=5)
    x, y = _train_rows(pos, neg, 5, config)
    s = float(np.sqrt((x ** 2).sum(1).mean()))
    svc = LinearSVC(C=1.0 / (len(y) * config.alpha), loss="hinge", dual=True, tol=1e-10,
                    max_iter=1_000_000, intercept_scaling=s).fit(x, y)
    w = svc.coef_[0] / np.linalg.norm(svc.coef_[0])
    assert float(w @ cav.vector) > 0.9999
    assert cav.intercept == pytest.approx(svc.intercept_[0] / np.linalg.norm(svc.coef_[0]),
                                          abs=2e-3)


def test_logistic_cav_is_the_exact_optimum():
    from sklearn.linear_model import LogisticRegression

    pos, neg, _ = blobs(n=50, d=30, shift=0.6, seed=4)
    config = T.CAVConfig(loss="logistic", tol=1e-8, max_iter=5000)
    cav = T.train_cav(pos, neg, config, seed=2)
    x, y = _train_rows(pos, neg, 2, config)
    lr = LogisticRegression(C=1.0 / (len(y) * config.alpha), tol=1e-10, max_iter=100000).fit(x, y)
    w = lr.coef_[0] / np.linalg.norm(lr.coef_[0])
    assert float(w @ cav.vector) > 0.9999


def test_cav_split_is_stratified_seeded_and_truncated():
    tr, te = T.stratified_split(30, 0.33, seed=1)
    assert len(te) == 10 and len(tr) == 20 and not set(tr) & set(te)
    again = T.stratified_split(30, 0.33, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((tr, te), again))
    assert not np.array_equal(te, T.stratified_split(30, 0.33, seed=2)[1])
    pos, neg, _ = blobs(n=40)
    cav = T.train_cav(pos, neg[:25], seed=0)  # equal-size truncation to 25 per side
    assert cav.n_train + cav.n_test == 25 and cav.n_test == 8
    with pytest.raises(CnnexplainError, match="at least 2 images"):
        T.train_cav(pos[:1], neg, seed=0)
    with pytest.raises(CnnexplainError, match="no direction"):
        T.train_cav(np.ones((6, 4)), np.ones((6, 4)), seed=0)
    with pytest.raises(UsageError, match="--cav-loss"):
        T.train_cav(pos, neg, T.CAVConfig(loss="svm"))


# ---------------------------------------------------------------------------------------------
# Statistics (scipy as the oracle)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("equal_var", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_ttest_matches_scipy(equal_var, seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, size=rng.integers(2, 12))
    b = rng.uniform(0, 1, size=rng.integers(2, 12)) + 0.2 * seed
    ours = ttest_ind(a, b, equal_var=equal_var)
    ref = scipy_stats.ttest_ind(a, b, equal_var=equal_var)
    assert ours.statistic == pytest.approx(float(ref.statistic), rel=1e-10)
    assert ours.pvalue == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-300)
    assert ours.df == pytest.approx(float(ref.df), rel=1e-10)


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_ttest_edge_cases():
    ref = scipy_stats.ttest_ind([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    ours = ttest_ind([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert ours.statistic == ref.statistic == np.inf and ours.pvalue == ref.pvalue == 0.0
    assert ttest_ind([0.0, 0.0], [1.0, 1.0]).statistic == -np.inf
    tied = ttest_ind([0.5, 0.5, 0.5], [0.5, 0.5])
    assert np.isnan(tied.statistic) and tied.pvalue == 1.0  # scipy: nan; here: no evidence
    assert ttest_ind([1.0, 1.0, 1.0], [0.0, 0.5, 1.0]).pvalue == pytest.approx(
        float(scipy_stats.ttest_ind([1.0, 1.0, 1.0], [0.0, 0.5, 1.0]).pvalue))
    with pytest.raises(UsageError, match="--random-runs"):
        ttest_ind([1.0], [0.0, 1.0])


def test_bonferroni():
    p = np.array([0.001, 0.02, 0.3, 0.9])
    np.testing.assert_allclose(bonferroni(p), [0.004, 0.08, 1.0, 1.0])
    np.testing.assert_allclose(bonferroni(p, n_tests=10), [0.01, 0.2, 1.0, 1.0])
    with pytest.raises(ValueError):
        bonferroni(p, n_tests=2)


def test_summary_statistics_and_correction():
    rows = []
    for layer in ("l1", "l2"):
        for run in range(1, 4):
            rows.append(dict(concept="c", negative=f"random_{run}", role="concept", run=run,
                             **{"class": "k"}, class_index=0, layer=layer,
                             sign_count=0.9 + 0.01 * run, magnitude=0.8, i_plus=0.7,
                             i_minus=0.6, sensitivity_mean=1.0, cav_accuracy=0.9,
                             cav_key="x", n_class_inputs=10))
            rows.append(dict(concept="random_0", negative=f"random_{run}", role="baseline",
                             run=run, **{"class": "k"}, class_index=0, layer=layer,
                             sign_count=[0.2, 0.6, 0.4][run - 1], magnitude=0.5, i_plus=0.5,
                             i_minus=0.5, sensitivity_mean=0.0, cav_accuracy=0.5, cav_key="y",
                             n_class_inputs=10))
    runs = pd.DataFrame(rows)
    config = T.TCAVConfig(random_runs=3)
    table = T.summarize(runs, ["c"], [(0, "k")], ["l1", "l2"], config)
    raw = scipy_stats.ttest_ind([0.91, 0.92, 0.93], [0.2, 0.6, 0.4]).pvalue
    assert list(table.columns) == T.TABLE_COLUMNS
    np.testing.assert_allclose(table["p_value_uncorrected"], [raw, raw])
    np.testing.assert_allclose(table["p_value"], [min(1.0, 2 * raw)] * 2)
    assert table["score_mean"].iloc[0] == pytest.approx(0.92)
    assert table["score_std"].iloc[0] == pytest.approx(np.std([0.91, 0.92, 0.93]))
    assert table["random_score_mean"].iloc[0] == pytest.approx(0.4)
    assert (table["n_tests"] == 2).all()
    off = T.summarize(runs, ["c"], [(0, "k")], ["l1", "l2"],
                      T.TCAVConfig(random_runs=3, bonferroni=False))
    np.testing.assert_allclose(off["p_value"], [raw, raw])
    assert (off["significant"] == (raw < 0.05)).all()
    with pytest.raises(UsageError, match="--random-runs must be at least 2"):
        T.TCAVConfig(random_runs=1).validate()


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


def pipeline(model, root: Path, cache: Cache, seed: int = 0, runs: int = 3, layers=("features.6",)):
    sets = T.folder_concept_sets(root, ["bright", "dark"], random_sets=runs + 1, preprocessing=PREP)
    inputs = SyntheticDataset(WorldConfig(num_images=12, resolution=16, classes=("star", "circle",
                                                                                   "square")),
                              "train", PREP)
    return T.run_tcav(model, list(layers), sets.concepts, sets.randoms, inputs,
                      [(0, "star"), (2, "square")], model_fingerprint=module_digest(model),
                      preprocessing=PREP, config=T.TCAVConfig(random_runs=runs, seed=seed),
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
    assert first.stats["cav_trained"] == 9 and first.stats["cav_cached"] == 0
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
    with pytest.raises(UsageError, match="modified in place"):
        # features.9 is a BatchNorm followed by ReLU(inplace=True)
        pipeline(model, sets_root, Cache(tmp_path / "c"), layers=("features.9",))
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
    (["--layer", "featurs.6"], ("featurs.6", "does not exist")),
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
                   "--random-runs", "2", "--layer", "features.9", "--out", tmp_path / "out",
                   env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(r, 2, "modified in place")
    assert snapshot(tmp_path) == before
    r = run_inproc("tcav", "--backbone", "smallcnn", "--broden", root, "--concept", "stripped",
                   "--dataset", "synthetic:n=6,res=32", "--split", "train", "--target", "star",
                   "--random-runs", "2", "--out", tmp_path / "out",
                   env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(r, 2, "unknown concept 'stripped'", "striped")
    assert snapshot(tmp_path) == before
